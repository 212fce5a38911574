use super::*;
use crate::manifest::ManifestSource;
use lb_common::{backend_state as bs, kind as k, scope as sc};

fn node() -> NodeContext {
    NodeContext {
        node_name: "n1".into(),
        node_addresses: vec![Ipv4Addr::new(192, 0, 2, 1)],
        zone: None,
        lb_mode: Default::default(),
    }
}

/// Plans the objects of a YAML text.
fn plan_yaml(yaml: &str) -> Plan {
    let path = std::env::temp_dir().join(format!(
        "lb-plan-{}-{:x}.yaml",
        std::process::id(),
        hash(yaml)
    ));
    std::fs::write(&path, yaml).unwrap();
    let mut src = ManifestSource::new(&path);
    let errors = src.reload();
    std::fs::remove_file(&path).unwrap();
    assert!(errors.is_empty(), "{errors:?}");
    plan(&src.state(), &node())
}

fn hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

fn service(spec: &str) -> String {
    format!("apiVersion: v1\nkind: Service\nmetadata: {{name: s, namespace: ns}}\nspec:\n{spec}\n")
}

/// A slice with endpoints given as (ip, node, ready, serving, terminating).
fn slice(ports: &str, eps: &[(&str, &str, bool, bool, bool)]) -> String {
    let eps: String = eps
        .iter()
        .map(|(ip, n, r, s, t)| {
            format!("- addresses: [{ip}]\n  nodeName: {n}\n  conditions: {{ready: {r}, serving: {s}, terminating: {t}}}\n")
        })
        .collect();
    format!("---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: s-1\n  namespace: ns\n  labels: {{kubernetes.io/service-name: s}}\naddressType: IPv4\nports: {ports}\nendpoints:\n{eps}")
}

const PORTS: &str = "  ports: [{name: http, port: 80, targetPort: web, nodePort: 30080}]";
const SLICE_PORTS: &str = "[{name: http, port: 8080}]";

fn only(p: &Plan) -> &DesiredService {
    assert_eq!(
        p.desired.services.len(),
        1,
        "{:?}",
        p.desired.services.keys()
    );
    p.desired.services.values().next().unwrap()
}

fn frontend(s: &DesiredService, kind: u8, scope: u8) -> &DesiredFrontend {
    s.frontends
        .iter()
        .find(|f| f.kind == kind && f.scope == scope)
        .unwrap_or_else(|| panic!("no frontend {kind}/{scope}: {:?}", s.frontends))
}

fn selected(s: &DesiredService, f: &DesiredFrontend) -> Vec<String> {
    f.selection
        .iter()
        .map(|&i| s.backends[i].addr.to_string())
        .collect()
}

#[test]
fn cluster_ip_gets_internal_frontend_marker_and_named_target_port() {
    let p = plan_yaml(
        &(service(&format!("  clusterIP: 10.96.0.1\n{PORTS}"))
            + &slice(SLICE_PORTS, &[("10.0.0.1", "n1", true, true, false)])),
    );
    let s = only(&p);
    let f = frontend(s, k::CLUSTER_IP, sc::INTERNAL);
    assert_eq!((f.addr, f.port), (Ipv4Addr::new(10, 96, 0, 1), 80));
    assert_eq!(
        s.backends[0].port, 8080,
        "named targetPort resolved through the slice port"
    );
    assert!(
        s.frontends.iter().all(|f| f.kind == k::CLUSTER_IP),
        "a ClusterIP service has no NodePort"
    );
    assert!(p.desired.cluster_ips.contains(&Ipv4Addr::new(10, 96, 0, 1)));
}

#[test]
fn node_port_load_balancer_and_external_ips_get_both_scopes() {
    let yaml = service(&format!("  type: LoadBalancer\n  clusterIP: 10.96.0.1\n  externalIPs: [198.51.100.7]\n{PORTS}"))
        + "status:\n  loadBalancer:\n    ingress: [{ip: 203.0.113.1}, {ip: 203.0.113.2, ipMode: Proxy}]\n"
        + &slice(SLICE_PORTS, &[("10.0.0.1", "n1", true, true, false)]);
    let p = plan_yaml(&yaml);
    let s = only(&p);
    for kind in [k::NODE_PORT, k::LOAD_BALANCER, k::EXTERNAL_IP] {
        frontend(s, kind, sc::EXTERNAL);
        frontend(s, kind, sc::INTERNAL);
    }
    assert_eq!(
        frontend(s, k::NODE_PORT, sc::EXTERNAL).addr,
        Ipv4Addr::UNSPECIFIED
    );
    assert_eq!(frontend(s, k::NODE_PORT, sc::EXTERNAL).port, 30080);
    let lb: Vec<Ipv4Addr> = s
        .frontends
        .iter()
        .filter(|f| f.kind == k::LOAD_BALANCER)
        .map(|f| f.addr)
        .collect();
    assert!(
        lb.iter().all(|a| *a == Ipv4Addr::new(203, 0, 113, 1)),
        "ipMode Proxy is not programmed: {lb:?}"
    );
}

#[test]
fn headless_external_name_and_other_proxies_get_nothing() {
    for spec in [
        format!("  clusterIP: None\n{PORTS}"),
        "  type: ExternalName\n  externalName: example.com".to_string(),
    ] {
        assert!(
            plan_yaml(&service(&spec)).desired.services.is_empty(),
            "{spec}"
        );
    }
    let labelled = "apiVersion: v1\nkind: Service\nmetadata: {name: s, labels: {service.kubernetes.io/service-proxy-name: other}}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n";
    assert!(plan_yaml(labelled).desired.services.is_empty());
}

#[test]
fn ready_endpoints_first_then_serving_terminating() {
    let eps = [
        ("10.0.0.1", "n1", true, true, false),
        ("10.0.0.2", "n1", false, true, true),
        ("10.0.0.3", "n1", false, false, false),
    ];
    let p = plan_yaml(
        &(service(&format!("  clusterIP: 10.96.0.1\n{PORTS}")) + &slice(SLICE_PORTS, &eps)),
    );
    let s = only(&p);
    assert_eq!(
        selected(s, frontend(s, k::CLUSTER_IP, sc::INTERNAL)),
        ["10.0.0.1"]
    );
    let states: Vec<u8> = s.backends.iter().map(|b| b.state).collect();
    assert_eq!(
        states,
        [bs::ACTIVE, bs::TERMINATING, bs::INACTIVE],
        "every listed endpoint stays a backend"
    );
    let eps = [
        ("10.0.0.2", "n1", false, true, true),
        ("10.0.0.3", "n1", false, false, false),
    ];
    let p = plan_yaml(
        &(service(&format!("  clusterIP: 10.96.0.1\n{PORTS}")) + &slice(SLICE_PORTS, &eps)),
    );
    let s = only(&p);
    assert_eq!(
        selected(s, frontend(s, k::CLUSTER_IP, sc::INTERNAL)),
        ["10.0.0.2"],
        "fallback to terminating"
    );
}

#[test]
fn traffic_policies_local() {
    let eps = [
        ("10.0.0.1", "n1", true, true, false),
        ("10.0.0.2", "n2", true, true, false),
    ];
    let spec = format!("  type: NodePort\n  clusterIP: 10.96.0.1\n  externalTrafficPolicy: Local\n  internalTrafficPolicy: Local\n{PORTS}");
    let p = plan_yaml(&(service(&spec) + &slice(SLICE_PORTS, &eps)));
    let s = only(&p);
    let ext = frontend(s, k::NODE_PORT, sc::EXTERNAL);
    assert!(ext.local_policy);
    assert_eq!(selected(s, ext), ["10.0.0.1"]);
    let int = frontend(s, k::NODE_PORT, sc::INTERNAL);
    assert!(
        !int.local_policy,
        "pods reaching a NodePort use every endpoint"
    );
    assert_eq!(selected(s, int).len(), 2);
    let cip = frontend(s, k::CLUSTER_IP, sc::INTERNAL);
    assert!(cip.local_policy);
    assert_eq!(selected(s, cip), ["10.0.0.1"]);
    let remote_only = [("10.0.0.2", "n2", true, true, false)];
    let p = plan_yaml(&(service(&spec) + &slice(SLICE_PORTS, &remote_only)));
    let s = only(&p);
    assert!(
        frontend(s, k::NODE_PORT, sc::EXTERNAL).selection.is_empty(),
        "no local endpoint: drop"
    );
}

#[test]
fn several_ports_protocols_and_missing_parts() {
    let spec = "  type: NodePort\n  clusterIP: 10.96.0.1\n  ports:\n  - {name: a, port: 53, protocol: UDP, nodePort: 30053}\n  - {name: b, port: 53, protocol: TCP}\n  - {name: c, port: 9, protocol: SCTP}";
    let ports = "[{name: a, port: 5353, protocol: UDP}, {name: b, port: 5354, protocol: TCP}]";
    let p = plan_yaml(&(service(spec) + &slice(ports, &[("10.0.0.1", "n1", true, true, false)])));
    assert_eq!(p.desired.services.len(), 2);
    let ids: Vec<(String, u8)> = p
        .desired
        .services
        .keys()
        .map(|i| (i.port_name.clone(), i.protocol))
        .collect();
    assert_eq!(
        ids,
        [("a".to_string(), proto::UDP), ("b".to_string(), proto::TCP)]
    );
    for s in p.desired.services.values() {
        assert_eq!(s.backends.len(), 1);
    }
    assert!(
        p.warnings.iter().any(|w| w.contains("no nodePort")),
        "{:?}",
        p.warnings
    );
    assert!(
        p.warnings.iter().any(|w| w.contains("SCTP")),
        "{:?}",
        p.warnings
    );
    let p = plan_yaml(&service(&format!("  type: NodePort\n{PORTS}")));
    assert!(
        p.warnings.iter().any(|w| w.contains("no clusterIP")),
        "{:?}",
        p.warnings
    );
    assert!(p.desired.cluster_ips.is_empty());
}

#[test]
fn session_affinity_default_timeout() {
    let p = plan_yaml(&service(&format!(
        "  clusterIP: 10.96.0.1\n  sessionAffinity: ClientIP\n{PORTS}"
    )));
    assert_eq!(only(&p).affinity_timeout, Some(DEFAULT_AFFINITY_TIMEOUT));
}

#[test]
fn session_affinity_timeout_from_the_config() {
    let p = plan_yaml(&service(&format!(
        "  clusterIP: 10.96.0.1\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: 60}}}}\n{PORTS}"
    )));
    assert_eq!(only(&p).affinity_timeout, Some(60));
    let p = plan_yaml(&service(&format!("  clusterIP: 10.96.0.1\n{PORTS}")));
    assert_eq!(only(&p).affinity_timeout, None, "sessionAffinity None");
}

/// A LoadBalancer service with one ingress IP; `extra` goes into its spec, `meta` into
/// its metadata.
fn load_balancer(extra: &str, meta: &str) -> String {
    format!("apiVersion: v1\nkind: Service\nmetadata: {{name: s, namespace: ns{meta}}}\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.1\n{extra}{PORTS}\nstatus:\n  loadBalancer:\n    ingress: [{{ip: 203.0.113.1}}]\n")
}

#[test]
fn source_ranges_filter_load_balancer_ips_only() {
    let p = plan_yaml(&load_balancer(
        "  loadBalancerSourceRanges: [198.51.100.0/24, ' 10.1.2.3/8 ', '2001:db8::/32']\n",
        "",
    ));
    let s = only(&p);
    assert_eq!(
        s.source_ranges,
        vec![
            (Ipv4Addr::new(10, 0, 0, 0), 8),
            (Ipv4Addr::new(198, 51, 100, 0), 24)
        ],
        "host bits cleared, IPv6 ignored"
    );
    for f in &s.frontends {
        assert_eq!(f.filter_sources, f.kind == k::LOAD_BALANCER, "{f:?}");
    }
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
}

#[test]
fn source_ranges_come_from_the_annotation_when_the_field_is_empty() {
    let meta =
        format!(", annotations: {{{SOURCE_RANGES_ANNOTATION}: '198.51.100.0/24, 192.0.2.128/25'}}");
    let p = plan_yaml(&load_balancer("", &meta));
    assert_eq!(
        only(&p).source_ranges,
        vec![
            (Ipv4Addr::new(192, 0, 2, 128), 25),
            (Ipv4Addr::new(198, 51, 100, 0), 24)
        ]
    );
    let p = plan_yaml(&load_balancer(
        "  loadBalancerSourceRanges: [10.0.0.0/8]\n",
        &meta,
    ));
    assert_eq!(
        only(&p).source_ranges,
        vec![(Ipv4Addr::new(10, 0, 0, 0), 8)],
        "the field wins"
    );
}

#[test]
fn a_bad_source_range_is_reported_and_skipped() {
    let p = plan_yaml(&load_balancer(
        "  loadBalancerSourceRanges: [198.51.100.0/24, 10.0.0.0/33, not-a-cidr]\n",
        "",
    ));
    assert_eq!(
        only(&p).source_ranges,
        vec![(Ipv4Addr::new(198, 51, 100, 0), 24)]
    );
    assert_eq!(p.warnings.len(), 2, "{:?}", p.warnings);
}

#[test]
fn a_range_holding_the_node_allows_the_lb_ips_themselves() {
    let p = plan_yaml(&load_balancer(
        "  loadBalancerSourceRanges: [192.0.2.0/24]\n",
        "",
    ));
    assert_eq!(
        only(&p).source_ranges,
        vec![
            (Ipv4Addr::new(192, 0, 2, 0), 24),
            (Ipv4Addr::new(203, 0, 113, 1), 32)
        ]
    );
}

#[test]
fn without_ranges_nothing_is_filtered() {
    let p = plan_yaml(&load_balancer("", ""));
    let s = only(&p);
    assert!(s.source_ranges.is_empty());
    assert!(s.frontends.iter().all(|f| !f.filter_sources));
}

#[test]
fn health_check_node_port_counts_ready_local_endpoints() {
    let svc = load_balancer(
        "  externalTrafficPolicy: Local\n  healthCheckNodePort: 32100\n",
        "",
    );
    let eps = [
        ("10.0.0.1", "n1", true, true, false),
        ("10.0.0.2", "n1", false, true, true),
        ("10.0.0.3", "n2", true, true, false),
    ];
    let p = plan_yaml(&(svc.clone() + &slice(SLICE_PORTS, &eps)));
    let hc = &p.desired.health_checks[&32100];
    assert_eq!((hc.namespace.as_str(), hc.name.as_str()), ("ns", "s"));
    assert_eq!(hc.local_endpoints, 1, "ready and on this node only");
    let p = plan_yaml(&(svc + &slice(SLICE_PORTS, &eps[2..])));
    assert_eq!(p.desired.health_checks[&32100].local_endpoints, 0);
}

#[test]
fn only_local_load_balancers_get_a_health_check() {
    for extra in [
        "  healthCheckNodePort: 32100\n",
        "  externalTrafficPolicy: Local\n",
    ] {
        let p = plan_yaml(&load_balancer(extra, ""));
        assert!(p.desired.health_checks.is_empty(), "{extra}");
    }
}

#[test]
fn dsr_applies_to_traffic_from_outside_by_flag_or_annotation() {
    let yaml = |meta: &str| load_balancer("", meta);
    let dsr_frontends = |p: &Plan| -> Vec<(u8, u8)> {
        only(p)
            .frontends
            .iter()
            .filter(|f| f.dsr)
            .map(|f| (f.kind, f.scope))
            .collect()
    };
    let p = plan_yaml(&yaml(""));
    assert!(dsr_frontends(&p).is_empty(), "snat by default");
    let p = plan_yaml(&yaml(&format!(
        ", annotations: {{{LB_MODE_ANNOTATION}: dsr}}"
    )));
    assert_eq!(
        dsr_frontends(&p),
        vec![
            (k::NODE_PORT, sc::EXTERNAL),
            (k::LOAD_BALANCER, sc::EXTERNAL)
        ]
    );
    let mut n = node();
    n.lb_mode = LbMode::Dsr;
    let path = std::env::temp_dir().join(format!("lb-plan-dsr-{}.yaml", std::process::id()));
    std::fs::write(
        &path,
        yaml(&format!(", annotations: {{{LB_MODE_ANNOTATION}: snat}}")),
    )
    .unwrap();
    let mut src = ManifestSource::new(&path);
    src.reload();
    std::fs::remove_file(&path).unwrap();
    let p = plan(&src.state(), &n);
    assert!(dsr_frontends(&p).is_empty(), "the annotation wins");
    let p = plan_yaml(&yaml(&format!(
        ", annotations: {{{LB_MODE_ANNOTATION}: fast}}"
    )));
    assert!(
        p.warnings.iter().any(|w| w.contains("fast")),
        "{:?}",
        p.warnings
    );
}

/// Endpoints given as (ip, ready, zone hints, node hints); the node is n1 in zone-a.
fn plan_hinted(eps: &[(&str, bool, &[&str], &[&str])], spec_extra: &str) -> Vec<String> {
    let list = |v: &[&str], key: &str| -> String {
        let items: Vec<String> = v.iter().map(|n| format!("{{name: {n}}}")).collect();
        format!("{key}: [{}]", items.join(", "))
    };
    let eps: String = eps
        .iter()
        .map(|(ip, r, zones, nodes)| {
            let mut hints = Vec::new();
            if !zones.is_empty() {
                hints.push(list(zones, "forZones"));
            }
            if !nodes.is_empty() {
                hints.push(list(nodes, "forNodes"));
            }
            let hints = if hints.is_empty() {
                String::new()
            } else {
                format!("  hints: {{{}}}\n", hints.join(", "))
            };
            format!("- addresses: [{ip}]\n  nodeName: other\n  conditions: {{ready: {r}, serving: {r}, terminating: false}}\n{hints}")
        })
        .collect();
    let yaml = service(&format!("  clusterIP: 10.96.0.1\n{PORTS}\n{spec_extra}"))
        + &format!("---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: s-1\n  namespace: ns\n  labels: {{kubernetes.io/service-name: s}}\naddressType: IPv4\nports: {SLICE_PORTS}\nendpoints:\n{eps}");
    let path = std::env::temp_dir().join(format!(
        "lb-plan-{}-{:x}.yaml",
        std::process::id(),
        hash(&yaml)
    ));
    std::fs::write(&path, &yaml).unwrap();
    let mut src = ManifestSource::new(&path);
    let errors = src.reload();
    std::fs::remove_file(&path).unwrap();
    assert!(errors.is_empty(), "{errors:?}");
    let node = NodeContext {
        zone: Some("zone-a".into()),
        ..node()
    };
    let p = plan(&src.state(), &node);
    let s = only(&p);
    selected(s, frontend(s, k::CLUSTER_IP, sc::INTERNAL))
}

/// The cases of kube-proxy's topology_test.go that decide between hints and all endpoints.
#[test]
fn topology_hints_follow_kube_proxy() {
    let a: &[&str] = &["zone-a"];
    let b: &[&str] = &["zone-b"];
    let none: &[&str] = &[];
    // Every endpoint hinted, some for this zone: only those.
    assert_eq!(
        plan_hinted(
            &[("10.0.0.1", true, a, none), ("10.0.0.2", true, b, none)],
            ""
        ),
        ["10.0.0.1"]
    );
    // One ready endpoint without hints: hints ignored.
    assert_eq!(
        plan_hinted(
            &[("10.0.0.1", true, a, none), ("10.0.0.2", true, none, none)],
            ""
        ),
        ["10.0.0.1", "10.0.0.2"]
    );
    // A not-ready endpoint without hints does not count.
    assert_eq!(
        plan_hinted(
            &[
                ("10.0.0.1", true, a, none),
                ("10.0.0.2", true, b, none),
                ("10.0.0.3", false, none, none)
            ],
            ""
        ),
        ["10.0.0.1"]
    );
    // Hinted, but none for this zone: all endpoints.
    assert_eq!(
        plan_hinted(
            &[("10.0.0.1", true, b, none), ("10.0.0.2", true, b, none)],
            ""
        ),
        ["10.0.0.1", "10.0.0.2"]
    );
    // PreferSameNode: node hints for this node win over zone hints.
    assert_eq!(
        plan_hinted(
            &[
                ("10.0.0.1", true, a, &["n1"]),
                ("10.0.0.2", true, a, &["n2"])
            ],
            "  trafficDistribution: PreferSameNode"
        ),
        ["10.0.0.1"]
    );
    // Node hints for other nodes only: fall back to the zone hints.
    assert_eq!(
        plan_hinted(
            &[
                ("10.0.0.1", true, a, &["n3"]),
                ("10.0.0.2", true, b, &["n2"])
            ],
            ""
        ),
        ["10.0.0.1"]
    );
    // Some endpoint lacks a node hint: zone hints decide.
    assert_eq!(
        plan_hinted(
            &[
                ("10.0.0.1", true, a, &["n1"]),
                ("10.0.0.2", true, a, none),
                ("10.0.0.3", true, b, none)
            ],
            ""
        ),
        ["10.0.0.1", "10.0.0.2"]
    );
}
