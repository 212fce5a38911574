//! The agent's Kubernetes client path — kube's watchers (`kubernetes::watch::spawn`) feeding
//! `KubeSource`, which drives a `Controller` over in-memory maps — against an API server in
//! the test process that lists and watches as kube-apiserver does (`kube_api/server.rs`).
//! Every wait is bounded and fails naming its phase with the state it last saw; nothing is
//! asserted on how long anything took.
//!
//! The tests run on a current-thread runtime, which `Agent::settled` relies on.

#[path = "kube_api/agent.rs"]
mod agent;
#[path = "kube_api/history.rs"]
mod history;
#[path = "kube_api/objects.rs"]
mod objects;
#[path = "kube_api/query.rs"]
mod query;
#[path = "kube_api/server.rs"]
mod server;
#[path = "kube_api/watch_stream.rs"]
mod watch_stream;

use std::net::Ipv4Addr;

use agent::{eventually, frontends, node_addresses, Agent, UPLINK};
use history::Kind;
use k8s_openapi::jiff::Timestamp;
use objects::{node, service, slice, slice_name, with_trigger_time, NODE, NS};
use server::{FakeApiServer, Page};

/// List pages hold at most this many objects, so that kube's watcher follows `continue`.
const PAGE: usize = 2;
const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .try_init();
}

/// A server holding this node and, per (name, clusterIP, endpoints), a Service on port 80 and
/// its EndpointSlice.
async fn cluster(services: &[(&str, &str, &[&str])]) -> FakeApiServer {
    init_tracing();
    let server = FakeApiServer::start(PAGE).await;
    server.put(node(NODE, &NODE_IP.to_string()));
    for (name, ip, endpoints) in services {
        server.put(service(name, ip, 80));
        server.put(slice(name, endpoints));
    }
    server
}

fn kinds_of(sessions: &[watch_stream::SessionInfo]) -> Vec<Kind> {
    let mut k: Vec<Kind> = sessions.iter().map(|s| s.kind).collect();
    k.sort();
    k
}

#[tokio::test(flavor = "current_thread")]
async fn the_first_sync_waits_for_services_and_slices() {
    let server = cluster(&[
        ("a", "10.96.0.1", &["10.244.1.1", "10.244.1.2"]),
        ("b", "10.96.0.2", &["10.244.2.1"]),
        ("c", "10.96.0.3", &["10.244.3.1"]),
    ])
    .await;
    server.put(node("node2", "192.0.2.20"));
    server.hold(Kind::EndpointSlice, Page::First);
    let agent = Agent::start(&server.url);

    let phase = "services and the node listed, slices not yet";
    agent
        .wait_updates(
            phase,
            0,
            &[
                "Service Init",
                "Service InitApply default/a",
                "Service InitApply default/b",
                "Service InitApply default/c",
                "Service InitDone",
            ],
        )
        .await;
    agent
        .wait_updates(phase, 0, &["Node InitApply node1", "Node InitDone"])
        .await;
    let maps = agent.maps();
    assert!(
        maps.log.is_empty() && maps.services.is_empty() && maps.node_addresses.is_empty(),
        "{phase}: maps written before the EndpointSlices were listed: {:?}",
        maps.log
    );
    assert_eq!(agent.syncs(), 0.0, "{phase}: a sync ran");
    assert!(!agent.health.healthy(), "{phase}: /healthz says synced");

    server.release(Kind::EndpointSlice, Page::First);
    let phase = "slices listed";
    agent
        .wait_frontends(
            phase,
            &[
                "10.96.0.1 (any port)",
                "10.96.0.1:80/TCP -> 10.244.1.1:8080 10.244.1.2:8080",
                "10.96.0.2 (any port)",
                "10.96.0.2:80/TCP -> 10.244.2.1:8080",
                "10.96.0.3 (any port)",
                "10.96.0.3:80/TCP -> 10.244.3.1:8080",
            ],
        )
        .await;
    assert_eq!(
        node_addresses(&agent.maps()),
        [UPLINK, NODE_IP],
        "{phase}: NodePort addresses: the uplink's and this Node's, not node2's"
    );
    assert_eq!(
        agent.syncs(),
        1.0,
        "{phase}: the initial state is written in one sync"
    );
    assert!(agent.health.healthy(), "{phase}: /healthz not synced");

    let requests = server.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.kind == Kind::Service && !r.watch && r.continued),
        "{phase}: the Service list was not paged: {requests:#?}"
    );
    for r in requests.iter().filter(|r| r.kind == Kind::Node) {
        assert!(
            r.query.contains("fieldSelector=metadata.name%3Dnode1"),
            "{phase}: Node request without this node's field selector: {r:?}"
        );
    }
    let updates = agent.updates();
    assert!(
        !updates.iter().any(|u| u.contains("node2")),
        "{phase}: another node reached the agent: {updates:?}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn changes_while_watching_are_applied() {
    let server = cluster(&[("web", "10.96.0.10", &["10.244.1.5", "10.244.1.6"])]).await;
    let agent = Agent::start(&server.url);
    agent
        .wait_frontends(
            "initial list",
            &[
                "10.96.0.10 (any port)",
                "10.96.0.10:80/TCP -> 10.244.1.5:8080 10.244.1.6:8080",
            ],
        )
        .await;

    server.put(service("api", "10.96.0.20", 443));
    server.put(slice("api", &["10.244.2.1"]));
    agent
        .wait_frontends(
            "service created",
            &[
                "10.96.0.10 (any port)",
                "10.96.0.10:80/TCP -> 10.244.1.5:8080 10.244.1.6:8080",
                "10.96.0.20 (any port)",
                "10.96.0.20:443/TCP -> 10.244.2.1:8080",
            ],
        )
        .await;

    server.put(slice("web", &["10.244.1.5", "10.244.1.6", "10.244.1.7"]));
    agent
        .wait_frontends(
            "endpoint added",
            &[
                "10.96.0.10 (any port)",
                "10.96.0.10:80/TCP -> 10.244.1.5:8080 10.244.1.6:8080 10.244.1.7:8080",
                "10.96.0.20 (any port)",
                "10.96.0.20:443/TCP -> 10.244.2.1:8080",
            ],
        )
        .await;

    server.put(slice("web", &["10.244.1.6", "10.244.1.7"]));
    agent
        .wait_frontends(
            "endpoint removed",
            &[
                "10.96.0.10 (any port)",
                "10.96.0.10:80/TCP -> 10.244.1.6:8080 10.244.1.7:8080",
                "10.96.0.20 (any port)",
                "10.96.0.20:443/TCP -> 10.244.2.1:8080",
            ],
        )
        .await;

    server.put(service("web", "10.96.0.10", 8080));
    agent
        .wait_frontends(
            "service port changed",
            &[
                "10.96.0.10 (any port)",
                "10.96.0.10:8080/TCP -> 10.244.1.6:8080 10.244.1.7:8080",
                "10.96.0.20 (any port)",
                "10.96.0.20:443/TCP -> 10.244.2.1:8080",
            ],
        )
        .await;

    server.delete(Kind::Service, NS, "api");
    server.delete(Kind::EndpointSlice, NS, &slice_name("api"));
    agent
        .wait_frontends(
            "service and slice deleted",
            &[
                "10.96.0.10 (any port)",
                "10.96.0.10:8080/TCP -> 10.244.1.6:8080 10.244.1.7:8080",
            ],
        )
        .await;

    server.delete(Kind::EndpointSlice, NS, &slice_name("web"));
    agent
        .wait_frontends(
            "slice deleted, service kept",
            &["10.96.0.10 (any port)", "10.96.0.10:8080/TCP -> (none)"],
        )
        .await;
    assert!(
        agent.maps().backends.is_empty(),
        "slice deleted: backends left: {:?}",
        agent.maps().backends
    );

    server.put(node(NODE, "192.0.2.11"));
    eventually("node address changed", || {
        let now = node_addresses(&agent.maps());
        (now == [UPLINK, Ipv4Addr::new(192, 0, 2, 11)])
            .then_some(())
            .ok_or(format!("{now:?}"))
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn bookmarks_move_the_resume_point_and_change_nothing() {
    let server = cluster(&[("web", "10.96.0.10", &["10.244.1.5"])]).await;
    let agent = Agent::start(&server.url);
    let initial = [
        "10.96.0.10 (any port)",
        "10.96.0.10:80/TCP -> 10.244.1.5:8080",
    ];
    agent.wait_frontends("initial list", &initial).await;
    eventually("watching", || {
        let open: Vec<_> = server
            .sessions()
            .into_iter()
            .filter(|s| s.ended.is_none())
            .collect();
        (kinds_of(&open) == Kind::ALL)
            .then_some(())
            .ok_or(format!("{open:?}"))
    })
    .await;

    let phase = "bookmark";
    let (mark, writes, syncs) = (agent.updates().len(), agent.maps().log.len(), agent.syncs());
    let sessions = server.sessions().len();
    // Writes elsewhere in the cluster move the resourceVersion past every watched object.
    server.advance(5);
    let bookmark = server.bookmark();
    // kube-apiserver sends a bookmark right before a watch times out; end them all here.
    server.end_watches();
    eventually(phase, || {
        let new = &server.sessions()[sessions..];
        (kinds_of(new) == Kind::ALL)
            .then_some(())
            .ok_or(format!("{new:?}"))
    })
    .await;
    for s in &server.sessions()[..sessions] {
        assert_eq!(
            (s.bookmarks, s.ended),
            (1, Some("timeout")),
            "{phase}: {s:?}"
        );
    }
    for s in &server.sessions()[sessions..] {
        assert_eq!(
            s.from, bookmark,
            "{phase}: {:?} did not resume from the bookmark's resourceVersion",
            s.kind
        );
    }
    assert!(agent.settled(), "{phase}: updates pending");
    let updates = agent.updates();
    assert!(
        updates[mark..].is_empty(),
        "{phase}: bookmarks reached the source as {:?}",
        &updates[mark..]
    );
    assert_eq!(
        (agent.maps().log.len(), agent.syncs()),
        (writes, syncs),
        "{phase}: maps written"
    );
    assert_eq!(frontends(&agent.maps()), initial, "{phase}");

    server.put(slice("web", &["10.244.1.5", "10.244.1.6"]));
    agent
        .wait_frontends(
            "change after the bookmark",
            &[
                "10.96.0.10 (any port)",
                "10.96.0.10:80/TCP -> 10.244.1.5:8080 10.244.1.6:8080",
            ],
        )
        .await;
}

/// The list requests the server has answered.
fn lists(server: &FakeApiServer) -> usize {
    server.requests().iter().filter(|r| !r.watch).count()
}

#[tokio::test(flavor = "current_thread")]
async fn a_dropped_watch_resumes_where_it_stopped() {
    let server = cluster(&[("web", "10.96.0.10", &["10.244.1.5"])]).await;
    let agent = Agent::start(&server.url);
    agent
        .wait_frontends(
            "initial list",
            &[
                "10.96.0.10 (any port)",
                "10.96.0.10:80/TCP -> 10.244.1.5:8080",
            ],
        )
        .await;
    server.put(slice("web", &["10.244.1.5", "10.244.1.6"]));
    agent
        .wait_frontends(
            "change while watching",
            &[
                "10.96.0.10 (any port)",
                "10.96.0.10:80/TCP -> 10.244.1.5:8080 10.244.1.6:8080",
            ],
        )
        .await;

    let phase = "connections dropped";
    let dropped: Vec<_> = server
        .sessions()
        .into_iter()
        .filter(|s| s.ended.is_none())
        .collect();
    assert_eq!(kinds_of(&dropped), Kind::ALL, "{phase}: open watches");
    let (sessions, lists_before, mark) = (
        server.sessions().len(),
        lists(&server),
        agent.updates().len(),
    );
    server.drop_watches();
    eventually(phase, || {
        let new = &server.sessions()[sessions..];
        (kinds_of(new) == Kind::ALL)
            .then_some(())
            .ok_or(format!("{new:?}"))
    })
    .await;
    let aborted = server.sessions()[..sessions]
        .iter()
        .filter(|s| s.ended == Some("dropped"))
        .count();
    assert_eq!(
        aborted,
        dropped.len(),
        "{phase}: watches aborted mid-stream"
    );
    for old in &dropped {
        let new = server.sessions()[sessions..]
            .iter()
            .find(|s| s.kind == old.kind)
            .cloned()
            .unwrap();
        assert_eq!(
            new.from, old.last_sent,
            "{phase}: {:?} watch did not resume from the last resourceVersion it was sent",
            old.kind
        );
    }
    assert_eq!(
        lists(&server),
        lists_before,
        "{phase}: relisted instead of resuming"
    );

    server.put(slice("web", &["10.244.1.6"]));
    server.put(service("api", "10.96.0.20", 80));
    server.put(slice("api", &["10.244.2.1"]));
    agent
        .wait_frontends(
            "changes after the reconnect",
            &[
                "10.96.0.10 (any port)",
                "10.96.0.10:80/TCP -> 10.244.1.6:8080",
                "10.96.0.20 (any port)",
                "10.96.0.20:80/TCP -> 10.244.2.1:8080",
            ],
        )
        .await;
    let updates = agent.updates();
    assert!(
        !updates[mark..].iter().any(|u| u.ends_with("Init")),
        "{phase}: relisted: {:?}",
        &updates[mark..]
    );
}

#[tokio::test(flavor = "current_thread")]
async fn the_maps_keep_their_state_while_the_server_is_unreachable() {
    let server = cluster(&[
        ("web", "10.96.0.10", &["10.244.1.5", "10.244.1.6"]),
        ("api", "10.96.0.20", &["10.244.2.1"]),
    ])
    .await;
    let agent = Agent::start(&server.url);
    let initial = [
        "10.96.0.10 (any port)",
        "10.96.0.10:80/TCP -> 10.244.1.5:8080 10.244.1.6:8080",
        "10.96.0.20 (any port)",
        "10.96.0.20:80/TCP -> 10.244.2.1:8080",
    ];
    agent.wait_frontends("initial list", &initial).await;

    let phase = "server unreachable";
    let before = agent.maps();
    let (seen, mark) = (server.requests().len(), agent.updates().len());
    server.set_unavailable(true);
    server.drop_watches();
    server.delete(Kind::Service, NS, "api");
    server.delete(Kind::EndpointSlice, NS, &slice_name("api"));
    server.put(slice("web", &["10.244.1.6"]));
    eventually(phase, || {
        let refused: Vec<Kind> = server.requests()[seen..]
            .iter()
            .filter(|r| r.status == 503)
            .map(|r| r.kind)
            .collect();
        let enough = Kind::ALL
            .iter()
            .all(|k| refused.iter().filter(|r| *r == k).count() >= 3);
        enough
            .then_some(())
            .ok_or(format!("refused so far: {refused:?}"))
    })
    .await;
    assert!(agent.settled(), "{phase}: updates pending");
    let during = agent.maps();
    assert_eq!(frontends(&during), initial, "{phase}: frontends changed");
    assert_eq!(during.log, before.log, "{phase}: maps written");
    assert_eq!(
        node_addresses(&during),
        node_addresses(&before),
        "{phase}: node addresses changed"
    );

    server.set_unavailable(false);
    agent
        .wait_frontends(
            "server back",
            &[
                "10.96.0.10 (any port)",
                "10.96.0.10:80/TCP -> 10.244.1.6:8080",
            ],
        )
        .await;
    let requests = &server.requests()[seen..];
    assert!(
        !requests.iter().any(|r| !r.watch && r.status == 200),
        "server back: relisted instead of resuming: {requests:#?}"
    );
    let updates = agent.updates();
    assert!(
        !updates[mark..].iter().any(|u| u.ends_with("Init")),
        "server back: relisted: {:?}",
        &updates[mark..]
    );
}

#[tokio::test(flavor = "current_thread")]
async fn gone_forces_a_relist() {
    let server = cluster(&[
        ("a", "10.96.0.1", &["10.244.1.1"]),
        ("b", "10.96.0.2", &["10.244.2.1"]),
    ])
    .await;
    let agent = Agent::start(&server.url);
    let initial = [
        "10.96.0.1 (any port)",
        "10.96.0.1:80/TCP -> 10.244.1.1:8080",
        "10.96.0.2 (any port)",
        "10.96.0.2:80/TCP -> 10.244.2.1:8080",
    ];
    agent.wait_frontends("initial list", &initial).await;

    // Changes the watches never report: made while the server is unreachable, then compacted.
    let phase = "relist after 410, incomplete";
    server.set_unavailable(true);
    server.drop_watches();
    server.delete(Kind::Service, NS, "b");
    server.delete(Kind::EndpointSlice, NS, &slice_name("b"));
    for (name, ip, ep) in [
        ("c", "10.96.0.3", "10.244.3.1"),
        ("d", "10.96.0.4", "10.244.4.1"),
    ] {
        server.put(service(name, ip, 80));
        server.put(slice(name, &[ep]));
    }
    server.put(slice("a", &["10.244.1.1", "10.244.1.9"]));
    server.compact();
    // The relist stops after its first page of Services and before any EndpointSlice.
    server.hold(Kind::Service, Page::Continued);
    server.hold(Kind::EndpointSlice, Page::First);
    let (seen, mark) = (server.requests().len(), agent.updates().len());
    server.set_unavailable(false);
    agent
        .wait_updates(
            phase,
            mark,
            &[
                "Service Init",
                "Service InitApply default/a",
                "Service InitApply default/c",
            ],
        )
        .await;
    let gone: Vec<Kind> = server.requests()[seen..]
        .iter()
        .filter(|r| r.gone)
        .map(|r| r.kind)
        .collect();
    assert!(
        gone.contains(&Kind::Service) && gone.contains(&Kind::EndpointSlice),
        "{phase}: watches answered 410: {gone:?}"
    );
    assert_eq!(
        frontends(&agent.maps()),
        initial,
        "{phase}: a half-received list was written"
    );

    server.release(Kind::Service, Page::Continued);
    server.release(Kind::EndpointSlice, Page::First);
    let relisted = [
        "10.96.0.1 (any port)",
        "10.96.0.1:80/TCP -> 10.244.1.1:8080 10.244.1.9:8080",
        "10.96.0.3 (any port)",
        "10.96.0.3:80/TCP -> 10.244.3.1:8080",
        "10.96.0.4 (any port)",
        "10.96.0.4:80/TCP -> 10.244.4.1:8080",
    ];
    agent
        .wait_frontends("relist after 410, complete", &relisted)
        .await;

    // Only the resourceVersion moved: the relist finds what the agent already has.
    let phase = "relist after 410 with nothing new";
    let maps = agent.maps();
    let (writes, syncs) = (maps.log.len(), agent.syncs());
    let changes = || {
        agent.metric("lb_sync_proxy_rules_service_changes_total")
            + agent.metric("lb_sync_proxy_rules_endpoint_changes_total")
    };
    let changes_before = changes();
    let (seen, mark) = (server.requests().len(), agent.updates().len());
    server.set_unavailable(true);
    server.drop_watches();
    server.advance(3);
    server.compact();
    server.set_unavailable(false);
    agent
        .wait_updates(phase, mark, &["Service Init", "Service InitDone"])
        .await;
    agent
        .wait_updates(phase, mark, &["Slice Init", "Slice InitDone"])
        .await;
    let gone: Vec<Kind> = server.requests()[seen..]
        .iter()
        .filter(|r| r.gone)
        .map(|r| r.kind)
        .collect();
    assert!(
        gone.contains(&Kind::Service) && gone.contains(&Kind::EndpointSlice),
        "{phase}: watches answered 410: {gone:?}"
    );
    assert_eq!(frontends(&agent.maps()), relisted, "{phase}");
    assert_eq!(
        agent.maps().log.len(),
        writes,
        "{phase}: maps written: {:?}",
        &agent.maps().log[writes..]
    );
    assert_eq!(agent.syncs(), syncs, "{phase}: a sync ran");
    assert_eq!(changes(), changes_before, "{phase}: changes counted");
}

#[tokio::test(flavor = "current_thread")]
async fn programming_latency_is_measured_from_the_trigger_time() {
    init_tracing();
    let server = FakeApiServer::start(PAGE).await;
    server.put(node(NODE, &NODE_IP.to_string()));
    server.put(service("web", "10.96.0.10", 80));
    // A change from before the agent started is not counted, as in kube-proxy.
    server.put(with_trigger_time(
        slice("web", &["10.244.1.1"]),
        "2020-01-01T00:00:00Z",
    ));
    let agent = Agent::start(&server.url);
    agent
        .wait_frontends(
            "initial list",
            &[
                "10.96.0.10 (any port)",
                "10.96.0.10:80/TCP -> 10.244.1.1:8080",
            ],
        )
        .await;
    const COUNT: &str = "lb_network_programming_duration_seconds_count";
    const SUM: &str = "lb_network_programming_duration_seconds_sum";
    assert_eq!(
        agent.metric(COUNT),
        0.0,
        "initial list: a change from before the start was counted"
    );

    let mut endpoints = vec!["10.244.1.1".to_string()];
    for change in 1..=3 {
        let phase = format!("endpoint change {change}");
        endpoints.push(format!("10.244.1.{}", change + 1));
        let eps: Vec<&str> = endpoints.iter().map(String::as_str).collect();
        let sum_before = agent.metric(SUM);
        server.put(with_trigger_time(
            slice("web", &eps),
            &Timestamp::now().to_string(),
        ));
        let expected = format!(
            "10.96.0.10:80/TCP -> {}",
            eps.iter()
                .map(|e| format!("{e}:8080"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        agent
            .wait_frontends(&phase, &["10.96.0.10 (any port)", &expected])
            .await;
        eventually(&phase, || {
            let n = agent.metric(COUNT);
            (n == f64::from(change))
                .then_some(())
                .ok_or(format!("{COUNT} {n}"))
        })
        .await;
        println!(
            "network programming latency, change {change}: {:.1} ms",
            (agent.metric(SUM) - sum_before) * 1000.0
        );
    }
}
