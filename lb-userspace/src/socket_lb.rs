//! Socket-level load balancing for the node's own processes: the cgroup v2 hooks connect4,
//! sendmsg4, recvmsg4 and getpeername4, attached through bpf_links pinned beside the
//! other links, so they stay when the agent stops and go with `lb reset`.

use std::{
    fs,
    io::Read,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context};
use aya::{
    maps::Array,
    programs::{links::FdLink, CgroupAttachMode, CgroupSockAddr},
    Ebpf,
};
use lb_common::{addr, maps, SockConfig};

use crate::sync::open_pin;

/// Where the agent mounts cgroup v2 when the machine has no cgroup v2 mount.
const OWN_MOUNT: &str = "/run/lb/cgroup2";
/// Nonce ports lie above Linux's ephemeral range and the NodePort range, so the agent's
/// nonce connect can never be mistaken for a service.
const NONCE_PORTS: std::ops::Range<u16> = 61_000..65_535;

/// A hook: the program with `bpf_set_retval` and the one for older kernels, if any.
struct Hook {
    name: &'static str,
    program: &'static str,
    compat: Option<&'static str>,
}

const HOOKS: [Hook; 4] = [
    Hook {
        name: "connect4",
        program: "lb_connect4",
        compat: Some("lb_connect4_compat"),
    },
    Hook {
        name: "sendmsg4",
        program: "lb_sendmsg4",
        compat: Some("lb_sendmsg4_compat"),
    },
    Hook {
        name: "recvmsg4",
        program: "lb_recvmsg4",
        compat: None,
    },
    Hook {
        name: "getpeername4",
        program: "lb_getpeername4",
        compat: None,
    },
];

fn pin_path(links: &Path, hook: &str) -> PathBuf {
    links.join(format!("cgroup-{hook}"))
}

/// The root of the cgroup v2 hierarchy as this process's mount table shows it.
fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mut fields = left.split_whitespace();
        let root = fields.nth(3)?;
        let mount_point = fields.next()?;
        (fstype == "cgroup2" && root == "/").then(|| PathBuf::from(mount_point))
    })
}

/// `--cgroup`, or the root of the cgroup v2 hierarchy, mounted by the agent if need be.
pub fn cgroup_root(arg: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = arg {
        return Ok(p.to_path_buf());
    }
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
    if let Some(p) = cgroup2_mount(&mountinfo) {
        return Ok(p);
    }
    let target = PathBuf::from(OWN_MOUNT);
    fs::create_dir_all(&target).with_context(|| format!("create {OWN_MOUNT}"))?;
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
    let (fstype, path) = (c("cgroup2"), c(OWN_MOUNT));
    // SAFETY: valid C strings or null.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            path.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        bail!(
            "no cgroup v2 mount and mounting one at {OWN_MOUNT} failed: {}",
            std::io::Error::last_os_error()
        );
    }
    tracing::info!(path = OWN_MOUNT, "mounted cgroup v2");
    Ok(target)
}

/// Loads the hook's program, falling back to the one without `bpf_set_retval` when the
/// kernel refuses it. Returns the program name that loaded.
fn load(ebpf: &mut Ebpf, hook: &Hook) -> anyhow::Result<&'static str> {
    let first = load_one(ebpf, hook.program);
    match (first, hook.compat) {
        (Ok(()), _) => Ok(hook.program),
        (Err(e), Some(compat)) => {
            tracing::info!(
                hook = hook.name,
                error = %format!("{e:#}"),
                "kernel without bpf_set_retval: refused connections read EPERM"
            );
            load_one(ebpf, compat)?;
            Ok(compat)
        }
        (Err(e), None) => Err(e),
    }
}

fn load_one(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<()> {
    let prog: &mut CgroupSockAddr = ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} missing"))?
        .try_into()?;
    prog.load().with_context(|| format!("load {name}"))
}

/// Attaches every hook to `cgroup` and pins the links under `links`. An earlier agent's
/// link is replaced after the new one is attached: for a moment both run, which is
/// harmless (the second sees a backend address, which is no service).
pub fn attach(ebpf: &mut Ebpf, links: &Path, cgroup: &Path) -> anyhow::Result<()> {
    let dir = fs::File::open(cgroup).with_context(|| format!("open {}", cgroup.display()))?;
    for hook in &HOOKS {
        let name = load(ebpf, hook)?;
        let prog: &mut CgroupSockAddr = ebpf.program_mut(name).expect("loaded").try_into()?;
        // bpf_link attachments are always multi-program and take no flags (the kernel
        // refuses BPF_F_ALLOW_MULTI on them), so other programs on the cgroup are kept.
        let id = prog
            .attach(&dir, CgroupAttachMode::Single)
            .with_context(|| format!("attach {name} to {}", cgroup.display()))?;
        let link: FdLink = prog
            .take_link(id)?
            .try_into()
            .context("cgroup hook attached without bpf_link (kernel before 5.7)")?;
        let pin = pin_path(links, hook.name);
        if pin.exists() {
            fs::remove_file(&pin).with_context(|| format!("replace {}", pin.display()))?;
        }
        link.pin(&pin)
            .with_context(|| format!("pin {}", pin.display()))?;
    }
    Ok(())
}

/// Removes the hooks an earlier agent left (`--socket-lb=false`).
pub fn detach(links: &Path) {
    for hook in &HOOKS {
        let pin = pin_path(links, hook.name);
        if pin.exists() && fs::remove_file(&pin).is_ok() {
            tracing::info!(hook = hook.name, "removed socket hook");
        }
    }
}

fn random_nonce() -> anyhow::Result<(Ipv4Addr, u16)> {
    let mut b = [0u8; 5];
    fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    // 127.x.y.z with x odd, so never 127.0.0.1.
    let ip = Ipv4Addr::new(127, b[0] | 1, b[1], b[2]);
    let span = NONCE_PORTS.end - NONCE_PORTS.start;
    let port = NONCE_PORTS.start + u16::from_le_bytes([b[3], b[4]]) % span;
    Ok((ip, port))
}

/// Tells the programs which network namespace is ours, and which address the node has as
/// a client. The programs learn the namespace cookie from a connect of ours to a random
/// nonce, which works on every kernel with the hooks (SO_NETNS_COOKIE needs 5.14).
pub fn configure(bpffs: &Path, node_addr: Option<Ipv4Addr>) -> anyhow::Result<u64> {
    let mut config: Array<_, SockConfig> = open_pin(bpffs, maps::SOCK_CONFIG)?.try_into()?;
    let current = config.get(&0, 0)?;
    let (nonce, port) = random_nonce()?;
    let node = node_addr.map_or(0, |a| addr::ipv4(a.octets()));
    let wire = |a: Ipv4Addr| addr::ipv4(a.octets());
    config.set(
        0,
        SockConfig::new(current.netns_cookie, wire(nonce), addr::port(port), node),
        0,
    )?;
    let sock = UdpSocket::bind("127.0.0.1:0")?;
    // The hook sees the connect before routing; whether it then succeeds does not matter.
    let _ = sock.connect(SocketAddrV4::new(nonce, port));
    let learned = config.get(&0, 0)?;
    config.set(0, SockConfig::new(learned.netns_cookie, 0, 0, node), 0)?;
    if learned.netns_cookie == 0 {
        bail!("the connect4 hook did not see the agent's nonce connect (is {nonce}:{port} filtered, or the agent outside the cgroup?)");
    }
    Ok(learned.netns_cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_root_in_mountinfo() {
        let hybrid = "25 30 0:23 / /sys rw,nosuid - sysfs sysfs rw\n\
            40 31 0:37 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd\n\
            41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        // Inside a cgroup namespace's bind mount the root is not the hierarchy's.
        let nested = "41 31 0:38 /kubepods/pod1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_mount(nested), None);
        assert_eq!(cgroup2_mount(""), None);
    }

    #[test]
    fn nonces_avoid_localhost_and_service_ports() {
        for _ in 0..200 {
            let (ip, port) = random_nonce().unwrap();
            assert_eq!(ip.octets()[0], 127);
            assert_ne!(ip, Ipv4Addr::LOCALHOST);
            assert!(NONCE_PORTS.contains(&port), "{port}");
        }
    }
}
