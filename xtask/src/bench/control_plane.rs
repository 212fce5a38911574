//! Control-plane figures at N services, for every arm: programming the whole set from
//! nothing, and one endpoint change measured from the moment the change reaches the
//! program (for the agent a parsed EndpointSlice watch event, taken through its store and
//! incremental sync; the restore input for iptables and nft). The rulesets are loaded
//! into a network namespace made for the purpose, never the host's.

use std::{
    io::Write,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use aya::{programs::Xdp, Ebpf, EbpfLoader};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::Event;
use lb_common::Config;
use lb_userspace::{
    controller::Controller,
    health::Health,
    kubernetes::{KubeStore, Update},
    manifest::ManifestSource,
    state::{ClusterState, NodeContext},
    sync::{AyaMaps, Syncer},
    testbed::{unique, Netns},
};

use super::{iptables, nftables, workload};

/// The endpoint a change brings in place of the changed service's second one.
const NEW_ENDPOINT: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);

pub fn node() -> NodeContext {
    NodeContext {
        node_name: workload::NODE_NAME.into(),
        node_addresses: vec![workload::NODE_IP],
        ..Default::default()
    }
}

/// The manifest of N services in a file of its own, removed when dropped.
pub struct ManifestFile(pub PathBuf);

impl ManifestFile {
    pub fn write(n: usize) -> Result<Self> {
        let path = std::env::temp_dir().join(format!("{}.json", unique("lb-bench-")));
        let doc = workload::manifest(&workload::services(n));
        std::fs::write(&path, serde_json::to_vec(&doc)?)?;
        Ok(Self(path))
    }
}

impl Drop for ManifestFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Reads a manifest as the agent does; the state and the time it took.
pub fn parse(file: &Path) -> Result<(ClusterState, Duration)> {
    let t = Instant::now();
    let mut source = ManifestSource::new(file);
    let errors = source.reload();
    let state = source.state();
    let took = t.elapsed();
    if let Some(e) = errors.first() {
        bail!("the benchmark manifest is invalid: {e}");
    }
    Ok((state, took))
}

/// The eBPF object loaded with its maps pinned in a directory of its own, removed when
/// dropped.
pub struct Loaded {
    pub ebpf: Ebpf,
    pub pins: PathBuf,
}

impl Drop for Loaded {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pins);
    }
}

pub fn load(object: &Path) -> Result<Loaded> {
    let pins = PathBuf::from("/sys/fs/bpf").join(unique("lb-bench-"));
    std::fs::create_dir_all(&pins).context("a pin directory (is bpffs mounted?)")?;
    let loaded = |pins: PathBuf| -> Result<Loaded> {
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&pins)
            .load_file(object)
            .context("load the eBPF object")?;
        let xdp: &mut Xdp = ebpf.program_mut("lb_xdp").context("lb_xdp")?.try_into()?;
        xdp.load()?;
        Ok(Loaded { ebpf, pins })
    };
    loaded(pins.clone()).inspect_err(|_| {
        let _ = std::fs::remove_dir_all(&pins);
    })
}

/// Plans `state` and writes it into the maps of `loaded` as the agent's first sync does;
/// the controller and the time taken.
pub fn program(
    loaded: &mut Loaded,
    state: &ClusterState,
) -> Result<(Controller<AyaMaps>, Duration)> {
    let health = Arc::new(Health::new(Duration::from_secs(60))?);
    let t = Instant::now();
    let syncer = Syncer::recover(AyaMaps::from_ebpf(&mut loaded.ebpf)?, Config::default())?;
    let mut ctl = Controller::new(node(), syncer, health);
    let report = ctl.sync(state);
    let took = t.elapsed();
    if let Some(e) = report.errors.first() {
        bail!("programming the services: {e}");
    }
    Ok((ctl, took))
}

/// Which service an endpoint change hits: one in the middle of the set.
fn changed_index(n: usize) -> usize {
    n / 2
}

/// The agent's endpoint change, timed from the parsed watch event: the event goes into the
/// agent's store (`state`, which the store holds meanwhile), then the incremental sync of
/// the services it touched, as the agent runs it for a watch event once synced.
pub fn agent_change(
    ctl: &mut Controller<AyaMaps>,
    state: &mut ClusterState,
    n: usize,
) -> Result<Duration> {
    let services = workload::services(n);
    let s = &services[changed_index(n)];
    let slice: EndpointSlice =
        serde_json::from_value(workload::slice(s, &[s.endpoints[0], NEW_ENDPOINT]))?;
    let mut store = KubeStore::default();
    std::mem::swap(&mut store.state, state);
    let t = Instant::now();
    let changes = store.update(Update::Slice(Event::Apply(slice)));
    let report = ctl.sync_services(&store.state, &changes.touched);
    let took = t.elapsed();
    std::mem::swap(&mut store.state, state);
    if report.writes == 0 {
        bail!("the endpoint change wrote nothing");
    }
    Ok(took)
}

/// Runs `program args` inside `ns` with `input` on its standard input; the time it took.
fn restore(ns: &Netns, program: &str, args: &[&str], input: &str) -> Result<Duration> {
    let t = Instant::now();
    let mut child = ns
        .command(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("run {program}"))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    let took = t.elapsed();
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .take(5)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    Ok(took)
}

/// Programming and endpoint-change times of one netfilter arm.
#[derive(serde::Serialize)]
pub struct NetfilterTimes {
    pub program: Duration,
    pub change: Duration,
}

/// Loads the iptables ruleset for N services into `ns`, then applies one endpoint change.
pub fn iptables_arm(ns: &Netns, n: usize) -> Result<NetfilterTimes> {
    let services = workload::services(n);
    let program = restore(ns, "iptables-restore", &[], &iptables::full(&services))?;
    let delta = iptables::endpoint_change(&services, changed_index(n), NEW_ENDPOINT);
    let change = restore(ns, "iptables-restore", &["--noflush"], &delta)?;
    Ok(NetfilterTimes { program, change })
}

/// Loads the nftables ruleset for N services into `ns`, then applies one endpoint change.
pub fn nftables_arm(ns: &Netns, n: usize) -> Result<NetfilterTimes> {
    let services = workload::services(n);
    let program = restore(ns, "nft", &["-f", "-"], &nftables::full(&services))?;
    let delta = nftables::endpoint_change(&services, changed_index(n), NEW_ENDPOINT);
    let change = restore(ns, "nft", &["-f", "-"], &delta)?;
    Ok(NetfilterTimes { program, change })
}

/// Which backend `iptables-restore` uses here ("nf_tables" or "legacy").
pub fn iptables_backend() -> String {
    Command::new("iptables-restore")
        .arg("--version")
        .output()
        .map(|o| {
            let v = String::from_utf8_lossy(&o.stdout);
            v.split(['(', ')']).nth(1).unwrap_or("?").to_string()
        })
        .unwrap_or_else(|_| "?".into())
}

/// Bytes the kernel charges for the maps under a pin directory (`memlock` in fdinfo).
pub fn map_memory(pins: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(pins)? {
        let path = entry?.path();
        let Ok(data) = aya::maps::MapData::from_pin(&path) else {
            continue;
        };
        use std::os::fd::{AsFd, AsRawFd};
        let fd = data.fd().as_fd().as_raw_fd();
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
        total += info
            .lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_userspace::plan::plan;

    /// The generated rulesets load (checked without being applied: `--test` and `-c`).
    #[test]
    fn kube_proxy_rulesets_are_accepted_by_the_tools() {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root");
            return;
        }
        let s = workload::services(20);
        let ns = Netns::new("lbbt").unwrap();
        restore(&ns, "iptables-restore", &["--test"], &iptables::full(&s)).unwrap();
        restore(&ns, "nft", &["-c", "-f", "-"], &nftables::full(&s)).unwrap();
        // The deltas apply on top of the full rulesets.
        restore(&ns, "iptables-restore", &[], &iptables::full(&s)).unwrap();
        restore(
            &ns,
            "iptables-restore",
            &["--noflush"],
            &iptables::endpoint_change(&s, 10, NEW_ENDPOINT),
        )
        .unwrap();
        let rules = ns.exec("iptables-save", &["-t", "nat"]).unwrap();
        assert!(rules.contains("--to-destination 10.200.0.1:8080"));
        assert!(!rules.contains(&format!("--to-destination {}:8080", s[10].endpoints[1])));
        restore(&ns, "nft", &["-f", "-"], &nftables::full(&s)).unwrap();
        restore(
            &ns,
            "nft",
            &["-f", "-"],
            &nftables::endpoint_change(&s, 10, NEW_ENDPOINT),
        )
        .unwrap();
        let rules = ns
            .exec("nft", &["list", "table", "ip", "kube-proxy"])
            .unwrap();
        assert!(rules.contains("dnat to 10.200.0.1:8080"));
        assert!(!rules.contains(&format!("dnat to {}:8080", s[10].endpoints[1])));
    }

    #[test]
    fn the_agent_plans_every_service_of_the_manifest() {
        let file = ManifestFile::write(50).unwrap();
        let (state, _) = parse(&file.0).unwrap();
        let d = plan(&state, &node()).desired;
        assert_eq!(d.services.len(), 50);
        assert!(d.services.values().all(|s| s.backends.len() == 2));
        let node_ports = d
            .services
            .values()
            .flat_map(|s| &s.frontends)
            .filter(|f| f.kind == lb_common::kind::NODE_PORT)
            .count();
        assert_eq!(node_ports, 2 * 50, "a NodePort frontend per scope");
    }
}
