//! The cluster state as the watchers report it. A relist (Init, InitApply..., InitDone)
//! replaces a kind's objects at once on InitDone, so a half-finished list never deletes
//! what it has not reached yet.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    time::{Duration, SystemTime},
};

use k8s_openapi::{
    api::{
        core::v1::{Node, Service},
        discovery::v1::EndpointSlice,
    },
    jiff::Timestamp,
};
use kube::runtime::watcher::Event;

use crate::{
    manifest::{object_ref, service_of},
    state::{labelled_service, ClusterState, ObjectRef},
};

/// What a watcher saw, tagged with its kind.
// Updates are moved once, through a channel: boxing them would only add allocations.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Update {
    Service(Event<Service>),
    Slice(Event<EndpointSlice>),
    Node(Event<Node>),
}

/// Set by the EndpointSlice controller: when the change behind this slice version happened.
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// The node's addresses for NodePorts and its zone for topology hints.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    pub addresses: Vec<Ipv4Addr>,
    pub zone: Option<String>,
}

pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

impl NodeInfo {
    /// InternalIP and ExternalIP IPv4 addresses and the zone label.
    pub fn of(node: &Node) -> Self {
        let addresses = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
            .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
            .filter_map(|a| a.address.parse().ok())
            .collect();
        let zone = node
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(ZONE_LABEL))
            .cloned();
        Self { addresses, zone }
    }
}

/// What an update changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub services: usize,
    pub endpoints: usize,
    pub node: bool,
    /// Services whose Service or EndpointSlices changed (for a slice that moved to another
    /// service, both): what an incremental sync plans again.
    pub touched: BTreeSet<ObjectRef>,
    /// A kind was listed anew.
    pub relisted: bool,
}

impl Changes {
    pub fn any(&self) -> bool {
        self.services > 0 || self.endpoints > 0 || self.node
    }

    /// Adds the changes of a later update.
    pub fn merge(&mut self, later: Changes) {
        self.services += later.services;
        self.endpoints += later.endpoints;
        self.node |= later.node;
        self.touched.extend(later.touched);
        self.relisted |= later.relisted;
    }
}

/// A kind's objects by reference, as the store keeps them.
trait Objects<K> {
    fn get(&self, r: &ObjectRef) -> Option<&K>;
    /// Stores `obj` under `r` (its own reference); returns what it replaced.
    fn put(&mut self, r: ObjectRef, obj: K) -> Option<K>;
    fn take(&mut self, r: &ObjectRef) -> Option<K>;
    fn refs(&self) -> Vec<ObjectRef>;
}

impl<K> Objects<K> for BTreeMap<ObjectRef, K> {
    fn get(&self, r: &ObjectRef) -> Option<&K> {
        BTreeMap::get(self, r)
    }
    fn put(&mut self, r: ObjectRef, obj: K) -> Option<K> {
        self.insert(r, obj)
    }
    fn take(&mut self, r: &ObjectRef) -> Option<K> {
        self.remove(r)
    }
    fn refs(&self) -> Vec<ObjectRef> {
        self.keys().cloned().collect()
    }
}

/// The slices of a cluster state, which keeps them indexed by service.
struct Slices<'a>(&'a mut ClusterState);

impl Objects<EndpointSlice> for Slices<'_> {
    fn get(&self, r: &ObjectRef) -> Option<&EndpointSlice> {
        self.0.slices().get(r)
    }
    fn put(&mut self, _: ObjectRef, obj: EndpointSlice) -> Option<EndpointSlice> {
        self.0.insert_slice(obj)
    }
    fn take(&mut self, r: &ObjectRef) -> Option<EndpointSlice> {
        self.0.remove_slice(r)
    }
    fn refs(&self) -> Vec<ObjectRef> {
        self.0.slices().keys().cloned().collect()
    }
}

/// Called with an object's reference, old and new version, for every object that changed.
type OnChange<'a, K> = &'a mut dyn FnMut(&ObjectRef, Option<&K>, Option<&K>);

/// One kind's objects, with the list being received while a relist runs.
struct Tracked<K> {
    relisting: Option<BTreeMap<ObjectRef, K>>,
    synced: bool,
}

impl<K> Default for Tracked<K> {
    fn default() -> Self {
        Self {
            relisting: None,
            synced: false,
        }
    }
}

impl<K: Clone + PartialEq> Tracked<K> {
    /// Applies one event to `current`; returns how many objects changed.
    fn apply(
        &mut self,
        current: &mut impl Objects<K>,
        event: Event<K>,
        meta: impl Fn(&K) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
        changed: OnChange<'_, K>,
    ) -> usize {
        match event {
            Event::Init => {
                self.relisting = Some(BTreeMap::new());
                0
            }
            Event::InitApply(obj) => {
                let r = object_ref(meta(&obj));
                self.relisting.get_or_insert_default().insert(r, obj);
                0
            }
            Event::InitDone => {
                self.synced = true;
                let new = self.relisting.take().unwrap_or_default();
                let mut count = 0;
                for r in current.refs() {
                    if !new.contains_key(&r) {
                        let old = current.take(&r);
                        changed(&r, old.as_ref(), None);
                        count += 1;
                    }
                }
                for (r, obj) in new {
                    if current.get(&r) != Some(&obj) {
                        count += 1;
                        put(current, r, obj, changed);
                    }
                }
                count
            }
            Event::Apply(obj) => {
                let r = object_ref(meta(&obj));
                if current.get(&r) == Some(&obj) {
                    return 0;
                }
                put(current, r, obj, changed);
                1
            }
            Event::Delete(obj) => {
                let r = object_ref(meta(&obj));
                let Some(old) = current.take(&r) else {
                    return 0;
                };
                changed(&r, Some(&old), None);
                1
            }
        }
    }
}

fn put<K>(current: &mut impl Objects<K>, r: ObjectRef, obj: K, changed: OnChange<'_, K>) {
    let old = current.put(r.clone(), obj);
    changed(&r, old.as_ref(), current.get(&r));
}

/// Services, EndpointSlices and this node, as last listed and watched.
pub struct KubeStore {
    pub state: ClusterState,
    pub node: Option<NodeInfo>,
    services: Tracked<Service>,
    slices: Tracked<EndpointSlice>,
    /// Trigger times of slice changes seen since the last sync, for the programming latency.
    triggers: Vec<SystemTime>,
    started: SystemTime,
}

impl Default for KubeStore {
    fn default() -> Self {
        Self {
            state: ClusterState::default(),
            node: None,
            services: Tracked::default(),
            slices: Tracked::default(),
            triggers: Vec::new(),
            started: SystemTime::now(),
        }
    }
}

impl KubeStore {
    /// True once Services and EndpointSlices have each been listed in full: before that the
    /// state would be missing objects, and writing it would delete their entries.
    pub fn synced(&self) -> bool {
        self.services.synced && self.slices.synced
    }

    pub fn update(&mut self, update: Update) -> Changes {
        match update {
            Update::Service(e) => {
                let relisted = matches!(e, Event::InitDone);
                let mut touched = BTreeSet::new();
                let services = self.services.apply(
                    &mut self.state.services,
                    e,
                    |s| &s.metadata,
                    &mut |r, _, _| {
                        touched.insert(r.clone());
                    },
                );
                Changes {
                    services,
                    touched,
                    relisted,
                    ..Default::default()
                }
            }
            Update::Slice(e) => {
                // A slice without the service label belongs to nothing the agent serves; one
                // that lost it is gone.
                let e = match e {
                    // Left out of a relist, it is gone at InitDone.
                    Event::InitApply(s) if service_of(&s).is_none() => return Changes::default(),
                    Event::Apply(s) if service_of(&s).is_none() => {
                        tracing::debug!(slice = %object_ref(&s.metadata), "EndpointSlice without {} label", crate::manifest::SERVICE_NAME_LABEL);
                        Event::Delete(s)
                    }
                    Event::Apply(s) => {
                        self.note_trigger(&s);
                        Event::Apply(s)
                    }
                    Event::InitApply(s) => {
                        self.note_trigger(&s);
                        Event::InitApply(s)
                    }
                    e => e,
                };
                let relisted = matches!(e, Event::InitDone);
                let mut touched = BTreeSet::new();
                let endpoints = self.slices.apply(
                    &mut Slices(&mut self.state),
                    e,
                    |s| &s.metadata,
                    &mut |r, old, new| {
                        touched.extend(old.and_then(|s| labelled_service(r, s)));
                        touched.extend(new.and_then(|s| labelled_service(r, s)));
                    },
                );
                Changes {
                    endpoints,
                    touched,
                    relisted,
                    ..Default::default()
                }
            }
            Update::Node(e) => {
                let info = match e {
                    Event::Apply(n) | Event::InitApply(n) => Some(NodeInfo::of(&n)),
                    Event::Delete(_) => None,
                    Event::Init | Event::InitDone => return Changes::default(),
                };
                let node = info != self.node;
                self.node = info;
                Changes {
                    node,
                    ..Default::default()
                }
            }
        }
    }

    /// kube-proxy counts only changes triggered after it started.
    fn note_trigger(&mut self, slice: &EndpointSlice) {
        let Some(t) = slice
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(TRIGGER_TIME_ANNOTATION))
            .and_then(|t| t.parse::<Timestamp>().ok())
        else {
            return;
        };
        let t = SystemTime::from(t);
        if t > self.started {
            self.triggers.push(t);
        }
    }

    /// The trigger times of the changes a sync has just written, oldest first.
    pub fn take_triggers(&mut self) -> Vec<SystemTime> {
        let mut t = std::mem::take(&mut self.triggers);
        t.sort();
        t
    }
}

/// How long ago `t` was, zero when it lies in the future (clock skew between nodes).
pub fn since(t: SystemTime) -> Duration {
    SystemTime::now().duration_since(t).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn svc(name: &str, ip: &str) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                ..Default::default()
            },
            spec: Some(k8s_openapi::api::core::v1::ServiceSpec {
                cluster_ip: Some(ip.into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn names(s: &KubeStore) -> Vec<String> {
        s.state.services.keys().map(|r| r.name.clone()).collect()
    }

    #[test]
    fn a_relist_replaces_at_init_done_only() {
        let mut s = KubeStore::default();
        s.update(Update::Service(Event::Init));
        s.update(Update::Service(Event::InitApply(svc("a", "10.0.0.1"))));
        assert!(names(&s).is_empty() && !s.synced());
        let c = s.update(Update::Service(Event::InitDone));
        assert_eq!((names(&s), c.services), (vec!["a".to_string()], 1));
        assert!(!s.synced(), "slices not listed yet");
        s.update(Update::Slice(Event::Init));
        s.update(Update::Slice(Event::InitDone));
        assert!(s.synced());

        // A second relist: b appears, a is gone, both only once the list is complete.
        s.update(Update::Service(Event::Init));
        s.update(Update::Service(Event::InitApply(svc("b", "10.0.0.2"))));
        assert_eq!(names(&s), ["a"], "the old state serves while relisting");
        let c = s.update(Update::Service(Event::InitDone));
        assert_eq!((names(&s), c.services), (vec!["b".to_string()], 2));

        // The same object again changes nothing.
        let c = s.update(Update::Service(Event::Apply(svc("b", "10.0.0.2"))));
        assert!(!c.any());
        let c = s.update(Update::Service(Event::Apply(svc("b", "10.0.0.3"))));
        assert_eq!(c.services, 1);
        let c = s.update(Update::Service(Event::Delete(svc("b", "10.0.0.3"))));
        assert_eq!((names(&s).len(), c.services), (0, 1));
    }

    #[test]
    fn node_addresses_and_zone() {
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n1", "labels": {ZONE_LABEL: "z1"}},
            "status": {"addresses": [
                {"type": "InternalIP", "address": "192.0.2.1"},
                {"type": "InternalIP", "address": "fd00::1"},
                {"type": "Hostname", "address": "n1"},
                {"type": "ExternalIP", "address": "198.51.100.1"}
            ]}
        }))
        .unwrap();
        let mut s = KubeStore::default();
        assert!(s.update(Update::Node(Event::Apply(node.clone()))).node);
        let info = s.node.clone().unwrap();
        assert_eq!(
            info.addresses,
            [
                "192.0.2.1".parse::<Ipv4Addr>().unwrap(),
                "198.51.100.1".parse().unwrap()
            ]
        );
        assert_eq!(info.zone.as_deref(), Some("z1"));
        assert!(!s.update(Update::Node(Event::Apply(node))).node);
    }

    #[test]
    fn trigger_times_after_start_only() {
        let mut s = KubeStore::default();
        let slice = |t: &str| -> EndpointSlice {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "x", "namespace": "ns",
                    "labels": {"kubernetes.io/service-name": "a"},
                    "annotations": {TRIGGER_TIME_ANNOTATION: t}},
                "addressType": "IPv4", "endpoints": []
            }))
            .unwrap()
        };
        s.update(Update::Slice(Event::Apply(slice("2020-01-01T00:00:00Z"))));
        let later = Timestamp::try_from(SystemTime::now() + Duration::from_secs(5)).unwrap();
        s.update(Update::Slice(Event::Apply(slice(&later.to_string()))));
        assert_eq!(s.take_triggers().len(), 1);
        assert!(s.take_triggers().is_empty());
    }

    #[test]
    fn a_slice_that_loses_its_service_label_is_gone() {
        let slice = |labelled: bool| -> EndpointSlice {
            let labels = if labelled {
                serde_json::json!({"kubernetes.io/service-name": "a"})
            } else {
                serde_json::json!({})
            };
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "x", "namespace": "ns", "labels": labels},
                "addressType": "IPv4", "endpoints": []
            }))
            .unwrap()
        };
        let mut s = KubeStore::default();
        assert_eq!(
            s.update(Update::Slice(Event::Apply(slice(true)))).endpoints,
            1
        );
        assert_eq!(
            s.update(Update::Slice(Event::Apply(slice(false))))
                .endpoints,
            1
        );
        assert!(s.state.slices().is_empty());
        assert!(!s.update(Update::Slice(Event::Apply(slice(false)))).any());
    }
}
