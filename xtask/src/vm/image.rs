//! The guest's initramfs: a busybox userland, the host's own `ip`, `nsenter`, `iptables`,
//! `ethtool`, `sysctl` with their shared libraries (at the paths `ldd` gives, so the host's
//! dynamic loader finds them), the test executables, `lb`, the kernel's modules and the init
//! script. Written directly as "newc" cpio archives; a common one shared by every kernel and
//! a small one per kernel (its modules), concatenated, which the kernel unpacks in order.

use std::{
    collections::BTreeMap,
    fs,
    io::Write,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use super::kernels::Kernel;

/// Tools the privileged tests run, taken from the host (busybox's applets of the same names
/// are incomplete). Looked up on the host's PATH.
const HOST_TOOLS: &[&str] = &[
    "ip",
    "nsenter",
    "xtables-nft-multi",
    "xtables-legacy-multi",
    "ethtool",
    "sysctl",
    "socat",
];

/// iptables loads its matches (`-m conntrack`) from here.
const XTABLES_DIR: &str = "/usr/lib/x86_64-linux-gnu/xtables";

/// Modules the tests need when the kernel has them as modules (dependencies follow).
pub const MODULES: &[&str] = &[
    "veth",
    "bridge",
    "sch_ingress",
    "cls_bpf",
    "ipip",
    "nf_conntrack",
    "nf_tables",
    "nft_compat",
    "nft_counter",
    "nft_ct",
    "xt_conntrack",
    "ip_tables",
    "iptable_filter",
];

pub const BUSYBOX: &str = "/bin/busybox";

/// One archive member.
enum Entry {
    Dir,
    File { data: Vec<u8>, mode: u32 },
    Symlink(String),
}

/// A cpio "newc" archive being assembled; paths are relative to the guest's root.
#[derive(Default)]
pub struct Archive {
    entries: BTreeMap<String, Entry>,
}

impl Archive {
    fn parents(&mut self, path: &str) {
        let mut p = path;
        while let Some((parent, _)) = p.rsplit_once('/') {
            if parent.is_empty() {
                break;
            }
            self.entries.entry(parent.to_string()).or_insert(Entry::Dir);
            p = parent;
        }
    }

    fn clean(path: &str) -> String {
        path.trim_start_matches('/').to_string()
    }

    pub fn dir(&mut self, path: &str) {
        let path = Self::clean(path);
        self.parents(&path);
        self.entries.insert(path, Entry::Dir);
    }

    pub fn file(&mut self, path: &str, data: Vec<u8>, mode: u32) {
        let path = Self::clean(path);
        self.parents(&path);
        self.entries.insert(path, Entry::File { data, mode });
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        let path = Self::clean(path);
        self.parents(&path);
        self.entries
            .insert(path, Entry::Symlink(target.to_string()));
    }

    /// A host file at `guest` in the image (symlinks followed), keeping its permissions.
    pub fn copy(&mut self, host: &Path, guest: &str) -> Result<()> {
        let data = fs::read(host).with_context(|| format!("read {}", host.display()))?;
        let mode = fs::metadata(host)?.permissions().mode() & 0o7777;
        self.file(guest, data, mode);
        Ok(())
    }

    pub fn contains(&self, path: &str) -> bool {
        self.entries.contains_key(&Self::clean(path))
    }

    /// The archive's bytes. Parents sort before their children, as the kernel needs.
    pub fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (ino, (path, entry)) in (1u32..).zip(&self.entries) {
            let (mode, data): (u32, &[u8]) = match entry {
                Entry::Dir => (0o040755, &[]),
                Entry::File { data, mode } => (0o100000 | mode, data),
                Entry::Symlink(t) => (0o120777, t.as_bytes()),
            };
            let nlink = if matches!(entry, Entry::Dir) { 2 } else { 1 };
            header(&mut out, ino, mode, nlink, data.len(), path);
            out.extend_from_slice(data);
            pad(&mut out);
        }
        header(&mut out, 0, 0, 1, 0, "TRAILER!!!");
        out
    }
}

fn header(out: &mut Vec<u8>, ino: u32, mode: u32, nlink: u32, size: usize, name: &str) {
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        nlink,
        0, // mtime
        size as u32,
        0, // devmajor
        0, // devminor
        0, // rdevmajor
        0, // rdevminor
        name.len() as u32 + 1,
        0, // check
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad(out);
}

fn pad(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}

/// The shared libraries `ldd` lists for `binary`, including the dynamic loader.
fn libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("run ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || text.contains("not a dynamic executable") {
        return Ok(Vec::new());
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)", "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
        if line.contains("not found") {
            bail!("{}: {}", binary.display(), line.trim());
        }
    }
    Ok(libs)
}

/// The binaries the guest runs, as paths on the host.
pub struct Payload {
    pub lb: PathBuf,
    /// (suite name, test executable)
    pub suites: Vec<(String, PathBuf)>,
}

/// The part of the image every kernel shares.
pub fn common(payload: &Payload, init: &str) -> Result<Archive> {
    let mut a = Archive::default();
    for d in [
        "proc", "sys", "dev", "run", "tmp", "etc", "root", "bb", "usr/sbin", "usr/bin",
    ] {
        a.dir(d);
    }
    a.copy(Path::new(BUSYBOX), "bin/busybox")
        .context("busybox-static is not installed")?;
    a.symlink("bin/sh", "busybox");
    a.file("init", init.as_bytes().to_vec(), 0o755);
    a.file(
        "etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\n".to_vec(),
        0o644,
    );
    a.file("etc/group", b"root:x:0:\n".to_vec(), 0o644);
    a.file("etc/hosts", b"127.0.0.1 localhost\n".to_vec(), 0o644);

    let mut binaries: Vec<PathBuf> = Vec::new();
    for tool in HOST_TOOLS {
        let Some(host) = which(tool) else {
            println!("vm-test: {tool} is not on this machine; the guest goes without it");
            continue;
        };
        let guest = format!("usr/sbin/{tool}");
        a.copy(&host, &guest)?;
        binaries.push(host);
    }
    // The multi-call binaries answer to the name they are called by.
    for name in ["iptables", "iptables-save", "iptables-restore", "ip6tables"] {
        a.symlink(&format!("usr/sbin/{name}"), "xtables-nft-multi");
    }
    for name in ["iptables-legacy", "iptables-legacy-save"] {
        a.symlink(&format!("usr/sbin/{name}"), "xtables-legacy-multi");
    }
    if let Ok(dir) = fs::read_dir(XTABLES_DIR) {
        for e in dir.flatten() {
            let p = e.path();
            a.copy(&p, &p.to_string_lossy())?;
            binaries.push(p);
        }
    }
    a.copy(&payload.lb, "t/lb")?;
    binaries.push(payload.lb.clone());
    for (name, exe) in &payload.suites {
        a.copy(exe, &format!("t/{name}"))?;
        binaries.push(exe.clone());
    }
    for b in &binaries {
        for lib in libraries(b)? {
            let guest = lib.to_string_lossy().to_string();
            if !a.contains(&guest) {
                a.copy(&lib, &guest)?;
            }
        }
    }
    Ok(a)
}

/// The per-kernel part: its modules, decompressed, and the order to load them in.
pub fn for_kernel(kernel: &Kernel) -> Result<Archive> {
    let mut a = Archive::default();
    let mut order = String::new();
    for (i, module) in super::kernels::module_order(kernel, MODULES)?
        .iter()
        .enumerate()
    {
        let name = module
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("module");
        let (stem, data) = if let Some(stem) = name.strip_suffix(".xz") {
            (stem, decompress("xz", module)?)
        } else if let Some(stem) = name.strip_suffix(".zst") {
            (stem, decompress("zstd", module)?)
        } else if let Some(stem) = name.strip_suffix(".gz") {
            (stem, decompress("gzip", module)?)
        } else {
            (name, fs::read(module)?)
        };
        let guest = format!("modules/{i:02}-{stem}");
        a.file(&guest, data, 0o644);
        order.push_str(&format!("/{guest}\n"));
    }
    a.file("modules/order", order.into_bytes(), 0o644);
    Ok(a)
}

fn decompress(tool: &str, path: &Path) -> Result<Vec<u8>> {
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .with_context(|| format!("run {tool}"))?;
    if !out.status.success() {
        bail!("{tool} -dc {}: failed", path.display());
    }
    Ok(out.stdout)
}

/// Writes the initramfs for one kernel: the common archive followed by the kernel's own.
pub fn write(path: &Path, common: &[u8], kernel: &Archive) -> Result<()> {
    let mut f = fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    f.write_all(common)?;
    f.write_all(&kernel.bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_archive_has_parents_first_and_aligned_members() {
        let mut a = Archive::default();
        a.file("/a/b/c", b"hello".to_vec(), 0o755);
        a.symlink("a/l", "b/c");
        let bytes = a.bytes();
        let text = String::from_utf8_lossy(&bytes);
        let a_at = text.find("a\0").unwrap();
        let b_at = text.find("a/b\0").unwrap();
        let c_at = text.find("a/b/c\0").unwrap();
        assert!(a_at < b_at && b_at < c_at);
        assert!(text.ends_with("TRAILER!!!\0\0\0\0") || text.contains("TRAILER!!!"));
        // Every header starts on a 4-byte boundary with the newc magic.
        let mut at = 0;
        let mut names = Vec::new();
        while at < bytes.len() {
            assert_eq!(&bytes[at..at + 6], b"070701");
            let field = |i: usize| {
                let s = std::str::from_utf8(&bytes[at + 6 + i * 8..at + 14 + i * 8]).unwrap();
                usize::from_str_radix(s, 16).unwrap()
            };
            let (size, namesize) = (field(6), field(11));
            let name = &bytes[at + 110..at + 110 + namesize - 1];
            names.push(String::from_utf8_lossy(name).into_owned());
            at = (at + 110 + namesize).next_multiple_of(4);
            at = (at + size).next_multiple_of(4);
            if names.last().unwrap() == "TRAILER!!!" {
                break;
            }
        }
        assert_eq!(names, ["a", "a/b", "a/b/c", "a/l", "TRAILER!!!"]);
    }
}
