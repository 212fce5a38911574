//! Array maps made with BPF_F_MMAPABLE, written through a shared mapping: a Maglev table of
//! hundreds of slots, or a frontend-filter word, is a few plain stores instead of one bpf
//! syscall per element.

use std::{
    marker::PhantomData,
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
    sync::atomic::{fence, Ordering},
};

use anyhow::{bail, Context};
use aya::maps::{Map, MapData};
use lb_common::maps;

use super::MapError;

/// Values of an mmapable array: u32 (MAGLEV, SVC_GEN) or u64 (FRONT_FILTER), stored as the
/// kernel lays them out, `maps::array_stride` bytes apart.
pub struct MmapArray<T> {
    name: &'static str,
    /// Owns the descriptor the mapping was made from.
    _map: MapData,
    base: NonNull<u8>,
    bytes: usize,
    len: u32,
    _values: PhantomData<T>,
}

// SAFETY: the mapping is owned by this value alone and lives until it is dropped; the
// kernel side only reads it.
unsafe impl<T> Send for MmapArray<T> {}

impl<T: Copy> MmapArray<T> {
    const STRIDE: usize = maps::array_stride(std::mem::size_of::<T>());

    pub fn new(map: Map, name: &'static str) -> anyhow::Result<Self> {
        let Map::Array(data) = map else {
            bail!("{name} is not an array");
        };
        let info = data.info().with_context(|| format!("{name} info"))?;
        if info.value_size() as usize != std::mem::size_of::<T>() {
            bail!("{name} holds {}-byte values", info.value_size());
        }
        if info.map_flags() & maps::MMAPABLE == 0 {
            bail!("{name} was created without BPF_F_MMAPABLE (by an agent of an older map layout)");
        }
        let len = info.max_entries();
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })?;
        let bytes = (len as usize * Self::STRIDE).div_ceil(page) * page;
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
            return Err(std::io::Error::last_os_error()).with_context(|| format!("mmap {name}"));
        }
        let base =
            NonNull::new(ptr.cast()).with_context(|| format!("mmap {name} returned null"))?;
        Ok(Self {
            name,
            _map: data,
            base,
            bytes,
            len,
            _values: PhantomData,
        })
    }

    fn element_ptr(&self, offset: u32, len: usize) -> Result<*mut T, MapError> {
        let end = u64::from(offset) + len as u64;
        if end > u64::from(self.len) {
            return Err(MapError::Full(self.name));
        }
        // SAFETY: offset is within the mapping (checked above).
        Ok(unsafe { self.base.as_ptr().add(offset as usize * Self::STRIDE) }.cast())
    }

    pub fn read(&self, offset: u32, len: u32) -> Result<Vec<T>, MapError> {
        let p = self.element_ptr(offset, len as usize)?;
        Ok((0..len as usize)
            // SAFETY: elements offset..offset+len lie in the mapping, 8-byte aligned.
            .map(|i| unsafe { p.byte_add(i * Self::STRIDE).read_volatile() })
            .collect())
    }

    /// Writes `values` from `offset` on. The fence orders these stores before whatever
    /// update follows (the service entry that points at a Maglev table, for one).
    pub fn write(&mut self, offset: u32, values: &[T]) -> Result<(), MapError> {
        let p = self.element_ptr(offset, values.len())?;
        for (i, v) in values.iter().enumerate() {
            // SAFETY: as in `read`; aligned stores of at most 8 bytes are single-copy
            // atomic, so a program never reads half an element.
            unsafe { p.byte_add(i * Self::STRIDE).write_volatile(*v) };
        }
        fence(Ordering::SeqCst);
        Ok(())
    }
}

impl<T> Drop for MmapArray<T> {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.bytes) };
    }
}
