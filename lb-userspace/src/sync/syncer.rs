//! The reconciler: ids, Maglev ranges and the diff between desired and programmed maps.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    time::Instant,
};

use lb_common::{
    addr, backend_state, capacity, maps, scope, service_flags, BackendValue, Config, ServiceKey,
    ServiceValue,
};

use super::{id_pool::IdPool, maglev_alloc::RangeAllocator, MapError, MapStore, SourceRange};
use crate::{
    desired::{DesiredMaps, DesiredService, ServicePortId},
    maglev,
};

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
}

impl SyncReport {
    fn fail(&mut self, what: &str, e: MapError) {
        if matches!(e, MapError::Full(_)) {
            self.map_full += 1;
        }
        self.errors.push(format!("{what}: {e}"));
    }
}

/// A Maglev range as written: where it is and which backend ids fill it.
#[derive(Debug, Clone)]
struct Range {
    len: u32,
    table: Vec<u32>,
}

/// Backend identity within a service port.
type BackendKey = (u32, u32, u16, u8);

pub struct Syncer<S: MapStore> {
    store: S,
    services: BTreeMap<ServiceKey, ServiceValue>,
    backends: BTreeMap<u32, BackendValue>,
    node_addresses: BTreeSet<u32>,
    source_ranges: BTreeSet<SourceRange>,
    service_ids: BTreeMap<ServicePortId, u32>,
    backend_ids: BTreeMap<BackendKey, u32>,
    /// The ids `backend_ids` does not hold.
    free_backend_ids: IdPool,
    ranges: BTreeMap<u32, Range>,
    alloc: RangeAllocator,
}

impl<S: MapStore> Syncer<S> {
    /// Takes over whatever the maps hold, so that a restarted agent keeps ids and tables and
    /// rewrites nothing that is already right. `config` replaces the CONFIG entry when it
    /// differs.
    pub fn recover(mut store: S, config: Config) -> anyhow::Result<Self> {
        let services: BTreeMap<_, _> = store.services()?.into_iter().collect();
        let backends: BTreeMap<_, _> = store.backends()?.into_iter().collect();
        let node_addresses = store.node_addresses()?.into_iter().collect();
        let source_ranges = store.source_ranges()?.into_iter().collect();
        let mut ranges = BTreeMap::new();
        for v in services.values() {
            if v.maglev_len > 0 && !ranges.contains_key(&v.maglev_offset) {
                let table = store.maglev(v.maglev_offset, v.maglev_len)?;
                ranges.insert(
                    v.maglev_offset,
                    Range {
                        len: v.maglev_len,
                        table,
                    },
                );
            }
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
        Ok(Self {
            store,
            services,
            backends,
            node_addresses,
            source_ranges,
            service_ids: BTreeMap::new(),
            backend_ids,
            free_backend_ids,
            ranges,
            alloc: RangeAllocator::new(capacity::MAGLEV, used),
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

    pub fn apply(&mut self, desired: &DesiredMaps) -> SyncReport {
        let mut report = SyncReport::default();
        self.tick();
        self.assign_service_ids(desired, &mut report);
        let mut want_services: BTreeMap<ServiceKey, ServiceValue> = BTreeMap::new();
        let mut want_backends: BTreeSet<u32> = BTreeSet::new();
        let mut want_ranges: BTreeSet<SourceRange> = BTreeSet::new();
        for (id, svc) in &desired.services {
            let Some(&sid) = self.service_ids.get(id) else {
                report.fail(
                    &format!("service {id}"),
                    MapError::Full(maps::SERVICE_STATS),
                );
                continue;
            };
            let ids = match self.sync_backends(sid, id.protocol, svc, &mut report) {
                Some(ids) => ids,
                None => continue,
            };
            want_backends.extend(ids.iter().copied());
            self.sync_frontends(sid, id, svc, &ids, &mut want_services, &mut report);
            if svc.frontends.iter().any(|f| f.filter_sources) {
                want_ranges.extend(svc.source_ranges.iter().map(|(a, len)| SourceRange {
                    service_id: sid,
                    addr: addr::ipv4(a.octets()),
                    prefix_len: *len,
                }));
            }
        }
        // Ranges before the frontends that check them: a frontend never filters against a
        // range set that is still being written.
        for r in want_ranges.difference(&self.source_ranges.clone()) {
            match self.store.put_source_range(*r) {
                Ok(()) => {
                    report.writes += 1;
                    self.source_ranges.insert(*r);
                }
                Err(e) => report.fail("source range", e),
            }
        }
        for ip in &desired.cluster_ips {
            let key = ServiceKey::new(addr::ipv4(ip.octets()), 0, 0, scope::INTERNAL);
            let value = ServiceValue::new(0, service_flags::ADDRESS_ONLY, 0, 0, 0, 0, 0);
            want_services.insert(key, value);
        }
        for (key, value) in &want_services {
            if self.services.get(key) == Some(value) {
                continue;
            }
            match self.store.put_service(*key, *value) {
                Ok(()) => {
                    report.writes += 1;
                    self.services.insert(*key, *value);
                }
                Err(e) => report.fail(&format!("frontend {key:?}"), e),
            }
        }
        let want_nodes: BTreeSet<u32> = desired
            .node_addresses
            .iter()
            .map(|a| addr::ipv4(a.octets()))
            .collect();
        for a in want_nodes.difference(&self.node_addresses.clone()) {
            match self.store.put_node_address(*a) {
                Ok(()) => {
                    report.writes += 1;
                    self.node_addresses.insert(*a);
                }
                Err(e) => report.fail("node address", e),
            }
        }
        // Deletions, in reverse order of dependency.
        let stale: Vec<ServiceKey> = self
            .services
            .keys()
            .filter(|k| !want_services.contains_key(k))
            .copied()
            .collect();
        for key in stale {
            match self.store.delete_service(&key) {
                Ok(()) => {
                    report.deletes += 1;
                    self.services.remove(&key);
                }
                Err(e) => report.fail(&format!("delete frontend {key:?}"), e),
            }
        }
        self.release_unused_ranges();
        for r in self.source_ranges.clone().difference(&want_ranges) {
            match self.store.delete_source_range(r) {
                Ok(()) => {
                    report.deletes += 1;
                    self.source_ranges.remove(r);
                }
                Err(e) => report.fail("delete source range", e),
            }
        }
        let stale: Vec<u32> = self
            .backends
            .keys()
            .filter(|id| !want_backends.contains(id))
            .copied()
            .collect();
        for id in stale {
            match self.store.delete_backend(id) {
                Ok(()) => {
                    report.deletes += 1;
                    self.backends.remove(&id);
                }
                Err(e) => report.fail(&format!("delete backend {id}"), e),
            }
        }
        let free = &mut self.free_backend_ids;
        let backends = &self.backends;
        self.backend_ids.retain(|_, id| {
            let live = backends.contains_key(id);
            if !live {
                free.release(*id);
            }
            live
        });
        for a in self.node_addresses.clone().difference(&want_nodes) {
            match self.store.delete_node_address(*a) {
                Ok(()) => {
                    report.deletes += 1;
                    self.node_addresses.remove(a);
                }
                Err(e) => report.fail("delete node address", e),
            }
        }
        report
    }

    /// Keeps the id a service port already has (also one recovered from the maps through
    /// its frontend keys), and gives new service ports the lowest free id, whose counters
    /// start again from zero (a recovered id keeps counting for the same service port).
    fn assign_service_ids(&mut self, desired: &DesiredMaps, report: &mut SyncReport) {
        self.service_ids
            .retain(|id, _| desired.services.contains_key(id));
        let mut taken: BTreeSet<u32> = self.service_ids.values().copied().collect();
        for (id, svc) in &desired.services {
            if self.service_ids.contains_key(id) {
                continue;
            }
            let recovered = svc.frontends.iter().find_map(|f| {
                let key = frontend_key(f.addr, f.port, id.protocol, f.scope);
                self.services
                    .get(&key)
                    .map(|v| v.id)
                    .filter(|sid| *sid != 0 && !taken.contains(sid))
            });
            if let Some(sid) = recovered {
                taken.insert(sid);
                self.service_ids.insert(id.clone(), sid);
            }
        }
        let mut next = 1;
        for id in desired.services.keys() {
            if self.service_ids.contains_key(id) {
                continue;
            }
            while taken.contains(&next) {
                next += 1;
            }
            if next >= capacity::SERVICE_STATS {
                return;
            }
            taken.insert(next);
            self.service_ids.insert(id.clone(), next);
            // Before any entry names the id. A failure only leaves old counts behind.
            match self.store.reset_service_counters(next) {
                Ok(()) => report.writes += 1,
                Err(e) => report.fail(&format!("counters of service {id}"), e),
            }
        }
    }

    /// Writes the backends of one service port; returns their ids in the service's order.
    fn sync_backends(
        &mut self,
        sid: u32,
        protocol: u8,
        svc: &DesiredService,
        report: &mut SyncReport,
    ) -> Option<Vec<u32>> {
        let mut ids = Vec::with_capacity(svc.backends.len());
        for b in &svc.backends {
            let (a, p) = (addr::ipv4(b.addr.octets()), addr::port(b.port));
            let key = (sid, a, p, protocol);
            let id = match self.backend_ids.get(&key) {
                Some(id) => *id,
                None => {
                    let Some(id) = self.free_backend_ids.alloc() else {
                        report.fail("backend", MapError::Full(maps::BACKENDS));
                        return None;
                    };
                    self.backend_ids.insert(key, id);
                    id
                }
            };
            let flags = if b.local {
                lb_common::backend_flags::LOCAL
            } else {
                0
            };
            let value = BackendValue::new(a, p, protocol, b.state, sid, flags);
            if self.backends.get(&id) != Some(&value) {
                match self.store.put_backend(id, value) {
                    Ok(()) => {
                        report.writes += 1;
                        self.backends.insert(id, value);
                    }
                    Err(e) => {
                        report.fail(&format!("backend {}:{}", b.addr, b.port), e);
                        return None;
                    }
                }
            }
            ids.push(id);
        }
        Some(ids)
    }

    fn sync_frontends(
        &mut self,
        sid: u32,
        id: &ServicePortId,
        svc: &DesiredService,
        ids: &[u32],
        want: &mut BTreeMap<ServiceKey, ServiceValue>,
        report: &mut SyncReport,
    ) {
        // Frontends with the same selection share one table.
        let mut tables: BTreeMap<Vec<usize>, (u32, u32)> = BTreeMap::new();
        for f in &svc.frontends {
            let key = frontend_key(f.addr, f.port, id.protocol, f.scope);
            let (offset, len) = match tables.get(&f.selection) {
                Some(t) => *t,
                None => {
                    let Some(t) = self.table_for(&key, svc, &f.selection, ids, report) else {
                        continue;
                    };
                    tables.insert(f.selection.clone(), t);
                    t
                }
            };
            let mut flags = 0;
            if f.local_policy {
                flags |= service_flags::LOCAL_POLICY;
            }
            if f.filter_sources {
                flags |= service_flags::SOURCE_RANGES;
            }
            if f.dsr {
                flags |= service_flags::DSR;
            }
            // The plan picks terminating endpoints only when no endpoint is ready.
            let fallback = !f.selection.is_empty()
                && f.selection
                    .iter()
                    .all(|&i| svc.backends[i].state == backend_state::TERMINATING);
            if fallback {
                flags |= service_flags::TERMINATING_FALLBACK;
            }
            let affinity = svc.affinity_timeout.unwrap_or(0);
            if svc.affinity_timeout.is_some() {
                flags |= service_flags::AFFINITY;
            }
            let count = f.selection.len() as u32;
            want.insert(
                key,
                ServiceValue::new(sid, flags, f.kind, offset, len, count, affinity),
            );
        }
    }

    /// The Maglev range for a selection: the one the frontend already points at when its
    /// content is right, else a fresh range (never the one in use: packets may be reading
    /// it while it is written).
    fn table_for(
        &mut self,
        key: &ServiceKey,
        svc: &DesiredService,
        selection: &[usize],
        ids: &[u32],
        report: &mut SyncReport,
    ) -> Option<(u32, u32)> {
        if selection.is_empty() {
            return Some((0, 0));
        }
        let len = capacity::maglev_len(selection.len() as u32);
        let names: Vec<String> = selection
            .iter()
            .map(|&i| format!("{}:{}", svc.backends[i].addr, svc.backends[i].port))
            .collect();
        let table: Vec<u32> = maglev::table(&names, len)
            .iter()
            .map(|&i| ids[selection[i as usize]])
            .collect();
        if let Some(cur) = self.services.get(key) {
            if let Some(r) = self.ranges.get(&cur.maglev_offset) {
                if r.len == len && r.table == table {
                    return Some((cur.maglev_offset, len));
                }
            }
        }
        // Another frontend of this service (backend ids belong to one service, so no other
        // service's table can match) may hold the same table already.
        let shared = svc.frontends.iter().find_map(|f| {
            let cur = self
                .services
                .get(&frontend_key(f.addr, f.port, key.proto, f.scope))?;
            let r = self.ranges.get(&cur.maglev_offset)?;
            (r.len == len && r.table == table).then_some(cur.maglev_offset)
        });
        if let Some(off) = shared {
            return Some((off, len));
        }
        let Some(offset) = self.alloc.alloc(len) else {
            report.fail("maglev table", MapError::Full(maps::MAGLEV));
            return None;
        };
        if let Err(e) = self.store.write_maglev(offset, &table) {
            report.fail("maglev table", e);
            self.alloc.release(offset, len, Instant::now());
            return None;
        }
        report.writes += 1;
        report.tables_written += 1;
        self.ranges.insert(offset, Range { len, table });
        Some((offset, len))
    }

    fn release_unused_ranges(&mut self) {
        let used: BTreeSet<u32> = self
            .services
            .values()
            .filter(|v| v.maglev_len > 0)
            .map(|v| v.maglev_offset)
            .collect();
        let now = Instant::now();
        let unused: Vec<u32> = self
            .ranges
            .keys()
            .filter(|o| !used.contains(o))
            .copied()
            .collect();
        for off in unused {
            if let Some(r) = self.ranges.remove(&off) {
                self.alloc.release(off, r.len, now);
            }
        }
    }
}

fn frontend_key(a: Ipv4Addr, port: u16, protocol: u8, scope_nr: u8) -> ServiceKey {
    ServiceKey::new(addr::ipv4(a.octets()), addr::port(port), protocol, scope_nr)
}

#[cfg(test)]
mod tests;
