use std::{net::Ipv4Addr, sync::Arc};

use lb_common::{backend_state, kind, scope, Config};

use super::*;
use crate::{
    desired::{DesiredBackend, DesiredFrontend, DesiredMaps, DesiredService},
    health::Health,
    sync::{MemoryMaps, SourceRange, Syncer},
};

/// Counters and map entries as a test sets them, and how often maps were walked.
#[derive(Clone, Default)]
struct Fake(Arc<Mutex<FakeState>>);

#[derive(Default)]
struct FakeState {
    counts: BTreeMap<u32, ServiceCounts>,
    entries: BTreeMap<&'static str, u64>,
    walks: usize,
}

impl Fake {
    fn set(&self, id: u32, packets: u64, bytes: u64, drops: u64) {
        lock(&self.0).counts.insert(
            id,
            ServiceCounts {
                packets,
                bytes,
                drops,
            },
        );
    }
}

impl CounterSource for Fake {
    fn service(&self, id: u32) -> anyhow::Result<ServiceCounts> {
        Ok(lock(&self.0).counts.get(&id).copied().unwrap_or_default())
    }
    fn entries(&self, map: &'static str) -> anyhow::Result<u64> {
        let mut s = lock(&self.0);
        s.walks += 1;
        s.entries
            .get(map)
            .copied()
            .ok_or_else(|| anyhow::anyhow!("no such map"))
    }
}

fn port(name: &str, port_name: &str, protocol: u8) -> ServicePortId {
    ServicePortId {
        namespace: "shop".into(),
        name: name.into(),
        port_name: port_name.into(),
        protocol,
    }
}

/// Service ports with a ClusterIP 10.96.0.`ip` each and `backends` endpoints 10.0.0.x.
fn desired(services: &[(&ServicePortId, u8, &[u8])]) -> DesiredMaps {
    let mut d = DesiredMaps::default();
    for (id, ip, backends) in services {
        let backends: Vec<DesiredBackend> = backends
            .iter()
            .map(|b| DesiredBackend {
                addr: Ipv4Addr::new(10, 0, 0, *b),
                port: 8080,
                state: backend_state::ACTIVE,
                local: true,
            })
            .collect();
        let frontend = |addr, port, scope, kind| DesiredFrontend {
            addr,
            port,
            scope,
            kind,
            local_policy: false,
            filter_sources: kind == kind::LOAD_BALANCER,
            dsr: false,
            selection: (0..backends.len()).collect(),
        };
        let frontends = vec![
            frontend(
                Ipv4Addr::new(10, 96, 0, *ip),
                80,
                scope::INTERNAL,
                kind::CLUSTER_IP,
            ),
            frontend(
                Ipv4Addr::new(203, 0, 113, *ip),
                80,
                scope::EXTERNAL,
                kind::LOAD_BALANCER,
            ),
        ];
        d.services.insert(
            (*id).clone(),
            DesiredService {
                backends,
                frontends,
                affinity_timeout: None,
                source_ranges: vec![(Ipv4Addr::new(198, 51, 100, 0), 24)],
            },
        );
        d.cluster_ips.insert(Ipv4Addr::new(10, 96, 0, *ip));
    }
    d.node_addresses.insert(Ipv4Addr::new(192, 0, 2, 1));
    d
}

/// The metrics text of a Health registry holding `m`, as the agent serves it.
fn scrape(m: &Arc<DatapathMetrics>) -> String {
    let h = Health::new(Duration::from_secs(60)).unwrap();
    h.register(|r| r.register_collector(Box::new(m.clone())));
    h.encode().unwrap()
}

fn line(metric: &str, p: &ServicePortId, value: u64) -> String {
    let proto = if p.protocol == proto::TCP {
        "TCP"
    } else {
        "UDP"
    };
    format!(
        "lb_{metric}_total{{namespace=\"{}\",name=\"{}\",port=\"{}\",protocol=\"{proto}\"}} {value}\n",
        p.namespace, p.name, p.port_name
    )
}

#[track_caller]
fn assert_has(text: &str, want: &str) {
    assert!(text.contains(want), "{want:?} missing in\n{text}");
}

#[test]
fn service_ids_are_exported_as_the_service_ports_they_count_for() {
    let (web, dns, plain) = (
        port("web", "http", proto::TCP),
        port("dns", "dns", proto::UDP),
        port("plain", "", proto::TCP),
    );
    let mut s = Syncer::recover(MemoryMaps::default(), Config::default()).unwrap();
    s.apply(&desired(&[
        (&web, 1, &[1, 2]),
        (&dns, 2, &[3]),
        (&plain, 3, &[]),
    ]));
    let fake = Fake::default();
    // Counts that tell the ids apart.
    for id in s.service_ids().values() {
        fake.set(
            *id,
            10 * u64::from(*id),
            1000 * u64::from(*id),
            u64::from(*id),
        );
    }
    let m = Arc::new(DatapathMetrics::new(fake.clone()));
    m.publish(s.service_ids(), s.fill_levels());
    let text = scrape(&m);
    for p in [&web, &dns, &plain] {
        let id = u64::from(s.service_ids()[p]);
        assert_has(&text, &line("service_packets", p, 10 * id));
        assert_has(&text, &line("service_bytes", p, 1000 * id));
        assert_has(&text, &line("service_drops", p, id));
    }
    let ids: std::collections::BTreeSet<u32> = s.service_ids().values().copied().collect();
    assert_eq!(ids.len(), 3, "one id per service port");

    // A service port that is gone is no longer exported; the others keep their ids.
    let web_id = s.service_ids()[&web];
    s.apply(&desired(&[(&web, 1, &[1, 2]), (&plain, 3, &[])]));
    assert_eq!(s.service_ids()[&web], web_id);
    m.publish(s.service_ids(), s.fill_levels());
    let text = scrape(&m);
    assert!(!text.contains("name=\"dns\""), "{text}");
    assert_has(
        &text,
        &line("service_packets", &web, 10 * u64::from(web_id)),
    );
}

#[test]
fn a_service_ports_counters_never_go_down() {
    let web = port("web", "http", proto::TCP);
    let fake = Fake::default();
    let m = Arc::new(DatapathMetrics::new(fake.clone()));
    let ids = BTreeMap::from([(web.clone(), 7u32)]);
    m.publish(&ids, []);
    fake.set(7, 100, 10_000, 4);
    assert_has(&scrape(&m), &line("service_packets", &web, 100));

    // Deleted and created again between scrapes: the same id, zeroed, counts anew.
    fake.set(7, 5, 500, 0);
    let text = scrape(&m);
    assert_has(&text, &line("service_packets", &web, 105));
    assert_has(&text, &line("service_bytes", &web, 10_500));
    assert_has(&text, &line("service_drops", &web, 4));

    // Another id for the same service port, even one with more counted: carried over.
    let ids = BTreeMap::from([(web.clone(), 9u32)]);
    m.publish(&ids, []);
    fake.set(9, 50, 5_000, 1);
    let text = scrape(&m);
    assert_has(&text, &line("service_packets", &web, 155));
    assert_has(&text, &line("service_drops", &web, 5));
    fake.set(9, 60, 6_000, 1);
    assert_has(&scrape(&m), &line("service_packets", &web, 165));

    // Gone, then back: a new series that starts from its id's counters.
    m.publish(&BTreeMap::new(), []);
    assert!(!scrape(&m).contains("name=\"web\""));
    m.publish(&ids, []);
    assert_has(&scrape(&m), &line("service_packets", &web, 60));
}

#[test]
fn agent_maps_are_counted_from_the_syncers_record() {
    let (a, b) = (port("a", "http", proto::TCP), port("b", "http", proto::TCP));
    let mut s = Syncer::recover(MemoryMaps::default(), Config::default()).unwrap();
    s.apply(&desired(&[(&a, 1, &[1, 2]), (&b, 2, &[3])]));
    let store = s.store();
    let fill: BTreeMap<&str, u64> = s.fill_levels().into_iter().collect();
    assert_eq!(fill[maps::SERVICES], store.services.len() as u64);
    assert_eq!(
        fill[maps::SERVICES],
        2 * 2 + 2,
        "two frontends and a marker each"
    );
    assert_eq!(fill[maps::BACKENDS], store.backends.len() as u64);
    assert_eq!(fill[maps::BACKENDS], 3);
    // Two tables of the smallest length; both frontends of a service share one.
    assert_eq!(fill[maps::MAGLEV], 2 * u64::from(capacity::maglev_len(1)));
    assert_eq!(
        fill[maps::NODE_ADDRESSES],
        store.node_addresses.len() as u64
    );
    assert_eq!(fill[maps::SOURCE_RANGES], store.source_ranges.len() as u64);
    assert_eq!(fill[maps::SOURCE_RANGES], 2);
    assert!(store
        .source_ranges
        .iter()
        .all(|r: &SourceRange| r.prefix_len == 24));

    // b goes: its entries go at once; its table waits out its grace period.
    s.apply(&desired(&[(&a, 1, &[1, 2])]));
    let fill: BTreeMap<&str, u64> = s.fill_levels().into_iter().collect();
    assert_eq!(fill[maps::SERVICES], s.store().services.len() as u64);
    assert_eq!(fill[maps::SERVICES], 3);
    assert_eq!(fill[maps::BACKENDS], 2);
    assert_eq!(fill[maps::SOURCE_RANGES], 1);
    assert_eq!(fill[maps::MAGLEV], 2 * u64::from(capacity::maglev_len(1)));
}

#[test]
fn fill_levels_of_every_map_with_a_capacity_and_walks_cached() {
    let a = port("a", "http", proto::TCP);
    let mut s = Syncer::recover(MemoryMaps::default(), Config::default()).unwrap();
    s.apply(&desired(&[(&a, 1, &[1])]));
    let fake = Fake::default();
    for (i, map) in KERNEL_MAPS.iter().enumerate() {
        lock(&fake.0).entries.insert(map, 40 + i as u64);
    }
    let m = Arc::new(DatapathMetrics::new(fake.clone()));
    m.publish(s.service_ids(), s.fill_levels());
    let text = scrape(&m);
    for map in AGENT_MAPS.iter().chain(&KERNEL_MAPS) {
        let cap = capacity_of(map).unwrap();
        assert_has(&text, &format!("lb_map_capacity{{map=\"{map}\"}} {cap}"));
    }
    assert_has(&text, "lb_map_entries{map=\"CONNTRACK\"} 40\n");
    assert_has(&text, "lb_map_entries{map=\"NEIGH_PENDING\"} 45\n");
    assert_has(&text, "lb_map_entries{map=\"SERVICES\"} 3\n");
    assert_has(&text, "lb_map_entries{map=\"BACKENDS\"} 1\n");
    assert_has(&text, "lb_map_entries{map=\"MAGLEV\"} 251\n");
    assert_has(&text, "lb_map_entries{map=\"NODE_ADDRS\"} 1\n");
    assert_has(&text, "lb_map_entries{map=\"SOURCE_RANGES\"} 1\n");
    let pressure: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("lb_map_pressure{map=\"MAGLEV\"} "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MAGLEV pressure in\n{text}"));
    assert!((pressure - 251.0 / f64::from(capacity::MAGLEV)).abs() < 1e-12);
    assert_eq!(lock(&fake.0).walks, KERNEL_MAPS.len(), "one walk per map");

    // A second scrape within the interval walks nothing.
    lock(&fake.0).entries.insert(maps::CONNTRACK, 99);
    let text = scrape(&m);
    assert_has(&text, "lb_map_entries{map=\"CONNTRACK\"} 40\n");
    assert_eq!(lock(&fake.0).walks, KERNEL_MAPS.len());

    // Once the interval has passed, the maps are walked again.
    let m = Arc::new(DatapathMetrics::with_walk_interval(
        fake.clone(),
        Duration::ZERO,
    ));
    let text = scrape(&m);
    assert_has(&text, "lb_map_entries{map=\"CONNTRACK\"} 99\n");
    assert_eq!(lock(&fake.0).walks, 2 * KERNEL_MAPS.len());
    // A map that cannot be walked is left out rather than reported empty.
    lock(&fake.0).entries.remove(maps::SNAT);
    let text = scrape(&m);
    assert!(!text.contains("map=\"SNAT\""), "{text}");
}

#[test]
fn published_id_changes_match_a_full_publish() {
    let web = port("web", "http", proto::TCP);
    let dns = port("dns", "dns", proto::UDP);
    let fake = Fake::default();
    for id in 1..4 {
        fake.set(id, u64::from(id), 0, 0);
    }
    let mut s = Syncer::recover(MemoryMaps::default(), Config::default()).unwrap();
    let incremental = Arc::new(DatapathMetrics::new(fake.clone()));
    let r = s.apply(&desired(&[(&web, 1, &[1])]));
    incremental.publish_changes(&r.ids_released, &r.ids_assigned, []);
    // web goes and dns comes, then web comes back.
    let touched = std::collections::BTreeSet::from([web.clone(), dns.clone()]);
    for d in [
        desired(&[(&dns, 2, &[2])]),
        desired(&[(&dns, 2, &[2]), (&web, 1, &[1])]),
    ] {
        let r = s.apply_changes(&d, &touched, &d.cluster_ips);
        incremental.publish_changes(&r.ids_released, &r.ids_assigned, []);
        let full = Arc::new(DatapathMetrics::new(fake.clone()));
        full.publish(s.service_ids(), []);
        assert_eq!(scrape(&incremental), scrape(&full));
    }
}
