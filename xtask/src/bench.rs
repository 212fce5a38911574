//! `cargo xtask bench`: this project's data and control plane against kube-proxy-style
//! iptables and nftables rulesets, on the same service set, in one run. Trials interleave
//! the sizes and the arms, so drift on a shared machine hits them alike; every figure is
//! reported as the minimum and median over the trials and as ratios taken within a trial.

mod control_plane;
mod iptables;
mod nftables;
mod per_packet;
mod workload;

use std::{collections::BTreeMap, fs, path::Path, time::Duration};

use anyhow::Result;

use per_packet::{median, EmptyXdp, PATHS};

#[derive(clap::Args)]
pub struct Options {
    /// Numbers of services to measure at (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [10, 1_000, 10_000, 50_000])]
    sizes: Vec<usize>,
    /// Interleaved trials; figures are the minimum and median over them.
    #[arg(long, default_value_t = 5)]
    trials: usize,
}

impl Options {
    fn args(&self) -> Vec<String> {
        let sizes: Vec<String> = self.sizes.iter().map(|n| n.to_string()).collect();
        vec![
            format!("--sizes={}", sizes.join(",")),
            format!("--trials={}", self.trials),
        ]
    }
}

/// One trial's control-plane figures at one size.
#[derive(Default, serde::Serialize)]
struct ControlPlane {
    lb_parse: Duration,
    lb_program: Duration,
    lb_change: Duration,
    lb_map_bytes: u64,
    iptables_program: Duration,
    iptables_change: Duration,
    nft_program: Duration,
    nft_change: Duration,
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
    let empty = EmptyXdp::load()?;
    // medians[n][path] = the per-trial medians.
    let mut medians: BTreeMap<usize, BTreeMap<&str, Vec<u64>>> = BTreeMap::new();
    let mut control: BTreeMap<usize, Vec<ControlPlane>> = BTreeMap::new();
    let trials = opts.trials;
    for t in 0..trials {
        for &n in &opts.sizes {
            let file = control_plane::ManifestFile::write(n)?;
            let (mut state, lb_parse) = control_plane::parse(&file.0)?;
            let mut loaded = control_plane::load(object)?;
            let (mut syncer, lb_program) = control_plane::program(&mut loaded, &state)?;
            for (path, m) in per_packet::trial(&empty, &loaded, n, t)? {
                medians
                    .entry(n)
                    .or_default()
                    .entry(path)
                    .or_default()
                    .push(m);
            }
            let lb_change = control_plane::agent_change(&mut syncer, &mut state, n)?;
            let lb_map_bytes = control_plane::map_memory(&loaded.pins)?;
            drop(syncer);
            drop(loaded);
            let ipt = control_plane::iptables_arm(n)?;
            let nft = control_plane::nftables_arm(n)?;
            control.entry(n).or_default().push(ControlPlane {
                lb_parse,
                lb_program,
                lb_change,
                lb_map_bytes,
                iptables_program: ipt.program,
                iptables_change: ipt.change,
                nft_program: nft.program,
                nft_change: nft.change,
            });
            println!("trial {} of {trials}: {n} services done", t + 1);
        }
    }
    let dir = crate::root().join("bench/results");
    fs::create_dir_all(&dir)?;
    let per_packet = write_per_packet(&dir, &medians)?;
    let control_md = write_control_plane(&dir, &control)?;
    fs::write(
        dir.join("README.md"),
        format!("{}\n{per_packet}\n{control_md}", machine()),
    )?;
    println!("\n{per_packet}\n{control_md}\nwritten to {}", dir.display());
    Ok(())
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
         | services | lb parse | lb program | iptables program | nft program | iptables/lb | nft/lb | lb change | iptables change | nft change | iptables/lb | nft/lb | lb map memory |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut json = serde_json::Map::new();
    for (n, trials) in control {
        let col = |f: &dyn Fn(&ControlPlane) -> f64| {
            min_median(&trials.iter().map(f).collect::<Vec<_>>())
        };
        let fmt = |(a, b): (f64, f64)| format!("{a:.2} / {b:.2}");
        let cells = [
            fmt(col(&|c| ms(c.lb_parse))),
            fmt(col(&|c| ms(c.lb_program))),
            fmt(col(&|c| ms(c.iptables_program))),
            fmt(col(&|c| ms(c.nft_program))),
            fmt(col(&|c| ms(c.iptables_program) / ms(c.lb_program))),
            fmt(col(&|c| ms(c.nft_program) / ms(c.lb_program))),
            fmt(col(&|c| ms(c.lb_change))),
            fmt(col(&|c| ms(c.iptables_change))),
            fmt(col(&|c| ms(c.nft_change))),
            fmt(col(&|c| ms(c.iptables_change) / ms(c.lb_change))),
            fmt(col(&|c| ms(c.nft_change) / ms(c.lb_change))),
            format!(
                "{:.1} MiB",
                col(&|c| c.lb_map_bytes as f64).1 / f64::from(1 << 20)
            ),
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
