//! Debian kernels for the VM tests: chosen from the archive's package lists, fetched with
//! `apt-get download` through a private apt configuration (the host's /etc/apt and package
//! database are left alone), unpacked with `dpkg -x` under target/vm/, never installed.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime},
};

use anyhow::{bail, Context, Result};

use crate::exec;

/// Suites searched for kernels: 5.10 lives in bullseye, 6.1 in bookworm, 6.12 in trixie and
/// bookworm's security updates, the newest in sid.
const SUITES: &[(&str, &str)] = &[
    ("http://deb.debian.org/debian", "bullseye"),
    ("http://deb.debian.org/debian-security", "bullseye-security"),
    ("http://deb.debian.org/debian", "bookworm"),
    ("http://deb.debian.org/debian-security", "bookworm-security"),
    ("http://deb.debian.org/debian", "trixie"),
    ("http://deb.debian.org/debian", "sid"),
];

/// The cloud flavour: small, and has every module the tests need as a loadable module.
const FLAVOUR: &str = "-cloud-amd64";

/// Package lists older than this are fetched again.
const LISTS_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// A kernel named on the command line: a version prefix ("5.10", "6.12") or "latest".
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelSpec {
    Version(String),
    Latest,
}

impl std::str::FromStr for KernelSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "latest" {
            return Ok(Self::Latest);
        }
        let mut parts = s.split('.');
        let numeric = |p: Option<&str>| {
            p.is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        };
        if numeric(parts.next()) && numeric(parts.next()) && parts.all(|p| numeric(Some(p))) {
            Ok(Self::Version(s.to_string()))
        } else {
            Err(format!(
                "{s:?}: expected a kernel version like 6.1 or 6.12, or latest"
            ))
        }
    }
}

impl std::fmt::Display for KernelSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Version(v) => f.write_str(v),
            Self::Latest => f.write_str("latest"),
        }
    }
}

/// The numbers in a kernel release string, for ordering: "6.1.0-57" -> [6, 1, 0, 57],
/// "6.12.118+deb12" -> [6, 12, 118, 12].
fn release_key(release: &str) -> Vec<u64> {
    release
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap_or(0))
        .collect()
}

/// The kernel release of a `linux-image-<release>-cloud-amd64` package name (not the
/// meta-packages, which have no patch level in their names).
fn release_of(package: &str) -> Option<&str> {
    let release = package
        .strip_prefix("linux-image-")?
        .strip_suffix(FLAVOUR)?;
    // "6.1.0-57", "6.12.118+deb12": three dotted numbers then an ABI or Debian suffix.
    let upstream = release.split(['-', '+']).next()?;
    (upstream.split('.').count() == 3 && release.len() > upstream.len()).then_some(release)
}

/// The package that `spec` selects among `packages`: the newest release of that series.
pub fn select<'a>(spec: &KernelSpec, packages: &[&'a str]) -> Option<&'a str> {
    packages
        .iter()
        .copied()
        .filter_map(|p| release_of(p).map(|r| (p, r)))
        .filter(|(_, r)| match spec {
            KernelSpec::Latest => true,
            KernelSpec::Version(v) => {
                r.starts_with(v.as_str()) && r[v.len()..].starts_with(|c: char| !c.is_ascii_digit())
            }
        })
        .max_by_key(|(_, r)| release_key(r))
        .map(|(p, _)| p)
}

/// A kernel unpacked and ready to boot.
pub struct Kernel {
    /// The package's release string (`uname -r`).
    pub release: String,
    pub vmlinuz: PathBuf,
    /// The unpacked tree: `lib/modules/<release>` below it, with modules.dep.
    pub root: PathBuf,
}

struct Apt {
    dir: PathBuf,
}

impl Apt {
    fn new(vm_dir: &Path) -> Result<Self> {
        let dir = vm_dir.join("apt");
        for sub in ["lists/partial", "cache/archives/partial"] {
            fs::create_dir_all(dir.join(sub))?;
        }
        let sources: String = SUITES
            .iter()
            .map(|(uri, suite)| format!("deb {uri} {suite} main\n"))
            .collect();
        fs::write(dir.join("sources.list"), sources)?;
        Ok(Self { dir })
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        let d = self.dir.display();
        for o in [
            format!("Dir::Etc::SourceList={d}/sources.list"),
            "Dir::Etc::SourceParts=/dev/null".into(),
            format!("Dir::State::Lists={d}/lists"),
            format!("Dir::Cache={d}/cache"),
            "Dir::State::status=/dev/null".into(),
            "APT::Sandbox::User=root".into(),
        ] {
            c.arg("-o").arg(o);
        }
        c
    }

    fn update_if_stale(&self) -> Result<()> {
        let stamp = self.dir.join("updated");
        let fresh = fs::metadata(&stamp)
            .and_then(|m| m.modified())
            .is_ok_and(|t| SystemTime::now().duration_since(t).unwrap_or_default() < LISTS_MAX_AGE);
        if fresh {
            return Ok(());
        }
        println!("vm-test: fetching Debian package lists (bullseye, bookworm, trixie, sid)");
        exec(self.command("apt-get").args(["update", "-q"]))?;
        fs::write(stamp, "")?;
        Ok(())
    }

    fn output(&self, program: &str, args: &[&str]) -> Result<String> {
        let out = self
            .command(program)
            .args(args)
            .output()
            .with_context(|| format!("run {program}"))?;
        if !out.status.success() {
            bail!(
                "{program} {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// The packages a kernel image package needs beside itself: newer Debian kernels split the
/// image into linux-binary-* (vmlinuz) and linux-modules-*.
fn parts(depends: &str) -> Vec<String> {
    depends
        .split(',')
        .flat_map(|alt| alt.split('|'))
        .filter_map(|d| d.split_whitespace().next())
        .filter(|d| d.starts_with("linux-binary-") || d.starts_with("linux-modules-"))
        .map(str::to_string)
        .collect()
}

/// Resolves each spec to a package, downloads and unpacks it (once: cached under vm_dir).
pub fn fetch(vm_dir: &Path, specs: &[KernelSpec]) -> Result<Vec<(KernelSpec, Kernel)>> {
    let apt = Apt::new(vm_dir)?;
    apt.update_if_stale()?;
    let names = apt.output(
        "apt-cache",
        &[
            "search",
            "--names-only",
            &format!("^linux-image-.*{FLAVOUR}$"),
        ],
    )?;
    let names: Vec<&str> = names
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let mut kernels = Vec::new();
    for spec in specs {
        let Some(package) = select(spec, &names) else {
            bail!(
                "no Debian kernel package for {spec} (looked for linux-image-<release>{FLAVOUR})"
            );
        };
        let release = release_of(package).unwrap().to_string() + FLAVOUR;
        let root = vm_dir.join("kernels").join(&release);
        if !root.join("unpacked").exists() {
            unpack(&apt, vm_dir, package, &root)?;
        }
        let vmlinuz = [
            root.join(format!("boot/vmlinuz-{release}")),
            root.join(format!("usr/lib/modules/{release}/vmlinuz")),
        ]
        .into_iter()
        .find(|p| p.exists())
        .with_context(|| format!("no vmlinuz in {package}"))?;
        kernels.push((
            spec.clone(),
            Kernel {
                release,
                vmlinuz,
                root,
            },
        ));
    }
    Ok(kernels)
}

fn unpack(apt: &Apt, vm_dir: &Path, package: &str, root: &Path) -> Result<()> {
    let show = apt.output("apt-cache", &["show", "--no-all-versions", package])?;
    let depends = show
        .lines()
        .find_map(|l| l.strip_prefix("Depends:"))
        .unwrap_or("");
    let mut packages = vec![package.to_string()];
    packages.extend(parts(depends));
    println!("vm-test: downloading {}", packages.join(" "));
    let debs = vm_dir.join("debs");
    fs::create_dir_all(&debs)?;
    exec(
        apt.command("apt-get")
            .current_dir(&debs)
            .args(["download", "-q"])
            .args(&packages),
    )?;
    let _ = fs::remove_dir_all(root);
    fs::create_dir_all(root)?;
    for p in &packages {
        let prefix = format!("{p}_");
        let deb = fs::read_dir(&debs)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|e| {
                e.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
            })
            .max()
            .with_context(|| format!("{p} was not downloaded"))?;
        exec(Command::new("dpkg").arg("-x").arg(&deb).arg(root))?;
    }
    // Split packages put the modules under usr/lib only.
    if !root.join("lib").exists() {
        std::os::unix::fs::symlink("usr/lib", root.join("lib"))?;
    }
    let release = release_of(package).unwrap().to_string() + FLAVOUR;
    // Debian generates modules.dep at installation; we make it here.
    exec(Command::new("depmod").arg("-b").arg(root).arg(&release))?;
    fs::write(root.join("unpacked"), package)?;
    Ok(())
}

/// The module files to load, in order, for `wanted` (dependencies first, each once).
/// Modules the kernel has built in, or lacks, are skipped.
pub fn module_order(kernel: &Kernel, wanted: &[&str]) -> Result<Vec<PathBuf>> {
    let mut order: Vec<PathBuf> = Vec::new();
    for m in wanted {
        let out = Command::new("modprobe")
            .arg("-d")
            .arg(&kernel.root)
            .args(["-S", &kernel.release, "--show-depends", m])
            .output()
            .context("run modprobe (kmod)")?;
        if !out.status.success() {
            println!(
                "vm-test: {}: no module {m}: {}",
                kernel.release,
                String::from_utf8_lossy(&out.stderr).trim()
            );
            continue;
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // "insmod /path/mod.ko.xz [params]"; "builtin name" for built-in ones.
            if let Some(path) = line.strip_prefix("insmod ") {
                let path = PathBuf::from(path.split_whitespace().next().unwrap_or(""));
                if !order.contains(&path) {
                    order.push(path);
                }
            }
        }
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAMES: &[&str] = &[
        "linux-image-5.10.0-45-cloud-amd64",
        "linux-image-5.10.0-46-cloud-amd64",
        "linux-image-6.1-cloud-amd64",
        "linux-image-6.1.0-0.deb11.52-cloud-amd64",
        "linux-image-6.1.0-9-cloud-amd64",
        "linux-image-6.1.0-57-cloud-amd64",
        "linux-image-6.12-cloud-amd64",
        "linux-image-6.12.117+deb13-cloud-amd64",
        "linux-image-6.12.118+deb12-cloud-amd64",
        "linux-image-7.2.13+deb14-cloud-amd64",
        "linux-image-cloud-amd64",
    ];

    fn pick(spec: &str) -> Option<&'static str> {
        select(&spec.parse().unwrap(), NAMES)
    }

    #[test]
    fn the_newest_release_of_a_series_is_chosen() {
        assert_eq!(pick("5.10"), Some("linux-image-5.10.0-46-cloud-amd64"));
        assert_eq!(pick("6.1"), Some("linux-image-6.1.0-57-cloud-amd64"));
        assert_eq!(pick("6.12"), Some("linux-image-6.12.118+deb12-cloud-amd64"));
        assert_eq!(pick("latest"), Some("linux-image-7.2.13+deb14-cloud-amd64"));
        assert_eq!(pick("5.4"), None);
    }

    #[test]
    fn kernel_specs_parse() {
        assert_eq!("latest".parse(), Ok(KernelSpec::Latest));
        assert_eq!("6.12".parse(), Ok(KernelSpec::Version("6.12".into())));
        assert!("6".parse::<KernelSpec>().is_err());
        assert!("6.x".parse::<KernelSpec>().is_err());
        assert!("newest".parse::<KernelSpec>().is_err());
    }

    #[test]
    fn split_kernel_packages_bring_their_parts() {
        let d = "dracut | initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool, \
                 linux-base-7.2.13+deb14-cloud-amd64 (= 7.2.13-1), \
                 linux-binary-7.2.13+deb14-cloud-amd64 (= 7.2.13-1), \
                 linux-modules-7.2.13+deb14-cloud-amd64 (= 7.2.13-1)";
        assert_eq!(
            parts(d),
            [
                "linux-binary-7.2.13+deb14-cloud-amd64",
                "linux-modules-7.2.13+deb14-cloud-amd64"
            ]
        );
        assert!(parts("kmod, linux-base (>= 4.3~)").is_empty());
    }
}
