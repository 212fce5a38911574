//! Data path metrics, read when Prometheus scrapes: how full each map is, and packets,
//! bytes and drops per Kubernetes service port from the programs' per-CPU counters.
//!
//! The maps the agent writes are counted from the syncer's own record of them, published
//! after every sync. The maps the programs fill (conntrack and the other LRU maps) are
//! counted by walking their keys, one syscall per key; a walk is reused for
//! [`WALK_INTERVAL`], so frequent scrapes stay cheap.

use std::{
    collections::BTreeMap,
    fmt,
    path::Path,
    sync::Mutex,
    time::{Duration, Instant},
};

use aya::{
    maps::{HashMap, MapData, PerCpuArray},
    Pod,
};
use lb_common::{
    capacity, maps, proto, AffinityKey, AffinityValue, Counter, CtKey, CtValue, FragKey, FragValue,
    SnatValue, SockRevKey, SockRevValue,
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
};

use crate::{desired::ServicePortId, sync::open_pin};

/// A walk of the programs' maps is reused for this long.
pub const WALK_INTERVAL: Duration = Duration::from_secs(5);

/// Maps the agent writes; their entries come from the syncer.
pub const AGENT_MAPS: [&str; 5] = [
    maps::SERVICES,
    maps::BACKENDS,
    maps::MAGLEV,
    maps::NODE_ADDRESSES,
    maps::SOURCE_RANGES,
];

/// Maps the programs fill; their entries are counted by walking their keys.
pub const KERNEL_MAPS: [&str; 6] = [
    maps::CONNTRACK,
    maps::FRAGMENTS,
    maps::AFFINITY,
    maps::SOCK_REVNAT,
    maps::SNAT,
    maps::NEIGH_PENDING,
];

/// The capacity of a map with a fill level.
pub fn capacity_of(map: &str) -> Option<u32> {
    Some(match map {
        maps::SERVICES => capacity::SERVICES,
        maps::BACKENDS => capacity::BACKENDS,
        maps::MAGLEV => capacity::MAGLEV,
        maps::NODE_ADDRESSES => capacity::NODE_ADDRESSES,
        maps::SOURCE_RANGES => capacity::SOURCE_RANGES,
        maps::CONNTRACK => capacity::CONNTRACK,
        maps::FRAGMENTS => capacity::FRAGMENTS,
        maps::AFFINITY => capacity::AFFINITY,
        maps::SOCK_REVNAT => capacity::SOCK_REVNAT,
        maps::SNAT => capacity::SNAT,
        maps::NEIGH_PENDING => capacity::NEIGH_PENDING,
        _ => return None,
    })
}

/// One service id's counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceCounts {
    pub packets: u64,
    pub bytes: u64,
    pub drops: u64,
}

impl ServiceCounts {
    fn add(self, o: Self) -> Self {
        Self {
            packets: self.packets + o.packets,
            bytes: self.bytes + o.bytes,
            drops: self.drops + o.drops,
        }
    }

    /// Some counter is lower than in `before`: the id's counters were zeroed since.
    fn went_down_from(&self, before: &Self) -> bool {
        self.packets < before.packets || self.bytes < before.bytes || self.drops < before.drops
    }
}

/// What a scrape reads from the data path.
pub trait CounterSource: Send + Sync + 'static {
    /// The counters of one service id.
    fn service(&self, id: u32) -> anyhow::Result<ServiceCounts>;
    /// Entries in use in one of [`KERNEL_MAPS`].
    fn entries(&self, map: &'static str) -> anyhow::Result<u64>;
}

/// The pinned maps of a running data path.
pub struct PinnedCounters {
    stats: PerCpuArray<MapData, Counter>,
    drops: PerCpuArray<MapData, u64>,
    conntrack: HashMap<MapData, CtKey, CtValue>,
    fragments: HashMap<MapData, FragKey, FragValue>,
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    sock_revnat: HashMap<MapData, SockRevKey, SockRevValue>,
    snat: HashMap<MapData, CtKey, SnatValue>,
    neigh_pending: HashMap<MapData, FragKey, u32>,
}

impl PinnedCounters {
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            stats: open_pin(dir, maps::SERVICE_STATS)?.try_into()?,
            drops: open_pin(dir, maps::SERVICE_DROPS)?.try_into()?,
            conntrack: open_pin(dir, maps::CONNTRACK)?.try_into()?,
            fragments: open_pin(dir, maps::FRAGMENTS)?.try_into()?,
            affinity: open_pin(dir, maps::AFFINITY)?.try_into()?,
            sock_revnat: open_pin(dir, maps::SOCK_REVNAT)?.try_into()?,
            snat: open_pin(dir, maps::SNAT)?.try_into()?,
            neigh_pending: open_pin(dir, maps::NEIGH_PENDING)?.try_into()?,
        })
    }
}

/// Keys of a hash map, one `get_next_key` each. While the programs add and evict entries
/// the kernel may restart the walk, so the count is approximate and never taken beyond the
/// capacity.
fn count_keys<K: Pod, V: Pod>(map: &HashMap<MapData, K, V>, cap: u32) -> anyhow::Result<u64> {
    let mut n = 0;
    for k in map.keys().take(cap as usize) {
        k?;
        n += 1;
    }
    Ok(n)
}

impl CounterSource for PinnedCounters {
    fn service(&self, id: u32) -> anyhow::Result<ServiceCounts> {
        let stats = self.stats.get(&id, 0)?;
        let drops = self.drops.get(&id, 0)?;
        Ok(ServiceCounts {
            packets: stats.iter().map(|c| c.packets).sum(),
            bytes: stats.iter().map(|c| c.bytes).sum(),
            drops: drops.iter().sum(),
        })
    }

    fn entries(&self, map: &'static str) -> anyhow::Result<u64> {
        let cap = capacity_of(map).unwrap_or(0);
        match map {
            maps::CONNTRACK => count_keys(&self.conntrack, cap),
            maps::FRAGMENTS => count_keys(&self.fragments, cap),
            maps::AFFINITY => count_keys(&self.affinity, cap),
            maps::SOCK_REVNAT => count_keys(&self.sock_revnat, cap),
            maps::SNAT => count_keys(&self.snat, cap),
            maps::NEIGH_PENDING => count_keys(&self.neigh_pending, cap),
            _ => anyhow::bail!("{map} is not walked"),
        }
    }
}

/// The labels of a service port's counters: `port` is the Service port's name (empty for
/// the one unnamed port a Service may have), as the port is identified everywhere else.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct ServiceLabels {
    pub namespace: String,
    pub name: String,
    pub port: String,
    pub protocol: String,
}

impl From<&ServicePortId> for ServiceLabels {
    fn from(id: &ServicePortId) -> Self {
        Self {
            namespace: id.namespace.clone(),
            name: id.name.clone(),
            port: id.port_name.clone(),
            protocol: match id.protocol {
                proto::TCP => "TCP",
                proto::UDP => "UDP",
                _ => "?",
            }
            .into(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabel {
    map: String,
}

/// What the last sync left: service ids and the fill of the agent's maps.
#[derive(Default)]
struct Published {
    services: BTreeMap<u32, ServiceLabels>,
    agent_maps: BTreeMap<&'static str, u64>,
}

/// What a service port's counters showed, so that they never go down.
#[derive(Clone, Copy, Default)]
struct Exported {
    /// The service id at the last scrape.
    id: u32,
    /// The id's counters at the last scrape.
    last: ServiceCounts,
    /// Counts of ids the service port had before (or of its id before it was zeroed).
    carried: ServiceCounts,
}

/// A scrape-time collector of the data path's fill levels and per-service counters.
pub struct DatapathMetrics {
    source: Box<dyn CounterSource>,
    walk_interval: Duration,
    published: Mutex<Published>,
    walked: Mutex<Option<(Instant, BTreeMap<&'static str, u64>)>>,
    exported: Mutex<BTreeMap<ServiceLabels, Exported>>,
}

impl fmt::Debug for DatapathMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatapathMetrics").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl DatapathMetrics {
    pub fn new(source: impl CounterSource) -> Self {
        Self::with_walk_interval(source, WALK_INTERVAL)
    }

    pub fn with_walk_interval(source: impl CounterSource, walk_interval: Duration) -> Self {
        Self {
            source: Box::new(source),
            walk_interval,
            published: Mutex::default(),
            walked: Mutex::default(),
            exported: Mutex::default(),
        }
    }

    /// After a sync: which service port each id counts for, and the entries of the maps the
    /// agent writes (see `Syncer::fill_levels`).
    pub fn publish<'a>(
        &self,
        service_ids: impl IntoIterator<Item = (&'a ServicePortId, &'a u32)>,
        agent_maps: impl IntoIterator<Item = (&'static str, u64)>,
    ) {
        let services = service_ids
            .into_iter()
            .map(|(port, id)| (*id, ServiceLabels::from(port)))
            .collect();
        let mut p = lock(&self.published);
        p.services = services;
        p.agent_maps = agent_maps.into_iter().collect();
    }

    /// After a sync of some service ports: the ids that went away and those handed out,
    /// applied to what was published before.
    pub fn publish_changes(
        &self,
        released: &[u32],
        assigned: &[(u32, ServicePortId)],
        agent_maps: impl IntoIterator<Item = (&'static str, u64)>,
    ) {
        let mut p = lock(&self.published);
        for id in released {
            p.services.remove(id);
        }
        for (id, port) in assigned {
            p.services.insert(*id, ServiceLabels::from(port));
        }
        p.agent_maps = agent_maps.into_iter().collect();
    }

    /// Only the fill of the agent's maps (Maglev ranges leave their grace period between
    /// syncs).
    pub fn publish_fill(&self, agent_maps: impl IntoIterator<Item = (&'static str, u64)>) {
        lock(&self.published).agent_maps = agent_maps.into_iter().collect();
    }

    /// Entries of the programs' maps, walked at most once per interval. A map that cannot
    /// be walked is left out.
    fn kernel_entries(&self) -> BTreeMap<&'static str, u64> {
        let mut walked = lock(&self.walked);
        if let Some((at, entries)) = &*walked {
            if at.elapsed() < self.walk_interval {
                return entries.clone();
            }
        }
        let mut entries = BTreeMap::new();
        for map in KERNEL_MAPS {
            match self.source.entries(map) {
                Ok(n) => {
                    entries.insert(map, n);
                }
                Err(e) => tracing::debug!(map, error = %e, "cannot count entries"),
            }
        }
        *walked = Some((Instant::now(), entries.clone()));
        entries
    }

    /// (map, entries, capacity) of every map with a capacity that could be counted.
    pub fn fill_levels(&self) -> Vec<(&'static str, u64, u32)> {
        let mut all = lock(&self.published).agent_maps.clone();
        all.extend(self.kernel_entries());
        all.into_iter()
            .filter_map(|(map, n)| Some((map, n, capacity_of(map)?)))
            .collect()
    }

    /// Every service port's counters as exported: summed over its frontends (they share
    /// its id), and never lower than at an earlier scrape while the service port exists.
    pub fn service_counts(&self) -> Vec<(ServiceLabels, ServiceCounts)> {
        let services = lock(&self.published).services.clone();
        let mut exported = lock(&self.exported);
        let mut out = Vec::with_capacity(services.len());
        let mut seen = BTreeMap::new();
        for (id, labels) in services {
            let now = match self.source.service(id) {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(id, error = %e, "cannot read service counters");
                    if let Some(e) = exported.get(&labels) {
                        seen.insert(labels.clone(), *e);
                        out.push((labels, e.carried.add(e.last)));
                    }
                    continue;
                }
            };
            let mut e = exported.get(&labels).copied().unwrap_or(Exported {
                id,
                ..Default::default()
            });
            // The service port got another id, or its id was zeroed (it was deleted and
            // created again between scrapes): keep what it had counted.
            if e.id != id || now.went_down_from(&e.last) {
                e.carried = e.carried.add(e.last);
            }
            e.id = id;
            e.last = now;
            seen.insert(labels.clone(), e);
            out.push((labels, e.carried.add(now)));
        }
        // Service ports that are gone are forgotten; one created again later starts anew.
        *exported = seen;
        out
    }
}

/// One of a service port's counts.
type CountOf = fn(&ServiceCounts) -> u64;

impl Collector for DatapathMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let levels = self.fill_levels();
        let label = |map: &str| MapLabel {
            map: map.to_string(),
        };
        let mut m = encoder.encode_descriptor(
            "map_entries",
            "Entries in use in a BPF map.",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        for (map, n, _) in &levels {
            ConstGauge::new(*n as i64).encode(m.encode_family(&label(map))?)?;
        }
        let mut m = encoder.encode_descriptor(
            "map_capacity",
            "Entries a BPF map can hold.",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        for (map, _, cap) in &levels {
            ConstGauge::new(i64::from(*cap)).encode(m.encode_family(&label(map))?)?;
        }
        let mut m = encoder.encode_descriptor(
            "map_pressure",
            "Entries in use divided by the capacity of a BPF map.",
            None,
            ConstGauge::new(0f64).metric_type(),
        )?;
        for (map, n, cap) in &levels {
            let pressure = *n as f64 / f64::from((*cap).max(1));
            ConstGauge::new(pressure).encode(m.encode_family(&label(map))?)?;
        }
        let services = self.service_counts();
        let counters: [(&str, &str, CountOf); 3] = [
            (
                "service_packets",
                "Packets of a service port the data path handled, over its frontends and both directions.",
                |c| c.packets,
            ),
            (
                "service_bytes",
                "Bytes of a service port the data path handled, over its frontends and both directions.",
                |c| c.bytes,
            ),
            (
                "service_drops",
                "Packets of a service port the data path dropped.",
                |c| c.drops,
            ),
        ];
        for (name, help, value) in counters {
            let c = ConstCounter::new(0u64);
            let mut m = encoder.encode_descriptor(name, help, None, c.metric_type())?;
            for (labels, counts) in &services {
                ConstCounter::new(value(counts)).encode(m.encode_family(labels)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
