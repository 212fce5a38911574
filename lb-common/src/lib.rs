//! Types shared by the in-kernel programs and the agent: map names, capacities, the
//! layout of every key and value, flag bits, verdicts and drop reasons.
//!
//! Conventions that both sides rely on:
//! - IPv4 addresses and ports are stored exactly as they appear on the wire (network byte
//!   order held in a native integer), so the data path compares them without conversion.
//!   Use [`addr`] and [`port`] to convert on the userspace side.
//! - Every struct is `#[repr(C)]` with explicit padding that constructors zero, so the
//!   bytes the kernel hashes are fully defined.
#![no_std]

pub mod addr;
pub mod capacity;
pub mod filter;
pub mod maps;
pub mod stats;
pub mod types;

pub use types::*;

/// Version of the pinned map layout. Bump whenever a key, value or capacity of an existing
/// map changes; an agent that finds another version replaces the maps (losing conntrack
/// state) instead of misreading them. A map that is added needs no bump: its pin is created
/// beside the others, so an upgrade keeps established connections.
pub const LAYOUT_VERSION: u32 = 4;
