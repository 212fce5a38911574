//! The `lb` agent: turns Services and endpoints into BPF map entries, and the commands that
//! inspect the data path.

pub mod agent;
pub mod cli;
pub mod controller;
pub mod datapath;
pub mod desired;
pub mod health;
pub mod inspect;
pub mod interfaces;
pub mod kubernetes;
pub mod maglev;
pub mod manifest;
pub mod metrics;
pub mod object;
pub mod plan;
pub mod service_health;
pub mod socket_lb;
pub mod state;
pub mod sync;
pub mod testbed;
