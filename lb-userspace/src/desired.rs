//! The data path the cluster state asks for, before ids and Maglev ranges are assigned.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
};

/// One port of one Service: the unit that owns a service id, its backends and counters.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortId {
    pub namespace: String,
    pub name: String,
    pub port_name: String,
    pub protocol: u8,
}

impl fmt::Display for ServicePortId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = match self.protocol {
            lb_common::proto::TCP => "TCP",
            lb_common::proto::UDP => "UDP",
            _ => "?",
        };
        write!(
            f,
            "{}/{}:{}/{}",
            self.namespace, self.name, self.port_name, proto
        )
    }
}

/// An endpoint listed for a service port. Every listed endpoint is a backend that existing
/// flows may keep; only those in a frontend's selection receive new flows.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct DesiredBackend {
    pub addr: Ipv4Addr,
    pub port: u16,
    /// `lb_common::backend_state`.
    pub state: u8,
    pub local: bool,
}

/// One address a service port answers on, in one scope.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredFrontend {
    /// 0.0.0.0 for a NodePort (any node address).
    pub addr: Ipv4Addr,
    pub port: u16,
    /// `lb_common::scope`.
    pub scope: u8,
    /// `lb_common::kind`.
    pub kind: u8,
    /// Local traffic policy: no selected backend means drop, not reject.
    pub local_policy: bool,
    /// Only sources inside the service's `source_ranges` may use this frontend.
    pub filter_sources: bool,
    /// Traffic to backends on other nodes is tunnelled there (direct server return).
    pub dsr: bool,
    /// Indices into the service's `backends` that new flows are spread over, in order.
    pub selection: Vec<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct DesiredService {
    /// Sorted by address and port.
    pub backends: Vec<DesiredBackend>,
    pub frontends: Vec<DesiredFrontend>,
    /// sessionAffinity ClientIP timeout in seconds.
    pub affinity_timeout: Option<u32>,
    /// loadBalancerSourceRanges as (network address, prefix length), sorted.
    pub source_ranges: Vec<(Ipv4Addr, u8)>,
}

/// A healthCheckNodePort of an externalTrafficPolicy Local LoadBalancer service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub namespace: String,
    pub name: String,
    /// Ready endpoints on this node, across the service's ports.
    pub local_endpoints: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct DesiredMaps {
    pub services: BTreeMap<ServicePortId, DesiredService>,
    /// Addresses that belong to services: any undeclared port on them is rejected.
    pub cluster_ips: BTreeSet<Ipv4Addr>,
    pub node_addresses: BTreeSet<Ipv4Addr>,
    /// healthCheckNodePort -> what it reports; served by the agent, not by the maps.
    pub health_checks: BTreeMap<u16, HealthCheck>,
}
