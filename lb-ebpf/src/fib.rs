//! Sending a translated packet to another node straight from XDP: the kernel's FIB names
//! the next hop and its MAC, the TTL goes down by one as in any router, and the frame
//! leaves by XDP_TX (or a redirect to another interface). When the next hop's neighbour
//! entry is not resolved yet, XDP passes the packet up after noting it in NEIGH_PENDING,
//! and the uplink's TC ingress sends it with `bpf_redirect_neigh`, which resolves it: the
//! stack itself would drop a frame that arrives carrying the node's own source address.
//! A map rather than the XDP metadata carries the note, since some kernels refuse
//! `bpf_xdp_adjust_meta` to XDP programs. Every packet XDP passes up reaches that TC
//! program, and notes are rare (a next hop's first packets), so XDP also records when it
//! last wrote one and TC looks for notes only for a while after that.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup, xdp_action, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::{TcContext, XdpContext},
};
use lb_common::{stats::drop_reason, FragKey};

use crate::{
    clock, csum,
    maps::{NEIGH_NOTED, NEIGH_PENDING},
    parse::{ptr_at, Flow},
    stats::count_drop,
};

const AF_INET: u8 = 2;
/// `BPF_FIB_LKUP_RET_FRAG_NEEDED` (uapi/linux/bpf.h), which the BPF-target bindings lack.
const FIB_FRAG_NEEDED: u32 = 8;
/// How long after XDP's last note TC still looks for notes. A noted packet reaches TC
/// ingress in the same softirq, or from a backlog queue shortly after; this leaves a wide
/// margin for that and for the per-CPU clock readings being a tick apart.
const NOTE_WINDOW_NS: u64 = 1_000_000_000;
/// Decrements the TTL with an incremental checksum update; None when it has run out.
#[inline(always)]
pub fn decrement_ttl(data: usize, data_end: usize, l3: usize) -> Option<()> {
    let word: *mut [u8; 2] = ptr_at(data, data_end, l3 + 8)?;
    let check: *mut u16 = ptr_at(data, data_end, l3 + 10)?;
    unsafe {
        let old = *word;
        if old[0] <= 1 {
            return None;
        }
        let new = [old[0] - 1, old[1]];
        *word = new;
        let c = check.read_unaligned();
        check.write_unaligned(csum::update16(
            c,
            u16::from_ne_bytes(old),
            u16::from_ne_bytes(new),
        ));
    }
    Some(())
}

/// Where the FIB sends the (already translated) packet: the lookup's result code and
/// its parameters, holding the egress interface and MACs.
#[inline(always)]
pub fn lookup(ctx: &XdpContext, flow: &Flow) -> Option<(u32, bpf_fib_lookup)> {
    let ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    lookup_in(
        ctx.ctx.cast(),
        ctx.data(),
        ctx.data_end(),
        flow,
        ifindex,
        true,
    )
}

/// [`lookup`] from TC. The packet's length is left for the kernel to check, which knows
/// how a GSO packet will be cut.
#[inline(always)]
pub fn tc_lookup(ctx: &TcContext, flow: &Flow) -> Option<(u32, bpf_fib_lookup)> {
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    lookup_in(
        ctx.skb.skb.cast(),
        ctx.data(),
        ctx.data_end(),
        flow,
        ifindex,
        false,
    )
}

#[inline(always)]
fn lookup_in(
    ctx: *mut core::ffi::c_void,
    data: usize,
    data_end: usize,
    flow: &Flow,
    ifindex: u32,
    with_len: bool,
) -> Option<(u32, bpf_fib_lookup)> {
    let tot_len: *const u16 = ptr_at(data, data_end, flow.l3_off + 2)?;
    let tos: *const u8 = ptr_at(data, data_end, flow.l3_off + 1)?;
    let src: *const u32 = ptr_at(data, data_end, flow.l3_off + 12)?;
    let dst: *const u32 = ptr_at(data, data_end, flow.l3_off + 16)?;
    // Filled in place: a zeroed value built and moved would be zeroed with a memset call.
    let mut p = core::mem::MaybeUninit::<bpf_fib_lookup>::uninit();
    let pp = p.as_mut_ptr();
    let rc = unsafe {
        crate::bytes::zero(pp);
        (*pp).family = AF_INET;
        (*pp).l4_protocol = flow.proto;
        if with_len {
            (*pp).__bindgen_anon_1.tot_len = u16::from_be(tot_len.read_unaligned());
        }
        (*pp).__bindgen_anon_2.tos = *tos;
        (*pp).__bindgen_anon_3.ipv4_src = src.read_unaligned();
        (*pp).__bindgen_anon_4.ipv4_dst = dst.read_unaligned();
        (*pp).ifindex = ifindex;
        fib_lookup(ctx, pp, size_of::<bpf_fib_lookup>() as i32, 0)
    };
    Some((rc as u32, unsafe { p.assume_init() }))
}

/// Sets the frame's MACs to the ones the FIB named.
#[inline(always)]
pub fn set_macs(data: usize, data_end: usize, p: &bpf_fib_lookup) -> Option<()> {
    let eth = ptr_at::<[u8; 12]>(data, data_end, 0)?;
    unsafe {
        crate::bytes::copy::<6>(eth.cast(), p.dmac.as_ptr());
        crate::bytes::copy::<6>(eth.cast::<u8>().add(6), p.smac.as_ptr());
    }
    Some(())
}

/// Sends a translated packet on from XDP; the XDP action.
#[inline(always)]
pub fn xdp_send(ctx: &XdpContext, flow: &Flow) -> u32 {
    let Some((rc, p)) = lookup(ctx, flow) else {
        count_drop(drop_reason::MALFORMED);
        return xdp_action::XDP_DROP;
    };
    if rc == FIB_FRAG_NEEDED {
        count_drop(drop_reason::MTU_EXCEEDED);
        return xdp_action::XDP_DROP;
    }
    let ok = rc == BPF_FIB_LKUP_RET_SUCCESS || rc == BPF_FIB_LKUP_RET_NO_NEIGH;
    if !ok || decrement_ttl(ctx.data(), ctx.data_end(), flow.l3_off).is_none() {
        count_drop(drop_reason::NO_ROUTE);
        return xdp_action::XDP_DROP;
    }
    xdp_out(ctx, flow, rc, &p).unwrap_or_else(|| {
        count_drop(drop_reason::MALFORMED);
        xdp_action::XDP_DROP
    })
}

/// Sends a routed packet (its TTL already lowered) to the next hop of FIB answer `p`
/// (`rc` a success or no neighbour yet): by TC when the neighbour must be resolved, else
/// with the FIB's MACs back out (XDP_TX) or to another interface. None when the frame is
/// too short for the MACs.
#[inline(always)]
pub fn xdp_out(ctx: &XdpContext, flow: &Flow, rc: u32, p: &bpf_fib_lookup) -> Option<u32> {
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH {
        return Some(pass_to_tc(ctx, flow, p.ifindex));
    }
    set_macs(ctx.data(), ctx.data_end(), p)?;
    Some(if p.ifindex == unsafe { (*ctx.ctx).ingress_ifindex } {
        xdp_action::XDP_TX
    } else {
        unsafe { bpf_redirect(p.ifindex, 0) as u32 }
    })
}

/// The datagram's identity as its IPv4 header says it now, after translation.
#[inline(always)]
fn datagram(data: usize, data_end: usize, l3: usize) -> Option<FragKey> {
    let ip: *const [u8; 20] = ptr_at(data, data_end, l3)?;
    let ip = unsafe { &*ip };
    Some(FragKey::new(
        u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]),
        u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]),
        u16::from_ne_bytes([ip[4], ip[5]]),
        ip[9],
    ))
}

#[inline(always)]
fn pass_to_tc(ctx: &XdpContext, flow: &Flow, ifindex: u32) -> u32 {
    let noted = datagram(ctx.data(), ctx.data_end(), flow.l3_off)
        .is_some_and(|key| NEIGH_PENDING.insert(&key, &ifindex, 0).is_ok());
    if !noted {
        count_drop(drop_reason::NO_ROUTE);
        return xdp_action::XDP_DROP;
    }
    if let Some(t) = NEIGH_NOTED.get_ptr_mut(0) {
        unsafe { *t = clock::now() };
    }
    xdp_action::XDP_PASS
}

/// Has XDP noted a packet in NEIGH_PENDING recently enough for it to be on its way to TC?
#[inline(always)]
pub fn notes_pending() -> bool {
    match NEIGH_NOTED.get(0) {
        Some(&t) => t != 0 && clock::now().saturating_sub(t) <= NOTE_WINDOW_NS,
        None => true,
    }
}

/// TC ingress on an uplink: sends on the packets XDP passed up, resolving the next hop.
/// Everything else goes to the stack untouched.
#[inline(always)]
pub fn tc_send_pending(ctx: &TcContext, flow: &Flow) -> i32 {
    let Some(key) = datagram(ctx.data(), ctx.data_end(), flow.l3_off) else {
        return TC_ACT_OK as i32;
    };
    let Some(ifindex) = (unsafe { NEIGH_PENDING.get(&key) }).copied() else {
        return TC_ACT_OK as i32;
    };
    let _ = NEIGH_PENDING.remove(&key);
    unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}
