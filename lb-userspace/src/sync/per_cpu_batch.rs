//! Zeroing the per-CPU counters of many ids in one batch update: a first sync hands out
//! tens of thousands of service ids, and one update per id and map is a syscall each.
//! Kernels whose per-CPU arrays have no batch operations (5.10 among them) get the updates
//! one by one.

use std::os::fd::AsFd;

use aya::maps::{IterableMap, MapData, PerCpuArray, PerCpuValues};

use super::map_batch;

/// Writes zero counters for `ids` on every CPU.
pub fn zero<V: aya::Pod + Default>(
    map: &mut PerCpuArray<MapData, V>,
    ids: &[u32],
) -> std::io::Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    match zero_batch(map, ids) {
        Err(stopped) if stopped.unsupported() => zero_each(map, &ids[stopped.written..]),
        r => r.map_err(|stopped| stopped.error),
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

fn zero_batch<V: aya::Pod>(
    map: &PerCpuArray<MapData, V>,
    ids: &[u32],
) -> Result<(), map_batch::Stopped> {
    let cpus =
        aya::util::nr_cpus().map_err(|(_, error)| map_batch::Stopped { written: 0, error })?;
    let stride = std::mem::size_of::<V>().div_ceil(8) * 8;
    let values = vec![0u8; ids.len() * cpus * stride];
    // SAFETY: u32 keys as the array's; a value per possible CPU for each, 8-byte strided.
    unsafe {
        map_batch::update_raw(
            map.map().fd().as_fd(),
            ids.as_ptr().cast(),
            values.as_ptr(),
            ids.len(),
        )
    }
}
