//! `cargo xtask bench`: this project's data and control plane against kube-proxy-style
//! iptables and nftables rulesets, on the same service set, in one run. Trials interleave
//! the sizes and the arms, so drift on a shared machine hits them alike; every figure is
//! reported as the minimum and median over the trials and as ratios taken within a trial.

mod control_plane;
mod iptables;
mod nftables;
mod per_packet;
mod traffic;
mod workload;

use std::{collections::BTreeMap, fs, path::Path, time::Duration};

use anyhow::{Context, Result};
use lb_userspace::testbed::Netns;

use per_packet::{median, EmptyXdp, PATHS};

#[derive(clap::Args)]
pub struct Options {
    /// Numbers of services to measure at (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [10, 1_000, 10_000, 50_000])]
    sizes: Vec<usize>,
    /// Interleaved trials; figures are the minimum and median over them.
    #[arg(long, default_value_t = 5)]
    trials: usize,
    /// Which figures to take (comma-separated); all by default.
    #[arg(long, value_delimiter = ',', value_enum, default_values_t = [Figure::PerPacket, Figure::Traffic, Figure::ControlPlane])]
    figures: Vec<Figure>,
    /// kube-proxy-style arms to leave out (comma-separated), for a quick look at lb alone;
    /// their cells and ratios are then left empty.
    #[arg(long, value_delimiter = ',', value_enum)]
    without: Vec<Netfilter>,
    /// The nftables arm runs only up to this many services: the kernel binds each of the
    /// ruleset's anonymous verdict maps by walking the whole transaction, so one load grows
    /// with the square of N (about 2 minutes at 10,000 here, most of an hour at 50,000).
    #[arg(long, default_value_t = 10_000)]
    nft_max: usize,
    /// The iptables arm runs only up to this many services (all sizes by default; at
    /// 50,000 one trial of it takes several minutes, most of them in the endpoint change's
    /// restore of KUBE-SERVICES).
    #[arg(long)]
    iptables_max: Option<usize>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Figure {
    PerPacket,
    Traffic,
    ControlPlane,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Netfilter {
    Iptables,
    Nft,
}

impl Options {
    fn args(&self) -> Vec<String> {
        let list = |v: Vec<String>| v.join(",");
        fn name<T: clap::ValueEnum>(v: &T) -> String {
            v.to_possible_value()
                .map(|p| p.get_name().to_string())
                .unwrap_or_default()
        }
        let mut args = vec![
            format!(
                "--sizes={}",
                list(self.sizes.iter().map(|n| n.to_string()).collect())
            ),
            format!("--trials={}", self.trials),
            format!("--nft-max={}", self.nft_max),
            format!(
                "--figures={}",
                list(self.figures.iter().map(name).collect())
            ),
        ];
        if let Some(max) = self.iptables_max {
            args.push(format!("--iptables-max={max}"));
        }
        if !self.without.is_empty() {
            args.push(format!(
                "--without={}",
                list(self.without.iter().map(name).collect())
            ));
        }
        args
    }

    fn wants(&self, f: Figure) -> bool {
        self.figures.contains(&f)
    }

    fn runs(&self, a: Netfilter, n: usize) -> bool {
        let max = match a {
            Netfilter::Iptables => self.iptables_max.unwrap_or(usize::MAX),
            Netfilter::Nft => self.nft_max,
        };
        !self.without.contains(&a) && n <= max
    }
}

/// A figure of each kube-proxy-style arm; None where the arm was left out.
#[derive(serde::Serialize)]
struct Netfilters<T> {
    iptables: Option<T>,
    nft: Option<T>,
}

impl<T> Default for Netfilters<T> {
    fn default() -> Self {
        Self {
            iptables: None,
            nft: None,
        }
    }
}

impl<T> Netfilters<T> {
    fn arm(&mut self, arm: Netfilter) -> &mut Option<T> {
        match arm {
            Netfilter::Iptables => &mut self.iptables,
            Netfilter::Nft => &mut self.nft,
        }
    }
}

/// One trial's control-plane figures at one size.
#[derive(Default, serde::Serialize)]
struct ControlPlane {
    lb_parse: Duration,
    lb_program: Duration,
    lb_change: Duration,
    lb_map_bytes: u64,
    #[serde(flatten)]
    netfilter: Netfilters<control_plane::NetfilterTimes>,
}

/// One trial's traffic figures at one size, and the agent's memory in that run.
#[derive(serde::Serialize)]
struct TrafficTrial {
    /// The agent as it runs by default: translated flows cross the node's stack.
    lb: traffic::Traffic,
    /// The agent with `--host-routing bpf`: a local backend's flows go past the stack.
    lb_host_routing: traffic::Traffic,
    lb_agent_rss: u64,
    #[serde(flatten)]
    netfilter: Netfilters<traffic::Traffic>,
}

/// The agent's figures come from its code running inside this process, so they are taken
/// from an optimised build: a debug `cargo xtask` hands over to a release one.
pub fn run_optimized(object: &Path, opts: &Options) -> Result<()> {
    if opts.sizes.is_empty() || opts.trials == 0 {
        anyhow::bail!("nothing to measure: give at least one size and one trial");
    }
    if !cfg!(debug_assertions) {
        return run(object, opts);
    }
    crate::exec(
        crate::cargo()
            .env("LB_EBPF_OBJECT", object)
            .args(["run", "--quiet", "--release", "-p", "xtask", "--", "bench"])
            .args(opts.args()),
    )
}

fn run(object: &Path, opts: &Options) -> Result<()> {
    let lb = crate::root().join("target/release/lb");
    let empty = EmptyXdp::load()?;
    // medians[n][path] = the per-trial medians.
    let mut medians: BTreeMap<usize, BTreeMap<&str, Vec<u64>>> = BTreeMap::new();
    let mut control: BTreeMap<usize, Vec<ControlPlane>> = BTreeMap::new();
    let mut traffic: BTreeMap<usize, Vec<TrafficTrial>> = BTreeMap::new();
    let trials = opts.trials;
    for t in 0..trials {
        for &n in &opts.sizes {
            let file = control_plane::ManifestFile::write(n)?;
            let mut cp = None;
            if opts.wants(Figure::PerPacket) || opts.wants(Figure::ControlPlane) {
                let (mut state, lb_parse) = control_plane::parse(&file.0)?;
                let mut loaded = control_plane::load(object)?;
                let (mut syncer, lb_program) = control_plane::program(&mut loaded, &state)?;
                if opts.wants(Figure::PerPacket) {
                    for (path, m) in per_packet::trial(&empty, &loaded, n, t)? {
                        medians
                            .entry(n)
                            .or_default()
                            .entry(path)
                            .or_default()
                            .push(m);
                    }
                }
                if opts.wants(Figure::ControlPlane) {
                    cp = Some(ControlPlane {
                        lb_parse,
                        lb_program,
                        lb_change: control_plane::agent_change(&mut syncer, &mut state, n)?,
                        lb_map_bytes: control_plane::map_memory(&loaded.pins)?,
                        ..Default::default()
                    });
                }
            }
            let mut tr = None;
            if opts.wants(Figure::Traffic) {
                let mut topology = traffic::Topology::new(&lb, n)?;
                let lb_agent_rss = topology.start_agent(&file.0, &[])?;
                let lb_stack = topology.measure().context("lb")?;
                drop(topology);
                let mut topology = traffic::Topology::new(&lb, n)?;
                topology.start_agent(&file.0, &["--host-routing", "bpf"])?;
                tr = Some(TrafficTrial {
                    lb: lb_stack,
                    lb_host_routing: topology.measure().context("lb, host routing bpf")?,
                    lb_agent_rss,
                    netfilter: Netfilters::default(),
                });
            }
            // The netfilter arms only feed the control-plane and traffic figures.
            let netfilter_wanted = cp.is_some() || tr.is_some();
            for arm in [Netfilter::Iptables, Netfilter::Nft] {
                if !netfilter_wanted || !opts.runs(arm, n) {
                    continue;
                }
                let (times, figures) = netfilter_arm(arm, &lb, n, opts.wants(Figure::Traffic))
                    .with_context(|| format!("{arm:?}"))?;
                if let Some(cp) = &mut cp {
                    *cp.netfilter.arm(arm) = Some(times);
                }
                if let (Some(tr), Some(f)) = (&mut tr, figures) {
                    *tr.netfilter.arm(arm) = Some(f);
                }
            }
            if let Some(cp) = cp {
                control.entry(n).or_default().push(cp);
            }
            if let Some(tr) = tr {
                traffic.entry(n).or_default().push(tr);
            }
            println!("trial {} of {trials}: {n} services done", t + 1);
        }
    }
    let dir = crate::root().join("bench/results");
    fs::create_dir_all(&dir)?;
    let mut sections = vec![machine()];
    if opts.wants(Figure::PerPacket) {
        sections.push(write_per_packet(&dir, &medians)?);
    }
    if opts.wants(Figure::Traffic) {
        sections.push(write_traffic(&dir, &traffic)?);
    }
    if opts.wants(Figure::ControlPlane) {
        sections.push(write_control_plane(&dir, &control)?);
    }
    sections.push(memory(&control, &traffic));
    let all = sections.join("\n");
    fs::write(dir.join("README.md"), &all)?;
    println!("\n{all}\nwritten to {}", dir.display());
    Ok(())
}

/// One kube-proxy-style arm at N: its ruleset loaded and changed (timed), in the traffic
/// topology's node when traffic is measured too (then measured after the change, which
/// leaves the measured service alone), else in a bare namespace.
fn netfilter_arm(
    arm: Netfilter,
    lb: &Path,
    n: usize,
    with_traffic: bool,
) -> Result<(control_plane::NetfilterTimes, Option<traffic::Traffic>)> {
    let topology = with_traffic
        .then(|| traffic::Topology::new(lb, n))
        .transpose()?;
    let bare = match topology {
        Some(_) => None,
        None => Some(Netns::new("lbb")?),
    };
    let ns = topology
        .as_ref()
        .map(traffic::Topology::node)
        .or(bare.as_ref())
        .context("a namespace")?;
    let times = match arm {
        Netfilter::Iptables => control_plane::iptables_arm(ns, n)?,
        Netfilter::Nft => control_plane::nftables_arm(ns, n)?,
    };
    let figures = topology.as_ref().map(|t| t.measure()).transpose()?;
    Ok((times, figures))
}

/// The kernel, CPU count and netfilter tools the figures were taken with.
fn machine() -> String {
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    format!(
        "# Benchmark results\n\nKernel {}, {} CPUs ({cpu}), iptables-restore backend: {}.\n",
        kernel.trim(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        control_plane::iptables_backend()
    )
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Minimum and median of some per-trial values.
fn min_median(v: &[f64]) -> (f64, f64) {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    (v[0], v[v.len() / 2])
}

fn write_control_plane(dir: &Path, control: &BTreeMap<usize, Vec<ControlPlane>>) -> Result<String> {
    let mut md = String::from(
        "## Control plane\n\nTime to program N services from nothing (lb: plan and map writes, \
         the manifest's parsing apart; iptables-restore and nft -f: the whole process, inside a \
         fresh network namespace) and to apply one endpoint change at N (lb: from the parsed \
         EndpointSlice to the maps written; iptables: kube-proxy's partial restore with \
         --noflush; nft: the changed chains in one transaction). Milliseconds, minimum / median \
         over the trials; ratios are the other arm's time over lb's, taken within each trial.\n\n\
         | services | lb parse | lb program | iptables program | nft program | iptables/lb | nft/lb | lb change | iptables change | nft change | iptables/lb | nft/lb |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut json = serde_json::Map::new();
    for (n, trials) in control {
        fn ipt(c: &ControlPlane) -> Option<&control_plane::NetfilterTimes> {
            c.netfilter.iptables.as_ref()
        }
        fn nft(c: &ControlPlane) -> Option<&control_plane::NetfilterTimes> {
            c.netfilter.nft.as_ref()
        }
        let col = |f: &dyn Fn(&ControlPlane) -> Option<f64>| cell(trials, f, 2);
        let cells = [
            col(&|c| Some(ms(c.lb_parse))),
            col(&|c| Some(ms(c.lb_program))),
            col(&|c| ipt(c).map(|t| ms(t.program))),
            col(&|c| nft(c).map(|t| ms(t.program))),
            col(&|c| ipt(c).map(|t| ms(t.program) / ms(c.lb_program))),
            col(&|c| nft(c).map(|t| ms(t.program) / ms(c.lb_program))),
            col(&|c| Some(ms(c.lb_change))),
            col(&|c| ipt(c).map(|t| ms(t.change))),
            col(&|c| nft(c).map(|t| ms(t.change))),
            col(&|c| ipt(c).map(|t| ms(t.change) / ms(c.lb_change))),
            col(&|c| nft(c).map(|t| ms(t.change) / ms(c.lb_change))),
        ];
        md.push_str(&format!("| {n} | {} |\n", cells.join(" | ")));
        json.insert(n.to_string(), serde_json::to_value(trials)?);
    }
    fs::write(
        dir.join("control-plane.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    fs::write(dir.join("control-plane.md"), &md)?;
    Ok(md)
}

/// `min / median` of a per-trial value; empty where an arm was left out of any trial.
fn cell<T>(trials: &[T], f: &dyn Fn(&T) -> Option<f64>, digits: usize) -> String {
    let v: Option<Vec<f64>> = trials.iter().map(f).collect();
    v.map_or_else(String::new, |v| {
        let (a, b) = min_median(&v);
        format!("{a:.digits$} / {b:.digits$}")
    })
}

fn write_traffic(dir: &Path, traffic: &BTreeMap<usize, Vec<TrafficTrial>>) -> Result<String> {
    let mut md = String::from(
        "## Through the kernel\n\nNew TCP connections per second (connect, one request and \
         its response, close; as many client threads as CPUs for 2 s) and the latency of \
         requests on one kept-alive connection (5,000 timed after 5,000 untimed), through \
         each arm on the same namespaces: the client to the measured NodePort, and a pod to \
         the measured ClusterIP. lb runs twice, on fresh namespaces: with its default host \
         routing (`stack`: translated packets cross the node's routing and netfilter, as \
         kube-proxy's do) and with `--host-routing bpf` (a local backend's flows go between \
         the interfaces by the programs, both ways). The node has an INVALID-drop FORWARD \
         rule in every arm, so its netfilter conntrack runs in all of them. Connections per second as minimum / median over the trials; \
         ratios are lb's rate over the other arm's, taken within each trial; latency as the \
         median over the trials of each trial's p50 / p99, in µs.\n\n\
         | services | path | lb host routing | lb conn/s | iptables conn/s | nft conn/s | lb/iptables | lb/nft | lb p50 / p99 | iptables p50 / p99 | nft p50 / p99 | failed connections |\n\
         |---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    type Pick = fn(&traffic::Traffic) -> &traffic::PathFigures;
    let paths: [(&str, Pick); 2] = [
        ("client → NodePort", |t| &t.node_port),
        ("pod → ClusterIP", |t| &t.cluster_ip),
    ];
    type Mode = fn(&TrafficTrial) -> &traffic::Traffic;
    let modes: [(&str, Mode); 2] = [("stack", |t| &t.lb), ("bpf", |t| &t.lb_host_routing)];
    for (n, trials) in traffic {
        for (name, pick) in paths {
            for (mode, lb) in modes {
                // Per trial: lb in this mode, iptables, nft.
                let rows: Vec<[Option<&traffic::PathFigures>; 3]> = trials
                    .iter()
                    .map(|t| {
                        [
                            Some(pick(lb(t))),
                            t.netfilter.iptables.as_ref().map(pick),
                            t.netfilter.nft.as_ref().map(pick),
                        ]
                    })
                    .collect();
                md.push_str(&format!(
                    "| {n} | {name} | {mode} | {} |\n",
                    traffic_cells(&rows).join(" | ")
                ));
            }
        }
    }
    let json: BTreeMap<String, &Vec<TrafficTrial>> =
        traffic.iter().map(|(n, t)| (n.to_string(), t)).collect();
    fs::write(
        dir.join("traffic.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    fs::write(dir.join("traffic.md"), &md)?;
    Ok(md)
}

/// One table row's cells from its per-trial figures of lb, iptables and nft.
fn traffic_cells(rows: &[[Option<&traffic::PathFigures>; 3]]) -> [String; 9] {
    let rate = |arm: usize| cell(rows, &|r| r[arm].map(|p| p.connections_per_sec), 0);
    let ratio = |arm: usize| {
        cell(
            rows,
            &|r| Some(r[0]?.connections_per_sec / r[arm]?.connections_per_sec),
            2,
        )
    };
    let latency = |arm: usize| {
        let v: Option<Vec<(f64, f64)>> = rows
            .iter()
            .map(|r| r[arm].map(|p| (p.p50_us, p.p99_us)))
            .collect();
        v.map_or_else(String::new, |v| {
            let p50 = min_median(&v.iter().map(|p| p.0).collect::<Vec<_>>()).1;
            let p99 = min_median(&v.iter().map(|p| p.1).collect::<Vec<_>>()).1;
            format!("{p50:.0} / {p99:.0}")
        })
    };
    let failed: u64 = rows.iter().flatten().flatten().map(|p| p.failed).sum();
    [
        rate(0),
        rate(1),
        rate(2),
        ratio(1),
        ratio(2),
        latency(0),
        latency(1),
        latency(2),
        failed.to_string(),
    ]
}

/// The BPF maps' memory (preallocated for the maps' capacity, so the same at every N) and
/// the agent's resident memory, with what each service adds to the latter.
fn memory(
    control: &BTreeMap<usize, Vec<ControlPlane>>,
    traffic: &BTreeMap<usize, Vec<TrafficTrial>>,
) -> String {
    let mib = |b: f64| b / f64::from(1 << 20);
    let mut md = String::from(
        "## Memory\n\nBPF map memory as the kernel charges it (memlock), and the agent's \
         resident memory (VmRSS) after its first sync from the manifest, median over the \
         trials. The agent maps MAGLEV (128 MiB) into its address space to write tables, so \
         its resident memory includes that map too.\n\n\
         | services | BPF maps | agent RSS |\n|---:|---:|---:|\n",
    );
    let sizes: std::collections::BTreeSet<usize> =
        control.keys().chain(traffic.keys()).copied().collect();
    let rss = |n: &usize| {
        traffic
            .get(n)
            .map(|t| min_median(&t.iter().map(|t| t.lb_agent_rss as f64).collect::<Vec<_>>()).1)
    };
    for n in &sizes {
        let maps = control.get(n).map_or_else(String::new, |c| {
            let m = min_median(&c.iter().map(|c| c.lb_map_bytes as f64).collect::<Vec<_>>()).1;
            format!("{:.1} MiB", mib(m))
        });
        let agent = rss(n).map_or_else(String::new, |r| format!("{:.1} MiB", mib(r)));
        md.push_str(&format!("| {n} | {maps} | {agent} |\n"));
    }
    if let (Some(lo), Some(hi)) = (traffic.keys().next(), traffic.keys().next_back()) {
        if hi > lo {
            let per = (rss(hi).unwrap_or(0.0) - rss(lo).unwrap_or(0.0)) / (hi - lo) as f64;
            md.push_str(&format!(
                "\nEach service adds {:.1} KiB to the agent's resident memory (from {lo} to \
                 {hi} services); the maps are sized for their capacity up front.\n",
                per / 1024.0
            ));
        }
    }
    md
}

fn write_per_packet(
    dir: &Path,
    medians: &BTreeMap<usize, BTreeMap<&str, Vec<u64>>>,
) -> Result<String> {
    let stat = |v: &Vec<u64>| (*v.iter().min().unwrap(), median(v.clone()));
    let mut json = serde_json::Map::new();
    let trials = medians
        .values()
        .next()
        .and_then(|p| p.values().next())
        .map_or(0, Vec::len);
    let mut md = format!(
        "## Per packet\n\nPer-packet cost of `lb_xdp` (BPF_PROG_TEST_RUN, one run per sample, kernel-reported \
         ns; the median of 4000 samples per trial, then the minimum and median over {trials} \
         interleaved trials). \"Above floor\" subtracts the empty XDP program measured in the \
         same trials.\n\n| services | path | min ns | median ns | above floor (median) |\n\
         |---:|---|---:|---:|---:|\n",
    );
    for (n, paths) in medians {
        let floor = stat(&paths["empty_xdp"]).1;
        let mut row = serde_json::Map::new();
        for path in PATHS {
            let (min, med) = stat(&paths[path]);
            let above = med.saturating_sub(floor);
            row.insert(
                path.into(),
                serde_json::json!({"min_ns": min, "median_ns": med, "above_floor_ns": above, "trials": paths[path]}),
            );
            md.push_str(&format!("| {n} | {path} | {min} | {med} | {above} |\n"));
        }
        json.insert(n.to_string(), row.into());
    }
    let (Some((lo, small)), Some((hi, large))) =
        (medians.first_key_value(), medians.last_key_value())
    else {
        return Ok(md);
    };
    md.push_str(&format!(
        "\nChange from {lo} to {hi} services (median above floor): "
    ));
    let changes: Vec<String> = PATHS[1..]
        .iter()
        .map(|p| {
            let f = |m: &BTreeMap<&str, Vec<u64>>| {
                stat(&m[*p]).1.saturating_sub(stat(&m["empty_xdp"]).1) as f64
            };
            format!("{p} {:+.0}%", (f(large) / f(small).max(1.0) - 1.0) * 100.0)
        })
        .collect();
    md.push_str(&changes.join(", "));
    md.push('\n');
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let doc = serde_json::json!({"kernel": kernel.trim(), "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0), "per_packet": json});
    fs::write(
        dir.join("per-packet.json"),
        serde_json::to_string_pretty(&doc)?,
    )?;
    fs::write(dir.join("per-packet.md"), &md)?;
    Ok(md)
}
