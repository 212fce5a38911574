//! Prerequisites, installed only when missing, so a second run takes seconds.

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};

use crate::exec;

const PACKAGES: &[&str] = &[
    "rustc-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "bpftool",
    "iproute2",
    "ethtool",
    "iptables",
    "nftables",
    "conntrack",
    "socat",
];
/// Only `cargo xtask vm-test` needs these: qemu, the guest's userland, module tools.
const VM_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "busybox-static",
    "kmod",
    "xz-utils",
    "zstd",
];
const BPF_LINKER_VERSION: &str = "0.13.0";

pub enum EbpfToolchain {
    /// Debian's rustc-web with prebuilt core for bpfel-unknown-none.
    Debian(String),
    /// rustup nightly with rust-src (the usual aya recipe).
    NightlyBuildStd,
}

pub fn cargo_bin() -> PathBuf {
    let home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into())).join(".cargo")
        });
    home.join("bin")
}

fn nightly_has_rust_src() -> bool {
    Command::new("rustup")
        .args(["+nightly", "component", "list", "--installed"])
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains("rust-src")
        })
}

pub fn ebpf_toolchain() -> Result<EbpfToolchain> {
    if let Ok(o) = Command::new("/usr/bin/rustc").arg("--version").output() {
        if o.status.success() {
            let v = String::from_utf8_lossy(&o.stdout);
            return Ok(EbpfToolchain::Debian(
                v.split_whitespace().nth(1).unwrap_or("?").to_string(),
            ));
        }
    }
    if nightly_has_rust_src() {
        return Ok(EbpfToolchain::NightlyBuildStd);
    }
    bail!("no eBPF toolchain: install rustc-web and libstd-rust-web-dev-bpf (cargo xtask setup)")
}

fn missing_packages(packages: &[&'static str]) -> Vec<&'static str> {
    packages
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect()
}

fn install_packages() -> Result<()> {
    let missing = missing_packages(PACKAGES);
    if missing.is_empty() {
        return Ok(());
    }
    // A machine that has rustup nightly with rust-src needs no Debian compiler.
    let missing: Vec<&str> = if nightly_has_rust_src() {
        missing
            .into_iter()
            .filter(|p| !p.starts_with("rustc-web") && !p.starts_with("libstd-rust"))
            .collect()
    } else {
        missing
    };
    apt_install(&missing)
}

/// The packages of `cargo xtask vm-test`, installed when missing.
pub fn install_vm_packages() -> Result<()> {
    let missing = missing_packages(VM_PACKAGES);
    if missing.is_empty() {
        return Ok(());
    }
    apt_install(&missing)
}

fn apt_install(missing: &[&str]) -> Result<()> {
    println!("installing Debian packages: {}", missing.join(" "));
    exec(Command::new("apt-get").args(["update", "-q"]))?;
    exec(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(missing),
    )
}

fn install_bpf_linker() -> Result<()> {
    let linker = cargo_bin().join("bpf-linker");
    if let Ok(o) = Command::new(&linker).arg("--version").output() {
        if String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION) {
            return Ok(());
        }
    }
    println!("installing bpf-linker {BPF_LINKER_VERSION} against LLVM 22");
    let path = format!(
        "/usr/lib/llvm-22/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    exec(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .env("PATH", path)
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args(["--no-default-features", "--features", "llvm-22"]),
    )
}

fn mount_bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("read /proc/mounts")?;
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    {
        return Ok(());
    }
    std::fs::create_dir_all("/sys/fs/bpf")?;
    exec(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}

pub fn run() -> Result<()> {
    install_packages()?;
    install_bpf_linker()?;
    mount_bpffs()
}
