//! The ruleset kube-proxy's iptables mode writes for the benchmark's services, in
//! `iptables-restore` format: KUBE-SERVICES dispatching on destination and port to one
//! KUBE-SVC chain per service port, which picks a KUBE-SEP chain with `statistic --mode
//! random`, which DNATs; KUBE-NODEPORTS behind an `addrtype --dst-type LOCAL` match;
//! masquerade marks for traffic from outside the cluster CIDR and for hairpins.

use std::{fmt::Write, net::Ipv4Addr};

use super::workload::{self, BenchService, CLUSTER_CIDR, NAMESPACE, SERVICE_PORT, TARGET_PORT};

fn chain_hash(name: &str) -> String {
    workload::chain_hash(name, 16)
}

fn port_name(s: &BenchService) -> String {
    format!("{NAMESPACE}/{}:http", s.name)
}

fn svc_chain(s: &BenchService) -> String {
    format!("KUBE-SVC-{}", chain_hash(&format!("{}tcp", port_name(s))))
}

fn ext_chain(s: &BenchService) -> String {
    format!("KUBE-EXT-{}", chain_hash(&format!("{}tcp", port_name(s))))
}

fn sep_chain(s: &BenchService, ep: Ipv4Addr) -> String {
    format!(
        "KUBE-SEP-{}",
        chain_hash(&format!("{}tcp{ep}:{TARGET_PORT}", port_name(s)))
    )
}

/// KUBE-SERVICES and KUBE-NODEPORTS: every sync rewrites them whole.
fn dispatch(out: &mut String, services: &[BenchService]) {
    for s in services {
        let pn = port_name(s);
        let _ = writeln!(
            out,
            "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"{pn} cluster IP\" -m tcp --dport {SERVICE_PORT} -j {}",
            s.cluster_ip,
            svc_chain(s)
        );
    }
    for s in services {
        if let Some(np) = s.node_port {
            let _ = writeln!(
                out,
                "-A KUBE-NODEPORTS -p tcp -m comment --comment \"{}\" -m tcp --dport {np} -j {}",
                port_name(s),
                ext_chain(s)
            );
        }
    }
    out.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
    );
}

/// The chains of one service port, declared and filled.
fn service_chains(decl: &mut String, rules: &mut String, s: &BenchService, eps: &[Ipv4Addr]) {
    let (pn, svc) = (port_name(s), svc_chain(s));
    let _ = writeln!(decl, ":{svc} - [0:0]");
    let _ = writeln!(
        rules,
        "-A {svc} ! -s {CLUSTER_CIDR} -d {}/32 -p tcp -m comment --comment \"{pn} cluster IP\" -m tcp --dport {SERVICE_PORT} -j KUBE-MARK-MASQ",
        s.cluster_ip
    );
    for (i, ep) in eps.iter().enumerate() {
        let sep = sep_chain(s, *ep);
        let left = eps.len() - i;
        if left > 1 {
            let _ = writeln!(
                rules,
                "-A {svc} -m comment --comment \"{pn} -> {ep}:{TARGET_PORT}\" -m statistic --mode random --probability {:.11} -j {sep}",
                1.0 / left as f64
            );
        } else {
            let _ = writeln!(
                rules,
                "-A {svc} -m comment --comment \"{pn} -> {ep}:{TARGET_PORT}\" -j {sep}"
            );
        }
        let _ = writeln!(decl, ":{sep} - [0:0]");
        let _ = writeln!(
            rules,
            "-A {sep} -s {ep}/32 -m comment --comment \"{pn}\" -j KUBE-MARK-MASQ"
        );
        let _ = writeln!(
            rules,
            "-A {sep} -p tcp -m comment --comment \"{pn}\" -m tcp -j DNAT --to-destination {ep}:{TARGET_PORT}"
        );
    }
    if s.node_port.is_some() {
        let ext = ext_chain(s);
        let _ = writeln!(decl, ":{ext} - [0:0]");
        let _ = writeln!(
            rules,
            "-A {ext} -m comment --comment \"masquerade traffic for {pn} external destinations\" -j KUBE-MARK-MASQ"
        );
        let _ = writeln!(rules, "-A {ext} -j {svc}");
    }
}

const FILTER: &str = "*filter
:KUBE-FORWARD - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD
-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
";

const NAT_HEAD: &str = ":KUBE-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
";

const NAT_JUMPS: &str = "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
";

/// The whole ruleset, as kube-proxy's first sync writes it.
pub fn full(services: &[BenchService]) -> String {
    let (mut decl, mut rules) = (String::from(NAT_HEAD), String::from(NAT_JUMPS));
    dispatch(&mut rules, services);
    for s in services {
        service_chains(&mut decl, &mut rules, s, &s.endpoints);
    }
    format!("{FILTER}*nat\n{decl}{rules}COMMIT\n")
}

/// One endpoint of `services[changed]` replaced by `new_ep`, as kube-proxy's partial sync
/// writes it (`--noflush`): KUBE-SERVICES and KUBE-NODEPORTS whole, the changed service's
/// chains, the new endpoint chain, and the old one deleted.
pub fn endpoint_change(services: &[BenchService], changed: usize, new_ep: Ipv4Addr) -> String {
    let s = &services[changed];
    let eps = [s.endpoints[0], new_ep];
    let mut decl = String::from(":KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n");
    let mut rules = String::new();
    dispatch(&mut rules, services);
    service_chains(&mut decl, &mut rules, s, &eps);
    // Declaring the stale chain flushes it, so that it can be deleted.
    let old = sep_chain(s, s.endpoints[1]);
    let _ = writeln!(decl, ":{old} - [0:0]");
    let _ = writeln!(rules, "-X {old}");
    format!("*nat\n{decl}{rules}COMMIT\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::workload::services;

    #[test]
    fn every_service_gets_a_dispatch_rule_and_its_endpoint_chains() {
        let s = services(3);
        let r = full(&s);
        assert_eq!(r.matches("-A KUBE-SERVICES -d 10.96.0.").count(), 3);
        assert_eq!(r.matches("-A KUBE-NODEPORTS -p tcp").count(), 3);
        assert_eq!(r.matches("-j DNAT --to-destination").count(), 6);
        assert_eq!(r.matches("--probability 0.50000000000").count(), 3);
        assert!(r.contains(&format!(
            "DNAT --to-destination {}:{TARGET_PORT}",
            s[2].endpoints[1]
        )));
        let d = endpoint_change(&s, 1, "10.200.0.1".parse().unwrap());
        assert!(d.contains("DNAT --to-destination 10.200.0.1:8080"));
        assert!(d.contains(&format!("-X {}", sep_chain(&s[1], s[1].endpoints[1]))));
        assert_eq!(d.matches("-j DNAT").count(), 2, "only the changed service");
    }
}
