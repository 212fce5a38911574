//! The map store over the kernel's maps (pinned under the agent's bpffs directory).

use std::path::Path;

use anyhow::Context;
use aya::maps::{
    lpm_trie::{Key, LpmTrie},
    Array, HashMap, Map, MapData, MapError as AyaMapError, PerCpuArray,
};
use aya::Pod;
use lb_common::{maps, BackendValue, Config, Counter, ServiceKey, ServiceValue, SourceRangeKey};

use super::{
    map_batch, mmap_array::MmapArray, per_cpu_batch, BatchError, MapError, MapStore, SourceRange,
};

pub struct AyaMaps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, u32, BackendValue>,
    maglev: MmapArray<u32>,
    filter: MmapArray<u64>,
    generations: MmapArray<u32>,
    node_addresses: HashMap<MapData, u32, u32>,
    config: Array<MapData, Config>,
    source_ranges: LpmTrie<MapData, SourceRangeKey, u8>,
    /// SVC_STATS and SVC_DROPS; not opened by the inspection commands.
    counters: Option<ServiceCounters>,
}

struct ServiceCounters {
    stats: PerCpuArray<MapData, Counter>,
    drops: PerCpuArray<MapData, u64>,
}

/// Reads one of our maps from its pin.
pub fn open_pin(dir: &Path, name: &str) -> anyhow::Result<Map> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path).with_context(|| format!("open {}", path.display()))?;
    Map::from_map_data(data).with_context(|| format!("map {name}"))
}

fn err(name: &'static str, e: AyaMapError) -> MapError {
    if let AyaMapError::SyscallError(s) = &e {
        // The kernel says E2BIG when a hash map has no room for another key.
        if matches!(
            s.io_error.raw_os_error(),
            Some(libc::E2BIG) | Some(libc::ENOSPC)
        ) {
            return MapError::Full(name);
        }
    }
    MapError::Other(format!("{name}: {e}"))
}

impl AyaMaps {
    /// Takes the maps of a freshly loaded object.
    pub fn from_ebpf(ebpf: &mut aya::Ebpf) -> anyhow::Result<Self> {
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .with_context(|| format!("map {name} missing"))
        };
        Ok(Self {
            services: take(maps::SERVICES)?.try_into()?,
            backends: take(maps::BACKENDS)?.try_into()?,
            maglev: MmapArray::new(take(maps::MAGLEV)?, maps::MAGLEV)?,
            filter: MmapArray::new(take(maps::FRONTEND_FILTER)?, maps::FRONTEND_FILTER)?,
            generations: MmapArray::new(
                take(maps::SERVICE_GENERATIONS)?,
                maps::SERVICE_GENERATIONS,
            )?,
            node_addresses: take(maps::NODE_ADDRESSES)?.try_into()?,
            config: take(maps::CONFIG)?.try_into()?,
            source_ranges: take(maps::SOURCE_RANGES)?.try_into()?,
            counters: Some(ServiceCounters {
                stats: take(maps::SERVICE_STATS)?.try_into()?,
                drops: take(maps::SERVICE_DROPS)?.try_into()?,
            }),
        })
    }

    /// Opens the pinned maps of a running (or stopped) agent.
    pub fn open_pinned(dir: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            services: open_pin(dir, maps::SERVICES)?.try_into()?,
            backends: open_pin(dir, maps::BACKENDS)?.try_into()?,
            maglev: MmapArray::new(open_pin(dir, maps::MAGLEV)?, maps::MAGLEV)?,
            filter: MmapArray::new(open_pin(dir, maps::FRONTEND_FILTER)?, maps::FRONTEND_FILTER)?,
            generations: MmapArray::new(
                open_pin(dir, maps::SERVICE_GENERATIONS)?,
                maps::SERVICE_GENERATIONS,
            )?,
            node_addresses: open_pin(dir, maps::NODE_ADDRESSES)?.try_into()?,
            config: open_pin(dir, maps::CONFIG)?.try_into()?,
            source_ranges: open_pin(dir, maps::SOURCE_RANGES)?.try_into()?,
            counters: None,
        })
    }
}

/// Entries per batch syscall. They are copied into the kernel's layout a batch at a time,
/// so that a call failing at its first entry (every call, once a map is full) copies a
/// batch, not all that remains.
const BATCH: usize = 1024;

/// Writes `entries` in batches. An entry the kernel refuses is written once more on its
/// own, so that its error reads as a single update's (a full map among them); where the
/// kernel has no batch updates, the rest go one by one.
fn put_batched<K: Pod, V: Pod>(
    map: &mut HashMap<MapData, K, V>,
    name: &'static str,
    entries: &[(K, V)],
) -> Result<(), BatchError> {
    let mut start = 0;
    while start < entries.len() {
        let batch = &entries[start..entries.len().min(start + BATCH)];
        let Err(stopped) = map_batch::update(map, batch) else {
            start += batch.len();
            continue;
        };
        let failed = start + stopped.written;
        let alone = if stopped.unsupported() {
            &entries[failed..]
        } else {
            &entries[failed..=failed]
        };
        for (i, (k, v)) in alone.iter().enumerate() {
            map.insert(k, v, 0).map_err(|e| BatchError {
                index: failed + i,
                error: err(name, e),
            })?;
        }
        start = failed + alone.len();
    }
    Ok(())
}

fn trie_key(r: &SourceRange) -> Key<SourceRangeKey> {
    Key::new(
        SourceRangeKey::prefix_len(r.prefix_len),
        SourceRangeKey {
            service_id: r.service_id,
            addr: r.addr,
        },
    )
}

impl MapStore for AyaMaps {
    fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, MapError> {
        self.services
            .iter()
            .collect::<Result<_, _>>()
            .map_err(|e| err(maps::SERVICES, e))
    }
    fn backends(&self) -> Result<Vec<(u32, BackendValue)>, MapError> {
        self.backends
            .iter()
            .collect::<Result<_, _>>()
            .map_err(|e| err(maps::BACKENDS, e))
    }
    fn node_addresses(&self) -> Result<Vec<u32>, MapError> {
        self.node_addresses
            .keys()
            .collect::<Result<_, _>>()
            .map_err(|e| err(maps::NODE_ADDRESSES, e))
    }
    fn maglev(&self, offset: u32, len: u32) -> Result<Vec<u32>, MapError> {
        self.maglev.read(offset, len)
    }
    fn config(&self) -> Result<Option<Config>, MapError> {
        let c = self.config.get(&0, 0).map_err(|e| err(maps::CONFIG, e))?;
        Ok((c.layout_version != 0).then_some(c))
    }
    fn source_ranges(&self) -> Result<Vec<SourceRange>, MapError> {
        self.source_ranges
            .keys()
            .map(|k| {
                let k = k.map_err(|e| err(maps::SOURCE_RANGES, e))?;
                let data = k.data();
                Ok(SourceRange {
                    service_id: data.service_id,
                    addr: data.addr,
                    prefix_len: k.prefix_len().saturating_sub(32) as u8,
                })
            })
            .collect()
    }
    fn put_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), MapError> {
        self.services
            .insert(key, value, 0)
            .map_err(|e| err(maps::SERVICES, e))
    }
    fn put_services(&mut self, entries: &[(ServiceKey, ServiceValue)]) -> Result<(), BatchError> {
        put_batched(&mut self.services, maps::SERVICES, entries)
    }
    fn delete_service(&mut self, key: &ServiceKey) -> Result<(), MapError> {
        match self.services.remove(key) {
            Ok(()) | Err(AyaMapError::KeyNotFound) => Ok(()),
            Err(e) => Err(err(maps::SERVICES, e)),
        }
    }
    fn put_backend(&mut self, id: u32, value: BackendValue) -> Result<(), MapError> {
        self.backends
            .insert(id, value, 0)
            .map_err(|e| err(maps::BACKENDS, e))
    }
    fn put_backends(&mut self, entries: &[(u32, BackendValue)]) -> Result<(), BatchError> {
        put_batched(&mut self.backends, maps::BACKENDS, entries)
    }
    fn delete_backend(&mut self, id: u32) -> Result<(), MapError> {
        match self.backends.remove(&id) {
            Ok(()) | Err(AyaMapError::KeyNotFound) => Ok(()),
            Err(e) => Err(err(maps::BACKENDS, e)),
        }
    }
    fn write_maglev(&mut self, offset: u32, ids: &[u32]) -> Result<(), MapError> {
        self.maglev.write(offset, ids)
    }
    fn write_filter(&mut self, index: u32, words: &[u64]) -> Result<(), MapError> {
        self.filter.write(index, words)
    }
    fn next_generation(&mut self, id: u32) -> Result<(), MapError> {
        let [g] = self.generations.read(id, 1)?[..] else {
            unreachable!("one element read")
        };
        self.generations.write(id, &[g.wrapping_add(1)])
    }
    fn put_node_address(&mut self, addr: u32) -> Result<(), MapError> {
        self.node_addresses
            .insert(addr, 1, 0)
            .map_err(|e| err(maps::NODE_ADDRESSES, e))
    }
    fn delete_node_address(&mut self, addr: u32) -> Result<(), MapError> {
        match self.node_addresses.remove(&addr) {
            Ok(()) | Err(AyaMapError::KeyNotFound) => Ok(()),
            Err(e) => Err(err(maps::NODE_ADDRESSES, e)),
        }
    }
    fn put_config(&mut self, config: Config) -> Result<(), MapError> {
        self.config
            .set(0, config, 0)
            .map_err(|e| err(maps::CONFIG, e))
    }
    fn put_source_range(&mut self, range: SourceRange) -> Result<(), MapError> {
        self.source_ranges
            .insert(&trie_key(&range), 1, 0)
            .map_err(|e| err(maps::SOURCE_RANGES, e))
    }
    fn delete_source_range(&mut self, range: &SourceRange) -> Result<(), MapError> {
        match self.source_ranges.remove(&trie_key(range)) {
            Ok(()) | Err(AyaMapError::KeyNotFound) => Ok(()),
            Err(e) => Err(err(maps::SOURCE_RANGES, e)),
        }
    }
    fn reset_service_counters(&mut self, ids: &[u32]) -> Result<(), MapError> {
        let Some(c) = &mut self.counters else {
            return Err(MapError::Other("service counters not opened".into()));
        };
        per_cpu_batch::zero(&mut c.stats, ids)
            .map_err(|e| MapError::Other(format!("{}: {e}", maps::SERVICE_STATS)))?;
        per_cpu_batch::zero(&mut c.drops, ids)
            .map_err(|e| MapError::Other(format!("{}: {e}", maps::SERVICE_DROPS)))
    }
}
