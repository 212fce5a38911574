//! Frontend entries. Several service ports may want one key (an externalIP two services
//! share): each claims it, and the entry holds the value of the greatest claimant, as a
//! sync of the whole state would leave it. A Maglev range lives while an entry or a
//! claimant's value names it, so that a claimant waiting for a key keeps its table.

use std::collections::BTreeSet;

use lb_common::{filter, ServiceKey, ServiceValue};

use super::{
    batched::{FrontendWrites, Owner},
    MapStore, Pending, SyncReport, Syncer,
};

impl<S: MapStore> Syncer<S> {
    pub(super) fn claim(&mut self, key: ServiceKey, sid: u32) {
        let claimants = self.claims.entry(key).or_default();
        if !claimants.contains(&sid) {
            claimants.push(sid);
        }
    }

    /// `sid` no longer wants these keys; their entries are settled in the second phase.
    pub(super) fn give_up(
        &mut self,
        sid: u32,
        frontends: &[(ServiceKey, ServiceValue)],
        pending: &mut Pending,
    ) {
        for (key, _) in frontends {
            if let Some(claimants) = self.claims.get_mut(key) {
                claimants.retain(|c| *c != sid);
                if claimants.is_empty() {
                    self.claims.remove(key);
                }
            }
            pending.keys.push(*key);
        }
    }

    /// The service port whose value `key` holds and that value.
    pub(super) fn winner(&self, key: &ServiceKey) -> Option<(u32, ServiceValue)> {
        self.claims
            .get(key)?
            .iter()
            .filter_map(|sid| Some((*sid, self.ports.get(sid)?)))
            .max_by(|a, b| a.1.id.cmp(&b.1.id))
            .and_then(|(sid, port)| {
                let (_, value) = port.frontends.iter().find(|(k, _)| k == key)?;
                Some((sid, *value))
            })
    }

    /// Writes the winning claimant's value, or deletes the entry when nobody claims it.
    pub(super) fn resettle(&mut self, key: ServiceKey, report: &mut SyncReport) {
        match self.winner(&key) {
            None => self.delete_frontend(key, report),
            Some((sid, value)) => {
                let mut writes = FrontendWrites::default();
                writes.put(key, value, Owner::Port(sid), &self.services);
                for sid in self.write_frontends(writes, report) {
                    self.mark_failed(sid);
                }
            }
        }
    }

    /// Records an entry the map now holds.
    pub(super) fn frontend_written(
        &mut self,
        key: ServiceKey,
        value: ServiceValue,
        report: &mut SyncReport,
    ) {
        report.writes += 1;
        self.hold_range(&value);
        if let Some(old) = self.services.insert(key, value) {
            self.release_range(&old);
            if changes_flows(&old, &value) {
                self.next_generation(old.id, report);
            }
        }
    }

    pub(super) fn delete_frontend(&mut self, key: ServiceKey, report: &mut SyncReport) {
        if !self.services.contains_key(&key) {
            return;
        }
        match self.store.delete_service(&key) {
            Ok(()) => {
                report.deletes += 1;
                let slots = self.slots(&key);
                self.retire(&slots, report);
                if let Some(old) = self.services.remove(&key) {
                    self.release_range(&old);
                    self.next_generation(old.id, report);
                }
            }
            Err(e) => {
                report.fail(&format!("delete frontend {key:?}"), e);
                self.unowned = true;
            }
        }
    }

    pub(super) fn slots(&self, key: &ServiceKey) -> Vec<u32> {
        key_slots(key, &self.node_addresses)
    }

    /// The NodePort keys, whose slots follow the node addresses.
    pub(super) fn node_port_slots(&self, node_addr: u32) -> Vec<u32> {
        let wildcard = ServiceKey::new(0, 0, 0, 0)..=ServiceKey::new(0, u16::MAX, u8::MAX, u8::MAX);
        self.services
            .range(wildcard)
            .map(|(k, _)| filter::slot(node_addr, k.port, k.proto))
            .collect()
    }

    /// Frontend tuples on these slots from now on.
    pub(super) fn admit(&mut self, slots: &[u32], report: &mut SyncReport) {
        for slot in slots {
            if let Some(word) = self.filter.add(*slot) {
                self.write_filter_word(word, report);
            }
        }
    }

    /// Frontend tuples on these slots no more.
    pub(super) fn retire(&mut self, slots: &[u32], report: &mut SyncReport) {
        for slot in slots {
            if let Some(word) = self.filter.remove(*slot) {
                self.write_filter_word(word, report);
            }
        }
    }

    fn write_filter_word(&mut self, (index, word): (u32, u64), report: &mut SyncReport) {
        if let Err(e) = self.store.write_filter(index, &[word]) {
            report.fail("frontend filter", e);
        }
    }

    /// Established flows of service id `id` are confirmed against their frontends again.
    fn next_generation(&mut self, id: u32, report: &mut SyncReport) {
        // Id 0 is the ClusterIP markers', which have no flows.
        if id == 0 {
            return;
        }
        if let Err(e) = self.store.next_generation(id) {
            report.fail(&format!("generation of service id {id}"), e);
        }
    }

    fn range_of_mut(&mut self, value: &ServiceValue) -> Option<&mut super::Range> {
        if value.maglev_len == 0 {
            return None;
        }
        self.ranges.get_mut(&value.maglev_offset)
    }

    /// One more entry or claimant's value names `value`'s range.
    pub(super) fn hold_range(&mut self, value: &ServiceValue) {
        if let Some(r) = self.range_of_mut(value) {
            r.users += 1;
        }
    }

    /// One fewer; a range nobody names is freed at the end of the apply.
    pub(super) fn release_range(&mut self, value: &ServiceValue) {
        let offset = value.maglev_offset;
        if let Some(r) = self.range_of_mut(value) {
            r.users = r.users.saturating_sub(1);
            if r.users == 0 {
                self.unused_ranges.push(offset);
            }
        }
    }
}

/// The filter slots of a frontend key: its own tuple, or for a NodePort its port on every
/// node address.
pub(super) fn key_slots(key: &ServiceKey, node_addresses: &BTreeSet<u32>) -> Vec<u32> {
    if key.addr != 0 {
        return vec![filter::slot(key.addr, key.port, key.proto)];
    }
    node_addresses
        .iter()
        .map(|a| filter::slot(*a, key.port, key.proto))
        .collect()
}

/// Does an entry's change matter to its established flows? A new table or backend count
/// does not (flows keep their backend); another service id, kind or flag (a source range,
/// a traffic policy) does.
fn changes_flows(old: &ServiceValue, new: &ServiceValue) -> bool {
    old.id != new.id || old.flags != new.flags || old.kind != new.kind
}
