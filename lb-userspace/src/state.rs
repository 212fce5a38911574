//! What the agent knows of the cluster: Services and their endpoints, and this node.

use std::{collections::BTreeMap, fmt, net::Ipv4Addr};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

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

/// Services and EndpointSlices (v1 Endpoints arrive converted to slices).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterState {
    pub services: BTreeMap<ObjectRef, Service>,
    pub slices: BTreeMap<ObjectRef, EndpointSlice>,
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
