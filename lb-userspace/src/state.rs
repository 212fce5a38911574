//! What the agent knows of the cluster: Services and their endpoints, and this node.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use crate::manifest::{object_ref, service_of};

/// Namespace and name of an object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Services and EndpointSlices (v1 Endpoints arrive converted to slices). Slices are
/// indexed by the service their label names, so that one service is planned without
/// looking at every slice.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterState {
    pub services: BTreeMap<ObjectRef, Service>,
    slices: BTreeMap<ObjectRef, EndpointSlice>,
    /// Service (namespace, name) -> names of the slices labelled with it.
    slices_by_service: BTreeMap<ObjectRef, BTreeSet<String>>,
}

impl ClusterState {
    pub fn slices(&self) -> &BTreeMap<ObjectRef, EndpointSlice> {
        &self.slices
    }

    /// Adds or replaces a slice; returns the one it replaced.
    pub fn insert_slice(&mut self, slice: EndpointSlice) -> Option<EndpointSlice> {
        let r = object_ref(&slice.metadata);
        if let Some(svc) = labelled_service(&r, &slice) {
            self.slices_by_service
                .entry(svc)
                .or_default()
                .insert(r.name.clone());
        }
        let old = self.slices.insert(r.clone(), slice);
        if let Some(old) = &old {
            self.unindex(&r, old);
        }
        old
    }

    pub fn remove_slice(&mut self, r: &ObjectRef) -> Option<EndpointSlice> {
        let old = self.slices.remove(r)?;
        self.unindex(r, &old);
        Some(old)
    }

    /// Drops `old`'s index entry unless the slice now stored under `r` has the same label.
    fn unindex(&mut self, r: &ObjectRef, old: &EndpointSlice) {
        let Some(svc) = labelled_service(r, old) else {
            return;
        };
        let current = self.slices.get(r).and_then(|s| labelled_service(r, s));
        if current.as_ref() == Some(&svc) {
            return;
        }
        if let Some(names) = self.slices_by_service.get_mut(&svc) {
            names.remove(&r.name);
            if names.is_empty() {
                self.slices_by_service.remove(&svc);
            }
        }
    }

    /// The slices labelled with `service` (in its namespace), in name order.
    pub fn slices_of(&self, service: &ObjectRef) -> Vec<&EndpointSlice> {
        let Some(names) = self.slices_by_service.get(service) else {
            return Vec::new();
        };
        names
            .iter()
            .filter_map(|name| {
                self.slices.get(&ObjectRef {
                    namespace: service.namespace.clone(),
                    name: name.clone(),
                })
            })
            .collect()
    }

    /// Whether any slice is labelled with `service`.
    pub fn has_slices(&self, service: &ObjectRef) -> bool {
        self.slices_by_service.contains_key(service)
    }
}

/// The service a slice stored under `r` belongs to, by its label.
pub fn labelled_service(r: &ObjectRef, slice: &EndpointSlice) -> Option<ObjectRef> {
    service_of(slice).map(|name| ObjectRef {
        namespace: r.namespace.clone(),
        name,
    })
}

/// This node, as the endpoint rules need it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeContext {
    pub node_name: String,
    pub node_addresses: Vec<Ipv4Addr>,
    pub zone: Option<String>,
    /// How traffic from outside reaches backends on other nodes, unless a service's
    /// annotation says otherwise.
    pub lb_mode: LbMode,
}

/// How traffic from outside reaches a backend on another node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LbMode {
    /// Source-NATed to this node, so the answer comes back through it (works on any network).
    #[default]
    Snat,
    /// Tunnelled (IPIP) to the backend's node, which answers the client directly.
    Dsr,
}
