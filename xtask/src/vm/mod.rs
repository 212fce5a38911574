//! `cargo xtask vm-test`: the privileged suites (packet fixtures and network namespaces) on
//! other kernels, each booted under qemu (TCG) from Debian's packages.

mod image;
mod kernels;
mod run;

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{bail, Context, Result};

pub use kernels::KernelSpec;

use crate::{root, setup};

/// The default matrix: the oldest kernel supported, Debian's stable kernels, the newest.
pub const DEFAULT_KERNELS: &[&str] = &["5.10", "6.1", "6.12", "latest"];

/// The network-namespace tests of `--quick`: one per hook family (XDP NodePort and LB IP,
/// TC ClusterIP from a pod, the socket hooks, XDP SNAT to another node and its reverse path,
/// host routing's redirects).
pub const QUICK_NETNS: &[&str] = &[
    "client_reaches_nodeport_and_lb_ip_on_both_pods_over_tcp_and_udp",
    "pod_reaches_cluster_ip_and_backend_sees_its_address",
    "the_node_itself_reaches_services_through_its_sockets",
    "a_node_port_served_by_another_node_is_source_nated_from_xdp",
    "host_routing_carries_local_backends_flows_past_the_nodes_forward_chain",
];

pub struct Options {
    pub kernels: Vec<KernelSpec>,
    /// Only these netns tests (exact names); all when empty.
    pub netns: Vec<String>,
    /// Run the packet fixtures.
    pub fixtures: bool,
    /// Run the network-namespace suite.
    pub netns_suite: bool,
    pub timeout: Duration,
}

/// Builds the test executables with cargo and returns (name, path) for each suite.
fn build_tests(object: &Path) -> Result<Vec<(String, PathBuf)>> {
    let out = crate::cargo()
        .env("LB_EBPF_OBJECT", object)
        .args(crate::PRIVILEGED_TESTS)
        .args(["--no-run", "--message-format=json-render-diagnostics"])
        .stderr(Stdio::inherit())
        .output()
        .context("run cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the test executables failed");
    }
    let mut suites = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let name = msg["target"]["name"].as_str().unwrap_or("");
        let is_test = msg["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "test"));
        if let (true, Some(exe)) = (is_test, msg["executable"].as_str()) {
            suites.push((name.to_string(), PathBuf::from(exe)));
        }
    }
    for want in ["fixtures", "netns"] {
        if !suites.iter().any(|(n, _)| n == want) {
            bail!("cargo did not report the {want} test executable");
        }
    }
    suites.sort();
    Ok(suites)
}

struct KernelResult {
    label: String,
    release: String,
    seconds: u64,
    outcome: run::Outcome,
    summary: String,
}

pub fn run(opts: &Options) -> Result<()> {
    setup::install_vm_packages()?;
    let object = crate::build()?;
    let lb = root().join("target/release/lb");
    let suites = build_tests(&object)?;
    let vm_dir = root().join("target/vm");
    std::fs::create_dir_all(&vm_dir)?;
    let kernels = kernels::fetch(&vm_dir, &opts.kernels)?;

    let mut plan: Vec<(String, Vec<String>)> = Vec::new();
    if opts.fixtures {
        plan.push(("fixtures".into(), vec![]));
    }
    if opts.netns_suite {
        let mut filters = opts.netns.clone();
        if !filters.is_empty() {
            filters.push("--exact".into());
        }
        plan.push(("netns".into(), filters));
    }
    let payload = image::Payload {
        lb,
        suites: suites
            .into_iter()
            .filter(|(n, _)| plan.iter().any(|(p, _)| p == n))
            .collect(),
    };
    let common = image::common(&payload, &run::init_script(&plan))?.bytes();

    let mut results = Vec::new();
    for (spec, kernel) in &kernels {
        let label = format!("{spec}: {}", kernel.release);
        let initramfs = vm_dir.join(format!("initramfs-{}.cpio", kernel.release));
        image::write(&initramfs, &common, &image::for_kernel(kernel)?)?;
        let log = run::log_path(&vm_dir, &kernel.release);
        println!("vm-test: booting {label} (console: {})", log.display());
        let (console, took) = run::boot(&run::Boot {
            label: &spec.to_string(),
            vmlinuz: &kernel.vmlinuz,
            initramfs: &initramfs,
            log: &log,
            timeout: opts.timeout,
            memory_mb: 1024,
        })?;
        let _ = std::fs::remove_file(&initramfs);
        let report = run::parse(&console);
        let outcome = run::outcome(&report);
        explain(&label, &report, &outcome, &console, &log);
        let summary = report
            .suites
            .iter()
            .map(|s| {
                format!(
                    "{} {}/{}",
                    s.name,
                    s.passed.len(),
                    s.passed.len() + s.failed.len()
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        results.push(KernelResult {
            label: spec.to_string(),
            release: kernel.release.clone(),
            seconds: took.as_secs(),
            outcome,
            summary,
        });
    }

    println!("\nvm-test results:");
    let mut bad = 0;
    for r in &results {
        let verdict = match &r.outcome {
            run::Outcome::Passed => "passed",
            run::Outcome::Failed => "FAILED",
            run::Outcome::VerifierRejected(_) => "VERIFIER REJECTED",
            run::Outcome::NoResult => "NO RESULT",
        };
        if r.outcome != run::Outcome::Passed {
            bad += 1;
        }
        println!(
            "  {:<7} {:<32} {:<18} {:>4}s  {}",
            r.label, r.release, verdict, r.seconds, r.summary
        );
    }
    if bad > 0 {
        bail!("{bad} of {} kernels failed", results.len());
    }
    Ok(())
}

/// Prints what went wrong in a guest: each failed test with its output, the verifier's log,
/// or the end of the console when the guest stopped early.
fn explain(label: &str, report: &run::Report, outcome: &run::Outcome, console: &str, log: &Path) {
    for m in &report.insmod_failed {
        println!("[{label}] could not load module {m}");
    }
    match outcome {
        run::Outcome::Passed => {}
        run::Outcome::NoResult => {
            let tail: Vec<&str> = console.lines().rev().take(60).collect();
            println!("[{label}] the guest stopped before reporting every suite; console tail:");
            for l in tail.iter().rev() {
                println!("  | {}", l.trim_end());
            }
        }
        run::Outcome::Failed | run::Outcome::VerifierRejected(_) => {
            for s in &report.suites {
                if s.rc != Some(0) && s.failed.is_empty() {
                    println!("[{label}] {} exited with {:?}; its output:", s.name, s.rc);
                    for l in s
                        .output
                        .lines()
                        .rev()
                        .take(60)
                        .collect::<Vec<_>>()
                        .iter()
                        .rev()
                    {
                        println!("  | {l}");
                    }
                }
                for t in &s.failed {
                    println!("[{label}] FAILED {}::{t}", s.name);
                    let out = run::failure_output(s, t).unwrap_or("(no output)");
                    let lines: Vec<&str> = out.lines().collect();
                    let skip = lines.len().saturating_sub(80);
                    if skip > 0 {
                        println!("  | ... {skip} lines, see {}", log.display());
                    }
                    for l in &lines[skip..] {
                        println!("  | {l}");
                    }
                }
            }
            if let run::Outcome::VerifierRejected(v) = outcome {
                println!("[{label}] verifier log (end):");
                for l in v.lines() {
                    println!("  | {l}");
                }
            }
        }
    }
}
