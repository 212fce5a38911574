//! The watchers' updates applied to the store and, once Services and EndpointSlices have
//! been listed in full, written through the controller. Updates that arrive together are
//! written together: one sync per burst, not per object.

use std::{collections::BTreeSet, net::Ipv4Addr};

use tokio::sync::mpsc;

use super::{store::since, Changes, KubeStore, Update};
use crate::{controller::Controller, state::NodeContext, sync::MapStore};

pub struct KubeSource {
    pub store: KubeStore,
    rx: mpsc::Receiver<Update>,
    /// The node as the command line and interfaces describe it.
    base: NodeContext,
    /// `--node-ip` given: the Node object's addresses are not used.
    fixed_addresses: bool,
    synced_once: bool,
}

impl KubeSource {
    pub fn new(rx: mpsc::Receiver<Update>, base: NodeContext, fixed_addresses: bool) -> Self {
        Self {
            store: KubeStore::default(),
            rx,
            base,
            fixed_addresses,
            synced_once: false,
        }
    }

    /// Waits for an update and applies it with every other one already queued; `None` once
    /// the watchers are gone.
    pub async fn recv(&mut self) -> Option<Changes> {
        let first = self.rx.recv().await?;
        let mut changes = self.store.update(first);
        while let Ok(next) = self.rx.try_recv() {
            changes.merge(self.store.update(next));
        }
        Some(changes)
    }

    /// This node with what its Node object says: NodePorts answer on the uplinks' addresses
    /// and the Node's InternalIP/ExternalIP addresses; the zone label drives topology hints.
    pub fn node_context(&self) -> NodeContext {
        let mut node = self.base.clone();
        if let Some(info) = &self.store.node {
            if !self.fixed_addresses {
                let mut all: BTreeSet<Ipv4Addr> = node.node_addresses.iter().copied().collect();
                for a in &info.addresses {
                    if all.insert(*a) {
                        node.node_addresses.push(*a);
                    }
                }
            }
            node.zone = info.zone.clone();
        }
        node
    }

    /// Writes the state when something changed and the lists are complete; before that,
    /// writing would delete the entries of objects not listed yet. A change to Services or
    /// EndpointSlices writes only the services it touched; the first sync, a relist and a
    /// change of the node write the whole state.
    pub fn handle<M: MapStore>(&mut self, changes: Changes, ctl: &mut Controller<M>) {
        if changes.node {
            ctl.node = self.node_context();
        }
        let first = self.store.synced() && !self.synced_once;
        if !changes.any() && !first {
            return;
        }
        ctl.health
            .record_changes(changes.services, changes.endpoints);
        if !self.store.synced() {
            return;
        }
        self.synced_once = true;
        if first || changes.node || changes.relisted {
            ctl.sync(&self.store.state);
            crate::agent::release_free_memory();
        } else {
            ctl.sync_services(&self.store.state, &changes.touched);
        }
        for t in self.store.take_triggers() {
            ctl.health.record_programming_latency(since(t));
        }
    }
}
