//! `cargo xtask bench`: the data plane's cost per packet, measured with BPF_PROG_TEST_RUN
//! on the real XDP program with N services programmed by the real syncer, against an
//! empty XDP program timed the same way in the same run. One run per sample (with
//! `repeat > 1` the kernel would rerun the program on the buffer it already rewrote, so
//! the path named would not be the one timed), kernel-reported duration, median of
//! thousands, trials interleaved across N.

use std::{
    collections::BTreeMap,
    ffi::c_void,
    fs,
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use aya::{
    programs::{TestRun, TestRunOptions, Xdp},
    Ebpf, EbpfLoader,
};
use lb_common::{backend_state, kind, proto, scope, Config};
use lb_userspace::{
    desired::{DesiredBackend, DesiredFrontend, DesiredMaps, DesiredService, ServicePortId},
    sync::{AyaMaps, Syncer},
};

const SIZES: [usize; 4] = [10, 1_000, 10_000, 50_000];
/// NodePorts hold 2768 numbers; the last min(N, 2000) services get one.
const NODE_PORTS: usize = 2_000;
const TRIALS: usize = 5;
const SAMPLES: usize = 4_000;
const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const OTHER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 99);

/// The paths timed, in report order.
const PATHS: [&str; 4] = ["empty_xdp", "pass_through", "established", "new_flow"];

/// A TCP segment in an Ethernet frame with correct checksums.
fn tcp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8) -> Vec<u8> {
    let sum = |b: &[u8]| -> u32 {
        b.chunks(2)
            .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
            .sum()
    };
    let fold = |mut s: u32| {
        while s >> 16 != 0 {
            s = (s & 0xffff) + (s >> 16);
        }
        !(s as u16)
    };
    let mut l4 = Vec::new();
    l4.extend(src.1.to_be_bytes());
    l4.extend(dst.1.to_be_bytes());
    l4.extend(1000u32.to_be_bytes());
    l4.extend(if flags & 0x10 != 0 { 5000u32 } else { 0 }.to_be_bytes());
    l4.extend([0x50, flags]);
    l4.extend(64240u16.to_be_bytes());
    l4.extend([0, 0, 0, 0]);
    let mut pseudo = Vec::new();
    pseudo.extend(src.0.octets());
    pseudo.extend(dst.0.octets());
    pseudo.extend([0, proto::TCP]);
    pseudo.extend((l4.len() as u16).to_be_bytes());
    let c = fold(sum(&pseudo) + sum(&l4));
    l4[16..18].copy_from_slice(&c.to_be_bytes());
    let mut ip = vec![0x45, 0];
    ip.extend(((20 + l4.len()) as u16).to_be_bytes());
    ip.extend([0x12, 0x34, 0x40, 0, 64, proto::TCP, 0, 0]);
    ip.extend(src.0.octets());
    ip.extend(dst.0.octets());
    let c = fold(sum(&ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut frame = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00];
    frame.extend(ip);
    frame.extend(l4);
    frame
}

/// N services like a cluster's: a ClusterIP each, two endpoints each, a NodePort for the
/// last min(N, 2000); the measured one (a NodePort) is the last.
fn services(n: usize) -> DesiredMaps {
    let mut d = DesiredMaps::default();
    d.node_addresses.insert(NODE_IP);
    for i in 0..n {
        let addr = |j: usize| Ipv4Addr::new(10, 128 + (j >> 16) as u8, (j >> 8) as u8, j as u8);
        let backends = (0..2)
            .map(|b| DesiredBackend {
                addr: addr(2 * i + b),
                port: 8080,
                state: backend_state::ACTIVE,
                local: true,
            })
            .collect();
        let cluster_ip = Ipv4Addr::new(10, 96 + (i >> 16) as u8, (i >> 8) as u8, i as u8);
        let frontend = |addr, port, scope, kind| DesiredFrontend {
            addr,
            port,
            scope,
            kind,
            local_policy: false,
            filter_sources: false,
            dsr: false,
            selection: vec![0, 1],
        };
        let mut frontends = vec![frontend(cluster_ip, 80, scope::INTERNAL, kind::CLUSTER_IP)];
        if i + NODE_PORTS.min(n) >= n {
            let port = 30000 + (i + NODE_PORTS.min(n) - n) as u16;
            for s in [scope::EXTERNAL, scope::INTERNAL] {
                frontends.push(frontend(Ipv4Addr::UNSPECIFIED, port, s, kind::NODE_PORT));
            }
        }
        d.services.insert(
            ServicePortId {
                namespace: "bench".into(),
                name: format!("svc-{i:05}"),
                port_name: "http".into(),
                protocol: proto::TCP,
            },
            DesiredService {
                backends,
                frontends,
                affinity_timeout: None,
                source_ranges: Vec::new(),
            },
        );
        d.cluster_ips.insert(cluster_ip);
    }
    d
}

/// The programs with N services, pinned in a directory of their own.
struct Loaded {
    ebpf: Ebpf,
    pins: PathBuf,
    measured_port: u16,
}

impl Drop for Loaded {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.pins);
    }
}

fn load(object: &Path, n: usize) -> Result<Loaded> {
    let pins = PathBuf::from("/sys/fs/bpf").join(format!("lb-bench-{}-{n}", std::process::id()));
    fs::create_dir_all(&pins).context("a pin directory (is bpffs mounted?)")?;
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(&pins)
        .load_file(object)
        .context("load the eBPF object")?;
    let xdp: &mut Xdp = ebpf.program_mut("lb_xdp").context("lb_xdp")?.try_into()?;
    xdp.load()?;
    let mut syncer = Syncer::recover(AyaMaps::from_ebpf(&mut ebpf)?, Config::default())?;
    let report = syncer.apply(&services(n));
    if !report.errors.is_empty() {
        bail!("programming {n} services: {:?}", &report.errors[..1]);
    }
    let measured_port = 30000 + NODE_PORTS.min(n) as u16 - 1;
    Ok(Loaded {
        ebpf,
        pins,
        measured_port,
    })
}

impl Loaded {
    /// One run of lb_xdp on `frame`: the kernel's duration in ns.
    fn run(&self, frame: &[u8]) -> Result<u64> {
        let mut out = vec![0u8; frame.len() + 256];
        let prog = self.ebpf.program("lb_xdp").context("lb_xdp")?;
        let aya::programs::Program::Xdp(p) = prog else {
            bail!("lb_xdp is not XDP");
        };
        let r = p.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat: 1,
            ..Default::default()
        })?;
        Ok(r.duration.as_nanos() as u64)
    }
}

/// `BPF_PROG_LOAD` and `BPF_PROG_TEST_RUN` by hand for an XDP program of two instructions
/// (`r0 = XDP_PASS; exit`): the floor every path is measured against.
struct EmptyXdp(OwnedFd);

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    _rest: [u64; 12],
}

#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    _rest: [u64; 10],
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_TYPE_XDP: u32 = 6;

fn bpf(cmd: libc::c_long, attr: *mut c_void, size: usize) -> libc::c_long {
    // SAFETY: attr points at a live, zero-padded attribute struct of `size` bytes.
    unsafe { libc::syscall(libc::SYS_bpf, cmd, attr, size) }
}

impl EmptyXdp {
    fn load() -> Result<Self> {
        // mov64 r0, 2 (XDP_PASS); exit
        let insns: [u64; 2] = [
            u64::from_le_bytes([0xb7, 0, 0, 0, 2, 0, 0, 0]),
            u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
        ];
        let license = b"GPL\0";
        let mut attr = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_XDP,
            insn_cnt: 2,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            ..Default::default()
        };
        let fd = bpf(
            BPF_PROG_LOAD,
            &mut attr as *mut _ as *mut c_void,
            std::mem::size_of::<ProgLoadAttr>(),
        );
        if fd < 0 {
            bail!(
                "load the empty XDP program: {}",
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: a new fd the kernel handed us.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
    }

    fn run(&self, frame: &[u8]) -> Result<u64> {
        let mut out = vec![0u8; frame.len() + 256];
        let mut attr = TestRunAttr {
            prog_fd: self.0.as_raw_fd() as u32,
            data_size_in: frame.len() as u32,
            data_size_out: out.len() as u32,
            data_in: frame.as_ptr() as u64,
            data_out: out.as_mut_ptr() as u64,
            repeat: 1,
            ..Default::default()
        };
        let rc = bpf(
            BPF_PROG_TEST_RUN,
            &mut attr as *mut _ as *mut c_void,
            std::mem::size_of::<TestRunAttr>(),
        );
        if rc < 0 {
            bail!("test run: {}", std::io::Error::last_os_error());
        }
        Ok(attr.duration as u64)
    }
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

/// Medians of one trial, by path.
fn trial(empty: &EmptyXdp, dp: &Loaded, trial_nr: usize) -> Result<BTreeMap<&'static str, u64>> {
    let np = (NODE_IP, dp.measured_port);
    let pass = tcp((CLIENT, 40000), (OTHER, 80), 0x10);
    let mut samples: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    // An established flow: its SYN first, then ACKs on the same tuple.
    dp.run(&tcp((CLIENT, 40000), np, 0x02))?;
    let ack = tcp((CLIENT, 40000), np, 0x10);
    for s in 0..SAMPLES {
        samples
            .entry("empty_xdp")
            .or_default()
            .push(empty.run(&pass)?);
        samples
            .entry("pass_through")
            .or_default()
            .push(dp.run(&pass)?);
        samples
            .entry("established")
            .or_default()
            .push(dp.run(&ack)?);
        // A client address and port never seen before: a conntrack miss and a Maglev pick.
        let j = trial_nr * SAMPLES + s;
        let client = Ipv4Addr::new(100, 64 + (j >> 16) as u8, (j >> 8) as u8, j as u8);
        let syn = tcp((client, 1024 + (j % 60000) as u16), np, 0x02);
        samples.entry("new_flow").or_default().push(dp.run(&syn)?);
    }
    Ok(samples.into_iter().map(|(k, v)| (k, median(v))).collect())
}

pub fn run(object: &Path) -> Result<()> {
    let empty = EmptyXdp::load()?;
    let mut loaded = Vec::new();
    for n in SIZES {
        let t = std::time::Instant::now();
        loaded.push(load(object, n)?);
        println!("programmed {n} services in {:?}", t.elapsed());
    }
    // medians[n][path] = the per-trial medians.
    let mut medians: BTreeMap<usize, BTreeMap<&str, Vec<u64>>> = BTreeMap::new();
    for t in 0..TRIALS {
        for (n, dp) in SIZES.iter().zip(&loaded) {
            for (path, m) in trial(&empty, dp, t)? {
                medians
                    .entry(*n)
                    .or_default()
                    .entry(path)
                    .or_default()
                    .push(m);
            }
        }
        println!("trial {} of {TRIALS} done", t + 1);
    }
    drop(loaded);
    write_results(&medians)
}

fn write_results(medians: &BTreeMap<usize, BTreeMap<&str, Vec<u64>>>) -> Result<()> {
    let stat = |v: &Vec<u64>| (*v.iter().min().unwrap(), median(v.clone()));
    let mut json = serde_json::Map::new();
    let mut md = String::from(
        "Per-packet cost of `lb_xdp` (BPF_PROG_TEST_RUN, one run per sample, kernel-reported \
         ns; the median of 4000 samples per trial, then the minimum and median over 5 \
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
    let (small, large) = (&medians[&SIZES[0]], &medians[&SIZES[3]]);
    md.push_str("\nChange from 10 to 50,000 services (median above floor): ");
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
    let dir = crate::root().join("bench/results");
    fs::create_dir_all(&dir)?;
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let doc = serde_json::json!({"kernel": kernel.trim(), "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0), "per_packet": json});
    fs::write(
        dir.join("per-packet.json"),
        serde_json::to_string_pretty(&doc)?,
    )?;
    fs::write(dir.join("per-packet.md"), &md)?;
    println!("\n{md}\nwritten to {}", dir.display());
    Ok(())
}
