//! `cargo xtask setup|build|test|lint|demo|bench|kind|vm-test`: everything a fresh machine needs, from the
//! Debian packages to the demo cluster.

mod bench;
mod demo;
mod kind;
mod setup;
mod vm;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the prerequisites (Debian packages, bpf-linker, bpffs); quick when present.
    Setup,
    /// Build the eBPF object and the `lb` binary that embeds it (target/release/lb).
    Build,
    /// Run every test: unit tests, packet fixtures and network-namespace tests.
    Test,
    /// cargo fmt --check and clippy.
    Lint,
    /// Run the agent on a demo cluster of network namespaces with real traffic.
    Demo,
    /// Measure the data and control plane against kube-proxy-style iptables and nftables
    /// rulesets; results go to bench/results/.
    Bench(bench::Options),
    /// The packet fixtures and network-namespace tests on other kernels (Debian's, under
    /// qemu with TCG). Fetches the kernels once into target/vm/.
    VmTest {
        /// Kernels to boot: a version like 5.10, 6.1, 6.12, or latest (repeatable).
        /// Default: 5.10, 6.1, 6.12 and latest.
        #[arg(long = "kernel")]
        kernels: Vec<vm::KernelSpec>,
        /// All fixtures, and only a few network-namespace tests (one per hook family): what CI runs.
        #[arg(long)]
        quick: bool,
        /// Run only this network-namespace test (exact name; repeatable).
        #[arg(long = "netns-test", conflicts_with = "quick")]
        netns: Vec<String>,
        /// Run only this suite: fixtures or netns (repeatable; default both).
        #[arg(long = "suite", value_parser = ["fixtures", "netns"])]
        suites: Vec<String>,
        /// Stop a guest after this many seconds.
        #[arg(long, default_value_t = 1500)]
        timeout: u64,
    },
    /// The DaemonSet in a kind cluster without kube-proxy: build, deploy, check, delete.
    /// Needs docker, kind, kubectl and network access.
    Kind {
        /// Validate the inputs and print every step's command without running any.
        #[arg(long)]
        dry_run: bool,
        /// Leave the cluster up afterwards (success or failure).
        #[arg(long)]
        keep: bool,
    },
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Cmd::Setup => setup::run(),
        Cmd::Build => build().map(|_| ()),
        Cmd::Test => test(),
        Cmd::Lint => lint(),
        Cmd::Demo => build().and_then(|_| demo::run(&root().join("target/release/lb"))),
        Cmd::Bench(opts) => build().and_then(|object| bench::run_optimized(&object, &opts)),
        Cmd::VmTest {
            kernels,
            quick,
            netns,
            suites,
            timeout,
        } => vm::run(&vm::Options {
            kernels: if kernels.is_empty() {
                vm::DEFAULT_KERNELS
                    .iter()
                    .map(|k| k.parse().unwrap())
                    .collect()
            } else {
                kernels
            },
            netns: if quick {
                vm::QUICK_NETNS.iter().map(|s| s.to_string()).collect()
            } else {
                netns
            },
            fixtures: suites.is_empty() || suites.iter().any(|s| s == "fixtures"),
            netns_suite: suites.is_empty() || suites.iter().any(|s| s == "netns"),
            timeout: std::time::Duration::from_secs(timeout),
        }),
        Cmd::Kind { dry_run, keep } => kind::run(&root(), kind::Options { dry_run, keep }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn exec(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

/// Builds the eBPF object with whichever toolchain is present and returns its path.
fn build_ebpf() -> Result<PathBuf> {
    setup::run()?;
    let root = root();
    let target_dir = root.join("target/bpf");
    let mut c = cargo();
    let path = format!(
        "{}:{}",
        setup::cargo_bin().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    c.env("PATH", &path);
    match setup::ebpf_toolchain()? {
        setup::EbpfToolchain::Debian(version) => {
            println!("eBPF toolchain: Debian rustc-web {version} (/usr/bin/rustc)");
            c.env("RUSTC", "/usr/bin/rustc").env("RUSTC_BOOTSTRAP", "1");
            c.args([
                "build",
                "--release",
                "-p",
                "lb-ebpf",
                "--target",
                "bpfel-unknown-none",
            ]);
        }
        setup::EbpfToolchain::NightlyBuildStd => {
            println!("eBPF toolchain: rustup nightly with rust-src (-Z build-std=core)");
            c.env_remove("RUSTC");
            c.args([
                "+nightly",
                "build",
                "--release",
                "-p",
                "lb-ebpf",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
            ]);
        }
    }
    c.arg("--target-dir").arg(&target_dir);
    exec(&mut c)?;
    Ok(target_dir.join("bpfel-unknown-none/release/lb"))
}

/// The eBPF object, then the release binary that embeds it.
fn build() -> Result<PathBuf> {
    let object = build_ebpf()?;
    exec(cargo().env("LB_EBPF_OBJECT", &object).args([
        "build",
        "--release",
        "-p",
        "lb-userspace",
    ]))?;
    let bin = root().join("target/release/lb");
    println!("built {}", bin.display());
    Ok(object)
}

fn test() -> Result<()> {
    let object = build()?;
    let bin = root().join("target/release/lb");
    // Unit tests of the default members (not `--workspace`: lb-ebpf only builds for the BPF
    // target), then the privileged suites, one test at a time (they share kernel state such
    // as bpffs).
    exec(
        cargo()
            .env("LB_EBPF_OBJECT", &object)
            .args(["test", "--release"]),
    )?;
    exec(
        cargo()
            .env("LB_EBPF_OBJECT", &object)
            .env("LB_BIN", &bin)
            .args(PRIVILEGED_TESTS)
            .args(["--", "--include-ignored", "--test-threads=1"]),
    )
}

/// `cargo` arguments that build the privileged suites: the packet fixtures and the
/// network-namespace tests (run here and inside `vm-test`'s guests).
pub const PRIVILEGED_TESTS: [&str; 8] = [
    "test",
    "--release",
    "-p",
    "lb-userspace",
    "--test",
    "fixtures",
    "--test",
    "netns",
];

fn lint() -> Result<()> {
    exec(cargo().args(["fmt", "--all", "--", "--check"]))?;
    exec(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))
}
