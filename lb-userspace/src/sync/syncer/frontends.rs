//! Frontend entries. Several service ports may want one key (an externalIP two services
//! share): each claims it, and the entry holds the value of the greatest claimant, as a
//! sync of the whole state would leave it. A Maglev range lives while an entry or a
//! claimant's value names it, so that a claimant waiting for a key keeps its table.

use lb_common::{ServiceKey, ServiceValue};

use super::{MapStore, Pending, SyncReport, Syncer};

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
                if self.services.get(&key) != Some(&value) && !self.put_frontend(key, value, report)
                {
                    self.mark_failed(sid);
                }
            }
        }
    }

    pub(super) fn put_frontend(
        &mut self,
        key: ServiceKey,
        value: ServiceValue,
        report: &mut SyncReport,
    ) -> bool {
        match self.store.put_service(key, value) {
            Ok(()) => {
                self.frontend_written(key, value, report);
                true
            }
            Err(e) => {
                report.fail(&format!("frontend {key:?}"), e);
                false
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
        }
    }

    pub(super) fn delete_frontend(&mut self, key: ServiceKey, report: &mut SyncReport) {
        if !self.services.contains_key(&key) {
            return;
        }
        match self.store.delete_service(&key) {
            Ok(()) => {
                report.deletes += 1;
                if let Some(old) = self.services.remove(&key) {
                    self.release_range(&old);
                }
            }
            Err(e) => {
                report.fail(&format!("delete frontend {key:?}"), e);
                self.unowned = true;
            }
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
