//! Writes the desired maps into the data path with the fewest changes, in an order in
//! which no packet sees a half-written state: backends first, then a fresh Maglev range,
//! then the service entry that points at it (one atomic update); deletions in reverse, and
//! an old Maglev range is reused only after a grace period, since programs that read the
//! old entry may still be using it.

mod aya_maps;
mod frontend_filter;
mod id_pool;
mod maglev_alloc;
mod map_batch;
mod memory;
mod mmap_array;
mod per_cpu_batch;
mod syncer;

pub use aya_maps::{open_pin, AyaMaps};
pub use memory::MemoryMaps;
pub use syncer::{SyncReport, Syncer};

use lb_common::{BackendValue, Config, ServiceKey, ServiceValue};

/// A failed map operation. A full map is told apart: it is a capacity problem the operator
/// must see, not a bug.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    #[error("map {0} is full")]
    Full(&'static str),
    #[error("{0}")]
    Other(String),
}

/// Entries written in order up to `index`, where `error` stopped the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchError {
    pub index: usize,
    pub error: MapError,
}

/// One loadBalancerSourceRanges CIDR of one service port, as SOURCE_RANGES holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct SourceRange {
    pub service_id: u32,
    /// Network address, as on the wire.
    pub addr: u32,
    pub prefix_len: u8,
}

/// The maps sync reads and writes; an aya implementation over the pinned maps and an
/// in-memory one for tests.
pub trait MapStore {
    fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, MapError>;
    fn backends(&self) -> Result<Vec<(u32, BackendValue)>, MapError>;
    fn node_addresses(&self) -> Result<Vec<u32>, MapError>;
    fn maglev(&self, offset: u32, len: u32) -> Result<Vec<u32>, MapError>;
    fn config(&self) -> Result<Option<Config>, MapError>;
    fn source_ranges(&self) -> Result<Vec<SourceRange>, MapError>;

    fn put_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), MapError>;
    /// Writes `entries` in order as `put_service` would one by one, stopping at the first
    /// that fails: none after it is written. The kernel's maps take many in one syscall.
    fn put_services(&mut self, entries: &[(ServiceKey, ServiceValue)]) -> Result<(), BatchError> {
        for (index, (key, value)) in entries.iter().enumerate() {
            self.put_service(*key, *value)
                .map_err(|error| BatchError { index, error })?;
        }
        Ok(())
    }
    fn delete_service(&mut self, key: &ServiceKey) -> Result<(), MapError>;
    fn put_backend(&mut self, id: u32, value: BackendValue) -> Result<(), MapError>;
    /// As `put_services`, for backends.
    fn put_backends(&mut self, entries: &[(u32, BackendValue)]) -> Result<(), BatchError> {
        for (index, (id, value)) in entries.iter().enumerate() {
            self.put_backend(*id, *value)
                .map_err(|error| BatchError { index, error })?;
        }
        Ok(())
    }
    fn delete_backend(&mut self, id: u32) -> Result<(), MapError>;
    fn write_maglev(&mut self, offset: u32, ids: &[u32]) -> Result<(), MapError>;
    /// Writes FRONT_FILTER words from `index` on (see lb-common's `filter`).
    fn write_filter(&mut self, index: u32, words: &[u64]) -> Result<(), MapError>;
    /// Moves service id `id` to its next generation: conntrack entries made under the
    /// previous one are confirmed against their frontend again.
    fn next_generation(&mut self, id: u32) -> Result<(), MapError>;
    fn put_node_address(&mut self, addr: u32) -> Result<(), MapError>;
    fn delete_node_address(&mut self, addr: u32) -> Result<(), MapError>;
    fn put_config(&mut self, config: Config) -> Result<(), MapError>;
    fn put_source_range(&mut self, range: SourceRange) -> Result<(), MapError>;
    fn delete_source_range(&mut self, range: &SourceRange) -> Result<(), MapError>;
    /// Zeroes the packet, byte and drop counters of service ids before they are handed to
    /// service ports, so that a reused id does not start with its previous owner's counts.
    fn reset_service_counters(&mut self, ids: &[u32]) -> Result<(), MapError>;
}
