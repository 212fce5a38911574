//! The service set every arm of the benchmark programs: N ClusterIP services with two
//! endpoints each, the last min(N, 2000) also NodePorts (the NodePort range holds 2768),
//! and the measured service last, where a linear rule walk finds it latest.

use std::net::Ipv4Addr;

use serde_json::{json, Value};

/// NodePorts go to the last services, at most this many.
pub const NODE_PORTS: usize = 2_000;
pub const NODE_PORT_BASE: u16 = 30_000;
pub const SERVICE_PORT: u16 = 80;
pub const TARGET_PORT: u16 = 8080;
/// Pod addresses: the masquerade rules treat traffic from outside it as external.
pub const CLUSTER_CIDR: &str = "10.128.0.0/9";
pub const NAMESPACE: &str = "bench";
/// The node the agent runs as (the test topology's); every endpoint is on it, so backends
/// are local.
pub const NODE_NAME: &str = lb_userspace::testbed::NODE_NAME;
pub const NODE_IP: Ipv4Addr = lb_userspace::testbed::NODE_IP;

pub struct BenchService {
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub node_port: Option<u16>,
    pub endpoints: [Ipv4Addr; 2],
}

/// Endpoint `j`'s address inside 10.128.0.0/9.
pub fn endpoint_ip(j: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 128 + (j >> 16) as u8, (j >> 8) as u8, j as u8)
}

/// `chars` characters of base32 over a hash of `name`, like kube-proxy's chain names (which
/// take them from SHA-256; any stable hash serves here).
pub fn chain_hash(name: &str, chars: usize) -> String {
    let fnv = |seed: u64| {
        name.bytes().fold(seed, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        })
    };
    let bits = (u128::from(fnv(0xcbf2_9ce4_8422_2325)) << 64) | u128::from(fnv(0x84222325));
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    (0..chars.min(25))
        .map(|i| ALPHABET[((bits >> (i * 5)) & 31) as usize] as char)
        .collect()
}

pub fn cluster_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 96 + (i >> 16) as u8, (i >> 8) as u8, i as u8)
}

pub fn services(n: usize) -> Vec<BenchService> {
    let with_node_port = NODE_PORTS.min(n);
    (0..n)
        .map(|i| BenchService {
            name: format!("svc-{i:05}"),
            cluster_ip: cluster_ip(i),
            node_port: (i + with_node_port >= n)
                .then(|| NODE_PORT_BASE + (i + with_node_port - n) as u16),
            endpoints: [endpoint_ip(2 * i), endpoint_ip(2 * i + 1)],
        })
        .collect()
}

/// The NodePort of the measured (last) service.
pub fn measured_node_port(n: usize) -> u16 {
    NODE_PORT_BASE + NODE_PORTS.min(n) as u16 - 1
}

/// The services and their EndpointSlices as one `kind: List` manifest, as `lb agent
/// --source file:` reads it.
pub fn manifest(services: &[BenchService]) -> Value {
    let mut items = Vec::with_capacity(2 * services.len());
    for s in services {
        let mut port = json!({"name": "http", "port": SERVICE_PORT, "protocol": "TCP",
            "targetPort": TARGET_PORT});
        let kind = if let Some(np) = s.node_port {
            port["nodePort"] = json!(np);
            "NodePort"
        } else {
            "ClusterIP"
        };
        items.push(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": s.name, "namespace": NAMESPACE},
            "spec": {"type": kind, "clusterIP": s.cluster_ip.to_string(), "ports": [port]},
        }));
        items.push(slice(s, &s.endpoints));
    }
    json!({"apiVersion": "v1", "kind": "List", "items": items})
}

/// The EndpointSlice of `s` listing `endpoints`, all ready.
pub fn slice(s: &BenchService, endpoints: &[Ipv4Addr]) -> Value {
    let eps: Vec<Value> = endpoints
        .iter()
        .map(|a| {
            json!({"addresses": [a.to_string()], "conditions": {"ready": true},
            "nodeName": NODE_NAME})
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{}-abcde", s.name), "namespace": NAMESPACE,
            "labels": {"kubernetes.io/service-name": s.name}},
        "addressType": "IPv4",
        "endpoints": eps,
        "ports": [{"name": "http", "port": TARGET_PORT, "protocol": "TCP"}],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_services_get_the_node_ports_and_addresses_are_unique() {
        let s = services(2_500);
        assert_eq!(
            s.iter().filter(|s| s.node_port.is_some()).count(),
            NODE_PORTS
        );
        assert_eq!(s[499].node_port, None);
        assert_eq!(s[500].node_port, Some(NODE_PORT_BASE));
        assert_eq!(s[2_499].node_port, Some(measured_node_port(2_500)));
        let big = services(50_000);
        let mut ips: Vec<_> = big.iter().flat_map(|s| s.endpoints).collect();
        ips.extend(big.iter().map(|s| s.cluster_ip));
        let n = ips.len();
        ips.sort();
        ips.dedup();
        assert_eq!(ips.len(), n);
        assert_eq!(services(10)[9].node_port, Some(measured_node_port(10)));
    }
}
