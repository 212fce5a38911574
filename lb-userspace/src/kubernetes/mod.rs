//! The Kubernetes API source: Services, EndpointSlices and this node, listed and watched.

pub mod client;
pub mod source;
pub mod store;
pub mod watch;

pub use source::KubeSource;
pub use store::{Changes, KubeStore, NodeInfo, Update};
