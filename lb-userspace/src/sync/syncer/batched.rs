//! The backend and frontend entries of the service ports an apply touches, gathered and
//! written in batches: a first sync writes hundreds of thousands of them, and the kernel
//! takes a batch in one syscall. Every backend goes before any frontend, since a frontend
//! names backends through its table. An entry that fails is reported on its own, and
//! fails its service port alone, as when entries were written one by one.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
};

use lb_common::{addr, backend_flags, maps, BackendValue, ServiceKey, ServiceValue};

use super::{MapError, MapStore, SyncReport, Syncer};
use crate::{
    desired::{DesiredService, ServicePortId},
    sync::BatchError,
};

/// A service port an apply writes: its id, its name and what it should be.
pub(super) type Touched<'a> = (u32, &'a ServicePortId, &'a DesiredService);

/// The backends of one service port after their writes.
pub(super) struct PortBackends {
    /// Backend ids in the service's order; up to the first that could not be written.
    pub ids: Vec<u32>,
    pub ok: bool,
}

/// Who a frontend write is for, to be told when it fails.
#[derive(Clone, Copy)]
pub(super) enum Owner {
    Port(u32),
    Marker(Ipv4Addr),
}

/// Frontend entries to write, in the order in which they were asked for.
#[derive(Default)]
pub(super) struct FrontendWrites {
    entries: Vec<(ServiceKey, ServiceValue)>,
    owners: Vec<Owner>,
    /// The value each key will hold once written: a later claimant of the key compares
    /// against it, as it would against the entry if it were written already.
    queued: HashMap<ServiceKey, ServiceValue>,
}

impl FrontendWrites {
    /// Asks for `key` to hold `value`, unless it will anyway.
    pub fn put(
        &mut self,
        key: ServiceKey,
        value: ServiceValue,
        owner: Owner,
        written: &BTreeMap<ServiceKey, ServiceValue>,
    ) {
        if self.queued.get(&key).or_else(|| written.get(&key)) == Some(&value) {
            return;
        }
        self.entries.push((key, value));
        self.owners.push(owner);
        self.queued.insert(key, value);
    }
}

/// A backend entry to write, and where it came from.
struct BackendWrite {
    /// Index of its service port in the apply's list.
    port: usize,
    /// Index in the service's backends.
    pos: usize,
    /// Its id was handed out for this write, and goes back to the pool if it fails.
    fresh: bool,
}

impl<S: MapStore> Syncer<S> {
    /// Writes the backends of every touched service port; returns their ids per service
    /// port. A service port stops at a backend that fails: its later ones are not written.
    pub(super) fn sync_backends(
        &mut self,
        touched: &[Touched],
        report: &mut SyncReport,
    ) -> Vec<PortBackends> {
        let mut entries: Vec<(u32, BackendValue)> = Vec::new();
        let mut writes: Vec<BackendWrite> = Vec::new();
        let mut out = Vec::with_capacity(touched.len());
        for (port, &(sid, id, svc)) in touched.iter().enumerate() {
            let mut ids = Vec::with_capacity(svc.backends.len());
            let mut ok = true;
            for b in &svc.backends {
                let (a, p) = (addr::ipv4(b.addr.octets()), addr::port(b.port));
                let key = (sid, a, p, id.protocol);
                let (bid, fresh) = match self.backend_ids.get(&key) {
                    Some(bid) => (*bid, false),
                    None => {
                        let Some(bid) = self.free_backend_ids.alloc() else {
                            report.fail("backend", MapError::Full(maps::BACKENDS));
                            ok = false;
                            break;
                        };
                        self.backend_ids.insert(key, bid);
                        (bid, true)
                    }
                };
                let flags = if b.local { backend_flags::LOCAL } else { 0 };
                let value = BackendValue::new(a, p, id.protocol, b.state, sid, flags);
                if self.backends.get(&bid) != Some(&value) {
                    entries.push((bid, value));
                    writes.push(BackendWrite {
                        port,
                        pos: ids.len(),
                        fresh,
                    });
                }
                ids.push(bid);
            }
            out.push(PortBackends { ids, ok });
        }
        let mut start = 0;
        while start < entries.len() {
            let result = self.store.put_backends(&entries[start..]);
            let end = result
                .as_ref()
                .map_or_else(|e| start + e.index, |()| entries.len());
            for &(bid, value) in &entries[start..end] {
                report.writes += 1;
                self.backends.insert(bid, value);
            }
            let Err(BatchError { error, .. }) = result else {
                break;
            };
            let failed = &writes[end];
            let b = &touched[failed.port].2.backends[failed.pos];
            report.fail(&format!("backend {}:{}", b.addr, b.port), error);
            let next = writes[end..]
                .iter()
                .position(|w| w.port != failed.port)
                .map_or(entries.len(), |n| end + n);
            for (w, (bid, v)) in writes[end..next].iter().zip(&entries[end..next]) {
                if w.fresh {
                    self.backend_ids
                        .remove(&(v.service_id, v.addr, v.port, v.proto));
                    self.free_backend_ids.release(*bid);
                }
            }
            let port = &mut out[failed.port];
            port.ids.truncate(failed.pos);
            port.ok = false;
            start = next;
        }
        out
    }

    /// Writes the frontends asked for; returns the service ports one of whose entries
    /// failed. A marker that fails is left to the next apply.
    pub(super) fn write_frontends(
        &mut self,
        writes: FrontendWrites,
        report: &mut SyncReport,
    ) -> BTreeSet<u32> {
        let FrontendWrites {
            entries, owners, ..
        } = writes;
        // New keys are let through the filter before any is written, so that an entry is
        // never there but filtered out, and filtered out again if no write of theirs
        // succeeded.
        let mut new_keys = BTreeSet::new();
        for (key, _) in &entries {
            if !self.services.contains_key(key) && new_keys.insert(*key) {
                let slots = self.slots(key);
                self.admit(&slots, report);
            }
        }
        let mut failed = BTreeSet::new();
        let mut start = 0;
        while start < entries.len() {
            let result = self.store.put_services(&entries[start..]);
            let end = result
                .as_ref()
                .map_or_else(|e| start + e.index, |()| entries.len());
            for &(key, value) in &entries[start..end] {
                self.frontend_written(key, value, report);
            }
            let Err(BatchError { error, .. }) = result else {
                break;
            };
            report.fail(&format!("frontend {:?}", entries[end].0), error);
            match owners[end] {
                Owner::Port(sid) => {
                    failed.insert(sid);
                }
                Owner::Marker(ip) => {
                    self.failed_markers.insert(ip);
                }
            }
            start = end + 1;
        }
        for key in new_keys {
            if !self.services.contains_key(&key) {
                let slots = self.slots(&key);
                self.retire(&slots, report);
            }
        }
        failed
    }
}
