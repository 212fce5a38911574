//! MAGLEV through a shared mapping of the map (BPF_F_MMAPABLE): a table of hundreds of
//! slots is a few hundred plain stores instead of one bpf syscall per slot.

use std::{
    ptr::NonNull,
    sync::atomic::{fence, Ordering},
};

use anyhow::{bail, Context};
use aya::maps::{Map, MapData};
use lb_common::maps;
use std::os::fd::{AsFd, AsRawFd};

use super::MapError;

const SLOT: usize = std::mem::size_of::<u32>();
const STRIDE: usize = maps::array_stride(SLOT);

pub struct MaglevMap {
    /// Owns the descriptor the mapping was made from.
    _map: MapData,
    base: NonNull<u8>,
    bytes: usize,
    slots: u32,
}

// SAFETY: the mapping is owned by this value alone and lives until it is dropped; the
// kernel side only reads it.
unsafe impl Send for MaglevMap {}

impl MaglevMap {
    pub fn new(map: Map) -> anyhow::Result<Self> {
        let Map::Array(data) = map else {
            bail!("{} is not an array", maps::MAGLEV);
        };
        let info = data.info().context("MAGLEV info")?;
        if info.value_size() as usize != SLOT {
            bail!("{} holds {}-byte values", maps::MAGLEV, info.value_size());
        }
        if info.map_flags() & maps::MMAPABLE == 0 {
            bail!(
                "{} was created without BPF_F_MMAPABLE (by an agent of an older map layout)",
                maps::MAGLEV
            );
        }
        let slots = info.max_entries();
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })?;
        let bytes = (slots as usize * STRIDE).div_ceil(page) * page;
        let fd = data.fd().as_fd().as_raw_fd();
        // SAFETY: a fresh shared mapping of the map's fd; the kernel checks the length
        // against the map's size.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mmap MAGLEV");
        }
        let base = NonNull::new(ptr.cast()).context("mmap MAGLEV returned null")?;
        Ok(Self {
            _map: data,
            base,
            bytes,
            slots,
        })
    }

    fn slot_ptr(&self, offset: u32, len: usize) -> Result<*mut u32, MapError> {
        let end = u64::from(offset) + len as u64;
        if end > u64::from(self.slots) {
            return Err(MapError::Full(maps::MAGLEV));
        }
        // SAFETY: offset is within the mapping (checked above).
        Ok(unsafe { self.base.as_ptr().add(offset as usize * STRIDE) }.cast())
    }

    pub fn read(&self, offset: u32, len: u32) -> Result<Vec<u32>, MapError> {
        let p = self.slot_ptr(offset, len as usize)?;
        Ok((0..len as usize)
            // SAFETY: slots offset..offset+len lie in the mapping, 8-byte aligned.
            .map(|i| unsafe { p.byte_add(i * STRIDE).read_volatile() })
            .collect())
    }

    /// Writes `ids` from `offset` on. The fence orders these stores before the update that
    /// makes a service entry point at them.
    pub fn write(&mut self, offset: u32, ids: &[u32]) -> Result<(), MapError> {
        let p = self.slot_ptr(offset, ids.len())?;
        for (i, id) in ids.iter().enumerate() {
            // SAFETY: as in `read`.
            unsafe { p.byte_add(i * STRIDE).write_volatile(*id) };
        }
        fence(Ordering::SeqCst);
        Ok(())
    }
}

impl Drop for MaglevMap {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.bytes) };
    }
}
