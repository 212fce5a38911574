//! The desired maps kept service by service, so that a change to one Service or its
//! EndpointSlices replans that service alone. What services share (a ClusterIP, a
//! healthCheckNodePort asked for twice) is counted, so the result is always the one
//! planning the whole state at once gives.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use super::{plan_service, ServicePlan};
use crate::{
    desired::{DesiredMaps, HealthCheck, ServicePortId},
    state::{ClusterState, NodeContext, ObjectRef},
};

pub struct Planner {
    node: NodeContext,
    desired: DesiredMaps,
    /// What each service put into `desired`.
    shares: BTreeMap<ObjectRef, Share>,
    /// How many services answer on each ClusterIP.
    cluster_ip_users: BTreeMap<Ipv4Addr, usize>,
    /// The services asking for each healthCheckNodePort; the first in name order gets it.
    health_claims: BTreeMap<u16, BTreeMap<ObjectRef, HealthCheck>>,
    /// Backends over all service ports.
    endpoints: usize,
}

struct Share {
    ports: Vec<ServicePortId>,
    cluster_ip: Option<Ipv4Addr>,
    health_port: Option<u16>,
}

/// What a replan changed in the desired maps.
#[derive(Debug, Default)]
pub struct Replanned {
    /// Service ports added, changed or removed (or possibly so).
    pub ports: BTreeSet<ServicePortId>,
    /// ClusterIPs whose services changed; whether each is still wanted is in the maps.
    pub cluster_ips: BTreeSet<Ipv4Addr>,
    pub health_checks: bool,
    pub warnings: Vec<String>,
}

impl Planner {
    /// Plans every service of `state`.
    pub fn new(state: &ClusterState, node: &NodeContext) -> (Self, Vec<String>) {
        let mut planner = Self {
            node: node.clone(),
            desired: DesiredMaps {
                node_addresses: node.node_addresses.iter().copied().collect(),
                ..Default::default()
            },
            shares: BTreeMap::new(),
            cluster_ip_users: BTreeMap::new(),
            health_claims: BTreeMap::new(),
            endpoints: 0,
        };
        let mut warnings = Vec::new();
        for (r, svc) in &state.services {
            let plan = plan_service(r, svc, &state.slices_of(r), node, &mut warnings);
            planner.add(r, plan, &mut warnings);
        }
        (planner, warnings)
    }

    pub fn node(&self) -> &NodeContext {
        &self.node
    }

    pub fn desired(&self) -> &DesiredMaps {
        &self.desired
    }

    pub fn into_desired(self) -> DesiredMaps {
        self.desired
    }

    /// Backends over all service ports.
    pub fn endpoints(&self) -> usize {
        self.endpoints
    }

    /// Plans `services` again as `state` has them now (a service missing from it is gone).
    pub fn replan<'a>(
        &mut self,
        state: &ClusterState,
        services: impl IntoIterator<Item = &'a ObjectRef>,
    ) -> Replanned {
        let mut out = Replanned::default();
        for r in services {
            if let Some(old) = self.forget(r) {
                out.note(&old);
            }
            if let Some(svc) = state.services.get(r) {
                let plan = plan_service(r, svc, &state.slices_of(r), &self.node, &mut out.warnings);
                let share = self.add(r, plan, &mut out.warnings);
                out.note(share);
            }
        }
        out
    }

    fn add(&mut self, r: &ObjectRef, plan: ServicePlan, warnings: &mut Vec<String>) -> &Share {
        let share = Share {
            ports: plan.ports.keys().cloned().collect(),
            cluster_ip: plan.cluster_ip,
            health_port: plan.health_check.as_ref().map(|(p, _)| *p),
        };
        for (id, svc) in plan.ports {
            self.endpoints += svc.backends.len();
            self.desired.services.insert(id, svc);
        }
        if let Some(ip) = plan.cluster_ip {
            *self.cluster_ip_users.entry(ip).or_default() += 1;
            self.desired.cluster_ips.insert(ip);
        }
        if let Some((port, check)) = plan.health_check {
            let claims = self.health_claims.entry(port).or_default();
            claims.insert(r.clone(), check);
            let (first, check) = claims.first_key_value().expect("just inserted");
            if first != r {
                warnings.push(format!(
                    "service {r}: healthCheckNodePort {port} is taken by {first}, not served"
                ));
            }
            self.desired.health_checks.insert(port, check.clone());
        }
        self.shares.entry(r.clone()).insert_entry(share).into_mut()
    }

    /// Takes a service's share out of the desired maps.
    fn forget(&mut self, r: &ObjectRef) -> Option<Share> {
        let share = self.shares.remove(r)?;
        for id in &share.ports {
            if let Some(svc) = self.desired.services.remove(id) {
                self.endpoints -= svc.backends.len();
            }
        }
        if let Some(ip) = share.cluster_ip {
            if let Some(users) = self.cluster_ip_users.get_mut(&ip) {
                *users -= 1;
                if *users == 0 {
                    self.cluster_ip_users.remove(&ip);
                    self.desired.cluster_ips.remove(&ip);
                }
            }
        }
        if let Some(port) = share.health_port {
            if let Some(claims) = self.health_claims.get_mut(&port) {
                claims.remove(r);
                match claims.first_key_value() {
                    Some((_, check)) => {
                        self.desired.health_checks.insert(port, check.clone());
                    }
                    None => {
                        self.health_claims.remove(&port);
                        self.desired.health_checks.remove(&port);
                    }
                }
            }
        }
        Some(share)
    }
}

impl Replanned {
    fn note(&mut self, share: &Share) {
        self.ports.extend(share.ports.iter().cloned());
        self.cluster_ips.extend(share.cluster_ip);
        self.health_checks |= share.health_port.is_some();
    }
}
