use super::*;
use crate::{
    desired::{DesiredBackend, DesiredFrontend},
    sync::MemoryMaps,
};
use lb_common::{backend_state, kind};

fn id(name: &str) -> ServicePortId {
    ServicePortId {
        namespace: "ns".into(),
        name: name.into(),
        port_name: "http".into(),
        protocol: lb_common::proto::TCP,
    }
}

fn desired(services: &[(&str, u8, &[u8])]) -> DesiredMaps {
    let mut d = DesiredMaps::default();
    for (name, ip_last, backends) in services {
        let backends: Vec<DesiredBackend> = backends
            .iter()
            .map(|b| DesiredBackend {
                addr: Ipv4Addr::new(10, 0, 0, *b),
                port: 8080,
                state: backend_state::ACTIVE,
                local: true,
            })
            .collect();
        let frontends = vec![DesiredFrontend {
            addr: Ipv4Addr::new(10, 96, 0, *ip_last),
            port: 80,
            scope: scope::INTERNAL,
            kind: kind::CLUSTER_IP,
            local_policy: false,
            filter_sources: false,
            dsr: false,
            selection: (0..backends.len()).collect(),
        }];
        d.services.insert(
            id(name),
            DesiredService {
                backends,
                frontends,
                affinity_timeout: None,
                source_ranges: Vec::new(),
            },
        );
        d.cluster_ips.insert(Ipv4Addr::new(10, 96, 0, *ip_last));
    }
    d.node_addresses.insert(Ipv4Addr::new(192, 0, 2, 1));
    d
}

fn entry(s: &Syncer<MemoryMaps>, ip_last: u8) -> ServiceValue {
    let key = ServiceKey::new(
        addr::ipv4([10, 96, 0, ip_last]),
        addr::port(80),
        lb_common::proto::TCP,
        scope::INTERNAL,
    );
    *s.store().services.get(&key).expect("frontend entry")
}

#[test]
fn second_apply_of_the_same_state_writes_nothing() {
    let mut s = Syncer::recover(MemoryMaps::default(), Config::default()).unwrap();
    let d = desired(&[("a", 1, &[1, 2]), ("b", 2, &[3])]);
    let r = s.apply(&d);
    assert!(r.errors.is_empty() && r.writes > 0, "{r:?}");
    let r = s.apply(&d);
    assert_eq!((r.writes, r.deletes), (0, 0), "{r:?}");
}

#[test]
fn restart_recovers_ids_and_tables_without_writes() {
    let mut s = Syncer::recover(MemoryMaps::default(), Config::default()).unwrap();
    let d = desired(&[("a", 1, &[1, 2]), ("b", 2, &[3])]);
    s.apply(&d);
    let (a, b) = (entry(&s, 1), entry(&s, 2));
    let mut again = Syncer::recover(s.store().clone(), Config::default()).unwrap();
    let r = again.apply(&d);
    assert_eq!((r.writes, r.deletes), (0, 0), "{r:?}");
    assert_eq!((entry(&again, 1), entry(&again, 2)), (a, b));
}

#[test]
fn a_changed_selection_gets_a_fresh_range_written_before_the_flip() {
    let mut s = Syncer::recover(MemoryMaps::default(), Config::default()).unwrap();
    s.apply(&desired(&[("a", 1, &[1, 2])]));
    let before = entry(&s, 1);
    let mark = s.store().log.len();
    s.apply(&desired(&[("a", 1, &[1])]));
    let after = entry(&s, 1);
    assert_ne!(
        after.maglev_offset, before.maglev_offset,
        "the range in use must not be rewritten"
    );
    let log = &s.store().log[mark..];
    let pos = |p: &str| {
        log.iter()
            .position(|l| l.starts_with(p))
            .unwrap_or_else(|| panic!("{p} missing in {log:?}"))
    };
    assert!(pos("write_maglev") < pos("put_service"), "{log:?}");
    assert!(pos("put_service") < pos("delete_backend"), "{log:?}");
    let table = s
        .store()
        .maglev(after.maglev_offset, after.maglev_len)
        .unwrap();
    let remaining: std::collections::BTreeSet<u32> = table.into_iter().collect();
    assert_eq!(remaining.len(), 1);
    assert!(s
        .store()
        .backends
        .contains_key(remaining.iter().next().unwrap()));
}

#[test]
fn new_backends_are_written_before_the_table_that_names_them() {
    let mut s = Syncer::recover(MemoryMaps::default(), Config::default()).unwrap();
    s.apply(&desired(&[("a", 1, &[1])]));
    let mark = s.store().log.len();
    s.apply(&desired(&[("a", 1, &[1, 2])]));
    let log = &s.store().log[mark..];
    let backend = log
        .iter()
        .position(|l| l.starts_with("put_backend"))
        .unwrap();
    let table = log
        .iter()
        .position(|l| l.starts_with("write_maglev"))
        .unwrap();
    assert!(backend < table, "{log:?}");
}

#[test]
fn removed_services_are_deleted_and_their_ids_reused_later() {
    let mut s = Syncer::recover(MemoryMaps::default(), Config::default()).unwrap();
    s.apply(&desired(&[("a", 1, &[1]), ("b", 2, &[2])]));
    let r = s.apply(&desired(&[("b", 2, &[2])]));
    assert!(r.deletes >= 3, "frontend, marker, backend: {r:?}");
    assert_eq!(s.store().services.len(), 2, "b's frontend and marker");
    assert_eq!(s.store().backends.len(), 1);
}

#[test]
fn a_full_map_is_reported_and_the_rest_applied() {
    let mut s = Syncer::recover(MemoryMaps::with_capacity(3, 1 << 16), Config::default()).unwrap();
    let r = s.apply(&desired(&[("a", 1, &[1]), ("b", 2, &[2])]));
    assert!(r.map_full >= 1, "{r:?}");
    assert_eq!(s.store().services.len(), 3, "what fits is written");
}

#[test]
fn no_endpoints_means_an_entry_without_table() {
    let mut s = Syncer::recover(MemoryMaps::default(), Config::default()).unwrap();
    s.apply(&desired(&[("a", 1, &[])]));
    let e = entry(&s, 1);
    assert_eq!((e.backend_count, e.maglev_len), (0, 0));
}

#[test]
fn recover_writes_the_configured_lifetimes() {
    let s = Syncer::recover(MemoryMaps::default(), Config::default()).unwrap();
    assert_eq!(s.store().config, Some(Config::default()));
    let shorter = Config::new(3600, 30, 5, 20, 20);
    let again = Syncer::recover(s.store().clone(), shorter).unwrap();
    assert_eq!(again.store().config, Some(shorter));
}

/// Service "a" with the given source ranges on its (single) frontend.
fn filtered(ranges: &[(Ipv4Addr, u8)]) -> DesiredMaps {
    let mut d = desired(&[("a", 1, &[1])]);
    let svc = d.services.get_mut(&id("a")).unwrap();
    svc.source_ranges = ranges.to_vec();
    svc.frontends[0].filter_sources = !ranges.is_empty();
    d
}

fn log_position(s: &Syncer<MemoryMaps>, prefix: &str) -> usize {
    let log = &s.store().log;
    log.iter()
        .rposition(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix} in {log:?}"))
}

#[test]
fn source_ranges_are_written_before_the_flag_and_deleted_after_it() {
    let mut s = Syncer::recover(MemoryMaps::default(), Config::default()).unwrap();
    s.apply(&desired(&[("a", 1, &[1])]));
    let r = s.apply(&filtered(&[
        (Ipv4Addr::new(198, 51, 100, 0), 24),
        (Ipv4Addr::new(203, 0, 113, 7), 32),
    ]));
    assert!(r.errors.is_empty(), "{r:?}");
    let e = entry(&s, 1);
    assert_ne!(e.flags & service_flags::SOURCE_RANGES, 0);
    let ranges: Vec<_> = s.store().source_ranges.iter().copied().collect();
    assert_eq!(
        ranges,
        vec![
            SourceRange {
                service_id: e.id,
                addr: addr::ipv4([198, 51, 100, 0]),
                prefix_len: 24
            },
            SourceRange {
                service_id: e.id,
                addr: addr::ipv4([203, 0, 113, 7]),
                prefix_len: 32
            },
        ]
    );
    assert!(log_position(&s, "put_source_range") < log_position(&s, "put_service"));

    s.apply(&filtered(&[]));
    assert_eq!(entry(&s, 1).flags & service_flags::SOURCE_RANGES, 0);
    assert!(s.store().source_ranges.is_empty());
    assert!(log_position(&s, "put_service") < log_position(&s, "delete_source_range"));
}

#[test]
fn a_full_source_range_map_is_reported() {
    let maps = MemoryMaps {
        source_range_capacity: 1,
        ..Default::default()
    };
    let mut s = Syncer::recover(maps, Config::default()).unwrap();
    let r = s.apply(&filtered(&[
        (Ipv4Addr::new(198, 51, 100, 0), 24),
        (Ipv4Addr::new(203, 0, 113, 0), 24),
    ]));
    assert_eq!(r.map_full, 1, "{r:?}");
    assert_eq!(s.store().source_ranges.len(), 1);
}

#[test]
fn restart_recovers_source_ranges_without_writes() {
    let mut s = Syncer::recover(MemoryMaps::default(), Config::default()).unwrap();
    let d = filtered(&[(Ipv4Addr::new(198, 51, 100, 0), 24)]);
    s.apply(&d);
    let mut again = Syncer::recover(s.store().clone(), Config::default()).unwrap();
    let r = again.apply(&d);
    assert_eq!((r.writes, r.deletes), (0, 0), "{r:?}");
}

#[test]
fn a_selection_of_terminating_endpoints_is_marked_as_the_fallback() {
    let mut s = Syncer::recover(MemoryMaps::default(), Config::default()).unwrap();
    let mut d = desired(&[("a", 1, &[1, 2])]);
    s.apply(&d);
    assert_eq!(entry(&s, 1).flags & service_flags::TERMINATING_FALLBACK, 0);
    let svc = d.services.get_mut(&id("a")).unwrap();
    for b in &mut svc.backends {
        b.state = backend_state::TERMINATING;
    }
    s.apply(&d);
    assert_ne!(entry(&s, 1).flags & service_flags::TERMINATING_FALLBACK, 0);
}

#[test]
fn a_fresh_id_gets_zeroed_counters_before_any_entry_names_it() {
    let mut s = Syncer::recover(MemoryMaps::default(), Config::default()).unwrap();
    s.apply(&desired(&[("a", 1, &[1]), ("b", 2, &[2])]));
    let log = &s.store().log;
    let resets: Vec<&String> = log
        .iter()
        .filter(|l| l.starts_with("reset_service_counters"))
        .collect();
    assert_eq!(
        resets,
        ["reset_service_counters 1", "reset_service_counters 2"]
    );
    let first_put = log.iter().position(|l| l.starts_with("put_service"));
    assert!(
        log.iter().rposition(|l| l.starts_with("reset_")) < first_put,
        "{log:?}"
    );

    // a goes and c comes in the same sync: a's entries name its id until they are
    // deleted, so c gets another; the next new service port takes a's, zeroed again.
    let a_id = s.service_ids()[&id("a")];
    s.apply(&desired(&[("b", 2, &[2]), ("c", 3, &[3])]));
    assert_ne!(s.service_ids()[&id("c")], a_id);
    let mark = s.store().log.len();
    s.apply(&desired(&[("b", 2, &[2]), ("c", 3, &[3]), ("d", 4, &[4])]));
    assert_eq!(s.service_ids()[&id("d")], a_id, "the lowest free id");
    let log = &s.store().log[mark..];
    let reset = log
        .iter()
        .position(|l| *l == format!("reset_service_counters {a_id}"))
        .unwrap_or_else(|| panic!("no reset in {log:?}"));
    assert!(
        reset
            < log
                .iter()
                .position(|l| l.starts_with("put_service"))
                .unwrap()
    );
    assert_eq!(
        log.iter().filter(|l| l.starts_with("reset_")).count(),
        1,
        "b keeps its id and its counts: {log:?}"
    );

    // A restarted agent recovers the ids and keeps counting on them.
    let mut again = Syncer::recover(s.store().clone(), Config::default()).unwrap();
    let mark = again.store().log.len();
    again.apply(&desired(&[("b", 2, &[2]), ("c", 3, &[3]), ("d", 4, &[4])]));
    assert!(
        !again.store().log[mark..]
            .iter()
            .any(|l| l.starts_with("reset_")),
        "{:?}",
        &again.store().log[mark..]
    );
}

#[test]
fn an_incremental_apply_writes_only_the_touched_service_port() {
    let mut s = Syncer::recover(MemoryMaps::default(), Config::default()).unwrap();
    s.apply(&desired(&[
        ("a", 1, &[1, 2]),
        ("b", 2, &[3]),
        ("c", 3, &[4]),
    ]));
    let mark = s.store().log.len();
    let d = desired(&[("a", 1, &[1, 2]), ("b", 2, &[3, 5]), ("c", 3, &[4])]);
    let r = s.apply_changes(&d, &BTreeSet::from([id("b")]), &BTreeSet::new());
    assert!(r.errors.is_empty(), "{r:?}");
    let b = entry(&s, 2);
    let log = &s.store().log[mark..];
    let backend = s
        .store()
        .backends
        .iter()
        .find(|(_, v)| v.addr == addr::ipv4([10, 0, 0, 5]))
        .map(|(id, _)| *id)
        .unwrap();
    assert_eq!(
        log,
        [
            format!("put_backend {backend}"),
            format!("write_maglev {}+251", b.maglev_offset),
            format!(
                "put_service {:?}",
                frontend_key(Ipv4Addr::new(10, 96, 0, 2), 80, 6, scope::INTERNAL)
            ),
        ]
    );
    // A full apply agrees that nothing else is left to do.
    let r = s.apply(&d);
    assert_eq!((r.writes, r.deletes), (0, 0), "{r:?}");
}

#[test]
fn a_service_port_that_failed_is_retried_by_the_next_incremental_apply() {
    let maps = MemoryMaps::with_capacity(1, 1 << 16);
    let mut s = Syncer::recover(maps, Config::default()).unwrap();
    let d = desired(&[("a", 1, &[1]), ("b", 2, &[2])]);
    let r = s.apply(&d);
    assert!(r.map_full >= 1, "{r:?}");
    let missing = |s: &Syncer<MemoryMaps>| {
        [1, 2]
            .iter()
            .filter(|i| {
                let key = frontend_key(Ipv4Addr::new(10, 96, 0, **i), 80, 6, scope::INTERNAL);
                !s.store().services.contains_key(&key)
            })
            .count()
    };
    assert_eq!(missing(&s), 1);
    s.store.service_capacity = 16;
    let r = s.apply_changes(&d, &BTreeSet::new(), &BTreeSet::new());
    assert!(r.errors.is_empty(), "{r:?}");
    assert_eq!(missing(&s), 0);
    assert!(
        s.store()
            .services
            .contains_key(&marker(addr::ipv4([10, 96, 0, 2])).0),
        "the marker that did not fit is written too"
    );
}

/// Service "a" and "b" both answering on 10.96.0.1:80; b's port id is the greater.
fn sharing(b_backends: Option<&[u8]>) -> DesiredMaps {
    let mut d = desired(&[("a", 1, &[1])]);
    if let Some(backends) = b_backends {
        let mut b = desired(&[("b", 1, backends)]);
        d.services.append(&mut b.services);
    }
    d
}

#[test]
fn a_shared_frontend_holds_the_greatest_claimant_and_passes_to_the_next() {
    let mut s = Syncer::recover(MemoryMaps::default(), Config::default()).unwrap();
    s.apply(&sharing(None));
    let a = entry(&s, 1);
    let r = s.apply_changes(
        &sharing(Some(&[2])),
        &BTreeSet::from([id("b")]),
        &BTreeSet::new(),
    );
    assert!(r.errors.is_empty(), "{r:?}");
    assert_eq!(entry(&s, 1).id, s.service_ids()[&id("b")]);
    // b goes: the entry is a's again, pointing at the table a kept while it waited.
    let r = s.apply_changes(&sharing(None), &BTreeSet::from([id("b")]), &BTreeSet::new());
    assert!(r.errors.is_empty(), "{r:?}");
    let again = entry(&s, 1);
    assert_eq!(again, a);
    assert_eq!(r.tables_written, 0);
    assert!(
        s.ranges.get(&a.maglev_offset).is_some_and(|r| r.users > 0),
        "a's table was freed while its entry still names it"
    );
    let table = s
        .store()
        .maglev(again.maglev_offset, again.maglev_len)
        .unwrap();
    assert!(table
        .iter()
        .all(|b| s.store().backends[b].addr == addr::ipv4([10, 0, 0, 1])));
    let r = s.apply(&sharing(None));
    assert_eq!((r.writes, r.deletes), (0, 0), "{r:?}");
}

/// Service "a" (ClusterIP 10.96.0.1:80) with a NodePort 30080 as well.
fn with_node_port(node_addresses: &[[u8; 4]]) -> DesiredMaps {
    let mut d = desired(&[("a", 1, &[1])]);
    let svc = d.services.get_mut(&id("a")).unwrap();
    let mut np = svc.frontends[0].clone();
    (np.addr, np.port, np.scope, np.kind) = (
        Ipv4Addr::UNSPECIFIED,
        30080,
        scope::EXTERNAL,
        kind::NODE_PORT,
    );
    svc.frontends.insert(0, np);
    d.node_addresses = node_addresses.iter().map(|a| Ipv4Addr::from(*a)).collect();
    d
}

/// Does the filter let `addr:port` (host order) over TCP through to the lookups?
fn passes_filter(s: &Syncer<MemoryMaps>, addr: [u8; 4], port: u16, proto: u8) -> bool {
    s.store()
        .maybe_frontend(addr::ipv4(addr), addr::port(port), proto)
}

#[test]
fn the_filter_lets_through_frontends_and_node_ports_on_each_node_address_only() {
    const TCP: u8 = lb_common::proto::TCP;
    let (a, b) = ([192, 0, 2, 1], [192, 0, 2, 2]);
    let mut s = Syncer::recover(MemoryMaps::default(), Config::default()).unwrap();
    let r = s.apply(&with_node_port(&[a]));
    assert!(r.errors.is_empty(), "{r:?}");
    assert!(passes_filter(&s, [10, 96, 0, 1], 80, TCP));
    assert!(
        passes_filter(&s, [10, 96, 0, 1], 0, 0),
        "the ClusterIP's marker"
    );
    assert!(passes_filter(&s, a, 30080, TCP));
    assert!(!passes_filter(&s, b, 30080, TCP), "not a node address");
    assert!(!passes_filter(&s, a, 22, TCP), "the node's own services");
    assert!(!passes_filter(&s, a, 30080, lb_common::proto::UDP));

    s.apply(&with_node_port(&[b]));
    assert!(passes_filter(&s, b, 30080, TCP), "a node address that came");
    assert!(
        !passes_filter(&s, a, 30080, TCP),
        "a node address that went"
    );

    // A restarted agent writes the filter whole from what the maps hold.
    let mut zeroed = s.store().clone();
    zeroed.filter.fill(0);
    let mut again = Syncer::recover(zeroed, Config::default()).unwrap();
    again.apply(&with_node_port(&[b]));
    assert_eq!(again.store().filter, s.store().filter);

    let mut d = with_node_port(&[b]);
    d.services.clear();
    d.cluster_ips.clear();
    s.apply(&d);
    assert!(
        s.store().filter.iter().all(|w| *w == u64::MAX),
        "no frontend left"
    );
}

#[test]
fn a_frontend_that_goes_or_changes_moves_its_service_id_to_the_next_generation() {
    let mut s = Syncer::recover(MemoryMaps::default(), Config::default()).unwrap();
    s.apply(&with_node_port(&[[192, 0, 2, 1]]));
    let sid = entry(&s, 1).id;
    let generation = |s: &Syncer<MemoryMaps>| s.store().generations[sid as usize];
    assert_eq!(
        generation(&s),
        0,
        "new frontends leave established flows alone"
    );

    let mut d = with_node_port(&[[192, 0, 2, 1]]);
    let svc = d.services.get_mut(&id("a")).unwrap();
    svc.backends[0].addr = Ipv4Addr::new(10, 0, 0, 9);
    s.apply(&d);
    assert_eq!(
        generation(&s),
        0,
        "an endpoint change keeps flows on the fast path"
    );

    let svc = d.services.get_mut(&id("a")).unwrap();
    svc.frontends.remove(0);
    let mark = s.store().log.len();
    s.apply(&d);
    assert_eq!(generation(&s), 1, "the NodePort went");
    let log = &s.store().log[mark..];
    let pos = |p: &str| log.iter().position(|l| l.starts_with(p)).unwrap();
    assert!(pos("delete_service") < pos("next_generation"), "{log:?}");

    let svc = d.services.get_mut(&id("a")).unwrap();
    svc.frontends[0].local_policy = true;
    s.apply(&d);
    assert_eq!(generation(&s), 2, "the ClusterIP's policy changed");
}

#[test]
fn every_backend_is_written_before_any_frontend() {
    let mut s = Syncer::recover(MemoryMaps::default(), Config::default()).unwrap();
    s.apply(&desired(&[
        ("a", 1, &[1, 2]),
        ("b", 2, &[3]),
        ("c", 3, &[4, 5]),
    ]));
    let log = &s.store().log;
    let last_backend = log.iter().rposition(|l| l.starts_with("put_backend"));
    let first_frontend = log.iter().position(|l| l.starts_with("put_service"));
    assert!(last_backend < first_frontend, "{log:?}");
    assert_eq!(
        log.iter().filter(|l| l.starts_with("put_backend")).count(),
        5
    );
}

#[test]
fn a_backend_that_does_not_fit_fails_its_service_port_alone() {
    let maps = MemoryMaps {
        backend_capacity: 3,
        ..Default::default()
    };
    let mut s = Syncer::recover(maps, Config::default()).unwrap();
    let d = desired(&[("a", 1, &[1]), ("b", 2, &[2, 3, 4, 5])]);
    let r = s.apply(&d);
    assert_eq!((r.map_full, r.errors.len()), (1, 1), "{r:?}");
    assert!(r.errors[0].contains("10.0.0.4:8080"), "{r:?}");
    let written: Vec<&String> = s
        .store()
        .log
        .iter()
        .filter(|l| l.starts_with("put_backend"))
        .collect();
    assert_eq!(
        written.len(),
        3,
        "b stops at the backend that failed: {written:?}"
    );
    assert_eq!(entry(&s, 1).backend_count, 1);
    let b_frontend = ServiceKey::new(
        addr::ipv4([10, 96, 0, 2]),
        addr::port(80),
        lb_common::proto::TCP,
        scope::INTERNAL,
    );
    assert!(!s.store().services.contains_key(&b_frontend));
    // b is withdrawn: the backends it wrote are deleted, the ids of all of them free.
    assert_eq!(s.store().backends.len(), 1);
    assert_eq!(s.backend_ids.len(), 1);
    assert!(s.failed.contains(&id("b")));
}

/// A service port that sorts before "b" and already has an entry of its own, so that a
/// restarted syncer gives it back its id.
fn sharing_after_restart(shared: bool) -> DesiredMaps {
    let mut d = desired(&[("a", 1, &[1]), ("b", 2, &[2])]);
    let external = |svc: &DesiredService| DesiredFrontend {
        addr: Ipv4Addr::new(192, 0, 2, 99),
        port: 80,
        scope: scope::EXTERNAL,
        kind: kind::EXTERNAL_IP,
        local_policy: false,
        filter_sources: false,
        dsr: false,
        selection: (0..svc.backends.len()).collect(),
    };
    let names: &[&str] = if shared { &["a", "b"] } else { &["b"] };
    for name in names {
        let svc = d.services.get_mut(&id(name)).unwrap();
        let f = external(svc);
        svc.frontends.push(f);
    }
    d
}

#[test]
fn a_frontend_shared_since_a_restart_holds_the_greatest_claimant() {
    let mut s = Syncer::recover(MemoryMaps::default(), Config::default()).unwrap();
    s.apply(&sharing_after_restart(false));
    let key = ServiceKey::new(
        addr::ipv4([192, 0, 2, 99]),
        addr::port(80),
        lb_common::proto::TCP,
        scope::EXTERNAL,
    );
    let b = s.store().services[&key];
    // "a" asks for b's externalIP while no agent runs: the restarted one writes a's entry
    // first (nobody else claims the key yet), then b's, which the map held before.
    let mut again = Syncer::recover(s.store().clone(), Config::default()).unwrap();
    let r = again.apply(&sharing_after_restart(true));
    assert!(r.errors.is_empty(), "{r:?}");
    assert_eq!(again.service_ids()[&id("b")], b.id);
    assert_eq!(again.store().services[&key], b);
}
