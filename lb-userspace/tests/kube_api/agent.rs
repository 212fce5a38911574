//! The agent's Kubernetes path as `lb agent` wires it: a kube client, `watch::spawn`,
//! `KubeSource` and a `Controller`, here over in-memory maps. Between the watchers and the
//! source a tap records every update it forwards, so the tests see what kube's watchers
//! reported (a relist, a resumed watch) and can tell when the source has handled all of it.

use std::{
    net::Ipv4Addr,
    sync::{Arc, Mutex},
    time::Duration,
};

use kube::runtime::watcher::Event;
use lb_common::{addr, proto, scope, service_flags, Config};
use lb_userspace::{
    controller::Controller,
    health::Health,
    kubernetes::{self, KubeSource, Update},
    state::NodeContext,
    sync::{MemoryMaps, Syncer},
};
use tokio::sync::mpsc;

use super::objects::NODE;

/// The address of the agent's uplink.
pub const UPLINK: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

/// Waits are bounded by this; nothing is asserted on how long they took.
const WAIT: Duration = Duration::from_secs(20);

pub struct Agent {
    ctl: Arc<Mutex<Controller<MemoryMaps>>>,
    pub health: Arc<Health>,
    updates: Arc<Mutex<Vec<String>>>,
    /// The source's channel, to see that it has taken everything the tap forwarded.
    queue: mpsc::Sender<Update>,
}

fn base_node() -> NodeContext {
    NodeContext {
        node_name: NODE.into(),
        node_addresses: vec![UPLINK],
        zone: None,
        lb_mode: Default::default(),
    }
}

fn describe(u: &Update) -> String {
    fn event<K: kube::Resource>(kind: &str, e: &Event<K>) -> String {
        let name = |o: &K| {
            let m = o.meta();
            match &m.namespace {
                Some(ns) => format!("{ns}/{}", m.name.as_deref().unwrap_or_default()),
                None => m.name.clone().unwrap_or_default(),
            }
        };
        match e {
            Event::Init => format!("{kind} Init"),
            Event::InitApply(o) => format!("{kind} InitApply {}", name(o)),
            Event::InitDone => format!("{kind} InitDone"),
            Event::Apply(o) => format!("{kind} Apply {}", name(o)),
            Event::Delete(o) => format!("{kind} Delete {}", name(o)),
        }
    }
    match u {
        Update::Service(e) => event("Service", e),
        Update::Slice(e) => event("Slice", e),
        Update::Node(e) => event("Node", e),
    }
}

impl Agent {
    /// Starts the agent against the API server at `url`.
    pub fn start(url: &str) -> Self {
        let config = kube::Config::new(url.parse().expect("server URL"));
        let client = kubernetes::client::client(config).expect("kube client");
        let mut watched = kubernetes::watch::spawn(client, NODE);

        let (queue, rx) = mpsc::channel(1024);
        let updates = Arc::new(Mutex::new(Vec::new()));
        let (tx, log) = (queue.clone(), updates.clone());
        tokio::spawn(async move {
            while let Some(u) = watched.recv().await {
                log.lock().unwrap().push(describe(&u));
                // No await between taking an update and queueing it (see `settled`).
                tx.try_send(u).expect("the source keeps up");
            }
        });

        let health = Arc::new(Health::new(Duration::from_secs(60)).unwrap());
        let syncer = Syncer::recover(MemoryMaps::default(), Config::new(7440, 60, 10, 30, 30))
            .expect("empty maps");
        let ctl = Arc::new(Mutex::new(Controller::new(
            base_node(),
            syncer,
            health.clone(),
        )));
        let mut source = KubeSource::new(rx, base_node(), false);
        let c = ctl.clone();
        tokio::spawn(async move {
            while let Some(changes) = source.recv().await {
                source.handle(changes, &mut c.lock().unwrap());
            }
        });
        Self {
            ctl,
            health,
            updates,
            queue,
        }
    }

    pub fn maps(&self) -> MemoryMaps {
        self.ctl.lock().unwrap().syncer.store().clone()
    }

    /// What the watchers reported, in order.
    pub fn updates(&self) -> Vec<String> {
        self.updates.lock().unwrap().clone()
    }

    /// True when the source has handled every update the tap forwarded. The tests run on a
    /// current-thread runtime: the source takes updates off its channel and handles them
    /// without yielding in between, so an empty channel means nothing is half-done.
    pub fn settled(&self) -> bool {
        self.queue.capacity() == self.queue.max_capacity()
    }

    /// Waits until the updates after `mark` include `expected` in that order (others may
    /// come between), then until the source has handled them.
    pub async fn wait_updates(&self, phase: &str, mark: usize, expected: &[&str]) {
        eventually(phase, || {
            let seen = self.updates();
            let mut rest = seen[mark..].iter();
            match expected.iter().find(|e| !rest.any(|s| s == *e)) {
                None if self.settled() => Ok(()),
                None => Err("updates not handled yet".into()),
                Some(missing) => Err(format!("no {missing:?} in {:?}", &seen[mark..])),
            }
        })
        .await;
    }

    /// Waits until the frontends are `expected` (see [`frontends`]).
    pub async fn wait_frontends(&self, phase: &str, expected: &[&str]) {
        eventually(phase, || {
            let now = frontends(&self.maps());
            if now == expected {
                Ok(())
            } else {
                Err(format!("frontends {now:#?}\nexpected {expected:#?}"))
            }
        })
        .await;
    }

    /// A metric's value from the Prometheus text, 0 when absent.
    pub fn metric(&self, name: &str) -> f64 {
        let text = self.health.encode().unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    /// How many syncs the controller ran.
    pub fn syncs(&self) -> f64 {
        self.metric("lb_sync_proxy_rules_duration_seconds_count")
    }
}

/// Polls `check` until it succeeds; fails naming `phase` with the last state it reported.
pub async fn eventually<T>(phase: &str, mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match check() {
            Ok(v) => return v,
            Err(state) if tokio::time::Instant::now() >= deadline => {
                panic!("{phase}: not reached within {WAIT:?}; last state:\n{state}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

fn ip(a: u32) -> Ipv4Addr {
    Ipv4Addr::from(addr::ipv4_octets(a))
}

/// The frontends in the maps, one line each, sorted: `10.96.0.10:80/TCP -> 10.244.1.5:8080
/// 10.244.1.6:8080` lists the backends in the entry's Maglev table (`(none)` when it has
/// none); `10.96.0.10 (any port)` is a ClusterIP's address marker; `external` prefixes
/// entries for traffic from outside.
pub fn frontends(maps: &MemoryMaps) -> Vec<String> {
    let mut out: Vec<String> = maps
        .services
        .iter()
        .map(|(k, v)| {
            let prefix = if k.scope == scope::EXTERNAL {
                "external "
            } else {
                ""
            };
            if v.flags & service_flags::ADDRESS_ONLY != 0 {
                return format!("{prefix}{} (any port)", ip(k.addr));
            }
            let table = &maps.maglev[v.maglev_offset as usize..][..v.maglev_len as usize];
            let mut backends: Vec<String> = table
                .iter()
                .map(|id| {
                    let b = &maps.backends[id];
                    format!("{}:{}", ip(b.addr), addr::port_host(b.port))
                })
                .collect();
            backends.sort();
            backends.dedup();
            if backends.is_empty() {
                backends.push("(none)".into());
            }
            let protocol = match k.proto {
                proto::TCP => "TCP",
                proto::UDP => "UDP",
                _ => "?",
            };
            format!(
                "{prefix}{}:{}/{protocol} -> {}",
                ip(k.addr),
                addr::port_host(k.port),
                backends.join(" ")
            )
        })
        .collect();
    out.sort();
    out
}

pub fn node_addresses(maps: &MemoryMaps) -> Vec<Ipv4Addr> {
    let mut a: Vec<Ipv4Addr> = maps.node_addresses.iter().map(|a| ip(*a)).collect();
    a.sort();
    a
}
