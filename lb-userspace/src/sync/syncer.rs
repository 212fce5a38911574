//! The reconciler: ids, Maglev ranges and the difference between desired and programmed
//! maps, kept per service port. Each service port remembers what it was last given and
//! which entries it wants, so an unchanged one costs a comparison and a change writes only
//! the entries of the service ports it touches.
//!
//! An apply runs in two phases: first the touched service ports write their backends (all
//! of them, in batches), then each its tables and source ranges, then their frontends (in
//! batches); then what they no longer want is deleted (frontends before the ranges, tables
//! and backends they name). A service port's id is handed out again only after its
//! entries are gone.

mod batched;
mod frontends;
mod port;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    time::Instant,
};

use lb_common::{
    addr, capacity, maps, scope, service_flags, BackendValue, Config, ServiceKey, ServiceValue,
};

use super::{
    frontend_filter::FrontendFilter, id_pool::IdPool, maglev_alloc::RangeAllocator, MapError,
    MapStore, SourceRange,
};
use crate::desired::{DesiredMaps, DesiredService, ServicePortId};
use batched::{FrontendWrites, Owner, Touched};
use frontends::key_slots;
use port::Port;

/// What one apply did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncReport {
    pub writes: usize,
    pub deletes: usize,
    pub errors: Vec<String>,
    /// Errors caused by a full map (also in `errors`).
    pub map_full: usize,
    /// Maglev tables that were rebuilt because their backend set changed.
    pub tables_written: usize,
    /// Service ids given to service ports by this apply.
    pub ids_assigned: Vec<(u32, ServicePortId)>,
    /// Service ids whose service ports went away (their entries with them).
    pub ids_released: Vec<u32>,
}

impl SyncReport {
    fn fail(&mut self, what: &str, e: MapError) {
        if matches!(e, MapError::Full(_)) {
            self.map_full += 1;
        }
        self.errors.push(format!("{what}: {e}"));
    }
}

/// A Maglev range as written.
#[derive(Debug, Clone)]
struct Range {
    len: u32,
    table: Vec<u32>,
    /// Frontend entries and service ports' frontend values that name it; at zero it is
    /// freed (reused after a grace period).
    users: u32,
    /// Unique per write: a service port's memory of a range is valid only while it matches.
    serial: u64,
}

/// Backend identity within a service port: (service id, address, port, protocol).
type BackendKey = (u32, u32, u16, u8);

/// What the second phase of an apply deletes or settles.
#[derive(Default)]
struct Pending {
    /// Frontend keys a service port gave up: deleted, or handed to another claimant.
    keys: Vec<ServiceKey>,
    backends: Vec<u32>,
    source_ranges: Vec<SourceRange>,
    /// Ids of removed service ports, reusable once their entries are gone.
    service_ids: Vec<u32>,
}

pub struct Syncer<S: MapStore> {
    store: S,
    // What the maps hold, as written or recovered.
    services: BTreeMap<ServiceKey, ServiceValue>,
    backends: BTreeMap<u32, BackendValue>,
    node_addresses: BTreeSet<u32>,
    source_ranges: BTreeSet<SourceRange>,
    ranges: BTreeMap<u32, Range>,
    /// Ranges that may have lost their last user.
    unused_ranges: Vec<u32>,
    alloc: RangeAllocator,
    next_serial: u64,
    backend_ids: BTreeMap<BackendKey, u32>,
    /// The ids `backend_ids` does not hold.
    free_backend_ids: IdPool,
    // What the service ports want.
    service_ids: BTreeMap<ServicePortId, u32>,
    free_service_ids: IdPool,
    /// Service ports by id.
    ports: BTreeMap<u32, Port>,
    /// The service ports that want each frontend key; the greatest service port wins.
    claims: BTreeMap<ServiceKey, Vec<u32>>,
    /// ClusterIPs (wire order) whose address marker is wanted.
    markers: BTreeSet<u32>,
    /// Service ports whose last apply did not complete: tried again on the next one.
    failed: BTreeSet<ServicePortId>,
    /// Markers whose write failed, likewise.
    failed_markers: BTreeSet<Ipv4Addr>,
    /// The maps may hold entries no service port wants (recovered ones, failed deletions):
    /// the next full apply looks for them.
    unowned: bool,
    /// FRONT_FILTER, following `services` and `node_addresses`.
    filter: FrontendFilter,
    /// The first apply writes the filter whole: the map may be new (zero, which filters
    /// nothing) or an earlier agent's; later ones write the words they change.
    filter_written: bool,
}

impl<S: MapStore> Syncer<S> {
    /// Takes over whatever the maps hold, so that a restarted agent keeps ids and tables and
    /// rewrites nothing that is already right. `config` replaces the CONFIG entry when it
    /// differs.
    pub fn recover(mut store: S, config: Config) -> anyhow::Result<Self> {
        let services: BTreeMap<_, _> = store.services()?.into_iter().collect();
        let backends: BTreeMap<_, _> = store.backends()?.into_iter().collect();
        let node_addresses: BTreeSet<u32> = store.node_addresses()?.into_iter().collect();
        let source_ranges: BTreeSet<_> = store.source_ranges()?.into_iter().collect();
        let mut ranges: BTreeMap<u32, Range> = BTreeMap::new();
        let mut next_serial = 0;
        for v in services.values().filter(|v| v.maglev_len > 0) {
            if let Some(r) = ranges.get_mut(&v.maglev_offset) {
                r.users += 1;
                continue;
            }
            let table = store.maglev(v.maglev_offset, v.maglev_len)?;
            next_serial += 1;
            ranges.insert(
                v.maglev_offset,
                Range {
                    len: v.maglev_len,
                    table,
                    users: 1,
                    serial: next_serial,
                },
            );
        }
        let backend_ids: BTreeMap<BackendKey, u32> = backends
            .iter()
            .map(|(id, b)| ((b.service_id, b.addr, b.port, b.proto), *id))
            .collect();
        let mut free_backend_ids = IdPool::new(1, capacity::BACKENDS);
        for id in backend_ids.values() {
            free_backend_ids.take(*id);
        }
        let used = ranges.iter().map(|(o, r)| (*o, r.len)).collect();
        if store.config()? != Some(config) {
            store.put_config(config)?;
        }
        let unowned = !services.is_empty() || !backends.is_empty() || !source_ranges.is_empty();
        let filter =
            FrontendFilter::new(services.keys().flat_map(|k| key_slots(k, &node_addresses)));
        Ok(Self {
            store,
            services,
            backends,
            node_addresses,
            source_ranges,
            ranges,
            unused_ranges: Vec::new(),
            alloc: RangeAllocator::new(capacity::MAGLEV, used),
            next_serial,
            backend_ids,
            free_backend_ids,
            service_ids: BTreeMap::new(),
            free_service_ids: IdPool::new(1, capacity::SERVICE_STATS),
            ports: BTreeMap::new(),
            claims: BTreeMap::new(),
            markers: BTreeSet::new(),
            failed: BTreeSet::new(),
            failed_markers: BTreeSet::new(),
            unowned,
            filter,
            filter_written: false,
        })
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    /// Frees Maglev ranges whose grace period has passed.
    pub fn tick(&mut self) {
        self.alloc.reclaim(Instant::now());
    }

    pub fn service_count(&self) -> usize {
        self.service_ids.len()
    }

    /// The id of every service port, as the data path's per-service counters are indexed.
    pub fn service_ids(&self) -> &BTreeMap<ServicePortId, u32> {
        &self.service_ids
    }

    /// Entries in use in the maps this syncer writes, from its own record of them (no map
    /// reads): frontends (ClusterIP markers included), backends, Maglev slots (tables in
    /// use and those still in their grace period), node addresses and source ranges.
    pub fn fill_levels(&self) -> [(&'static str, u64); 5] {
        [
            (maps::SERVICES, self.services.len() as u64),
            (maps::BACKENDS, self.backends.len() as u64),
            (maps::MAGLEV, u64::from(self.alloc.used())),
            (maps::NODE_ADDRESSES, self.node_addresses.len() as u64),
            (maps::SOURCE_RANGES, self.source_ranges.len() as u64),
        ]
    }

    /// Brings the maps to `desired`: every service port whose desired state differs from
    /// what it was last given, the ClusterIP markers, the node addresses, and entries no
    /// service port wants.
    pub fn apply(&mut self, desired: &DesiredMaps) -> SyncReport {
        let mut report = SyncReport::default();
        self.tick();
        self.write_whole_filter(&mut report);
        let removed: Vec<ServicePortId> = self
            .service_ids
            .keys()
            .filter(|id| !desired.services.contains_key(*id))
            .cloned()
            .collect();
        let changed = desired
            .services
            .iter()
            .filter(|(id, svc)| !self.is_applied(id, svc))
            .map(|(id, _)| id);
        let ports: Vec<&ServicePortId> = removed.iter().chain(changed).collect();
        let ips: BTreeSet<Ipv4Addr> = desired
            .cluster_ips
            .iter()
            .copied()
            .chain(
                self.markers
                    .iter()
                    .map(|a| Ipv4Addr::from(addr::ipv4_octets(*a))),
            )
            .collect();
        let want_nodes: BTreeSet<u32> = desired
            .node_addresses
            .iter()
            .map(|a| addr::ipv4(a.octets()))
            .collect();
        let mut pending = Pending::default();
        self.upsert(desired, &ports, &ips, &mut pending, &mut report);
        self.put_node_addresses(&want_nodes, &mut report);
        self.settle(desired, &ports, &ips, pending, &mut report);
        self.delete_node_addresses(&want_nodes, &mut report);
        if self.unowned {
            self.sweep(&mut report);
        }
        report
    }

    /// Brings the given service ports and ClusterIP markers to `desired`, and retries
    /// service ports whose last apply failed; nothing else is looked at. `desired` must be
    /// complete: a service port that another one conflicts with is found in it.
    pub fn apply_changes(
        &mut self,
        desired: &DesiredMaps,
        ports: &BTreeSet<ServicePortId>,
        cluster_ips: &BTreeSet<Ipv4Addr>,
    ) -> SyncReport {
        let mut report = SyncReport::default();
        self.tick();
        self.write_whole_filter(&mut report);
        let owned: Vec<ServicePortId> = ports
            .union(&self.failed)
            .filter(|id| match desired.services.get(*id) {
                Some(svc) => !self.is_applied(id, svc),
                None => self.service_ids.contains_key(*id),
            })
            .cloned()
            .collect();
        let ports: Vec<&ServicePortId> = owned.iter().collect();
        let ips: BTreeSet<Ipv4Addr> = cluster_ips.union(&self.failed_markers).copied().collect();
        let mut pending = Pending::default();
        self.upsert(desired, &ports, &ips, &mut pending, &mut report);
        self.settle(desired, &ports, &ips, pending, &mut report);
        report
    }

    fn write_whole_filter(&mut self, report: &mut SyncReport) {
        if self.filter_written {
            return;
        }
        match self.store.write_filter(0, self.filter.words()) {
            Ok(()) => self.filter_written = true,
            Err(e) => report.fail("frontend filter", e),
        }
    }

    fn is_applied(&self, id: &ServicePortId, svc: &DesiredService) -> bool {
        self.service_ids
            .get(id)
            .and_then(|sid| self.ports.get(sid))
            .is_some_and(|p| p.applied.as_ref() == Some(svc))
    }

    /// The first phase: ids, then the backends of every service port, their tables and
    /// source ranges, then their frontends and address markers.
    fn upsert(
        &mut self,
        desired: &DesiredMaps,
        ports: &[&ServicePortId],
        ips: &BTreeSet<Ipv4Addr>,
        pending: &mut Pending,
        report: &mut SyncReport,
    ) {
        self.assign_service_ids(desired, ports, report);
        let touched: Vec<Touched> = ports
            .iter()
            .copied()
            .filter_map(|id| {
                let sid = *self.service_ids.get(id)?;
                let svc = desired.services.get(id)?;
                self.ports.contains_key(&sid).then_some((sid, id, svc))
            })
            .collect();
        let backends = self.sync_backends(&touched, report);
        let mut frontends = FrontendWrites::default();
        let mut ok = Vec::with_capacity(touched.len());
        for (&port, backends) in touched.iter().zip(backends) {
            ok.push(self.upsert_port(port, backends, &mut frontends, pending, report));
        }
        for ip in ips.iter().filter(|ip| desired.cluster_ips.contains(ip)) {
            let a = addr::ipv4(ip.octets());
            self.markers.insert(a);
            self.failed_markers.remove(ip);
            let (key, value) = marker(a);
            frontends.put(key, value, Owner::Marker(*ip), &self.services);
        }
        let failed = self.write_frontends(frontends, report);
        for (&(sid, id, svc), ok) in touched.iter().zip(ok) {
            self.finish_port(sid, id, svc, ok && !failed.contains(&sid));
        }
    }

    /// Keeps the id a service port already has (also one recovered from the maps through
    /// its frontend keys), and gives new service ports the lowest free id, whose counters
    /// start again from zero (a recovered id keeps counting for the same service port).
    fn assign_service_ids(
        &mut self,
        desired: &DesiredMaps,
        ports: &[&ServicePortId],
        report: &mut SyncReport,
    ) {
        let new: Vec<(&ServicePortId, &DesiredService)> = ports
            .iter()
            .copied()
            .filter(|id| !self.service_ids.contains_key(*id))
            .filter_map(|id| Some((id, desired.services.get(id)?)))
            .collect();
        let mut fresh = Vec::new();
        for (id, svc) in new {
            let recovered = svc.frontends.iter().find_map(|f| {
                let key = frontend_key(f.addr, f.port, id.protocol, f.scope);
                let sid = self.services.get(&key)?.id;
                (sid != 0 && self.free_service_ids.take(sid)).then_some(sid)
            });
            match recovered {
                Some(sid) => self.add_port(sid, id, report),
                None => fresh.push(id),
            }
        }
        let mut given = Vec::with_capacity(fresh.len());
        for id in fresh {
            let Some(sid) = self.free_service_ids.alloc() else {
                report.fail(
                    &format!("service {id}"),
                    MapError::Full(maps::SERVICE_STATS),
                );
                self.failed.insert(id.clone());
                continue;
            };
            given.push((sid, id));
        }
        // Before any entry names the ids. A failure only leaves old counts behind.
        let sids: Vec<u32> = given.iter().map(|(sid, _)| *sid).collect();
        if !sids.is_empty() {
            match self.store.reset_service_counters(&sids) {
                Ok(()) => report.writes += sids.len(),
                Err(e) => report.fail("counters of new service ids", e),
            }
        }
        for (sid, id) in given {
            self.add_port(sid, id, report);
        }
    }

    fn add_port(&mut self, sid: u32, id: &ServicePortId, report: &mut SyncReport) {
        self.service_ids.insert(id.clone(), sid);
        self.ports.insert(sid, Port::new(id.clone()));
        report.ids_assigned.push((sid, id.clone()));
    }

    /// The second phase: removed service ports go, then whatever the first phase left
    /// unwanted, in reverse order of dependency.
    fn settle(
        &mut self,
        desired: &DesiredMaps,
        ports: &[&ServicePortId],
        ips: &BTreeSet<Ipv4Addr>,
        mut pending: Pending,
        report: &mut SyncReport,
    ) {
        for id in ports
            .iter()
            .copied()
            .filter(|id| !desired.services.contains_key(*id))
        {
            self.failed.remove(id);
            let Some(sid) = self.service_ids.remove(id) else {
                continue;
            };
            if let Some(port) = self.ports.remove(&sid) {
                for (_, value) in &port.frontends {
                    self.release_range(value);
                }
                self.give_up(sid, &port.frontends, &mut pending);
                pending.backends.extend(port.backends);
                pending.source_ranges.extend(port.source_ranges);
            }
            pending.service_ids.push(sid);
        }
        for ip in ips.iter().filter(|ip| !desired.cluster_ips.contains(ip)) {
            let a = addr::ipv4(ip.octets());
            self.markers.remove(&a);
            self.failed_markers.remove(ip);
            self.delete_frontend(marker(a).0, report);
        }
        for key in pending.keys {
            self.resettle(key, report);
        }
        self.release_unused_ranges();
        for r in pending.source_ranges {
            self.delete_source_range(r, report);
        }
        for id in pending.backends {
            self.delete_backend(id, report);
        }
        for sid in pending.service_ids {
            self.free_service_ids.release(sid);
            report.ids_released.push(sid);
        }
    }

    fn put_node_addresses(&mut self, want: &BTreeSet<u32>, report: &mut SyncReport) {
        for a in want.difference(&self.node_addresses.clone()) {
            let slots = self.node_port_slots(*a);
            self.admit(&slots, report);
            match self.store.put_node_address(*a) {
                Ok(()) => {
                    report.writes += 1;
                    self.node_addresses.insert(*a);
                }
                Err(e) => {
                    report.fail("node address", e);
                    self.retire(&slots, report);
                }
            }
        }
    }

    fn delete_node_addresses(&mut self, want: &BTreeSet<u32>, report: &mut SyncReport) {
        for a in self.node_addresses.clone().difference(want) {
            match self.store.delete_node_address(*a) {
                Ok(()) => {
                    report.deletes += 1;
                    self.node_addresses.remove(a);
                    let slots = self.node_port_slots(*a);
                    self.retire(&slots, report);
                }
                Err(e) => report.fail("delete node address", e),
            }
        }
    }

    fn put_source_range(&mut self, r: SourceRange, report: &mut SyncReport) -> bool {
        if self.source_ranges.contains(&r) {
            return true;
        }
        match self.store.put_source_range(r) {
            Ok(()) => {
                report.writes += 1;
                self.source_ranges.insert(r);
                true
            }
            Err(e) => {
                report.fail("source range", e);
                false
            }
        }
    }

    fn delete_source_range(&mut self, r: SourceRange, report: &mut SyncReport) {
        if !self.source_ranges.contains(&r) {
            return;
        }
        match self.store.delete_source_range(&r) {
            Ok(()) => {
                report.deletes += 1;
                self.source_ranges.remove(&r);
            }
            Err(e) => {
                report.fail("delete source range", e);
                self.unowned = true;
            }
        }
    }

    fn delete_backend(&mut self, id: u32, report: &mut SyncReport) {
        let Some(b) = self.backends.get(&id).copied() else {
            return;
        };
        match self.store.delete_backend(id) {
            Ok(()) => {
                report.deletes += 1;
                self.backends.remove(&id);
                self.backend_ids
                    .remove(&(b.service_id, b.addr, b.port, b.proto));
                self.free_backend_ids.release(id);
            }
            Err(e) => {
                report.fail(&format!("delete backend {id}"), e);
                self.unowned = true;
            }
        }
    }

    fn release_unused_ranges(&mut self) {
        let now = Instant::now();
        for off in std::mem::take(&mut self.unused_ranges) {
            if self.ranges.get(&off).is_some_and(|r| r.users == 0) {
                let r = self.ranges.remove(&off).expect("present");
                self.alloc.release(off, r.len, now);
            }
        }
    }

    /// Deletes what no service port wants: entries recovered from the maps of a previous
    /// run, or left by a deletion that failed.
    fn sweep(&mut self, report: &mut SyncReport) {
        self.unowned = false;
        let stale: Vec<ServiceKey> = self
            .services
            .keys()
            .filter(|k| !self.claims.contains_key(k) && !self.is_marker(k))
            .copied()
            .collect();
        for key in stale {
            self.delete_frontend(key, report);
        }
        self.release_unused_ranges();
        let owned: BTreeSet<SourceRange> = self
            .ports
            .values()
            .flat_map(|p| p.source_ranges.iter().copied())
            .collect();
        for r in self.source_ranges.clone().difference(&owned) {
            self.delete_source_range(*r, report);
        }
        let owned: BTreeSet<u32> = self
            .ports
            .values()
            .flat_map(|p| p.backends.iter().copied())
            .collect();
        let stale: Vec<u32> = self
            .backends
            .keys()
            .filter(|id| !owned.contains(id))
            .copied()
            .collect();
        for id in stale {
            self.delete_backend(id, report);
        }
    }

    /// Every Maglev range an entry names is recorded as in use.
    #[cfg(test)]
    pub fn assert_ranges_held(&self) {
        for (key, v) in self.services.iter().filter(|(_, v)| v.maglev_len > 0) {
            let range = self.ranges.get(&v.maglev_offset);
            assert!(
                range.is_some_and(|r| r.users > 0 && r.len == v.maglev_len),
                "{key:?} names a range not held: {v:?}"
            );
        }
    }

    fn is_marker(&self, key: &ServiceKey) -> bool {
        self.markers.contains(&key.addr) && marker(key.addr).0 == *key
    }
}

/// The entry that marks `a` as a service address: other ports on it are rejected.
fn marker(a: u32) -> (ServiceKey, ServiceValue) {
    (
        ServiceKey::new(a, 0, 0, scope::INTERNAL),
        ServiceValue::new(0, service_flags::ADDRESS_ONLY, 0, 0, 0, 0, 0),
    )
}

fn frontend_key(a: Ipv4Addr, port: u16, protocol: u8, scope_nr: u8) -> ServiceKey {
    ServiceKey::new(addr::ipv4(a.octets()), addr::port(port), protocol, scope_nr)
}

#[cfg(test)]
mod tests;
