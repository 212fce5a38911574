//! Incremental syncs against full ones: after any sequence of watch events, the maps an
//! incremental sync leaves are those a full sync of the same state writes from nothing.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::runtime::watcher::Event;
use lb_common::{Config, ServiceKey};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::*;
use crate::{
    kubernetes::{KubeSource, Update},
    plan::plan,
    sync::MemoryMaps,
};

/// xorshift64*: the same sequence on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
    fn some<T: Clone>(&mut self, xs: &[T]) -> Vec<T> {
        xs.iter().filter(|_| self.chance(50)).cloned().collect()
    }
}

const SERVICES: usize = 6;
const SLICES: usize = 8;

fn namespace(i: usize) -> &'static str {
    ["a", "b"][i % 2]
}

/// Small pools, so that services share ClusterIPs, NodePorts, externalIPs and health
/// check ports, and slices share endpoints.
fn random_service(rng: &mut Rng, i: usize) -> Service {
    let kind = *rng.pick(&["ClusterIP", "NodePort", "LoadBalancer"]);
    let node_ports = kind != "ClusterIP";
    let ports: Vec<Value> = (0..1 + rng.below(2))
        .map(|_| {
            let (name, port, protocol) = *rng.pick(&[
                ("", 80, "TCP"),
                ("http", 80, "TCP"),
                ("dns", 53, "UDP"),
                ("http", 8080, "TCP"),
            ]);
            let mut p = json!({"name": name, "port": port, "protocol": protocol});
            if node_ports {
                p["nodePort"] = json!(*rng.pick(&[30001, 30002, 30003]));
            }
            p
        })
        .collect();
    let local = rng.chance(30);
    let mut spec = json!({
        "type": kind,
        "clusterIP": *rng.pick(&["10.96.0.1", "10.96.0.2", "10.96.0.3", "10.96.0.4", "None", ""]),
        "ports": ports,
        "externalIPs": rng.some(&["192.0.2.10", "192.0.2.11"]),
        "externalTrafficPolicy": if local { "Local" } else { "Cluster" },
        "internalTrafficPolicy": if rng.chance(20) { "Local" } else { "Cluster" },
        "loadBalancerSourceRanges": rng.some(&["203.0.113.0/24", "192.0.2.1/32"]),
    });
    if local && kind == "LoadBalancer" {
        spec["healthCheckNodePort"] = json!(*rng.pick(&[32000, 32001]));
    }
    if rng.chance(25) {
        spec["sessionAffinity"] = json!("ClientIP");
    }
    let ingress: Vec<Value> = rng
        .some(&["198.51.100.1", "198.51.100.2"])
        .into_iter()
        .map(|ip| json!({"ip": ip}))
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": format!("s{i}"), "namespace": namespace(i)},
        "spec": spec,
        "status": {"loadBalancer": {"ingress": ingress}},
    }))
    .unwrap()
}

fn random_slice(rng: &mut Rng, j: usize) -> EndpointSlice {
    let mut metadata = json!({"name": format!("e{j}"), "namespace": namespace(j)});
    if !rng.chance(10) {
        // Sometimes a service of the other namespace's name: a slice for no service.
        let service = format!("s{}", rng.below(SERVICES));
        metadata["labels"] = json!({"kubernetes.io/service-name": service});
    }
    let ports = rng.some(&[
        json!({"name": "", "port": 8080, "protocol": "TCP"}),
        json!({"name": "http", "port": 8081, "protocol": "TCP"}),
        json!({"name": "dns", "port": 5353, "protocol": "UDP"}),
    ]);
    let endpoints: Vec<Value> = (0..rng.below(5))
        .map(|_| {
            let ready = rng.chance(70);
            json!({
                "addresses": [format!("10.244.0.{}", 1 + rng.below(8))],
                "nodeName": *rng.pick(&["n1", "n2"]),
                "conditions": {"ready": ready, "serving": ready || rng.chance(50),
                    "terminating": !ready && rng.chance(50)},
            })
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": metadata, "addressType": "IPv4", "ports": ports, "endpoints": endpoints,
    }))
    .unwrap()
}

fn node(zone_label: &str) -> k8s_openapi::api::core::v1::Node {
    serde_json::from_value(json!({
        "metadata": {"name": "n1", "labels": {"topology.kubernetes.io/zone": zone_label}},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.1"}]},
    }))
    .unwrap()
}

fn controller(node: NodeContext) -> Controller<MemoryMaps> {
    let maps = MemoryMaps::with_capacity(lb_common::capacity::SERVICES as usize, 1 << 22);
    let syncer = Syncer::recover(maps, Config::default()).unwrap();
    Controller::new(
        node,
        syncer,
        Arc::new(Health::new(Duration::from_secs(60)).unwrap()),
    )
}

/// A frontend with everything its id and offsets point at, so that maps written by
/// different syncers compare equal when they program the same thing.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Resolved {
    key: ServiceKey,
    flags: u16,
    kind: u8,
    backend_count: u32,
    affinity_timeout: u32,
    /// (address, port, state, flags) of each Maglev slot.
    table: Vec<(u32, u16, u8, u8)>,
    /// Every backend and source range of its service port.
    backends: BTreeSet<(u32, u16, u8, u8, u8)>,
    source_ranges: BTreeSet<(u32, u8)>,
    /// The other frontends of its service port.
    siblings: BTreeSet<ServiceKey>,
}

type Backends = BTreeSet<(u32, u16, u8, u8, u8)>;
type SourceRanges = BTreeSet<(u32, u8)>;

/// The frontends resolved; the backends and source ranges of service ports no frontend
/// names (a service without a ClusterIP still lists backends, one whose every address
/// another service wins keeps its ranges), one group per service port; node addresses.
type Resolution = (Vec<Resolved>, Vec<(Backends, SourceRanges)>, Vec<u32>);

fn resolve(maps: &MemoryMaps) -> Resolution {
    let mut by_id: BTreeMap<u32, BTreeSet<ServiceKey>> = BTreeMap::new();
    for (k, v) in &maps.services {
        by_id.entry(v.id).or_default().insert(*k);
    }
    let backends_of = |id: u32| -> Backends {
        maps.backends
            .values()
            .filter(|b| id != 0 && b.service_id == id)
            .map(|b| (b.addr, b.port, b.proto, b.state, b.flags))
            .collect()
    };
    let source_ranges_of = |id: u32| -> SourceRanges {
        maps.source_ranges
            .iter()
            .filter(|r| id != 0 && r.service_id == id)
            .map(|r| (r.addr, r.prefix_len))
            .collect()
    };
    let frontends = maps
        .services
        .iter()
        .map(|(k, v)| {
            let o = v.maglev_offset as usize;
            let slot = |id: &u32| {
                let b = maps
                    .backends
                    .get(id)
                    .expect("a slot names a backend that exists");
                (b.addr, b.port, b.state, b.flags)
            };
            Resolved {
                key: *k,
                flags: v.flags,
                kind: v.kind,
                backend_count: v.backend_count,
                affinity_timeout: v.affinity_timeout,
                table: maps.maglev[o..o + v.maglev_len as usize]
                    .iter()
                    .map(slot)
                    .collect(),
                backends: backends_of(v.id),
                source_ranges: source_ranges_of(v.id),
                siblings: by_id[&v.id].clone(),
            }
        })
        .collect();
    let unnamed: BTreeSet<u32> = maps
        .backends
        .values()
        .map(|b| b.service_id)
        .chain(maps.source_ranges.iter().map(|r| r.service_id))
        .filter(|id| !by_id.contains_key(id))
        .collect();
    let mut unnamed: Vec<_> = unnamed
        .into_iter()
        .map(|id| (backends_of(id), source_ranges_of(id)))
        .collect();
    unnamed.sort();
    let mut nodes = maps.node_addresses.clone();
    nodes.sort();
    (frontends, unnamed, nodes)
}

/// Fails with the entries that differ, not the whole maps.
fn assert_same(step: usize, incremental: Resolution, full: Resolution) {
    if incremental == full {
        return;
    }
    let only = |a: &[Resolved], b: &[Resolved]| -> Vec<String> {
        a.iter()
            .filter(|r| !b.contains(r))
            .map(|r| {
                format!(
                    "{:?} {:?} id-mates {}",
                    r.key,
                    (
                        r.flags,
                        r.kind,
                        r.backend_count,
                        &r.backends,
                        &r.source_ranges
                    ),
                    r.siblings.len()
                )
            })
            .collect()
    };
    panic!(
        "step {step}: the maps differ\nonly incremental: {:#?}\nonly full: {:#?}\nunnamed: {:?} vs {:?}\nnodes: {:?} vs {:?}",
        only(&incremental.0, &full.0),
        only(&full.0, &incremental.0),
        incremental.1,
        full.1,
        incremental.2,
        full.2
    );
}

/// Applies the update to the store and, like the agent, syncs what it changed.
fn deliver(source: &mut KubeSource, ctl: &mut Controller<MemoryMaps>, updates: Vec<Update>) {
    let mut changes = crate::kubernetes::Changes::default();
    for u in updates {
        changes.merge(source.store.update(u));
    }
    source.handle(changes, ctl);
}

#[test]
fn incremental_syncs_leave_the_maps_a_full_sync_writes() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (_tx, rx) = mpsc::channel(1);
    let base = NodeContext {
        node_name: "n1".into(),
        node_addresses: vec!["192.0.2.1".parse().unwrap()],
        ..Default::default()
    };
    let mut source = KubeSource::new(rx, base.clone(), false);
    let mut ctl = controller(base);
    let mut initial = vec![Update::Service(Event::Init)];
    initial.extend(
        (0..SERVICES / 2).map(|i| Update::Service(Event::InitApply(random_service(&mut rng, i)))),
    );
    initial.push(Update::Service(Event::InitDone));
    initial.push(Update::Slice(Event::Init));
    initial.extend(
        (0..SLICES / 2).map(|j| Update::Slice(Event::InitApply(random_slice(&mut rng, j)))),
    );
    initial.push(Update::Slice(Event::InitDone));
    deliver(&mut source, &mut ctl, initial);

    let mut incremental = 0;
    for step in 0..300 {
        let mut updates = Vec::new();
        for _ in 0..1 + rng.below(3) {
            let i = rng.below(SERVICES);
            let j = rng.below(SLICES);
            updates.push(match rng.below(100) {
                0..35 => Update::Service(Event::Apply(random_service(&mut rng, i))),
                35..45 => Update::Service(Event::Delete(random_service(&mut rng, i))),
                45..85 => Update::Slice(Event::Apply(random_slice(&mut rng, j))),
                85..97 => Update::Slice(Event::Delete(random_slice(&mut rng, j))),
                _ => {
                    let zone: &&str = rng.pick(&["z1", "z2"]);
                    Update::Node(Event::Apply(node(zone)))
                }
            });
        }
        let full = updates.iter().any(|u| matches!(u, Update::Node(_)));
        deliver(&mut source, &mut ctl, updates);
        incremental += usize::from(!full);

        let state = &source.store.state;
        let mut fresh = controller(ctl.node.clone());
        let r = fresh.sync(state);
        assert!(r.errors.is_empty(), "step {step}: {r:?}");
        assert_same(
            step,
            resolve(ctl.syncer.store()),
            resolve(fresh.syncer.store()),
        );
        ctl.syncer.assert_ranges_held();
        // The plan kept service by service is the plan of the whole state (health checks
        // included, which the maps do not show), and the syncer's own record agrees: a
        // full apply finds nothing to do.
        let whole = plan(state, &ctl.node).desired;
        assert!(
            ctl.planner.as_ref().is_some_and(|p| *p.desired() == whole),
            "step {step}: the kept plan differs from the whole state's"
        );
        let r = ctl.syncer.apply(&whole);
        assert_eq!(
            (r.writes, r.deletes, r.errors.len()),
            (0, 0, 0),
            "step {step}: {r:?}"
        );
    }
    assert!(
        incremental > 250,
        "the sequence must mostly take the incremental path"
    );
}
