//! Loading, pinning and attaching the programs, so that the data path outlives the agent:
//! maps are pinned by name, XDP links are pinned, TC filters are netlink filters with a
//! fixed priority and handle (they stay until removed). A restarted agent replaces the
//! programs in those attachments instead of detaching, so no packet finds a gap.

use std::{
    collections::BTreeSet,
    ffi::CString,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context};
use aya::{
    maps::Array,
    programs::{
        links::{FdLink, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcAttachType, TcHandle},
        xdp::XdpLink,
        Link, SchedClassifier, Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use lb_common::{maps, Config, LAYOUT_VERSION};

use crate::{interfaces, object::ebpf_object, sync::AyaMaps};

const BPFFS_MAGIC: i64 = 0xcafe_4a11;
/// Our TC filters: one priority and handle, so a restart finds and replaces them.
const TC_PRIORITY: u16 = 0x4c42;
const TC_HANDLE: TcHandle = TcHandle::new(0, 0x4c42);
const LINKS: &str = "links";

/// How `--xdp-mode` asks to attach.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpModeArg {
    /// Native when the driver supports it, generic otherwise.
    Auto,
    Native,
    Generic,
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid C string and st a valid out-pointer.
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPFFS_MAGIC }
}

/// Mounts bpffs at the parent of `dir` when it is not one already, and creates `dir`.
pub fn ensure_bpffs(dir: &Path) -> anyhow::Result<()> {
    let root = dir.parent().unwrap_or(Path::new("/sys/fs/bpf"));
    fs::create_dir_all(root).with_context(|| format!("create {}", root.display()))?;
    if !is_bpffs(root) {
        let target = CString::new(root.as_os_str().as_encoded_bytes())?;
        let fstype = CString::new("bpf")?;
        // SAFETY: all pointers are valid C strings or null.
        let rc = unsafe {
            libc::mount(
                fstype.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            bail!(
                "mount bpffs at {}: {}",
                root.display(),
                std::io::Error::last_os_error()
            );
        }
        tracing::info!(path = %root.display(), "mounted bpffs");
    }
    fs::create_dir_all(dir.join(LINKS)).with_context(|| format!("create {}", dir.display()))?;
    Ok(())
}

/// Whether a kernel of this release (`uname -r`) charges BPF maps to RLIMIT_MEMLOCK: those
/// before 5.11, which account BPF memory to the memory cgroup instead.
fn charges_memlock(release: &str) -> bool {
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let major = numbers.next().unwrap_or(0);
    let minor = numbers.next().unwrap_or(0);
    (major, minor) < (5, 11)
}

fn kernel_release() -> String {
    // SAFETY: uname fills the zeroed struct; release is NUL-terminated.
    unsafe {
        let mut u: libc::utsname = std::mem::zeroed();
        if libc::uname(&mut u) != 0 {
            return String::new();
        }
        std::ffi::CStr::from_ptr(u.release.as_ptr())
            .to_string_lossy()
            .into_owned()
    }
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK, whose default (8 MiB, less in
/// containers) is far below the maps' size: raise it there. Newer kernels need nothing.
fn raise_memlock() {
    let release = kernel_release();
    if !charges_memlock(&release) {
        tracing::debug!(kernel = %release, "BPF memory is charged to the memory cgroup");
        return;
    }
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a valid rlimit struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        tracing::warn!(
            kernel = %release,
            error = %std::io::Error::last_os_error(),
            "this kernel charges BPF maps to RLIMIT_MEMLOCK and it could not be raised (CAP_SYS_RESOURCE)"
        );
    } else {
        tracing::info!(
            kernel = %release,
            "this kernel charges BPF maps to RLIMIT_MEMLOCK: raised it to unlimited"
        );
    }
}

/// Removes the pinned maps when they were made with another layout: reading them would
/// misread every entry. Only conntrack state is lost; the maps are filled again.
fn check_layout(dir: &Path) -> anyhow::Result<()> {
    let pin = dir.join(maps::CONFIG);
    if !pin.exists() {
        return Ok(());
    }
    let version = crate::sync::open_pin(dir, maps::CONFIG)
        .and_then(|m| Ok(Array::<_, Config>::try_from(m)?))
        .and_then(|a| Ok(a.get(&0, 0)?.layout_version));
    match version {
        Ok(v) if v == LAYOUT_VERSION || v == 0 => Ok(()),
        other => {
            tracing::warn!(
                found = ?other.ok(),
                expected = LAYOUT_VERSION,
                "pinned maps have another layout; replacing them (conntrack state is lost)"
            );
            for name in maps::ALL {
                let _ = fs::remove_file(dir.join(name));
            }
            Ok(())
        }
    }
}

/// The loaded programs and the maps they share, pinned under `dir`.
pub struct Datapath {
    pub ebpf: Ebpf,
    dir: PathBuf,
    /// (interface index, hook) attached by this process or found from an earlier one. By
    /// index, not name: a pod's interface can be deleted and created again under its name.
    attached: BTreeSet<(u32, &'static str)>,
}

impl Datapath {
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let object = ebpf_object()?;
        raise_memlock();
        ensure_bpffs(dir)?;
        check_layout(dir)?;
        let ebpf = EbpfLoader::new()
            .default_map_pin_directory(dir)
            .load(object)
            .context("load the eBPF programs")?;
        let mut dp = Self {
            ebpf,
            dir: dir.to_path_buf(),
            attached: BTreeSet::new(),
        };
        let xdp: &mut Xdp = dp.program("lb_xdp")?;
        xdp.load().context("load lb_xdp")?;
        for name in [
            "lb_pod_ingress",
            "lb_pod_egress",
            "lb_uplink_ingress",
            "lb_uplink_egress",
        ] {
            let p: &mut SchedClassifier = dp.program(name)?;
            p.load().with_context(|| format!("load {name}"))?;
        }
        Ok(dp)
    }

    fn program<'a, T>(&'a mut self, name: &str) -> anyhow::Result<&'a mut T>
    where
        &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
    {
        let p = self
            .ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing"))?;
        Ok(p.try_into()?)
    }

    /// The map store over this data path's maps (taken out of the object).
    pub fn maps(&mut self) -> anyhow::Result<AyaMaps> {
        AyaMaps::from_ebpf(&mut self.ebpf)
    }

    pub fn is_attached(&self, iface: &str, hook: &'static str) -> bool {
        interfaces::index(iface).is_some_and(|i| self.attached.contains(&(i, hook)))
    }

    /// Drops what is remembered about interfaces that no longer exist (pods come and go).
    pub fn forget_missing(&mut self, present: &BTreeSet<u32>) {
        self.attached.retain(|(i, _)| present.contains(i));
    }

    fn mark_attached(&mut self, iface: &str, hook: &'static str) {
        if let Some(i) = interfaces::index(iface) {
            self.attached.insert((i, hook));
        }
    }

    /// The socket hooks on `cgroup`, acting for this network namespace; returns its
    /// cookie as the programs learned it.
    pub fn attach_sockets(
        &mut self,
        cgroup: &Path,
        node_addr: Option<std::net::Ipv4Addr>,
    ) -> anyhow::Result<u64> {
        crate::socket_lb::attach(&mut self.ebpf, &self.dir.join(LINKS), cgroup)?;
        crate::socket_lb::configure(&self.dir, node_addr)
    }

    /// How flows to backends on other nodes are source-NATed.
    pub fn configure_snat(&self, config: lb_common::SnatConfig) -> anyhow::Result<()> {
        let mut map: Array<_, lb_common::SnatConfig> =
            crate::sync::open_pin(&self.dir, maps::SNAT_CONFIG)?.try_into()?;
        map.set(0, config, 0)?;
        Ok(())
    }

    /// Makes POD_IFACES hold exactly `ifindexes`: the pod interfaces host routing may hand
    /// packets to. An index left from a pod gone could name an unrelated interface later.
    pub fn set_pod_ifaces(&self, ifindexes: &BTreeSet<u32>) -> anyhow::Result<()> {
        let mut map: aya::maps::HashMap<_, u32, u32> =
            crate::sync::open_pin(&self.dir, maps::POD_IFACES)?.try_into()?;
        let present: BTreeSet<u32> = map.keys().collect::<Result<_, _>>()?;
        for gone in present.difference(ifindexes) {
            match map.remove(gone) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(e).context(maps::POD_IFACES),
            }
        }
        for new in ifindexes.difference(&present) {
            map.insert(new, 1, 0).with_context(|| {
                format!(
                    "{} (full at {})",
                    maps::POD_IFACES,
                    lb_common::capacity::POD_IFACES
                )
            })?;
        }
        Ok(())
    }

    /// Removes socket hooks an earlier agent attached.
    pub fn detach_sockets(&self) {
        crate::socket_lb::detach(&self.dir.join(LINKS));
    }

    /// XDP on an uplink, through a bpf_link pinned as `links/xdp-<mode>-<iface>`: an
    /// existing link (from an earlier agent) gets the new program atomically.
    pub fn attach_xdp(&mut self, iface: &str, mode: XdpModeArg) -> anyhow::Result<String> {
        let links = self.dir.join(LINKS);
        let existing = ["native", "generic"]
            .into_iter()
            .map(|m| (m, links.join(format!("xdp-{m}-{iface}"))))
            .find(|(_, p)| p.exists());
        let prog: &mut Xdp = self.program("lb_xdp")?;
        let mode_name = match existing.map(|(m, p)| (m, PinnedLink::from_pin(p))) {
            Some((previous_mode, Ok(pinned))) => {
                let link = XdpLink::try_from(FdLink::from(pinned))?;
                let id = prog
                    .attach_to_link(link)
                    .with_context(|| format!("replace the XDP program on {iface}"))?;
                // Our handle is one more reference to the pinned link; closing it is harmless.
                drop(prog.take_link(id)?);
                previous_mode.to_string()
            }
            _ => {
                let (id, m) = match mode {
                    XdpModeArg::Native => (prog.attach(iface, XdpMode::Driver)?, "native"),
                    XdpModeArg::Generic => (prog.attach(iface, XdpMode::Skb)?, "generic"),
                    // A veth drops native XDP_TX frames unless its peer has GRO or an XDP
                    // program, which the agent cannot see from here (kind nodes,
                    // containers): generic mode answers rejects reliably there.
                    XdpModeArg::Auto if interfaces::driver(iface).as_deref() == Some("veth") => {
                        (prog.attach(iface, XdpMode::Skb)?, "generic")
                    }
                    XdpModeArg::Auto => match prog.attach(iface, XdpMode::Driver) {
                        Ok(id) => (id, "native"),
                        Err(e) => {
                            tracing::info!(iface, error = %e, "native XDP unavailable, using generic");
                            (prog.attach(iface, XdpMode::Skb)?, "generic")
                        }
                    },
                };
                let link = prog.take_link(id)?;
                let fd: FdLink = link.try_into().context("XDP attached without bpf_link")?;
                let pin = links.join(format!("xdp-{m}-{iface}"));
                // The pin keeps the attachment after this process ends.
                fd.pin(&pin)
                    .with_context(|| format!("pin {}", pin.display()))?;
                m.to_string()
            }
        };
        self.mark_attached(iface, "xdp");
        Ok(mode_name)
    }

    /// A TC program on one direction of an interface, as a netlink filter with our fixed
    /// priority and handle (replaced in place when it exists).
    pub fn attach_tc(&mut self, iface: &str, program: &str, egress: bool) -> anyhow::Result<()> {
        let _ = tc::qdisc_add_clsact(iface);
        let attach_type = if egress {
            TcAttachType::Egress
        } else {
            TcAttachType::Ingress
        };
        let prog: &mut SchedClassifier = self.program(program)?;
        let options = NlOptions {
            priority: TC_PRIORITY,
            handle: TC_HANDLE,
            ..Default::default()
        };
        let id =
            match prog.attach_with_options(iface, attach_type, TcAttachOptions::Netlink(options)) {
                Ok(id) => id,
                // Our filter is there already (an earlier agent): put the new program in it.
                Err(_) => {
                    let link = SchedClassifierLink::attached(
                        iface,
                        attach_type,
                        TC_PRIORITY,
                        TC_HANDLE,
                        None,
                    )?;
                    prog.attach_to_link(link)
                        .with_context(|| format!("replace TC on {iface}"))?
                }
            };
        // Netlink filters stay until removed; the agent exiting must not remove them.
        std::mem::forget(prog.take_link(id)?);
        let hook = if egress { "tc-egress" } else { "tc-ingress" };
        self.mark_attached(iface, hook);
        Ok(())
    }
}

/// Detaches everything the agent attached in this network namespace and removes the pins.
pub fn reset(dir: &Path) -> anyhow::Result<()> {
    if !dir.exists() {
        bail!(
            "no data path pinned at {} (nothing to reset)",
            dir.display()
        );
    }
    // Our TC filters carry a fixed priority and handle: remove them wherever they are in
    // this network namespace. XDP links go with their pins below.
    for iface in interfaces::list()?.keys() {
        for t in [TcAttachType::Ingress, TcAttachType::Egress] {
            if let Ok(link) = SchedClassifierLink::attached(iface, t, TC_PRIORITY, TC_HANDLE, None)
            {
                let _ = link.detach();
            }
        }
    }
    fs::remove_dir_all(dir).with_context(|| format!("remove {}", dir.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::charges_memlock;

    #[test]
    fn kernels_before_5_11_charge_maps_to_memlock() {
        assert!(charges_memlock("5.10.0-46-cloud-amd64"));
        assert!(charges_memlock("4.19.0-27-amd64"));
        assert!(!charges_memlock("5.11.0"));
        assert!(!charges_memlock("6.1.0-57-cloud-amd64"));
        assert!(!charges_memlock("6.12.118+deb12-cloud-amd64"));
        assert!(!charges_memlock("7.2.13+deb14-cloud-amd64"));
    }
}
