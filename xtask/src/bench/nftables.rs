//! The ruleset kube-proxy's nftables mode writes for the benchmark's services, as `nft -f`
//! input: the table `ip kube-proxy` with the verdict maps `service-ips` (address . protocol
//! . port) and `service-nodeports` (protocol . port), one chain per service port choosing
//! an endpoint chain with `numgen random`, and one chain per endpoint that DNATs.

use std::{fmt::Write, net::Ipv4Addr};

use super::workload::{self, BenchService, CLUSTER_CIDR, NAMESPACE, SERVICE_PORT, TARGET_PORT};

pub const TABLE: &str = "ip kube-proxy";

fn hash8(name: &str) -> String {
    workload::chain_hash(name, 8)
}

fn port_path(s: &BenchService) -> String {
    format!("{NAMESPACE}/{}/tcp/http", s.name)
}

fn svc_chain(s: &BenchService) -> String {
    let p = port_path(s);
    format!("service-{}-{p}", hash8(&p))
}

fn ext_chain(s: &BenchService) -> String {
    let p = port_path(s);
    format!("external-{}-{p}", hash8(&p))
}

fn ep_chain(s: &BenchService, ep: Ipv4Addr) -> String {
    let p = format!("{}__{ep}/{TARGET_PORT}", port_path(s));
    format!("endpoint-{}-{p}", hash8(&p))
}

const BASE: &str = "add table ip kube-proxy { comment \"rules for kube-proxy\" ; }
add chain ip kube-proxy mark-for-masquerade
add rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000
add chain ip kube-proxy masquerading
add rule ip kube-proxy masquerading mark and 0x4000 == 0 return
add rule ip kube-proxy masquerading mark set mark xor 0x4000
add rule ip kube-proxy masquerading masquerade fully-random
add chain ip kube-proxy services
add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }
add rule ip kube-proxy nat-prerouting jump services
add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }
add rule ip kube-proxy nat-output jump services
add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority 100 ; }
add rule ip kube-proxy nat-postrouting jump masquerading
add chain ip kube-proxy filter-forward { type filter hook forward priority -110 ; }
add rule ip kube-proxy filter-forward ct state invalid drop
add set ip kube-proxy cluster-ips { type ipv4_addr ; comment \"Active ClusterIPs\" ; }
add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }
add map ip kube-proxy service-nodeports { type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }
add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips
add rule ip kube-proxy services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports
";

/// The rules of a service port's chain, which must exist.
fn service_rules(out: &mut String, s: &BenchService, eps: &[Ipv4Addr]) {
    let svc = svc_chain(s);
    let _ = writeln!(
        out,
        "add rule {TABLE} {svc} ip daddr {} tcp dport {SERVICE_PORT} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
        s.cluster_ip
    );
    let choices: Vec<String> = eps
        .iter()
        .enumerate()
        .map(|(i, ep)| format!("{i} : goto {}", ep_chain(s, *ep)))
        .collect();
    let _ = writeln!(
        out,
        "add rule {TABLE} {svc} numgen random mod {} vmap {{ {} }}",
        eps.len(),
        choices.join(" , ")
    );
}

fn endpoint_chain(out: &mut String, s: &BenchService, ep: Ipv4Addr) {
    let c = ep_chain(s, ep);
    let _ = writeln!(out, "add chain {TABLE} {c}");
    let _ = writeln!(
        out,
        "add rule {TABLE} {c} ip saddr {ep} jump mark-for-masquerade"
    );
    let _ = writeln!(
        out,
        "add rule {TABLE} {c} meta l4proto tcp dnat to {ep}:{TARGET_PORT}"
    );
}

/// The whole ruleset, as kube-proxy's first sync writes it.
pub fn full(services: &[BenchService]) -> String {
    let mut out = String::from(BASE);
    for s in services {
        for ep in s.endpoints {
            endpoint_chain(&mut out, s, ep);
        }
        let svc = svc_chain(s);
        let _ = writeln!(out, "add chain {TABLE} {svc}");
        service_rules(&mut out, s, &s.endpoints);
        let _ = writeln!(
            out,
            "add element {TABLE} cluster-ips {{ {} }}",
            s.cluster_ip
        );
        let _ = writeln!(
            out,
            "add element {TABLE} service-ips {{ {} . tcp . {SERVICE_PORT} : goto {svc} }}",
            s.cluster_ip
        );
        if let Some(np) = s.node_port {
            let ext = ext_chain(s);
            let _ = writeln!(out, "add chain {TABLE} {ext}");
            let _ = writeln!(out, "add rule {TABLE} {ext} jump mark-for-masquerade");
            let _ = writeln!(out, "add rule {TABLE} {ext} goto {svc}");
            let _ = writeln!(
                out,
                "add element {TABLE} service-nodeports {{ tcp . {np} : goto {ext} }}"
            );
        }
    }
    out
}

/// One endpoint of `services[changed]` replaced by `new_ep`, as kube-proxy's nftables mode
/// writes it: only the changed chains, in one transaction.
pub fn endpoint_change(services: &[BenchService], changed: usize, new_ep: Ipv4Addr) -> String {
    let s = &services[changed];
    let mut out = String::new();
    endpoint_chain(&mut out, s, new_ep);
    let _ = writeln!(out, "flush chain {TABLE} {}", svc_chain(s));
    service_rules(&mut out, s, &[s.endpoints[0], new_ep]);
    let _ = writeln!(out, "delete chain {TABLE} {}", ep_chain(s, s.endpoints[1]));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::workload::services;

    #[test]
    fn every_service_gets_map_elements_and_endpoint_chains() {
        let s = services(3);
        let r = full(&s);
        assert_eq!(
            r.matches("add element ip kube-proxy service-ips").count(),
            3
        );
        assert_eq!(
            r.matches("add element ip kube-proxy service-nodeports")
                .count(),
            3
        );
        assert_eq!(r.matches("dnat to ").count(), 6);
        assert_eq!(r.matches("numgen random mod 2 vmap").count(), 3);
        let d = endpoint_change(&s, 1, "10.200.0.1".parse().unwrap());
        assert!(d.contains("dnat to 10.200.0.1:8080"));
        assert!(d.contains(&format!(
            "delete chain {TABLE} {}",
            ep_chain(&s[1], s[1].endpoints[1])
        )));
    }
}
