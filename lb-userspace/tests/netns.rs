//! The real agent in network namespaces with real TCP and UDP traffic: a client reaching
//! NodePorts and LoadBalancer IPs over the node's uplink, pods reaching ClusterIPs.
//! Needs root and the eBPF object: run through `cargo xtask test`.

use std::{
    cell::RefCell,
    collections::BTreeSet,
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use lb_userspace::testbed::{self, tcp_request, udp_ask, udp_socket, Cluster, Session, NODE_IP};

const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const EMPTY_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const LB_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const NODE_PORT: u16 = 30080;
const EMPTY_NODE_PORT: u16 = 30081;
const TCP_ONLY_NODE_PORT: u16 = 30082;

fn lb_bin() -> PathBuf {
    std::env::var_os("LB_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/lb"))
}

/// The echo service (TCP 80 and UDP 53 to the pods' 8080, NodePort, LB IP) with the given
/// pods as endpoints, and a service without endpoints.
fn manifest(cluster: &Cluster, endpoints: &[usize]) -> String {
    let ready: Vec<(usize, Condition)> = endpoints.iter().map(|&i| (i, Ready)).collect();
    manifest_with(cluster, &ready)
}

#[derive(Clone, Copy)]
enum Condition {
    Ready,
    /// serving and terminating, not ready: a pod that is shutting down.
    Terminating,
}
use Condition::*;

fn manifest_with(cluster: &Cluster, endpoints: &[(usize, Condition)]) -> String {
    let eps: String = endpoints
        .iter()
        .map(|&(i, c)| {
            let conditions = match c {
                Ready => "{ready: true}",
                Terminating => "{ready: false, serving: true, terminating: true}",
            };
            format!(
                "- addresses: [\"{}\"]\n  nodeName: node1\n  conditions: {conditions}\n",
                cluster.pods[i].ip
            )
        })
        .collect();
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: demo}}
spec:
  type: LoadBalancer
  clusterIP: {CLUSTER_IP}
  ports:
  - {{name: http, port: 80, targetPort: 8080, nodePort: {NODE_PORT}, protocol: TCP}}
  - {{name: dns, port: 53, targetPort: 8080, nodePort: {NODE_PORT}, protocol: UDP}}
status:
  loadBalancer:
    ingress: [{{ip: "{LB_IP}"}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: echo-abc
  namespace: demo
  labels: {{kubernetes.io/service-name: echo}}
addressType: IPv4
ports:
- {{name: http, port: 8080, protocol: TCP}}
- {{name: dns, port: 8080, protocol: UDP}}
endpoints:
{eps}---
apiVersion: v1
kind: Service
metadata: {{name: empty, namespace: demo}}
spec:
  type: NodePort
  clusterIP: {EMPTY_CLUSTER_IP}
  ports:
  - {{name: http, port: 80, targetPort: 8080, nodePort: {EMPTY_NODE_PORT}, protocol: TCP}}
  - {{name: dns, port: 53, targetPort: 8080, nodePort: {EMPTY_NODE_PORT}, protocol: UDP}}
---
apiVersion: v1
kind: Service
metadata: {{name: tcp-only, namespace: demo}}
spec:
  type: NodePort
  clusterIP: 10.96.0.30
  ports:
  - {{name: http, port: 80, targetPort: 8080, nodePort: {TCP_ONLY_NODE_PORT}, protocol: TCP}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: tcp-only-abc
  namespace: demo
  labels: {{kubernetes.io/service-name: tcp-only}}
addressType: IPv4
ports:
- {{name: http, port: 8080, protocol: TCP}}
endpoints:
{eps}"#
    )
}

struct Setup {
    cluster: Cluster,
    file: PathBuf,
    /// The echo service's endpoints and the YAML of further objects, as last written.
    written: RefCell<(Vec<(usize, Condition)>, String)>,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.file);
    }
}

/// A cluster whose first `backends` pods are the echo service's endpoints.
fn setup(pods: &[&str], backends: usize) -> Setup {
    setup_with(pods, backends, &[])
}

/// [`setup`], with more agent flags.
fn setup_with(pods: &[&str], backends: usize, agent_flags: &[&str]) -> Setup {
    let mut cluster = Cluster::new(&lb_bin(), pods).expect("topology");
    cluster.start_servers().expect("servers");
    let file = std::env::temp_dir().join(format!("{}.yaml", testbed::unique("lbm")));
    let eps: Vec<usize> = (0..backends).collect();
    std::fs::write(&file, manifest(&cluster, &eps)).unwrap();
    cluster.start_agent_with(&file, agent_flags).expect("agent");
    let written = RefCell::new((eps.iter().map(|&i| (i, Ready)).collect(), String::new()));
    Setup {
        cluster,
        file,
        written,
    }
}

/// Rewrites the manifest in place (truncate and write, as editors and scripts do) and
/// waits for the agent to apply it.
fn rewrite(s: &Setup, endpoints: &[usize]) {
    let ready: Vec<(usize, Condition)> = endpoints.iter().map(|&i| (i, Ready)).collect();
    rewrite_with(s, &ready);
}

fn rewrite_with(s: &Setup, endpoints: &[(usize, Condition)]) {
    s.written.borrow_mut().0 = endpoints.to_vec();
    write_manifest(s);
}

/// Adds (or replaces) objects after the echo service's.
fn rewrite_extra(s: &Setup, yaml: String) {
    s.written.borrow_mut().1 = yaml;
    write_manifest(s);
}

fn write_manifest(s: &Setup) {
    let before = s.cluster.synced_count();
    let (endpoints, extra) = &*s.written.borrow();
    let text = manifest_with(&s.cluster, endpoints) + extra;
    std::fs::write(&s.file, text).unwrap();
    s.cluster
        .wait_synced(before + 1)
        .expect("agent applied the change");
}

/// A TCP service `name` on port 80 (to the pods' 8080) of the given `type_` with `spec`
/// lines added, whose endpoints are the given pods.
fn extra_service(s: &Setup, name: &str, spec: &str, status: &str, pods: &[usize]) -> String {
    let eps: String = pods
        .iter()
        .map(|&i| {
            format!(
                "- addresses: [\"{}\"]\n  nodeName: node1\n  conditions: {{ready: true}}\n",
                s.cluster.pods[i].ip
            )
        })
        .collect();
    format!(
        r#"---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: demo}}
spec:
{spec}
{status}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-abc
  namespace: demo
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports:
- {{name: http, port: 8080, protocol: TCP}}
endpoints:
{eps}"#
    )
}

fn from_client<T: Send + 'static>(s: &Setup, f: impl FnOnce() -> T + Send + 'static) -> T {
    s.cluster.client.run(f).expect("client namespace")
}

fn answers(s: &Setup, to: SocketAddr, n: usize) -> BTreeSet<String> {
    answers_in(&s.cluster.client, to, n)
}

/// The pods answering `n` TCP requests to `to` sent from inside `from`.
fn answers_in(from: &testbed::Netns, to: SocketAddr, n: usize) -> BTreeSet<String> {
    from.run(move || {
        (0..n)
            .map(|_| tcp_request(to).expect("request through the service"))
            .collect()
    })
    .expect("the sender's namespace")
}

/// The agent's Prometheus text, fetched inside the node namespace where it listens
/// (`--metrics-addr 127.0.0.1:10249`).
fn scrape_metrics(s: &Setup) -> String {
    s.cluster
        .node
        .run(|| -> std::io::Result<String> {
            use std::io::{Read, Write};
            let to = SocketAddr::from((Ipv4Addr::LOCALHOST, 10249));
            let mut c = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
            c.set_read_timeout(Some(Duration::from_secs(5)))?;
            c.write_all(b"GET /metrics HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")?;
            let mut text = String::new();
            c.read_to_string(&mut text)?;
            assert!(text.starts_with("HTTP/1.1 200"), "{text}");
            Ok(text)
        })
        .expect("node namespace")
        .expect("the agent's metrics")
}

/// The value of one series (name with labels, as printed) in Prometheus text.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn service_series(metric: &str, name: &str, port: &str, protocol: &str) -> String {
    format!("lb_{metric}_total{{namespace=\"demo\",name=\"{name}\",port=\"{port}\",protocol=\"{protocol}\"}}")
}

#[test]
#[ignore = "needs root and the eBPF object: cargo xtask test"]
fn client_reaches_nodeport_and_lb_ip_on_both_pods_over_tcp_and_udp() {
    let s = setup(&["pod-a", "pod-b"], 2);
    let both: BTreeSet<String> = ["pod-a".into(), "pod-b".into()].into();
    assert_eq!(
        answers(&s, SocketAddr::from((NODE_IP, NODE_PORT)), 40),
        both,
        "NodePort"
    );
    assert_eq!(
        answers(&s, SocketAddr::from((LB_IP, 80)), 40),
        both,
        "LB IP"
    );
    let udp: BTreeSet<String> = from_client(&s, || {
        (0..40)
            .map(|_| {
                udp_ask(&udp_socket(SocketAddr::from((NODE_IP, NODE_PORT))).unwrap())
                    .expect("UDP answer")
            })
            .collect()
    });
    assert_eq!(udp, both, "UDP NodePort");
    let services = s.cluster.lb("services", &[]).unwrap();
    assert!(services.contains("203.0.113.10:80"), "{services}");
    let stats = s.cluster.lb("stats", &["--output", "json"]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert!(
        v["verdicts"]["dnat"]["packets"].as_u64().unwrap() > 0,
        "{stats}"
    );
    assert!(
        v["verdicts"]["reverse_nat"]["packets"].as_u64().unwrap() > 0,
        "{stats}"
    );
    let services = v["services"].as_object().unwrap();
    assert!(
        services.values().all(|c| c["drops"].as_u64() == Some(0)),
        "{stats}"
    );

    // The agent's metrics: conntrack entries of these flows, counters per service port.
    let text = scrape_metrics(&s);
    let ct = metric(&text, "lb_map_entries{map=\"CONNTRACK\"}");
    assert!(ct.is_some_and(|n| n > 0.0), "{text}");
    let cap = metric(&text, "lb_map_capacity{map=\"CONNTRACK\"}");
    assert_eq!(
        cap,
        Some(f64::from(lb_common::capacity::CONNTRACK)),
        "{text}"
    );
    assert_eq!(
        metric(&text, "lb_map_entries{map=\"NODE_ADDRS\"}"),
        Some(1.0)
    );
    for (port, protocol) in [("http", "TCP"), ("dns", "UDP")] {
        for m in ["service_packets", "service_bytes"] {
            let series = service_series(m, "echo", port, protocol);
            let n = metric(&text, &series);
            assert!(n.is_some_and(|n| n > 0.0), "{series} in\n{text}");
        }
        let drops = service_series("service_drops", "echo", port, protocol);
        assert_eq!(metric(&text, &drops), Some(0.0), "{text}");
    }
    let idle = service_series("service_packets", "empty", "http", "TCP");
    assert_eq!(metric(&text, &idle), Some(0.0), "{text}");
}

#[test]
#[ignore = "needs root and the eBPF object: cargo xtask test"]
fn pod_reaches_cluster_ip_and_backend_sees_its_address() {
    let s = setup(&["pod-a", "pod-b", "client"], 2);
    let got = answers_in(
        &s.cluster.pods[2].ns,
        SocketAddr::from((CLUSTER_IP, 80)),
        40,
    );
    assert_eq!(
        got,
        ["pod-a", "pod-b"].iter().map(|s| s.to_string()).collect()
    );
    let ct = s.cluster.lb("conntrack", &["--output", "json"]).unwrap();
    // No source NAT: the flow's client is the pod itself.
    assert!(ct.contains(&format!("\"{}:", s.cluster.pods[2].ip)), "{ct}");
    // By default the node's stack carries it.
    assert!(ct.contains("\"route\": \"stack\""), "{ct}");
    let to = SocketAddr::from((CLUSTER_IP, 53));
    let answer = s.cluster.pods[2]
        .ns
        .run(move || udp_ask(&udp_socket(to).unwrap()))
        .unwrap();
    assert!(answer.expect("UDP via ClusterIP").starts_with("pod-"));

    // A recreated pod gets a new interface under the old name; it is attached again.
    s.cluster.recreate_pod_interface(2).unwrap();
    let to = SocketAddr::from((CLUSTER_IP, 80));
    let answer = s.cluster.pods[2].ns.run(move || tcp_request(to)).unwrap();
    assert!(answer
        .expect("ClusterIP after the pod's interface came back")
        .starts_with("pod-"));
}

#[test]
#[ignore = "needs root and the eBPF object: cargo xtask test"]
fn host_routing_carries_local_backends_flows_past_the_nodes_forward_chain() {
    let s = setup_with(&["pod-a", "pod-b", "client"], 2, &["--host-routing", "bpf"]);
    // Nothing the node's stack forwards gets through: every answer below went by the
    // programs, both ways (the INVALID rule is there too).
    s.cluster
        .node
        .exec("iptables", &["-I", "FORWARD", "-j", "DROP"])
        .unwrap();
    let both: BTreeSet<String> = ["pod-a".into(), "pod-b".into()].into();
    assert_eq!(
        answers(&s, SocketAddr::from((NODE_IP, NODE_PORT)), 30),
        both,
        "NodePort from outside"
    );
    let got = answers_in(
        &s.cluster.pods[2].ns,
        SocketAddr::from((CLUSTER_IP, 80)),
        30,
    );
    assert_eq!(got, both, "ClusterIP from a pod");
    let to = SocketAddr::from((CLUSTER_IP, 53));
    let answer = s.cluster.pods[2]
        .ns
        .run(move || udp_ask(&udp_socket(to).unwrap()))
        .unwrap();
    assert!(answer.expect("UDP via ClusterIP").starts_with("pod-"));
    // A kept-alive connection keeps going the same way.
    let mut session = from_client(&s, || Session::open(SocketAddr::from((LB_IP, 80))).unwrap());
    for _ in 0..3 {
        assert!(session
            .ask()
            .expect("kept-alive request")
            .starts_with("pod-"));
    }
    let ct = s.cluster.lb("conntrack", &["--output", "json"]).unwrap();
    let flows: Vec<serde_json::Value> = serde_json::from_str(&ct).unwrap();
    assert!(
        !flows.is_empty() && flows.iter().all(|f| f["route"] == "direct"),
        "every flow direct: {ct}"
    );
}

#[test]
#[ignore = "needs root and the eBPF object: cargo xtask test"]
fn removing_an_endpoint_moves_new_flows_and_keeps_established_ones() {
    let s = setup(&["pod-a", "pod-b"], 2);
    let to = SocketAddr::from((NODE_IP, NODE_PORT));
    // Hold a connection to each pod.
    let (a, b) = from_client(&s, move || {
        let mut sessions: Vec<Session> = Vec::new();
        let (mut a, mut b) = (None, None);
        for _ in 0..64 {
            let mut sess = Session::open(to).unwrap();
            match sess.ask().unwrap().as_str() {
                "pod-a" if a.is_none() => a = Some(sess),
                "pod-b" if b.is_none() => b = Some(sess),
                _ => sessions.push(sess),
            }
            if a.is_some() && b.is_some() {
                break;
            }
        }
        (a.expect("a flow to pod-a"), b.expect("a flow to pod-b"))
    });
    let udp_to = SocketAddr::from((NODE_IP, NODE_PORT));
    let (udp_a, first) = from_client(&s, move || loop {
        let sock = udp_socket(udp_to).unwrap();
        let who = udp_ask(&sock).unwrap();
        if who == "pod-b" {
            break (sock, who);
        }
    });
    assert_eq!(first, "pod-b");

    rewrite(&s, &[0]); // pod-b leaves the endpoints
    let got = answers(&s, to, 30);
    assert_eq!(
        got,
        ["pod-a".to_string()].into(),
        "new connections avoid the removed pod"
    );
    let (a, b, again) = from_client(&s, move || {
        let (mut a, mut b) = (a, b);
        let again = udp_ask(&udp_a);
        (a.ask(), b.ask(), again)
    });
    assert_eq!(
        a.unwrap(),
        "pod-a",
        "established flow to a remaining endpoint keeps working"
    );
    // As with kube-proxy, a TCP flow keeps its backend address for its life.
    assert_eq!(b.unwrap(), "pod-b");
    assert_eq!(
        again.expect("UDP flow re-selected, not black-holed"),
        "pod-a"
    );
}

#[test]
#[ignore = "needs root and the eBPF object: cargo xtask test"]
fn service_without_endpoints_refuses_promptly() {
    let s = setup(&["pod-a", "client"], 1);
    // Host processes on the node listen on the empty NodePort: the service still wins, as
    // with kube-proxy, so these must never answer.
    let _host_listeners = s
        .cluster
        .node
        .run(|| {
            let any = SocketAddr::from((Ipv4Addr::UNSPECIFIED, EMPTY_NODE_PORT));
            (
                std::net::TcpListener::bind(any).unwrap(),
                std::net::UdpSocket::bind(any).unwrap(),
            )
        })
        .unwrap();
    let check = |r: std::io::Result<String>, what: &str, started: Instant| {
        let e = r.expect_err(what);
        assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{what}: {e}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{what}: refusal was not prompt"
        );
    };
    let (tcp, udp, t) = from_client(&s, || {
        let t = Instant::now();
        let tcp = tcp_request(SocketAddr::from((NODE_IP, EMPTY_NODE_PORT)));
        let udp = udp_ask(&udp_socket(SocketAddr::from((NODE_IP, EMPTY_NODE_PORT))).unwrap());
        (tcp, udp, t)
    });
    check(tcp, "TCP NodePort without endpoints", t);
    check(udp, "UDP NodePort without endpoints", t);
    let (tcp, udp, port, t) = s.cluster.pods[1]
        .ns
        .run(|| {
            let t = Instant::now();
            let tcp = tcp_request(SocketAddr::from((EMPTY_CLUSTER_IP, 80)));
            let udp = udp_ask(&udp_socket(SocketAddr::from((EMPTY_CLUSTER_IP, 53))).unwrap());
            // A known ClusterIP on a port no service declares.
            let port = tcp_request(SocketAddr::from((CLUSTER_IP, 81)));
            (tcp, udp, port, t)
        })
        .unwrap();
    check(tcp, "TCP ClusterIP without endpoints", t);
    check(udp, "UDP ClusterIP without endpoints", t);
    check(port, "ClusterIP on an undeclared port", t);
}

#[test]
#[ignore = "needs root and the eBPF object: cargo xtask test"]
fn agent_restart_keeps_connections_and_service() {
    let mut s = setup(&["pod-a", "pod-b"], 2);
    let to = SocketAddr::from((NODE_IP, NODE_PORT));
    let sess = from_client(&s, move || {
        let mut sess = Session::open(to).unwrap();
        sess.ask().unwrap();
        sess
    });
    s.cluster.kill_agent();
    let (sess, down) = from_client(&s, move || {
        let mut sess = sess;
        let r = sess.ask();
        (sess, r.map(|_| tcp_request(to)))
    });
    down.expect("established flow while the agent is down")
        .expect("new connection while the agent is down");
    let services_before = s.cluster.lb("services", &["--output", "json"]).unwrap();
    s.cluster
        .start_agent(&s.file.clone())
        .expect("agent restarts");
    let log = s.cluster.log();
    let last_sync = log
        .lines()
        .rfind(|l| l.contains(" synced"))
        .unwrap()
        .to_string();
    assert!(
        last_sync.contains("writes=0"),
        "restart rewrote the maps: {last_sync}"
    );
    assert_eq!(
        s.cluster.lb("services", &["--output", "json"]).unwrap(),
        services_before,
        "ids changed"
    );
    let after = from_client(&s, move || {
        let mut sess = sess;
        (sess.ask(), tcp_request(to))
    });
    after.0.expect("established flow after restart");
    after.1.expect("new connection after restart");
}

/// Sets the layout version in the pinned CONFIG map, as an agent of another release would
/// have left it.
fn pin_layout_version(s: &Setup, version: u32) {
    let map = lb_userspace::sync::open_pin(&s.cluster.bpffs, lb_common::maps::CONFIG).unwrap();
    let mut config: aya::maps::Array<_, lb_common::Config> = map.try_into().unwrap();
    let mut c = config.get(&0, 0).unwrap();
    c.layout_version = version;
    config.set(0, c, 0).unwrap();
}

#[test]
#[ignore = "needs root and the eBPF object: cargo xtask test"]
fn agent_replaces_maps_of_another_layout() {
    let mut s = setup(&["pod-a", "pod-b"], 2);
    let to = SocketAddr::from((NODE_IP, NODE_PORT));
    assert_eq!(answers(&s, to, 8).len(), 2);
    s.cluster.kill_agent();
    pin_layout_version(&s, lb_common::LAYOUT_VERSION + 1);
    s.cluster
        .start_agent(&s.file.clone())
        .expect("agent restarts");
    assert!(
        s.cluster.log().contains("pinned maps have another layout"),
        "the agent did not say it replaced the maps:\n{}",
        s.cluster.log()
    );
    let map = lb_userspace::sync::open_pin(&s.cluster.bpffs, lb_common::maps::CONFIG).unwrap();
    let config: aya::maps::Array<_, lb_common::Config> = map.try_into().unwrap();
    assert_eq!(
        config.get(&0, 0).unwrap().layout_version,
        lb_common::LAYOUT_VERSION
    );
    assert_eq!(answers(&s, to, 8).len(), 2, "served from the new maps");
}

#[test]
#[ignore = "needs root and the eBPF object: cargo xtask test"]
fn a_node_port_takes_only_its_own_protocol_from_host_processes() {
    let s = setup(&["pod-a"], 1);
    // A host process on the node serves UDP on the port the service claims for TCP only.
    let host = s
        .cluster
        .node
        .run(|| {
            std::net::UdpSocket::bind(SocketAddr::from((
                Ipv4Addr::UNSPECIFIED,
                TCP_ONLY_NODE_PORT,
            )))
            .unwrap()
        })
        .unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok((_, from)) = host.recv_from(&mut buf) {
            let _ = host.send_to(b"host", from);
        }
    });
    let to = SocketAddr::from((NODE_IP, TCP_ONLY_NODE_PORT));
    let (tcp, udp) = from_client(&s, move || {
        (tcp_request(to), udp_ask(&udp_socket(to).unwrap()))
    });
    assert_eq!(tcp.expect("TCP through the NodePort"), "pod-a");
    assert_eq!(udp.expect("UDP to the host process"), "host");
}

#[test]
#[ignore = "needs root and the eBPF object: cargo xtask test"]
fn a_udp_service_scaled_to_zero_and_back_serves_the_same_flow_at_once() {
    let s = setup(&["pod-a", "pod-b"], 2);
    let to = SocketAddr::from((NODE_IP, NODE_PORT));
    let sock = from_client(&s, move || {
        let sock = udp_socket(to).unwrap();
        udp_ask(&sock).expect("UDP before scaling down");
        sock
    });
    rewrite(&s, &[]);
    let (sock, down) = from_client(&s, move || {
        let r = udp_ask(&sock);
        (sock, r)
    });
    assert_eq!(
        down.expect_err("UDP with no endpoints").kind(),
        ErrorKind::ConnectionRefused
    );
    rewrite(&s, &[1]);
    // The same socket, so the same conntrack key: its old entry must not black-hole it.
    let up = from_client(&s, move || udp_ask(&sock));
    assert_eq!(up.expect("UDP right after scaling up"), "pod-b");
}

#[test]
#[ignore = "needs root and the eBPF object: cargo xtask test"]
fn a_terminating_endpoint_finishes_its_connections_and_is_the_last_resort() {
    let s = setup(&["pod-a", "pod-b"], 2);
    let to = SocketAddr::from((NODE_IP, NODE_PORT));
    let (sess, first) = from_client(&s, move || {
        let mut sess = Session::open(to).unwrap();
        let who = sess.ask().unwrap();
        (sess, who)
    });
    let (leaving, staying) = if first == "pod-a" { (0, 1) } else { (1, 0) };
    rewrite_with(&s, &[(leaving, Terminating), (staying, Ready)]);
    let (sess, still) = from_client(&s, move || {
        let mut sess = sess;
        let r = sess.ask();
        (sess, r)
    });
    assert_eq!(still.expect("established flow to a terminating pod"), first);
    let new = answers(&s, to, 12);
    assert_eq!(
        new,
        BTreeSet::from([s.cluster.pods[staying].name.clone()]),
        "new connections went to the terminating pod"
    );
    // Only the terminating pod is left: kube-proxy falls back to it.
    rewrite_with(&s, &[(leaving, Terminating)]);
    assert_eq!(answers(&s, to, 4), BTreeSet::from([first.clone()]));
    drop(sess);
}

const STICKY_NODE_PORT: u16 = 30090;
const GUARDED_LB_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
const GUARDED_NODE_PORT: u16 = 30091;

/// The pods that answered `n` new connections.
fn who_answers(s: &Setup, to: SocketAddr, n: usize) -> Vec<String> {
    from_client(s, move || {
        (0..n)
            .map(|_| tcp_request(to).expect("request through the service"))
            .collect()
    })
}

fn one_pod(answers: &[String]) -> String {
    let set: BTreeSet<&String> = answers.iter().collect();
    assert_eq!(
        set.len(),
        1,
        "one backend for every connection: {answers:?}"
    );
    answers[0].clone()
}

#[test]
#[ignore = "needs root and the eBPF object: cargo xtask test"]
fn session_affinity_keeps_a_client_on_one_pod_until_it_leaves_or_times_out() {
    let s = setup(&["pod-a", "pod-b", "pod-c"], 0);
    let sticky = |pods: &[usize]| {
        extra_service(
            &s,
            "sticky",
            &format!("  type: NodePort\n  clusterIP: 10.96.0.40\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: 5}}}}\n  ports: [{{name: http, port: 80, targetPort: 8080, nodePort: {STICKY_NODE_PORT}}}]"),
            "",
            pods,
        )
    };
    rewrite_extra(&s, sticky(&[0, 1, 2]));
    let services = s.cluster.lb("services", &[]).unwrap();
    assert!(services.contains("affinity=5s"), "{services}");
    let to = SocketAddr::from((NODE_IP, STICKY_NODE_PORT));
    // Without affinity 12 connections over 3 pods all on one would be a 1 in 3^11 chance.
    let first = one_pod(&who_answers(&s, to, 12));
    let first_i = s.cluster.pods.iter().position(|p| p.name == first).unwrap();
    // The node's own sockets are one client too.
    let from_node: Vec<String> = (0..8)
        .map(|_| {
            node_tcp(&s, SocketAddr::from((Ipv4Addr::new(10, 96, 0, 40), 80)))
                .expect("sticky ClusterIP from the node")
                .0
        })
        .collect();
    one_pod(&from_node);

    // Its pod leaves: the client moves, and stays where it moved.
    let rest: Vec<usize> = (0..3).filter(|&i| i != first_i).collect();
    rewrite_extra(&s, sticky(&rest));
    let moved = one_pod(&who_answers(&s, to, 8));
    assert_ne!(moved, first);

    // The pod comes back. The hash of the client would pick it again; the affinity entry
    // keeps the client where it is.
    rewrite_extra(&s, sticky(&[0, 1, 2]));
    assert_eq!(one_pod(&who_answers(&s, to, 8)), moved);

    // Once the timeout has passed since the last connection, the binding is gone.
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(one_pod(&who_answers(&s, to, 4)), first);
}

#[test]
#[ignore = "needs root and the eBPF object: cargo xtask test"]
fn source_ranges_drop_other_clients_at_the_lb_ip_only() {
    let s = setup(&["pod-a"], 1);
    let guarded = |ranges: &str| {
        extra_service(
            &s,
            "guarded",
            &format!("  type: LoadBalancer\n  clusterIP: 10.96.0.50\n  loadBalancerSourceRanges: [{ranges}]\n  ports: [{{name: http, port: 80, targetPort: 8080, nodePort: {GUARDED_NODE_PORT}}}]"),
            &format!("status:\n  loadBalancer:\n    ingress: [{{ip: \"{GUARDED_LB_IP}\"}}]"),
            &[0],
        )
    };
    rewrite_extra(&s, guarded("198.51.100.0/24"));
    let lb = SocketAddr::from((GUARDED_LB_IP, 80));
    let refused = from_client(&s, move || tcp_request(lb));
    let e = refused.expect_err("a client outside the ranges");
    assert_eq!(e.kind(), ErrorKind::TimedOut, "dropped, not refused: {e}");
    let stats = s.cluster.lb("stats", &["--output", "json"]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert!(v["drops"]["source_range"].as_u64().unwrap() > 0, "{stats}");
    let dropped: u64 = v["services"]
        .as_object()
        .unwrap()
        .values()
        .map(|c| c["drops"].as_u64().unwrap())
        .sum();
    assert!(dropped > 0, "{stats}");
    let text = scrape_metrics(&s);
    let drops = service_series("service_drops", "guarded", "http", "TCP");
    assert!(metric(&text, &drops).is_some_and(|n| n > 0.0), "{text}");
    let echo = service_series("service_drops", "echo", "http", "TCP");
    assert_eq!(metric(&text, &echo), Some(0.0), "{text}");
    // The node's own sockets come from the node's address, outside the ranges too.
    let e = node_tcp(&s, lb).expect_err("the node outside the ranges");
    assert_eq!(e.kind(), node_refusal(), "{e}");
    // The same service's NodePort is not filtered, as with kube-proxy.
    let np = SocketAddr::from((NODE_IP, GUARDED_NODE_PORT));
    assert_eq!(answers(&s, np, 2), BTreeSet::from(["pod-a".to_string()]));

    rewrite_extra(
        &s,
        guarded(&format!("198.51.100.0/24, {}/32", testbed::CLIENT_IP)),
    );
    let services = s.cluster.lb("services", &[]).unwrap();
    assert!(services.contains("source-ranges="), "{services}");
    assert_eq!(answers(&s, lb, 2), BTreeSet::from(["pod-a".to_string()]));
}

/// A ClusterIP service "dns" on 53/TCP, 53/UDP and 80/TCP, all to the pods' 8080.
fn dns_service(s: &Setup, pods: &[usize]) -> String {
    let eps: String = pods
        .iter()
        .map(|&i| format!("- addresses: [\"{}\"]\n", s.cluster.pods[i].ip))
        .collect();
    let slice = if pods.is_empty() {
        String::new()
    } else {
        format!(
            r#"---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: dns-abc
  namespace: demo
  labels: {{kubernetes.io/service-name: dns}}
addressType: IPv4
ports:
- {{name: dns-tcp, port: 8080, protocol: TCP}}
- {{name: dns-udp, port: 8080, protocol: UDP}}
- {{name: http, port: 8080, protocol: TCP}}
endpoints:
{eps}"#
        )
    };
    format!(
        r#"---
apiVersion: v1
kind: Service
metadata: {{name: dns, namespace: demo}}
spec:
  clusterIP: {DNS_CLUSTER_IP}
  ports:
  - {{name: dns-tcp, port: 53, targetPort: 8080, protocol: TCP}}
  - {{name: dns-udp, port: 53, targetPort: 8080, protocol: UDP}}
  - {{name: http, port: 80, targetPort: 8080, protocol: TCP}}
{slice}"#
    )
}

const DNS_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 60);

#[test]
#[ignore = "needs root and the eBPF object: cargo xtask test"]
fn a_cluster_ip_without_endpoints_serves_every_port_once_it_gains_some() {
    let s = setup(&["pod-a", "client"], 0);
    rewrite_extra(&s, dns_service(&s, &[]));
    let ask_all = || {
        s.cluster.pods[1]
            .ns
            .run(|| {
                let tcp53 = tcp_request(SocketAddr::from((DNS_CLUSTER_IP, 53)));
                let udp53 = udp_ask(&udp_socket(SocketAddr::from((DNS_CLUSTER_IP, 53))).unwrap());
                let tcp80 = tcp_request(SocketAddr::from((DNS_CLUSTER_IP, 80)));
                [tcp53, udp53, tcp80]
            })
            .unwrap()
    };
    for r in ask_all() {
        let e = r.expect_err("no endpoints yet");
        assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");
    }
    rewrite_extra(&s, dns_service(&s, &[0]));
    for (r, what) in ask_all().into_iter().zip(["53/TCP", "53/UDP", "80/TCP"]) {
        assert_eq!(r.expect(what), "pod-a", "{what}");
    }
}

/// One request over a new TCP connection from the node itself: the answer and the peer
/// address the socket reports.
/// What the node's own sockets read when a socket hook refuses them: ECONNREFUSED, or EPERM
/// on kernels without `bpf_set_retval` (before 5.18), where the agent loads the hooks'
/// compat programs and says so in its log.
fn node_refusal() -> ErrorKind {
    // SAFETY: uname fills the zeroed struct; release is NUL-terminated.
    let release = unsafe {
        let mut u: libc::utsname = std::mem::zeroed();
        libc::uname(&mut u);
        std::ffi::CStr::from_ptr(u.release.as_ptr())
            .to_string_lossy()
            .into_owned()
    };
    let mut n = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().unwrap_or(0));
    if (n.next().unwrap_or(0), n.next().unwrap_or(0)) < (5, 18) {
        ErrorKind::PermissionDenied
    } else {
        ErrorKind::ConnectionRefused
    }
}

fn node_tcp(s: &Setup, to: SocketAddr) -> std::io::Result<(String, SocketAddr)> {
    s.cluster
        .node
        .run(move || {
            use std::io::{BufRead, BufReader, Write};
            let mut c = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
            c.set_read_timeout(Some(Duration::from_secs(3)))?;
            let peer = c.peer_addr()?;
            c.write_all(b"hello\n")?;
            let mut line = String::new();
            BufReader::new(c).read_line(&mut line)?;
            Ok((line.trim().to_string(), peer))
        })
        .unwrap()
}

#[test]
#[ignore = "needs root and the eBPF object: cargo xtask test"]
fn the_node_itself_reaches_services_through_its_sockets() {
    let s = setup(&["pod-a", "pod-b"], 2);
    let cluster_ip = SocketAddr::from((CLUSTER_IP, 80));
    let pods: BTreeSet<String> = ["pod-a".into(), "pod-b".into()].into();
    let mut seen = BTreeSet::new();
    for _ in 0..24 {
        let (who, peer) = node_tcp(&s, cluster_ip).expect("ClusterIP from the node");
        assert_eq!(peer, cluster_ip, "getpeername shows the service");
        seen.insert(who);
    }
    assert_eq!(
        seen, pods,
        "one process's connections spread over the backends"
    );
    for to in [
        SocketAddr::from((NODE_IP, NODE_PORT)),
        SocketAddr::from((Ipv4Addr::LOCALHOST, NODE_PORT)),
        SocketAddr::from((LB_IP, 80)),
    ] {
        let (who, peer) = node_tcp(&s, to).unwrap_or_else(|e| panic!("{to} from the node: {e}"));
        assert!(pods.contains(&who), "{to}: {who}");
        assert_eq!(peer, to);
    }

    let dns = SocketAddr::from((CLUSTER_IP, 53));
    let (unconnected, connected) = s
        .cluster
        .node
        .run(move || {
            let sock = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            sock.send_to(b"ping", dns).unwrap();
            let mut buf = [0u8; 64];
            let unconnected = sock
                .recv_from(&mut buf)
                .map(|(n, from)| (String::from_utf8_lossy(&buf[..n]).into_owned(), from));
            let c = udp_socket(dns).unwrap();
            let connected = udp_ask(&c).map(|who| (who, c.peer_addr().unwrap()));
            (unconnected, connected)
        })
        .unwrap();
    let (who, from) = unconnected.expect("UDP answer to an unconnected socket");
    assert!(pods.contains(&who));
    assert_eq!(from, dns, "the reply comes from the service address");
    let (who, peer) = connected.expect("UDP answer to a connected socket");
    assert!(pods.contains(&who));
    assert_eq!(peer, dns);

    // No endpoints, or a port the ClusterIP does not declare: a prompt refusal.
    let t = Instant::now();
    for to in [
        SocketAddr::from((EMPTY_CLUSTER_IP, 80)),
        SocketAddr::from((CLUSTER_IP, 81)),
    ] {
        let e = node_tcp(&s, to).expect_err("refused");
        assert_eq!(e.kind(), node_refusal(), "{to}: {e}");
    }
    let empty_dns = SocketAddr::from((EMPTY_CLUSTER_IP, 53));
    let udp = s
        .cluster
        .node
        .run(move || {
            let sock = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            sock.send_to(b"ping", empty_dns)
        })
        .unwrap();
    assert_eq!(
        udp.expect_err("UDP to a service without endpoints").kind(),
        node_refusal()
    );
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "refusals were not prompt"
    );

    let stats = s.cluster.lb("stats", &["--output", "json"]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&stats).unwrap();
    // 24 + 3 TCP connects and 2 UDP sockets translated; 3 refusals.
    assert_eq!(v["verdicts"]["socket"]["packets"], 29, "{stats}");
    assert_eq!(v["verdicts"]["reject"]["packets"], 3, "{stats}");
}

#[test]
#[ignore = "needs root and the eBPF object: cargo xtask test"]
fn socket_hooks_act_only_in_the_agents_namespace_and_can_be_turned_off() {
    let mut s = setup(&["pod-a"], 1);
    let cluster_ip = SocketAddr::from((CLUSTER_IP, 80));
    // The client is another namespace on the same machine: translated, its connect would
    // reach the pod through the node; untranslated, the node has nothing at a ClusterIP
    // for traffic from outside.
    let from_outside = from_client(&s, move || tcp_request(cluster_ip));
    assert!(
        from_outside.is_err(),
        "the client namespace was translated: {from_outside:?}"
    );
    // The hooks stay while the agent is down.
    s.cluster.kill_agent();
    assert_eq!(node_tcp(&s, cluster_ip).expect("agent down").0, "pod-a");

    s.cluster
        .start_agent_with(&s.file, &["--socket-lb=false"])
        .expect("agent without socket LB");
    assert!(
        s.cluster.log().contains("removed socket hook"),
        "{}",
        s.cluster.log()
    );
    assert!(
        node_tcp(&s, cluster_ip).is_err(),
        "the node's sockets are not translated any more"
    );
    // The packet path is unaffected.
    assert_eq!(
        answers(&s, SocketAddr::from((NODE_IP, NODE_PORT)), 2),
        BTreeSet::from(["pod-a".to_string()])
    );
}

const HEALTH_CHECK_PORT: u16 = 32100;

/// A Local LoadBalancer with a healthCheckNodePort; its one endpoint runs on `node`.
fn local_lb(s: &Setup, node: &str) -> String {
    format!(
        r#"---
apiVersion: v1
kind: Service
metadata: {{name: local-web, namespace: demo}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.70
  externalTrafficPolicy: Local
  healthCheckNodePort: {HEALTH_CHECK_PORT}
  ports: [{{name: http, port: 80, targetPort: 8080, nodePort: 30095}}]
status:
  loadBalancer:
    ingress: [{{ip: "203.0.113.30"}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: local-web-abc
  namespace: demo
  labels: {{kubernetes.io/service-name: local-web}}
addressType: IPv4
ports:
- {{name: http, port: 8080, protocol: TCP}}
endpoints:
- addresses: ["{}"]
  nodeName: {node}
  conditions: {{ready: true}}
"#,
        s.cluster.pods[0].ip
    )
}

/// GET / on the node's health check port from the client: status code and body.
fn health_check(s: &Setup) -> std::io::Result<(u16, serde_json::Value)> {
    from_client(s, || {
        use std::io::{Read, Write};
        let to = SocketAddr::from((NODE_IP, HEALTH_CHECK_PORT));
        let mut c = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
        c.set_read_timeout(Some(Duration::from_secs(3)))?;
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")?;
        let mut text = String::new();
        c.read_to_string(&mut text)?;
        let code = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        Ok((code, serde_json::from_str(body).unwrap_or_default()))
    })
}

#[test]
#[ignore = "needs root and the eBPF object: cargo xtask test"]
fn the_health_check_node_port_reports_local_endpoints() {
    let s = setup(&["pod-a"], 0);
    rewrite_extra(&s, local_lb(&s, "node1"));
    let (code, body) = health_check(&s).expect("health check with a local endpoint");
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["service"]["namespace"], "demo");
    assert_eq!(body["service"]["name"], "local-web");
    assert_eq!(body["localEndpoints"], 1);

    rewrite_extra(&s, local_lb(&s, "node2"));
    let (code, body) = health_check(&s).expect("health check without a local endpoint");
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["localEndpoints"], 0);

    rewrite_extra(&s, String::new());
    // The listener closes right after the sync; a connection that reached its backlog in
    // between is reset (seen on slow machines), so ask again until the port is closed.
    let mut gone = health_check(&s).expect_err("the service is gone");
    for _ in 0..10 {
        if gone.kind() != ErrorKind::ConnectionReset {
            break;
        }
        thread::sleep(Duration::from_millis(500));
        gone = health_check(&s).expect_err("the service is gone");
    }
    assert_eq!(gone.kind(), ErrorKind::ConnectionRefused, "{gone}");
}

#[test]
#[ignore = "needs root and the eBPF object: cargo xtask test"]
fn a_pod_reaching_its_own_service_is_answered_by_itself() {
    let s = setup(&["pod-a", "pod-b"], 1);
    let (tcp, udp, session) = s.cluster.pods[0]
        .ns
        .run(|| {
            let tcp: Vec<_> = (0..4)
                .map(|_| tcp_request(SocketAddr::from((CLUSTER_IP, 80))))
                .collect();
            let udp = udp_ask(&udp_socket(SocketAddr::from((CLUSTER_IP, 53))).unwrap());
            let session = Session::open(SocketAddr::from((CLUSTER_IP, 80))).and_then(|mut s| {
                let a = s.ask()?;
                let b = s.ask()?;
                Ok((a, b))
            });
            (tcp, udp, session)
        })
        .unwrap();
    for r in tcp {
        assert_eq!(r.expect("TCP from the pod to its own service"), "pod-a");
    }
    assert_eq!(udp.expect("UDP from the pod to its own service"), "pod-a");
    let (a, b) = session.expect("a kept-open hairpinned connection");
    assert_eq!((a.as_str(), b.as_str()), ("pod-a", "pod-a"));
    // The other pod is not a backend and reaches the service as before.
    let to = SocketAddr::from((CLUSTER_IP, 80));
    let other = s.cluster.pods[1].ns.run(move || tcp_request(to)).unwrap();
    assert_eq!(other.expect("another pod"), "pod-a");
}

/// One `from?` request over a new TCP connection: "<pod> <address the pod saw>".
fn ask_from(to: SocketAddr) -> std::io::Result<String> {
    use std::io::{BufRead, BufReader, Write};
    let mut c = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
    c.set_read_timeout(Some(Duration::from_secs(3)))?;
    c.write_all(b"from?\n")?;
    let mut line = String::new();
    BufReader::new(c).read_line(&mut line)?;
    Ok(line.trim().to_string())
}

const REMOTE_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 80);
const LOCAL_NODE_PORT: u16 = 30096;
const LOCAL_HEALTH_PORT: u16 = 32101;

/// A ClusterIP and a Local LoadBalancer whose one endpoint, `pod`, runs on node2.
fn two_node_manifest(pod: Ipv4Addr) -> String {
    let slice = |name: &str| {
        format!(
            r#"---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-abc
  namespace: demo
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports:
- {{name: http, port: 8080, protocol: TCP}}
endpoints:
- addresses: ["{pod}"]
  nodeName: node2
  conditions: {{ready: true}}
"#
        )
    };
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: remote, namespace: demo}}
spec:
  clusterIP: {REMOTE_CLUSTER_IP}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
{}---
apiVersion: v1
kind: Service
metadata: {{name: local-lb, namespace: demo}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.81
  externalTrafficPolicy: Local
  healthCheckNodePort: {LOCAL_HEALTH_PORT}
  ports: [{{name: http, port: 80, targetPort: 8080, nodePort: {LOCAL_NODE_PORT}}}]
status:
  loadBalancer:
    ingress: [{{ip: "203.0.113.40"}}]
{}"#,
        slice("remote"),
        slice("local-lb")
    ) + &format!(
        r#"---
apiVersion: v1
kind: Service
metadata: {{name: cluster-lb, namespace: demo}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.82
  ports:
  - {{name: http, port: 80, targetPort: 8080, nodePort: {CLUSTER_NODE_PORT}, protocol: TCP}}
  - {{name: dns, port: 53, targetPort: 8080, nodePort: {CLUSTER_NODE_PORT}, protocol: UDP}}
status:
  loadBalancer:
    ingress: [{{ip: "{CLUSTER_LB_IP}"}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: cluster-lb-abc
  namespace: demo
  labels: {{kubernetes.io/service-name: cluster-lb}}
addressType: IPv4
ports:
- {{name: http, port: 8080, protocol: TCP}}
- {{name: dns, port: 8080, protocol: UDP}}
endpoints:
- addresses: ["{pod}"]
  nodeName: node2
  conditions: {{ready: true}}
---
apiVersion: v1
kind: Service
metadata:
  name: dsr-lb
  namespace: demo
  annotations: {{lb.dev/lb-mode: dsr}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.83
  ports:
  - {{name: http, port: 80, targetPort: 8080, nodePort: {DSR_NODE_PORT}, protocol: TCP}}
  - {{name: dns, port: 53, targetPort: 8080, nodePort: {DSR_NODE_PORT}, protocol: UDP}}
status:
  loadBalancer:
    ingress: [{{ip: "{DSR_LB_IP}"}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: dsr-lb-abc
  namespace: demo
  labels: {{kubernetes.io/service-name: dsr-lb}}
addressType: IPv4
ports:
- {{name: http, port: 8080, protocol: TCP}}
- {{name: dns, port: 8080, protocol: UDP}}
endpoints:
- addresses: ["{pod}"]
  nodeName: node2
  conditions: {{ready: true}}
"#
    )
}

const DSR_NODE_PORT: u16 = 30098;
const DSR_LB_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 42);
const CLUSTER_NODE_PORT: u16 = 30097;
const CLUSTER_LB_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 41);

/// Two nodes with their agents; node1 has the pod "client", node2 the pod "pod-b", the
/// only endpoint of every service.
fn two_nodes() -> (Cluster, Remove) {
    let mut cluster = Cluster::with_peers(&lb_bin(), &["client"], &[&["pod-b"]]).expect("topology");
    cluster.start_servers().expect("servers");
    let pod_b = cluster.peers[0].pods[0].ip;
    let file = std::env::temp_dir().join(format!("{}.yaml", testbed::unique("lbm")));
    std::fs::write(&file, two_node_manifest(pod_b)).unwrap();
    let remove = Remove(file.clone());
    cluster.start_agent(&file).expect("node1 agent");
    cluster.start_peer_agents(&file).expect("node2 agent");
    (cluster, remove)
}

struct Remove(PathBuf);

impl Drop for Remove {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The status code of GET / on `to`, from the client.
fn health_status(cluster: &Cluster, to: SocketAddr) -> u16 {
    cluster
        .client
        .run(move || {
            use std::io::{Read, Write};
            let mut c = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(3)).ok()?;
            c.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
            c.write_all(b"GET / HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")
                .ok()?;
            let mut text = String::new();
            c.read_to_string(&mut text).ok()?;
            text.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap()
        .unwrap_or(0)
}

#[test]
#[ignore = "needs root and the eBPF object: cargo xtask test"]
fn two_nodes_east_west_and_local_traffic_policy() {
    let mut cluster = Cluster::with_peers(&lb_bin(), &["client"], &[&["pod-b"]]).expect("topology");
    cluster.start_servers().expect("servers");
    let pod_b = cluster.peers[0].pods[0].ip;
    let node2 = cluster.peers[0].ip;
    let client_pod = cluster.pods[0].ip;
    let file = std::env::temp_dir().join(format!("{}.yaml", testbed::unique("lbm")));
    std::fs::write(&file, two_node_manifest(pod_b)).unwrap();
    struct Remove(PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _file = Remove(file.clone());
    cluster.start_agent(&file).expect("node1 agent");
    cluster.start_peer_agents(&file).expect("node2 agent");

    // East-west: a pod on node1 reaches a ClusterIP served on node2, which sees the pod's
    // own address; the reply is reverse-NATed on node1 (else the connect would fail).
    let to = SocketAddr::from((REMOTE_CLUSTER_IP, 80));
    let answer = cluster.pods[0].ns.run(move || ask_from(to)).unwrap();
    assert_eq!(
        answer.expect("ClusterIP across nodes"),
        format!("pod-b {client_pod}")
    );

    // externalTrafficPolicy Local: the node with the endpoint serves with the client's
    // address kept; the other drops.
    let on_node2 = SocketAddr::from((node2, LOCAL_NODE_PORT));
    let answer = cluster.client.run(move || ask_from(on_node2)).unwrap();
    assert_eq!(
        answer.expect("NodePort on the node with the endpoint"),
        format!("pod-b {}", testbed::CLIENT_IP)
    );
    let on_node1 = SocketAddr::from((NODE_IP, LOCAL_NODE_PORT));
    let e = cluster
        .client
        .run(move || ask_from(on_node1))
        .unwrap()
        .expect_err("no local endpoint on node1");
    assert_eq!(e.kind(), ErrorKind::TimedOut, "dropped, not refused: {e}");
    // Pods of the cluster are treated as Cluster: node1's NodePort takes them to node2.
    let answer = cluster.pods[0].ns.run(move || ask_from(on_node1)).unwrap();
    assert_eq!(
        answer.expect("in-cluster client of a Local NodePort"),
        format!("pod-b {client_pod}")
    );

    // healthCheckNodePort: 200 where the endpoint is, 503 elsewhere.
    assert_eq!(
        health_status(&cluster, SocketAddr::from((node2, LOCAL_HEALTH_PORT))),
        200
    );
    assert_eq!(
        health_status(&cluster, SocketAddr::from((NODE_IP, LOCAL_HEALTH_PORT))),
        503
    );
}

#[test]
#[ignore = "needs root and the eBPF object: cargo xtask test"]
fn a_node_port_served_by_another_node_is_source_nated_from_xdp() {
    let (cluster, _file) = two_nodes();
    let node2 = cluster.peers[0].ip;
    let neigh = |c: &Cluster| c.node.ip(&["neigh", "show", &node2.to_string()]).unwrap();
    assert!(
        !neigh(&cluster).contains("lladdr"),
        "node1 must not know node2 yet: {}",
        neigh(&cluster)
    );
    // The first connection to a never-contacted node goes through TC's neighbour
    // resolution; the pod sees node1's address.
    let np = SocketAddr::from((NODE_IP, CLUSTER_NODE_PORT));
    let answer = cluster.client.run(move || ask_from(np)).unwrap();
    assert_eq!(
        answer.expect("first connection to a NodePort served on node2"),
        format!("pod-b {NODE_IP}")
    );
    assert!(neigh(&cluster).contains("lladdr"), "{}", neigh(&cluster));
    // Resolved now: XDP sends by itself, for the LB IP and UDP too.
    let lb = SocketAddr::from((CLUSTER_LB_IP, 80));
    let (tcp, udp) = cluster
        .client
        .run(move || (ask_from(lb), udp_ask(&udp_socket(np).unwrap())))
        .unwrap();
    assert_eq!(
        tcp.expect("LB IP served on node2"),
        format!("pod-b {NODE_IP}")
    );
    assert_eq!(udp.expect("UDP NodePort served on node2"), "pod-b");
    let ct = cluster.lb("conntrack", &["--output", "json"]).unwrap();
    assert!(ct.contains("192.0.2.2"), "{ct}");

    // A uplink whose veth peer has no GRO: --xdp-mode auto still gets frames through.
    cluster
        .client
        .exec("ethtool", &["-K", "eth0", "gro", "off"])
        .unwrap();
    let many: Vec<_> = cluster
        .client
        .run(move || (0..8).map(|_| ask_from(np)).collect())
        .unwrap();
    for r in many {
        assert_eq!(
            r.expect("with GRO off on the peer"),
            format!("pod-b {NODE_IP}")
        );
    }
}

#[test]
#[ignore = "needs root and the eBPF object: cargo xtask test"]
fn direct_server_return_tunnels_to_the_backends_node_which_answers_the_client() {
    let (cluster, _file) = two_nodes();
    let np = SocketAddr::from((NODE_IP, DSR_NODE_PORT));
    // The first connection to a never-contacted node; the pod sees the client itself.
    let answer = cluster.client.run(move || ask_from(np)).unwrap();
    assert_eq!(
        answer.expect("DSR NodePort, first connection"),
        format!("pod-b {}", testbed::CLIENT_IP)
    );
    let lb = SocketAddr::from((DSR_LB_IP, 80));
    let (tcp, udp, session) = cluster
        .client
        .run(move || {
            let session = Session::open(np).and_then(|mut s| Ok((s.ask()?, s.ask()?)));
            (ask_from(lb), udp_ask(&udp_socket(np).unwrap()), session)
        })
        .unwrap();
    assert_eq!(
        tcp.expect("DSR LB IP"),
        format!("pod-b {}", testbed::CLIENT_IP)
    );
    assert_eq!(udp.expect("DSR over UDP"), "pod-b");
    let (a, b) = session.expect("a kept-open DSR connection");
    assert_eq!((a.as_str(), b.as_str()), ("pod-b", "pod-b"));
    // Node2 answered with node1's NodePort as the source: its conntrack holds the flow.
    let ct = cluster.peers[0]
        .lb(&lb_bin(), "conntrack", &["--output", "json"])
        .unwrap();
    assert!(ct.contains(&format!("{NODE_IP}:{DSR_NODE_PORT}")), "{ct}");
}
