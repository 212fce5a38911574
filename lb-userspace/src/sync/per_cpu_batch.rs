//! Zeroing the per-CPU counters of many ids in one BPF_MAP_UPDATE_BATCH (Linux 5.6),
//! which aya 0.14 does not wrap: a first sync hands out tens of thousands of service ids,
//! and one update per id and map was a syscall each.

use std::os::fd::{AsFd, AsRawFd};

use aya::maps::{IterableMap, MapData, PerCpuArray};

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// The batch part of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Writes zero counters for `ids` on every CPU.
pub fn zero<V: aya::Pod>(map: &PerCpuArray<MapData, V>, ids: &[u32]) -> std::io::Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
    let stride = std::mem::size_of::<V>().div_ceil(8) * 8;
    let values = vec![0u8; ids.len() * cpus * stride];
    let mut attr = BatchAttr {
        keys: ids.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: ids.len() as u32,
        map_fd: map.map().fd().as_fd().as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: attr points at keys and values that live until the call returns; the kernel
    // reads at most `count` of each.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_UPDATE_BATCH,
            &mut attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
