//! One service port's entries once its backends are written: Maglev tables, source ranges
//! and frontends, in the order in which no packet finds an entry naming something not
//! written yet.

use std::{collections::BTreeSet, net::Ipv4Addr, time::Instant};

use lb_common::{addr, backend_state, capacity, maps, service_flags, ServiceKey, ServiceValue};

use super::{
    batched::{FrontendWrites, Owner, PortBackends, Touched},
    frontend_key, MapError, MapStore, Pending, Range, SourceRange, SyncReport, Syncer,
};
use crate::{
    desired::{DesiredFrontend, DesiredService, ServicePortId},
    maglev,
};

/// A service port as last applied.
pub(super) struct Port {
    pub id: ServicePortId,
    /// The desired state last written in full; `None` before and after a failure, so that
    /// the next apply writes it again.
    pub applied: Option<DesiredService>,
    /// The frontend entries it wants (another service port may win a key).
    pub frontends: Vec<(ServiceKey, ServiceValue)>,
    pub backends: Vec<u32>,
    pub source_ranges: Vec<SourceRange>,
    tables: Vec<Table>,
}

impl Port {
    pub fn new(id: ServicePortId) -> Self {
        Self {
            id,
            applied: None,
            frontends: Vec::new(),
            backends: Vec::new(),
            source_ranges: Vec::new(),
            tables: Vec::new(),
        }
    }
}

/// What a service port's frontends are built from.
#[derive(Clone, Copy)]
struct Input<'a> {
    sid: u32,
    id: &'a ServicePortId,
    svc: &'a DesiredService,
    /// Backend ids in the order of `svc.backends`.
    ids: &'a [u32],
    /// The tables the service port used before.
    known: &'a [Table],
}

/// A Maglev table in use by a service port, and the backends it was built from, so that
/// an unchanged selection skips building it again.
#[derive(Clone)]
struct Table {
    /// (backend id, address, port) in selection order.
    members: Vec<(u32, u32, u16)>,
    offset: u32,
    len: u32,
    /// The range's serial when this service port used it: a range freed and written
    /// again gets another.
    serial: u64,
}

impl<S: MapStore> Syncer<S> {
    /// Writes what service port `sid` wants for `svc` once its backends are written, and
    /// asks for its frontends; what it wanted before and no longer does goes to `pending`.
    /// False when an entry could not be written.
    pub(super) fn upsert_port(
        &mut self,
        (sid, id, svc): Touched,
        backends: PortBackends,
        frontends: &mut FrontendWrites,
        pending: &mut Pending,
        report: &mut SyncReport,
    ) -> bool {
        // Nothing reads the service port until it is put back below.
        let Some(before) = self.ports.remove(&sid) else {
            return false;
        };
        for (_, value) in &before.frontends {
            self.release_range(value);
        }
        let PortBackends { ids, mut ok } = backends;
        let mut after = Port::new(before.id);
        if ok {
            for f in &svc.frontends {
                let input = Input {
                    sid,
                    id,
                    svc,
                    ids: &ids,
                    known: &before.tables,
                };
                match self.frontend(&input, f, &mut after, report) {
                    Some(entry) => after.frontends.push(entry),
                    None => ok = false,
                }
            }
            if svc.frontends.iter().any(|f| f.filter_sources) {
                // Before the frontends that check them: a frontend never filters against a
                // range set that is still being written.
                for (a, len) in &svc.source_ranges {
                    let r = SourceRange {
                        service_id: sid,
                        addr: addr::ipv4(a.octets()),
                        prefix_len: *len,
                    };
                    ok &= self.put_source_range(r, report);
                    after.source_ranges.push(r);
                }
            }
            after.backends = ids;
        } else {
            // Withdrawn: its entries go, including backends this attempt wrote.
            pending.backends.extend(ids);
        }
        let kept: BTreeSet<u32> = after.backends.iter().copied().collect();
        pending
            .backends
            .extend(before.backends.iter().filter(|b| !kept.contains(b)));
        pending.source_ranges.extend(
            before
                .source_ranges
                .iter()
                .filter(|r| !after.source_ranges.contains(r)),
        );
        let wanted: BTreeSet<ServiceKey> = after.frontends.iter().map(|(k, _)| *k).collect();
        let dropped: Vec<(ServiceKey, ServiceValue)> = before
            .frontends
            .iter()
            .filter(|(k, _)| !wanted.contains(k))
            .copied()
            .collect();
        self.give_up(sid, &dropped, pending);
        for (key, _) in &after.frontends {
            self.claim(*key, sid);
        }
        for (_, value) in &after.frontends {
            self.hold_range(value);
        }
        self.ports.insert(sid, after);
        for (key, value) in &self.ports[&sid].frontends {
            let wins = self.winner(key).is_some_and(|(w, _)| w == sid);
            if wins {
                frontends.put(*key, *value, Owner::Port(sid), &self.services);
            }
        }
        ok
    }

    /// Records whether service port `sid` was written in full, once its frontends are.
    pub(super) fn finish_port(
        &mut self,
        sid: u32,
        id: &ServicePortId,
        svc: &DesiredService,
        ok: bool,
    ) {
        if ok {
            if let Some(port) = self.ports.get_mut(&sid) {
                port.applied = Some(svc.clone());
            }
            self.failed.remove(id);
        } else {
            self.mark_failed(sid);
        }
    }

    pub(super) fn mark_failed(&mut self, sid: u32) {
        if let Some(port) = self.ports.get_mut(&sid) {
            port.applied = None;
            self.failed.insert(port.id.clone());
        }
    }

    /// The entry of one frontend; `None` when its table could not be written.
    fn frontend(
        &mut self,
        input: &Input,
        f: &DesiredFrontend,
        port: &mut Port,
        report: &mut SyncReport,
    ) -> Option<(ServiceKey, ServiceValue)> {
        let Input { sid, id, svc, .. } = *input;
        let key = frontend_key(f.addr, f.port, id.protocol, f.scope);
        let (offset, len) = self.table_for(&key, input, &f.selection, port, report)?;
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
        let value = ServiceValue::new(sid, flags, f.kind, offset, len, count, affinity);
        Some((key, value))
    }

    /// The Maglev range for a selection: one this service port already uses for the same
    /// backends, the one the frontend points at when its content is right, or a fresh
    /// range (never one in use: packets may be reading it while it is written).
    fn table_for(
        &mut self,
        key: &ServiceKey,
        input: &Input,
        selection: &[usize],
        port: &mut Port,
        report: &mut SyncReport,
    ) -> Option<(u32, u32)> {
        let Input {
            id,
            svc,
            ids,
            known,
            ..
        } = *input;
        if selection.is_empty() {
            return Some((0, 0));
        }
        let len = capacity::maglev_len(selection.len() as u32);
        let members: Vec<(u32, u32, u16)> = selection
            .iter()
            .map(|&i| {
                let b = &svc.backends[i];
                (ids[i], addr::ipv4(b.addr.octets()), b.port)
            })
            .collect();
        let same = |t: &&Table| t.members == members && t.len == len;
        if let Some(t) = port.tables.iter().find(same) {
            return Some((t.offset, t.len));
        }
        let live = |t: &&Table| self.ranges.get(&t.offset).map(|r| r.serial) == Some(t.serial);
        if let Some(t) = known.iter().filter(same).find(live) {
            port.tables.push(t.clone());
            return Some((t.offset, t.len));
        }
        let backends = members
            .iter()
            .map(|&(_, a, p)| (Ipv4Addr::from(addr::ipv4_octets(a)), p));
        let mut table = maglev::table(backends, len);
        for slot in &mut table {
            *slot = members[*slot as usize].0;
        }
        // A recovered range, or another frontend's of this service port (backend ids
        // belong to one service port, so no other's table can match), may hold it already.
        let current = std::iter::once(*key).chain(
            svc.frontends
                .iter()
                .map(|f| frontend_key(f.addr, f.port, id.protocol, f.scope)),
        );
        let found = current.filter_map(|k| self.services.get(&k)).find_map(|v| {
            let r = self.ranges.get(&v.maglev_offset)?;
            (r.len == len && r.table == table).then_some((v.maglev_offset, r.serial))
        });
        let (offset, serial) = match found {
            Some(found) => found,
            None => self.write_table(len, table, report)?,
        };
        port.tables.push(Table {
            members,
            offset,
            len,
            serial,
        });
        Some((offset, len))
    }

    fn write_table(
        &mut self,
        len: u32,
        table: Vec<u32>,
        report: &mut SyncReport,
    ) -> Option<(u32, u64)> {
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
        self.next_serial += 1;
        let serial = self.next_serial;
        self.ranges.insert(
            offset,
            Range {
                len,
                table,
                users: 0,
                serial,
            },
        );
        // Freed again at the end of the apply if no frontend ends up pointing at it.
        self.unused_ranges.push(offset);
        Some((offset, serial))
    }
}
