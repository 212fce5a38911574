//! Per-CPU counters: packets and bytes per service and per verdict, drops per reason and
//! per service.

use lb_common::Counter;

use crate::maps::{DROP_STATS, SVC_DROPS, SVC_STATS, VERDICT_STATS};

#[inline(always)]
fn add(counter: Option<*mut Counter>, bytes: u64) {
    if let Some(c) = counter {
        // Per-CPU slots: no other writer races this one.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}

#[inline(always)]
pub fn count_verdict(verdict: u32, bytes: u64) {
    add(VERDICT_STATS.get_ptr_mut(verdict), bytes);
}

#[inline(always)]
pub fn count_service(id: u32, bytes: u64) {
    add(SVC_STATS.get_ptr_mut(id), bytes);
}

/// A dropped packet of service `id`, counted beside its reason (`count_drop`) wherever the
/// drop happens after the service was known.
#[inline(always)]
pub fn count_service_drop(id: u32) {
    if let Some(c) = SVC_DROPS.get_ptr_mut(id) {
        unsafe { *c += 1 };
    }
}

#[inline(always)]
pub fn count_drop(reason: u32) {
    if let Some(c) = DROP_STATS.get_ptr_mut(reason) {
        unsafe { *c += 1 };
    }
}
