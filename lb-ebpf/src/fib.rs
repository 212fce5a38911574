//! Sending a translated packet to another node straight from XDP: the kernel's FIB names
//! the next hop and its MAC, the TTL goes down by one as in any router, and the frame
//! leaves by XDP_TX (or a redirect to another interface). When the next hop's neighbour
//! entry is not resolved yet, the packet is handed to the uplink's TC ingress with a mark
//! in the XDP metadata, and TC sends it with `bpf_redirect_neigh`, which resolves it: the
//! stack itself would drop a frame that arrives carrying the node's own source address.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup, xdp_action, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK,
    },
    helpers::{
        bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_xdp_adjust_meta,
    },
    programs::{TcContext, XdpContext},
};
use lb_common::stats::drop_reason;

use crate::{
    csum,
    parse::{ptr_at, Flow},
    stats::count_drop,
};

const AF_INET: u8 = 2;
/// `BPF_FIB_LKUP_RET_FRAG_NEEDED` (uapi/linux/bpf.h), which the BPF-target bindings lack.
const FIB_FRAG_NEEDED: u32 = 8;
/// Marks a packet, in the XDP metadata, whose next hop TC must resolve ("LBNH").
const NEIGH_MARK: u32 = 0x4c42_4e48;

/// The metadata XDP leaves for TC.
#[repr(C)]
struct NeighMeta {
    mark: u32,
    ifindex: u32,
}

/// Decrements the TTL with an incremental checksum update; None when it has run out.
#[inline(always)]
fn decrement_ttl(data: usize, data_end: usize, l3: usize) -> Option<()> {
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
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let tot_len: *const u16 = ptr_at(data, data_end, flow.l3_off + 2)?;
    let tos: *const u8 = ptr_at(data, data_end, flow.l3_off + 1)?;
    let src: *const u32 = ptr_at(data, data_end, flow.l3_off + 12)?;
    let dst: *const u32 = ptr_at(data, data_end, flow.l3_off + 16)?;
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    unsafe {
        p.family = AF_INET;
        p.l4_protocol = flow.proto;
        p.__bindgen_anon_1.tot_len = u16::from_be(tot_len.read_unaligned());
        p.__bindgen_anon_2.tos = *tos;
        p.__bindgen_anon_3.ipv4_src = src.read_unaligned();
        p.__bindgen_anon_4.ipv4_dst = dst.read_unaligned();
        p.ifindex = (*ctx.ctx).ingress_ifindex;
    }
    let rc = unsafe {
        fib_lookup(
            ctx.ctx as *mut _,
            &mut p,
            size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    Some((rc as u32, p))
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
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH {
        return pass_to_tc(ctx, p.ifindex);
    }
    let Some(eth) = ptr_at::<[u8; 12]>(ctx.data(), ctx.data_end(), 0) else {
        count_drop(drop_reason::MALFORMED);
        return xdp_action::XDP_DROP;
    };
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&p.dmac);
    macs[6..].copy_from_slice(&p.smac);
    unsafe { eth.write_unaligned(macs) };
    if p.ifindex == unsafe { (*ctx.ctx).ingress_ifindex } {
        xdp_action::XDP_TX
    } else {
        unsafe { bpf_redirect(p.ifindex, 0) as u32 }
    }
}

#[inline(always)]
fn pass_to_tc(ctx: &XdpContext, ifindex: u32) -> u32 {
    let room = size_of::<NeighMeta>() as i32;
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, -room) } != 0 {
        count_drop(drop_reason::NO_ROUTE);
        return xdp_action::XDP_DROP;
    }
    let (meta, data) = (ctx.metadata(), ctx.data());
    let Some(m) = ptr_at::<NeighMeta>(meta, data, 0) else {
        count_drop(drop_reason::NO_ROUTE);
        return xdp_action::XDP_DROP;
    };
    unsafe {
        (*m).mark = NEIGH_MARK;
        (*m).ifindex = ifindex;
    }
    xdp_action::XDP_PASS
}

/// TC ingress on an uplink: sends on the packets XDP marked, resolving the next hop.
#[inline(always)]
pub fn tc_send_marked(ctx: &TcContext) -> i32 {
    let skb = ctx.skb.skb;
    let (meta, data) = unsafe { ((*skb).data_meta as usize, (*skb).data as usize) };
    let Some(m) = ptr_at::<NeighMeta>(meta, data, 0) else {
        return TC_ACT_OK as i32;
    };
    let m = unsafe { &*m };
    if m.mark != NEIGH_MARK {
        return TC_ACT_OK as i32;
    }
    unsafe { bpf_redirect_neigh(m.ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}
