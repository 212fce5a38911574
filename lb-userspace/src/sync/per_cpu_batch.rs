//! Zeroing the per-CPU counters of many ids in one BPF_MAP_UPDATE_BATCH, which aya 0.14
//! does not wrap: a first sync hands out tens of thousands of service ids, and one update
//! per id and map is a syscall each. Kernels whose per-CPU arrays have no batch operations
//! (5.10 among them) get the updates one by one.

use std::os::fd::{AsFd, AsRawFd};

use aya::maps::{IterableMap, MapData, PerCpuArray, PerCpuValues};

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
/// The kernel's ENOTSUPP: the map type has no batch operations.
const ENOTSUPP: i32 = 524;

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
pub fn zero<V: aya::Pod + Default>(
    map: &mut PerCpuArray<MapData, V>,
    ids: &[u32],
) -> std::io::Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    match zero_batch(map, ids) {
        // EINVAL: a kernel without the command at all.
        Err(e) if matches!(e.raw_os_error(), Some(ENOTSUPP | libc::EINVAL)) => zero_each(map, ids),
        r => r,
    }
}

fn zero_each<V: aya::Pod + Default>(
    map: &mut PerCpuArray<MapData, V>,
    ids: &[u32],
) -> std::io::Result<()> {
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
    for id in ids {
        let zeros = PerCpuValues::try_from(vec![V::default(); cpus])?;
        map.set(*id, zeros, 0).map_err(std::io::Error::other)?;
    }
    Ok(())
}

fn zero_batch<V: aya::Pod>(map: &PerCpuArray<MapData, V>, ids: &[u32]) -> std::io::Result<()> {
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
