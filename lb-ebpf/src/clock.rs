//! The time conntrack, affinity and SNAT entries are stamped and aged with, on the scale of
//! `bpf_ktime_get_ns` (CLOCK_MONOTONIC, as the agent reads it).
//!
//! Reading the clock source on every packet costs more than the rest of an established
//! flow's work where the TSC read traps to a hypervisor, and lifetimes are seconds to
//! hours: each CPU keeps the time it read at its first packet of the current jiffy and
//! hands that out until the next one. The result is at most one tick old and never ahead
//! of the clock. `bpf_jiffies64` is inlined by the verifier; `bpf_ktime_get_coarse_ns`
//! would do the same job but needs 5.11.

use aya_ebpf::helpers::{bpf_jiffies64, bpf_ktime_get_ns};

use crate::maps::CLOCK;

/// The last clock reading of one CPU and the jiffy it was taken in.
#[repr(C)]
pub struct Reading {
    jiffies: u64,
    ns: u64,
}

#[inline(always)]
pub fn now() -> u64 {
    let jiffies = unsafe { bpf_jiffies64() };
    let Some(r) = CLOCK.get_ptr_mut(0) else {
        return unsafe { bpf_ktime_get_ns() };
    };
    unsafe {
        if core::ptr::read_volatile(&(*r).jiffies) == jiffies {
            return core::ptr::read_volatile(&(*r).ns);
        }
        let ns = bpf_ktime_get_ns();
        // The time before its jiffy: a program that interrupts this one on the same CPU
        // (a socket hook runs in process context) then finds either the old jiffy, which
        // no longer matches, or the new one with its time.
        core::ptr::write_volatile(&mut (*r).ns, ns);
        core::ptr::write_volatile(&mut (*r).jiffies, jiffies);
        ns
    }
}
