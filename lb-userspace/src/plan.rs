//! Kubernetes service semantics as a pure function: cluster state and this node in,
//! the desired maps out. kube-proxy is the reference (`pkg/proxy/topology.go` for the
//! choice of endpoints).

use std::{collections::BTreeMap, net::Ipv4Addr};

use k8s_openapi::api::{
    core::v1::{Service, ServicePort},
    discovery::v1::EndpointSlice,
};
use lb_common::{backend_state, kind, proto, scope};

use crate::{
    desired::{DesiredBackend, DesiredFrontend, DesiredMaps, DesiredService, ServicePortId},
    manifest::service_of,
    state::{ClusterState, NodeContext, ObjectRef},
};

pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;

pub struct Plan {
    pub desired: DesiredMaps,
    pub warnings: Vec<String>,
}

pub fn plan(state: &ClusterState, node: &NodeContext) -> Plan {
    let mut desired = DesiredMaps {
        node_addresses: node.node_addresses.iter().copied().collect(),
        ..Default::default()
    };
    let mut warnings = Vec::new();
    let mut slices: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
    for (r, slice) in &state.slices {
        if let Some(svc) = service_of(slice) {
            slices
                .entry((r.namespace.clone(), svc))
                .or_default()
                .push(slice);
        }
    }
    for (r, svc) in &state.services {
        let svc_slices = slices
            .get(&(r.namespace.clone(), r.name.clone()))
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        plan_service(r, svc, svc_slices, node, &mut desired, &mut warnings);
    }
    Plan { desired, warnings }
}

fn parse_protocol(p: Option<&str>) -> Option<u8> {
    match p.unwrap_or("TCP") {
        "TCP" => Some(proto::TCP),
        "UDP" => Some(proto::UDP),
        _ => None,
    }
}

fn plan_service(
    r: &ObjectRef,
    svc: &Service,
    slices: &[&EndpointSlice],
    node: &NodeContext,
    out: &mut DesiredMaps,
    warnings: &mut Vec<String>,
) {
    let labels = svc.metadata.labels.as_ref();
    if labels.is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL)) {
        return;
    }
    let Some(spec) = &svc.spec else { return };
    let svc_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    if svc_type == "ExternalName" {
        return;
    }
    let cluster_ip = match spec.cluster_ip.as_deref() {
        Some("None") => return, // headless
        Some(ip) if !ip.is_empty() => match ip.parse::<Ipv4Addr>() {
            Ok(ip) => Some(ip),
            Err(_) => {
                tracing::info!(service = %r, address = ip, "skipping non-IPv4 clusterIP");
                None
            }
        },
        _ => {
            warnings.push(format!("service {r}: no clusterIP, no ClusterIP frontend"));
            None
        }
    };
    let node_ports = matches!(svc_type, "NodePort" | "LoadBalancer");
    let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
    let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let mut external_addrs: Vec<(Ipv4Addr, u8)> = Vec::new();
    for ip in spec.external_ips.iter().flatten() {
        match ip.parse() {
            Ok(ip) => external_addrs.push((ip, kind::EXTERNAL_IP)),
            Err(_) => tracing::info!(service = %r, address = %ip, "skipping non-IPv4 externalIP"),
        }
    }
    if svc_type == "LoadBalancer" {
        let ingress = svc.status.as_ref().and_then(|s| s.load_balancer.as_ref());
        for ing in ingress
            .and_then(|l| l.ingress.as_ref())
            .into_iter()
            .flatten()
        {
            // ipMode Proxy: the load balancer proxies itself; traffic must reach it.
            if ing.ip_mode.as_deref() == Some("Proxy") {
                continue;
            }
            if let Some(ip) = ing.ip.as_deref().and_then(|ip| ip.parse().ok()) {
                external_addrs.push((ip, kind::LOAD_BALANCER));
            }
        }
    }
    let affinity_timeout = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .map_or(DEFAULT_AFFINITY_TIMEOUT, |t| t as u32)
    });

    let mut any_port = false;
    for port in spec.ports.iter().flatten() {
        let Some(protocol) = parse_protocol(port.protocol.as_deref()) else {
            warnings.push(format!(
                "service {r}: port {} protocol {} is not supported",
                port.port,
                port.protocol.as_deref().unwrap_or_default()
            ));
            continue;
        };
        let id = ServicePortId {
            namespace: r.namespace.clone(),
            name: r.name.clone(),
            port_name: port.name.clone().unwrap_or_default(),
            protocol,
        };
        let endpoints = endpoints_for(port, protocol, slices, node, r);
        let backends: Vec<DesiredBackend> = endpoints.iter().map(|e| e.backend.clone()).collect();
        let cluster = select(&endpoints, false);
        let local = select(&endpoints, true);
        let mut frontends = Vec::new();
        let svc_port = port.port as u16;
        let mut add = |addr, port, scope, kind, local_policy: bool| {
            let selection = if local_policy {
                local.clone()
            } else {
                cluster.clone()
            };
            frontends.push(DesiredFrontend {
                addr,
                port,
                scope,
                kind,
                local_policy,
                selection,
            });
        };
        if let Some(ip) = cluster_ip {
            add(
                ip,
                svc_port,
                scope::INTERNAL,
                kind::CLUSTER_IP,
                internal_local,
            );
            any_port = true;
        }
        if node_ports {
            match port.node_port {
                Some(np) => {
                    let np = np as u16;
                    add(
                        Ipv4Addr::UNSPECIFIED,
                        np,
                        scope::EXTERNAL,
                        kind::NODE_PORT,
                        external_local,
                    );
                    add(
                        Ipv4Addr::UNSPECIFIED,
                        np,
                        scope::INTERNAL,
                        kind::NODE_PORT,
                        false,
                    );
                }
                None => warnings.push(format!(
                    "service {r}: port {} has no nodePort, no NodePort frontend",
                    port.port
                )),
            }
        }
        for &(ip, k) in &external_addrs {
            add(ip, svc_port, scope::EXTERNAL, k, external_local);
            add(ip, svc_port, scope::INTERNAL, k, false);
        }
        out.services.insert(
            id,
            DesiredService {
                backends,
                frontends,
                affinity_timeout,
            },
        );
    }
    if let (Some(ip), true) = (cluster_ip, any_port) {
        out.cluster_ips.insert(ip);
    }
}

/// An endpoint with the conditions the selection rules look at.
struct Candidate {
    backend: DesiredBackend,
    ready: bool,
    serving_terminating: bool,
}

/// Every listed endpoint of a service port, deduplicated, sorted by address and port.
fn endpoints_for(
    port: &ServicePort,
    protocol: u8,
    slices: &[&EndpointSlice],
    node: &NodeContext,
    r: &ObjectRef,
) -> Vec<Candidate> {
    let want_name = port.name.clone().unwrap_or_default();
    let mut found: BTreeMap<(Ipv4Addr, u16), Candidate> = BTreeMap::new();
    for slice in slices {
        if slice.address_type != "IPv4" {
            tracing::info!(service = %r, address_type = %slice.address_type, "skipping EndpointSlice");
            continue;
        }
        // kube-proxy matches slice ports to service ports by name.
        let Some(target) = slice.ports.iter().flatten().find(|p| {
            p.name.clone().unwrap_or_default() == want_name
                && parse_protocol(p.protocol.as_deref()) == Some(protocol)
        }) else {
            continue;
        };
        let Some(target_port) = target.port else {
            continue;
        };
        for ep in &slice.endpoints {
            let cond = ep.conditions.as_ref();
            let ready = cond.and_then(|c| c.ready).unwrap_or(true);
            let serving = cond.and_then(|c| c.serving).unwrap_or(ready);
            let terminating = cond.and_then(|c| c.terminating).unwrap_or(false);
            let local = ep.node_name.as_deref() == Some(node.node_name.as_str());
            let state = if ready {
                backend_state::ACTIVE
            } else if serving && terminating {
                backend_state::TERMINATING
            } else {
                backend_state::INACTIVE
            };
            for addr in &ep.addresses {
                let Ok(addr) = addr.parse::<Ipv4Addr>() else {
                    tracing::info!(service = %r, address = %addr, "skipping non-IPv4 endpoint");
                    continue;
                };
                let backend = DesiredBackend {
                    addr,
                    port: target_port as u16,
                    state,
                    local,
                };
                found
                    .entry((addr, target_port as u16))
                    .or_insert(Candidate {
                        backend,
                        ready,
                        serving_terminating: serving && terminating,
                    });
            }
        }
    }
    found.into_values().collect()
}

/// kube-proxy's choice: ready endpoints; if there are none, serving and terminating ones.
fn select(endpoints: &[Candidate], local_only: bool) -> Vec<usize> {
    let pool = |f: &dyn Fn(&Candidate) -> bool| -> Vec<usize> {
        endpoints
            .iter()
            .enumerate()
            .filter(|(_, c)| (!local_only || c.backend.local) && f(c))
            .map(|(i, _)| i)
            .collect()
    };
    let ready = pool(&|c| c.ready);
    if !ready.is_empty() {
        return ready;
    }
    pool(&|c| c.serving_terminating)
}

#[cfg(test)]
mod tests;
