//! BPF_MAP_UPDATE_BATCH, which aya 0.14 does not wrap: one syscall writes many entries,
//! where a first sync otherwise spends a syscall on each of hundreds of thousands. Hash
//! maps have it since Linux 5.6, per-CPU arrays only since later kernels (not 5.10): the
//! callers fall back to one update per entry where the kernel says it has none.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use aya::{
    maps::{HashMap, IterableMap, MapData},
    Pod,
};

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

/// A batch update that stopped at entry `written`, the entries before it written.
#[derive(Debug)]
pub struct Stopped {
    pub written: usize,
    pub error: std::io::Error,
}

impl Stopped {
    /// The kernel has no batch update for this map type (ENOTSUPP) or none at all (EINVAL,
    /// before 5.6): the entries must go one by one.
    pub fn unsupported(&self) -> bool {
        matches!(self.error.raw_os_error(), Some(ENOTSUPP | libc::EINVAL))
    }
}

/// Writes `count` entries in order, as that many single updates would, stopping at the
/// first that fails.
///
/// # Safety
///
/// `keys` and `values` must point at `count` keys and `count` values laid out as the map
/// of `fd` reads them: its key size apart, and its value size apart (per-CPU maps: a value
/// per possible CPU, each rounded up to 8 bytes).
pub unsafe fn update_raw(
    fd: BorrowedFd<'_>,
    keys: *const u8,
    values: *const u8,
    count: usize,
) -> Result<(), Stopped> {
    let mut attr = BatchAttr {
        keys: keys as u64,
        values: values as u64,
        count: count as u32,
        map_fd: fd.as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: attr is a valid bpf_attr prefix; the caller vouches for keys and values.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_UPDATE_BATCH,
            &mut attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>(),
        )
    };
    if rc < 0 {
        // The kernel reports in `count` how many entries it wrote before the failure, and
        // leaves it as given when it failed before trying any.
        let written = attr.count as usize;
        return Err(Stopped {
            error: std::io::Error::last_os_error(),
            written: if written < count { written } else { 0 },
        });
    }
    Ok(())
}

/// Writes `entries` into a hash map in one batch, in order, stopping at the first that
/// fails.
pub fn update<K: Pod, V: Pod>(
    map: &HashMap<MapData, K, V>,
    entries: &[(K, V)],
) -> Result<(), Stopped> {
    if entries.is_empty() {
        return Ok(());
    }
    let keys: Vec<K> = entries.iter().map(|(k, _)| *k).collect();
    let values: Vec<V> = entries.iter().map(|(_, v)| *v).collect();
    // SAFETY: aya checked that K and V have the map's key and value sizes, so the slices
    // hold `entries.len()` of each at the strides the kernel reads them at.
    unsafe {
        update_raw(
            map.map().fd().as_fd(),
            keys.as_ptr().cast(),
            values.as_ptr().cast(),
            entries.len(),
        )
    }
}
