//! The node agent: keeps the data path in step with the API server or the manifests.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::Context;

use crate::{
    cli::{AgentArgs, HostRouting, Source},
    controller::Controller,
    datapath::Datapath,
    health::{self, Health},
    interfaces,
    kubernetes::{self, KubeSource},
    manifest::ManifestSource,
    metrics::{DatapathMetrics, PinnedCounters},
    service_health::ServiceHealth,
    socket_lb,
    state::NodeContext,
    sync::{AyaMaps, Syncer},
};

/// How often files and interfaces are looked at. A change is applied once two looks in a
/// row agree, so a file being rewritten in place is never read half-written.
const POLL: Duration = Duration::from_millis(250);

pub fn run(args: AgentArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run_async(args))
}

/// A cheap fingerprint of the manifest files: names, sizes and modification times.
fn fingerprint(source: &ManifestSource) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    source
        .list_files()
        .unwrap_or_default()
        .into_iter()
        .map(|p| {
            let m = std::fs::metadata(&p).ok();
            let size = m.as_ref().map_or(0, |m| m.len());
            let mtime = m.and_then(|m| m.modified().ok());
            (p, size, mtime)
        })
        .collect()
}

fn node_context(args: &AgentArgs, uplinks: &[String]) -> anyhow::Result<NodeContext> {
    let node_name = match &args.node_name {
        Some(n) => n.clone(),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")?
            .trim()
            .to_string(),
    };
    let node_addresses: Vec<Ipv4Addr> = if args.node_ips.is_empty() {
        let all = interfaces::list()?;
        uplinks
            .iter()
            .filter_map(|i| all.get(i))
            .flatten()
            .copied()
            .collect()
    } else {
        args.node_ips.clone()
    };
    Ok(NodeContext {
        node_name,
        node_addresses,
        zone: None,
        lb_mode: args.lb_mode,
    })
}

async fn run_async(args: AgentArgs) -> anyhow::Result<()> {
    let source = args.source()?;
    let mut config = args.lifetimes.config()?;
    config.hairpin_addr = lb_common::addr::ipv4(args.service_loopback_address.octets());
    let uplinks = if args.external_ifaces.is_empty() {
        vec![interfaces::default_route_iface()
            .context("no --external-iface given and no default route to find one")?]
    } else {
        args.external_ifaces.clone()
    };
    // The client comes first: a bad kubeconfig should fail before anything is attached.
    let kube_client = match &source {
        Source::Kubernetes => {
            let config =
                kubernetes::client::config(args.kubeconfig.as_deref(), args.api_server.as_deref())
                    .await?;
            tracing::info!(server = %config.cluster_url, "watching the API server");
            Some(kubernetes::client::client(config)?)
        }
        Source::Files(_) => None,
    };
    let mut dp = Datapath::load(&args.pins.bpffs)?;
    let mut all_generic = true;
    for iface in &uplinks {
        let mode = dp.attach_xdp(iface, args.xdp_mode)?;
        all_generic &= mode == "generic";
        dp.attach_tc(iface, "lb_uplink_ingress", false)?;
        dp.attach_tc(iface, "lb_uplink_egress", true)?;
        tracing::info!(iface, xdp_mode = %mode, "attached uplink");
    }
    config.host_routing = host_routing_bits(args.host_routing, all_generic);
    tracing::info!(
        host_routing = ?args.host_routing,
        from_pods = config.host_routing & lb_common::host_routing::PODS != 0,
        from_uplinks = config.host_routing & lb_common::host_routing::UPLINKS != 0,
        "host routing"
    );
    let node = node_context(&args, &uplinks)?;
    tracing::info!(node = %node.node_name, addresses = ?node.node_addresses, "node");
    configure_snat(&dp, &args, &node)?;
    if args.socket_lb {
        let cgroup = socket_lb::cgroup_root(args.cgroup.as_deref())?;
        let cookie = dp
            .attach_sockets(&cgroup, node.node_addresses.first().copied())
            .context("socket load balancing (--socket-lb=false turns it off)")?;
        tracing::info!(cgroup = %cgroup.display(), netns_cookie = cookie, "attached socket hooks");
    } else {
        dp.detach_sockets();
    }
    let health = Arc::new(Health::new(args.healthz_timeout)?);
    tokio::spawn(health::serve(
        args.healthz_addr,
        args.metrics_addr,
        health.clone(),
    ));

    let syncer = Syncer::recover(dp.maps()?, config)?;
    let mut ctl = Controller::new(node.clone(), syncer, health.clone());
    ctl.service_health = Some(ServiceHealth::default());
    match PinnedCounters::open(&args.pins.bpffs) {
        Ok(counters) => {
            let m = Arc::new(DatapathMetrics::new(counters));
            health.register(|r| r.register_collector(Box::new(m.clone())));
            ctl.metrics = Some(m);
        }
        Err(e) => tracing::warn!(error = %format!("{e:#}"), "no map fill or per-service metrics"),
    }
    let mut input = match (source, kube_client) {
        (Source::Kubernetes, Some(client)) => {
            let updates = kubernetes::watch::spawn(client, &node.node_name);
            Input::Kubernetes(Box::new(KubeSource::new(
                updates,
                node,
                !args.node_ips.is_empty(),
            )))
        }
        (Source::Files(path), _) => {
            let files = ManifestSource::new(&path);
            let seen = fingerprint(&files);
            let mut input = Input::Files {
                source: files,
                seen,
                pending: None,
            };
            input.reload(&mut ctl);
            input
        }
        (Source::Kubernetes, None) => unreachable!("client built above"),
    };
    let mut links = interfaces::LinkEvents::subscribe().context("netlink link subscription")?;
    let mut pods_complete = attach_pods(&mut dp, &args.pod_ifaces, &uplinks);

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut ticker = tokio::time::interval(POLL);
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                input.poll_files(&mut ctl);
                ctl.tick();
                // A failed attach gets no second netlink message: retry it here.
                if !pods_complete {
                    pods_complete = attach_pods(&mut dp, &args.pod_ifaces, &uplinks);
                }
            }
            changes = input.updates() => match changes {
                Some((source, changes)) => source.handle(changes, &mut ctl),
                None => anyhow::bail!("the API watchers stopped"),
            },
            changed = links.changed() => {
                if let Err(e) = changed {
                    tracing::warn!(error = %e, "netlink link events");
                }
                pods_complete = attach_pods(&mut dp, &args.pod_ifaces, &uplinks);
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
    }
    // The data path stays: pinned maps, pinned XDP links and netlink TC filters.
    tracing::info!("stopping; the data path stays in place");
    Ok(())
}

type Fingerprint = Vec<(PathBuf, u64, Option<SystemTime>)>;

/// Where changes come from.
enum Input {
    Kubernetes(Box<KubeSource>),
    Files {
        source: ManifestSource,
        seen: Fingerprint,
        /// A change seen once, applied when the next look agrees.
        pending: Option<Fingerprint>,
    },
}

impl Input {
    /// The next burst of watch updates; never ready for files.
    async fn updates(&mut self) -> Option<(&mut KubeSource, kubernetes::Changes)> {
        match self {
            Input::Kubernetes(k) => {
                let c = k.recv().await?;
                Some((k, c))
            }
            Input::Files { .. } => std::future::pending().await,
        }
    }

    /// Files are looked at on every tick; a change is applied once two looks agree.
    fn poll_files(&mut self, ctl: &mut Controller<AyaMaps>) {
        let Input::Files {
            source,
            seen,
            pending,
        } = self
        else {
            return;
        };
        let now = fingerprint(source);
        match pending.take() {
            Some(p) if p == now => {
                *seen = now;
                self.reload(ctl);
            }
            _ if now != *seen => {
                ctl.health.record_changes(0, 0);
                *pending = Some(now);
            }
            _ => {}
        }
    }

    fn reload(&mut self, ctl: &mut Controller<AyaMaps>) {
        if let Input::Files { source, .. } = self {
            for e in source.reload() {
                tracing::warn!("{e}");
            }
            ctl.sync(&source.state());
            release_free_memory();
        }
    }
}

/// Hands the allocator's free pages back after a full sync: reading and planning a large
/// manifest or a first list peaks far above what the agent keeps, and the allocator would
/// otherwise hold on to the difference for good.
pub(crate) fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks and returns the allocator's own free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// CONFIG's host_routing bits. From uplinks only when every uplink's XDP is generic: a
/// native XDP redirect into a pod's veth is dropped unless the pod's side has GRO or an
/// XDP program, which the agent does not control.
fn host_routing_bits(wanted: HostRouting, uplinks_generic: bool) -> u32 {
    use lb_common::host_routing::{PODS, UPLINKS};
    match (wanted, uplinks_generic) {
        (HostRouting::Stack, _) => 0,
        (HostRouting::Bpf, true) => PODS | UPLINKS,
        (HostRouting::Bpf, false) => PODS,
    }
}

/// Flows from outside to backends on other nodes leave with the node's first address.
fn configure_snat(dp: &Datapath, args: &AgentArgs, node: &NodeContext) -> anyhow::Result<()> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")?;
    let mut nums = range
        .split_whitespace()
        .filter_map(|n| n.parse::<u16>().ok());
    let ephemeral = (nums.next().unwrap_or(32768), nums.next().unwrap_or(60999));
    crate::cli::check_snat_ports(args.snat_ports, ephemeral)?;
    let addr = node.node_addresses.first().copied();
    if addr.is_none() {
        tracing::warn!("no node address: flows to backends on other nodes are not source-NATed");
    }
    dp.configure_snat(lb_common::SnatConfig {
        addr: addr.map_or(0, |a| lb_common::addr::ipv4(a.octets())),
        port_min: args.snat_ports.0,
        port_max: args.snat_ports.1,
    })
}

/// Attaches the pod programs to every interface that matches a pattern and is not attached
/// yet (pods come and go while the agent runs), and tells the programs which of them are
/// pods' veths, for host routing. False when something is left undone.
fn attach_pods(dp: &mut Datapath, patterns: &[String], uplinks: &[String]) -> bool {
    let Ok(all) = interfaces::list() else {
        return false;
    };
    dp.forget_missing(&all.keys().filter_map(|n| interfaces::index(n)).collect());
    let mut complete = true;
    let mut pods = BTreeSet::new();
    for name in all.keys() {
        if uplinks.contains(name) || !patterns.iter().any(|p| interfaces::glob_match(p, name)) {
            continue;
        }
        if !(dp.is_attached(name, "tc-ingress") && dp.is_attached(name, "tc-egress")) {
            let result = dp
                .attach_tc(name, "lb_pod_ingress", false)
                .and_then(|()| dp.attach_tc(name, "lb_pod_egress", true));
            match result {
                Ok(()) => tracing::info!(iface = %name, "attached pod interface"),
                Err(e) => {
                    complete = false;
                    tracing::warn!(iface = %name, error = %format!("{e:#}"), "attach failed");
                    continue;
                }
            }
        }
        // bpf_redirect_peer reaches a pod only through a veth.
        if interfaces::driver(name).as_deref() == Some("veth") {
            pods.extend(interfaces::index(name));
        }
    }
    if let Err(e) = dp.set_pod_ifaces(&pods) {
        complete = false;
        tracing::warn!(error = %format!("{e:#}"), "pod interfaces not recorded for host routing");
    }
    complete
}

#[cfg(test)]
mod tests {
    use lb_common::host_routing::{PODS, UPLINKS};

    use super::{host_routing_bits, HostRouting};

    #[test]
    fn host_routing_from_uplinks_only_over_generic_xdp() {
        assert_eq!(host_routing_bits(HostRouting::Stack, true), 0);
        assert_eq!(host_routing_bits(HostRouting::Bpf, true), PODS | UPLINKS);
        assert_eq!(host_routing_bits(HostRouting::Bpf, false), PODS);
    }
}
