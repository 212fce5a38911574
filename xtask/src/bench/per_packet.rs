//! The data plane's cost per packet, measured with BPF_PROG_TEST_RUN on the real XDP
//! program with N services programmed by the real syncer, against an empty XDP program
//! timed the same way in the same run. One run per sample (with `repeat > 1` the kernel
//! would rerun the program on the buffer it already rewrote, so the path named would not
//! be the one timed), kernel-reported duration, median of thousands.

use std::{
    collections::BTreeMap,
    ffi::c_void,
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use anyhow::{bail, Context, Result};
use aya::programs::{TestRun, TestRunOptions};
use lb_common::proto;

use super::{control_plane::Loaded, workload};

const SAMPLES: usize = 4_000;
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const OTHER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 99);

/// The paths timed, in report order.
pub const PATHS: [&str; 4] = ["empty_xdp", "pass_through", "established", "new_flow"];

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
pub struct EmptyXdp(OwnedFd);

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
    pub fn load() -> Result<Self> {
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

pub fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

/// Medians of one trial, by path.
pub fn trial(
    empty: &EmptyXdp,
    dp: &Loaded,
    n: usize,
    trial_nr: usize,
) -> Result<BTreeMap<&'static str, u64>> {
    let np = (workload::NODE_IP, workload::measured_node_port(n));
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
