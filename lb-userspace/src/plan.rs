//! Kubernetes service semantics as a pure function: cluster state and this node in,
//! the desired maps out. kube-proxy is the reference (`pkg/proxy/topology.go` for the
//! choice of endpoints).

mod planner;

use std::{collections::BTreeMap, net::Ipv4Addr};

use k8s_openapi::api::{
    core::v1::{Service, ServicePort},
    discovery::v1::EndpointSlice,
};
use lb_common::{backend_state, kind, proto, scope};

use crate::{
    desired::{
        DesiredBackend, DesiredFrontend, DesiredMaps, DesiredService, HealthCheck, ServicePortId,
    },
    state::{ClusterState, LbMode, NodeContext, ObjectRef},
};

pub use planner::{Planner, Replanned};

pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// `snat` or `dsr`: overrides `--lb-mode` for one service.
pub const LB_MODE_ANNOTATION: &str = "lb.dev/lb-mode";
/// Read when spec.loadBalancerSourceRanges is empty, as Kubernetes' service helper (used
/// by cloud load balancers) does.
pub const SOURCE_RANGES_ANNOTATION: &str = "service.beta.kubernetes.io/load-balancer-source-ranges";
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;

pub struct Plan {
    pub desired: DesiredMaps,
    pub warnings: Vec<String>,
}

/// The whole state planned at once.
pub fn plan(state: &ClusterState, node: &NodeContext) -> Plan {
    let (planner, warnings) = Planner::new(state, node);
    Plan {
        desired: planner.into_desired(),
        warnings,
    }
}

/// One Service's share of the desired maps.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServicePlan {
    pub ports: BTreeMap<ServicePortId, DesiredService>,
    /// The ClusterIP, when the service answers on it.
    pub cluster_ip: Option<Ipv4Addr>,
    /// A valid healthCheckNodePort and what it reports; another service may hold the port.
    pub health_check: Option<(u16, HealthCheck)>,
}

fn parse_protocol(p: Option<&str>) -> Option<u8> {
    match p.unwrap_or("TCP") {
        "TCP" => Some(proto::TCP),
        "UDP" => Some(proto::UDP),
        _ => None,
    }
}

/// Plans one Service with its EndpointSlices.
pub fn plan_service(
    r: &ObjectRef,
    svc: &Service,
    slices: &[&EndpointSlice],
    node: &NodeContext,
    warnings: &mut Vec<String>,
) -> ServicePlan {
    let mut out = ServicePlan::default();
    let labels = svc.metadata.labels.as_ref();
    if labels.is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL)) {
        return out;
    }
    let Some(spec) = &svc.spec else { return out };
    let svc_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    if svc_type == "ExternalName" {
        return out;
    }
    let cluster_ip = match spec.cluster_ip.as_deref() {
        Some("None") => return out, // headless
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
    let source_ranges = source_ranges(r, svc, &external_addrs, node, warnings);
    let dsr = lb_mode(r, svc, node, warnings) == LbMode::Dsr;
    let affinity_timeout = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .map_or(DEFAULT_AFFINITY_TIMEOUT, |t| t as u32)
    });

    let mut any_port = false;
    let mut local_ready = std::collections::BTreeSet::new();
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
        local_ready.extend(
            endpoints
                .iter()
                .filter(|e| e.ready && e.backend.local)
                .map(|e| e.backend.addr),
        );
        let backends: Vec<DesiredBackend> = endpoints.iter().map(|e| e.backend.clone()).collect();
        let cluster = select_cluster(&endpoints, node);
        let local = select_local(&endpoints);
        let mut frontends = Vec::new();
        let svc_port = port.port as u16;
        let mut add = |addr, port, scope, kind, local_policy: bool| {
            let selection = if local_policy {
                local.clone()
            } else {
                cluster.clone()
            };
            // kube-proxy filters LB IPs only, and for every client, pods included.
            let filter_sources = kind == kind::LOAD_BALANCER && !source_ranges.is_empty();
            frontends.push(DesiredFrontend {
                addr,
                port,
                scope,
                kind,
                local_policy,
                filter_sources,
                // Only traffic from outside is tunnelled; pods reach other nodes by routing.
                dsr: dsr && scope == scope::EXTERNAL,
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
        out.ports.insert(
            id,
            DesiredService {
                backends,
                frontends,
                affinity_timeout,
                source_ranges: source_ranges.clone(),
            },
        );
    }
    if any_port {
        out.cluster_ip = cluster_ip;
    }
    // kube-proxy serves a health check for Local LoadBalancers, counting ready local
    // endpoints, so that the cloud load balancer sends only to nodes that have one.
    if let (true, true, Some(port)) = (
        svc_type == "LoadBalancer",
        external_local,
        spec.health_check_node_port,
    ) {
        let check = HealthCheck {
            namespace: r.namespace.clone(),
            name: r.name.clone(),
            local_endpoints: local_ready.len(),
        };
        match u16::try_from(port) {
            Ok(p) if p != 0 => out.health_check = Some((p, check)),
            _ => warnings.push(format!(
                "service {r}: healthCheckNodePort {port} is invalid, not served"
            )),
        }
    }
    out
}

/// The IPv4 loadBalancerSourceRanges of a LoadBalancer service, normalised to network
/// addresses. The annotation counts only when the field is empty; as in kube-proxy, ranges
/// of the other family are ignored, and when a range holds a node address the LB IPs
/// themselves are allowed too (a node reaching its own VIP arrives from the VIP).
fn source_ranges(
    r: &ObjectRef,
    svc: &Service,
    external_addrs: &[(Ipv4Addr, u8)],
    node: &NodeContext,
    warnings: &mut Vec<String>,
) -> Vec<(Ipv4Addr, u8)> {
    let Some(spec) = &svc.spec else {
        return Vec::new();
    };
    if spec.type_.as_deref() != Some("LoadBalancer") {
        return Vec::new();
    }
    let from_spec: Vec<String> = spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .cloned()
        .collect();
    let given = if from_spec.is_empty() {
        svc.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(SOURCE_RANGES_ANNOTATION))
            .map(|v| v.split(',').map(str::to_string).collect())
            .unwrap_or_default()
    } else {
        from_spec
    };
    let mut ranges = Vec::new();
    for text in given.iter().map(|t| t.trim()).filter(|t| !t.is_empty()) {
        match parse_cidr(text) {
            Ok(Some(range)) => ranges.push(range),
            Ok(None) => tracing::debug!(service = %r, range = text, "skipping IPv6 source range"),
            Err(e) => warnings.push(format!(
                "service {r}: loadBalancerSourceRanges entry {text:?} skipped: {e}"
            )),
        }
    }
    let holds_node = ranges
        .iter()
        .any(|&(net, len)| node.node_addresses.iter().any(|a| network(*a, len) == net));
    if holds_node {
        for &(ip, k) in external_addrs {
            if k == kind::LOAD_BALANCER {
                ranges.push((ip, 32));
            }
        }
    }
    ranges.sort();
    ranges.dedup();
    ranges
}

/// The service's annotation, or the node's default.
fn lb_mode(r: &ObjectRef, svc: &Service, node: &NodeContext, warnings: &mut Vec<String>) -> LbMode {
    let annotation = svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(LB_MODE_ANNOTATION));
    match annotation.map(|v| v.trim()) {
        None => node.lb_mode,
        Some("snat") => LbMode::Snat,
        Some("dsr") => LbMode::Dsr,
        Some(other) => {
            warnings.push(format!(
                "service {r}: {LB_MODE_ANNOTATION} {other:?} is neither snat nor dsr; using {:?}",
                node.lb_mode
            ));
            node.lb_mode
        }
    }
}

fn network(addr: Ipv4Addr, len: u8) -> Ipv4Addr {
    let mask = u32::MAX.checked_shl(32 - len as u32).unwrap_or(0);
    Ipv4Addr::from(u32::from(addr) & mask)
}

/// An IPv4 CIDR as (network address, length), host bits cleared as kube-proxy's sloppy
/// parser does; `None` for an IPv6 CIDR.
fn parse_cidr(text: &str) -> Result<Option<(Ipv4Addr, u8)>, String> {
    let (ip, len) = text
        .split_once('/')
        .ok_or_else(|| "not a CIDR (address/length)".to_string())?;
    if ip.contains(':') {
        return ip
            .parse::<std::net::Ipv6Addr>()
            .map(|_| None)
            .map_err(|e| format!("address: {e}"));
    }
    let ip: Ipv4Addr = ip.parse().map_err(|e| format!("address: {e}"))?;
    let len: u8 = len
        .parse()
        .ok()
        .filter(|l| *l <= 32)
        .ok_or_else(|| format!("prefix length {len:?} is not 0 to 32"))?;
    Ok(Some((network(ip, len), len)))
}

/// An endpoint with the conditions the selection rules look at.
struct Candidate {
    backend: DesiredBackend,
    ready: bool,
    serving_terminating: bool,
    /// Topology hints the EndpointSlice controller set (from spec.trafficDistribution).
    zone_hints: Vec<String>,
    node_hints: Vec<String>,
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
            let hints = ep.hints.as_ref();
            let zone_hints = hint_names(hints.and_then(|h| h.for_zones.as_ref()), |z| &z.name);
            let node_hints = hint_names(hints.and_then(|h| h.for_nodes.as_ref()), |n| &n.name);
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
                        zone_hints: zone_hints.clone(),
                        node_hints: node_hints.clone(),
                    });
            }
        }
    }
    found.into_values().collect()
}

fn hint_names<T>(hints: Option<&Vec<T>>, name: fn(&T) -> &String) -> Vec<String> {
    hints
        .into_iter()
        .flatten()
        .map(|h| name(h).clone())
        .collect()
}

/// The endpoints new flows may use under topology-aware routing, as kube-proxy's
/// `topologyModeFromHints` decides it.
#[derive(Debug, PartialEq, Eq)]
enum Topology {
    /// No hints apply: every endpoint.
    Any,
    /// Only endpoints hinted for this node (trafficDistribution PreferSameNode).
    SameNode,
    /// Only endpoints hinted for this node's zone (PreferClose, PreferSameZone, or the
    /// topology-mode annotation).
    SameZone,
}

/// Hints count only when every ready endpoint has them and at least one is hinted for this
/// node (or its zone); otherwise kube-proxy ignores them and uses all endpoints.
fn topology_mode(endpoints: &[Candidate], node: &NodeContext) -> Topology {
    let zone = node.zone.as_deref().unwrap_or("");
    let ready = || endpoints.iter().filter(|c| c.ready);
    let all_node_hints = ready().all(|c| !c.node_hints.is_empty());
    let for_node = ready().any(|c| c.node_hints.contains(&node.node_name));
    let all_zone_hints = ready().all(|c| !c.zone_hints.is_empty());
    let for_zone = ready().any(|c| c.zone_hints.iter().any(|z| z == zone));
    if all_node_hints && for_node {
        Topology::SameNode
    } else if all_zone_hints && for_zone {
        Topology::SameZone
    } else {
        Topology::Any
    }
}

fn available(c: &Candidate, topology: &Topology, node: &NodeContext) -> bool {
    match topology {
        Topology::Any => true,
        Topology::SameNode => c.node_hints.contains(&node.node_name),
        Topology::SameZone => {
            let zone = node.zone.as_deref().unwrap_or("");
            c.zone_hints.iter().any(|z| z == zone)
        }
    }
}

fn indices(endpoints: &[Candidate], f: impl Fn(&Candidate) -> bool) -> Vec<usize> {
    endpoints
        .iter()
        .enumerate()
        .filter(|(_, c)| f(c))
        .map(|(i, _)| i)
        .collect()
}

/// kube-proxy's cluster endpoints: ready ones available under the topology; if there are
/// none, serving and terminating ones available under it.
fn select_cluster(endpoints: &[Candidate], node: &NodeContext) -> Vec<usize> {
    let topology = topology_mode(endpoints, node);
    let ready = indices(endpoints, |c| c.ready && available(c, &topology, node));
    if !ready.is_empty() {
        return ready;
    }
    indices(endpoints, |c| {
        c.serving_terminating && available(c, &topology, node)
    })
}

/// kube-proxy's local endpoints (traffic policy Local): ready ones on this node; if there
/// are none, serving and terminating ones on this node. Topology does not apply.
fn select_local(endpoints: &[Candidate]) -> Vec<usize> {
    let ready = indices(endpoints, |c| c.ready && c.backend.local);
    if !ready.is_empty() {
        return ready;
    }
    indices(endpoints, |c| c.serving_terminating && c.backend.local)
}

#[cfg(test)]
mod tests;
