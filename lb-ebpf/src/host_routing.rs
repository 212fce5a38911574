//! Host routing (opt-in, CONFIG's `host_routing`): a flow between a backend on this node
//! and its client goes from one interface to the other by the programs, in both
//! directions, past the node's routing, netfilter and qdiscs, as Cilium's BPF host routing
//! does. Into a pod it goes by `bpf_redirect_peer` (TC) or a redirect to the pod's
//! host-side interface (generic XDP); out of the node by a redirect to the uplink; with
//! `bpf_redirect_neigh` while the neighbour is unresolved. The FIB names the interface and
//! the MACs, and the TTL goes down by one, as in the stack.
//!
//! Both directions of a flow must take the same way: the node's conntrack would call a
//! reply INVALID whose request it never saw. A flow is made direct only for a local
//! backend (ct_flags::DIRECT in both entries), and the first packet that cannot be routed
//! so clears the flag in both, after which the flow keeps to the stack.

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup, xdp_action, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK,
        TC_ACT_SHOT,
    },
    helpers::{bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer, bpf_skb_change_type},
    programs::{TcContext, XdpContext},
};
use lb_common::{
    ct_flags, ct_kind,
    host_routing::{PODS, UPLINKS},
    stats::drop_reason,
    stats::verdict,
};

use crate::{
    clock, conntrack, fib,
    maps::{CONFIG, POD_IFACES},
    nat::{End, Rewrite},
    parse::{ptr_at, Flow, ETH_HLEN},
    stats::{count_drop, count_service, count_service_drop, count_verdict},
};

/// Any of CONFIG's `host_routing` bits.
pub const ANY: u32 = PODS | UPLINKS;

/// Does CONFIG allow host routing for the hooks `bit` names?
#[inline(always)]
pub fn allowed(bit: u32) -> bool {
    CONFIG.get(0).is_some_and(|c| c.host_routing & bit != 0)
}

#[inline(always)]
fn is_pod_iface(ifindex: u32) -> bool {
    unsafe { POD_IFACES.get(&ifindex) }.is_some()
}

/// `PACKET_HOST` (linux/if_packet.h).
const PACKET_HOST: u32 = 0;

/// A FIB answer a direct route can use: a next hop, resolved or not.
#[inline(always)]
fn usable(rc: u32) -> bool {
    rc == BPF_FIB_LKUP_RET_SUCCESS || rc == BPF_FIB_LKUP_RET_NO_NEIGH
}

/// What every packet host routing sends must be: a whole datagram (later fragments would
/// take the stack), in an untagged frame (a VLAN tag would reach the pod), with a hop left.
#[inline(always)]
fn sendable(data: usize, data_end: usize, flow: &Flow) -> bool {
    flow.l3_off == ETH_HLEN
        && !flow.more_fragments
        && ptr_at::<[u8; 1]>(data, data_end, flow.l3_off + 8)
            .is_some_and(|t| unsafe { (*t)[0] > 1 })
}

/// [`sendable`] for an skb, whose VLAN tag the kernel keeps out of the frame.
#[inline(always)]
fn tc_sendable(ctx: &TcContext, flow: &Flow) -> bool {
    let untagged = unsafe { (*ctx.skb.skb).vlan_present == 0 };
    untagged && sendable(ctx.data(), ctx.data_end(), flow)
}

/// XDP: a direct flow's translated packet to its backend's pod interface. A packet that
/// cannot go so (the FIB sends it elsewhere or finds it too large, which a packet GRO
/// aggregated is; a fragment; host routing turned off by an agent restarted with other
/// flags) takes the flow back to the stack, in both directions.
#[inline(always)]
pub fn xdp_to_pod(ctx: &XdpContext, flow: &Flow, addr: u32, port: u16) -> u32 {
    if allowed(UPLINKS) && sendable(ctx.data(), ctx.data_end(), flow) {
        if let Some((rc, p)) = fib::lookup(ctx, flow) {
            if usable(rc) && is_pod_iface(p.ifindex) {
                // sendable() saw a hop left and an Ethernet header, so neither fails.
                let _ = fib::decrement_ttl(ctx.data(), ctx.data_end(), flow.l3_off);
                return fib::xdp_out(ctx, flow, rc, &p).unwrap_or(xdp_action::XDP_PASS);
            }
        }
    }
    conntrack::demote(flow, addr, port);
    xdp_action::XDP_PASS
}

/// TC ingress of a pod interface: a direct flow's translated packet to its backend's pod;
/// as [`xdp_to_pod`], a packet that cannot go so takes the flow back to the stack.
#[inline(always)]
pub fn tc_to_pod(ctx: &TcContext, flow: &Flow, addr: u32, port: u16) -> i32 {
    if allowed(PODS) && tc_sendable(ctx, flow) {
        if let Some((rc, p)) = fib::tc_lookup(ctx, flow) {
            if usable(rc) && is_pod_iface(p.ifindex) {
                return send(ctx, flow, rc, &p);
            }
        }
    }
    conntrack::demote(flow, addr, port);
    TC_ACT_OK
}

/// TC ingress of a pod interface: a local backend's reply on a direct flow, reverse-NATed
/// here and sent straight to its client. None leaves the packet to the usual way (the
/// stack, then the egress programs); a reply that cannot go straight takes its flow back
/// to the stack, in both directions.
#[inline(always)]
pub fn tc_reply(ctx: &TcContext, flow: &Flow, bytes: u64) -> Option<i32> {
    let entry = conntrack::entry(flow)?;
    let ct = unsafe { &*entry };
    if ct.kind != ct_kind::REPLY || ct.flags & ct_flags::DIRECT == 0 {
        return None;
    }
    // The reverse NAT leaves the destination, so the route can be known first.
    let route = match fib::tc_lookup(ctx, flow) {
        Some((rc, p)) if usable(rc) && tc_sendable(ctx, flow) => Some((rc, p)),
        _ => None,
    };
    let Some((rc, p)) = route else {
        conntrack::demote_reply(flow, ct.nat_addr, ct.nat_port);
        return None;
    };
    let client = (flow.dst, flow.dport);
    let (addr, port, service, _) = conntrack::reply_of(flow, entry, client, clock::now())?;
    if ctx.rewrite(flow, End::Src, addr, port).is_err() {
        count_drop(drop_reason::REWRITE_FAILED);
        count_service_drop(service);
        count_verdict(verdict::DROP, bytes);
        return Some(TC_ACT_SHOT);
    }
    count_service(service, bytes);
    count_verdict(verdict::REVERSE_NAT, bytes);
    Some(send(ctx, flow, rc, &p))
}

/// TC: an ICMP error about a direct flow, translated, to where its flow's packets go; to
/// the stack when it cannot go so.
#[inline(always)]
pub fn tc_route(ctx: &TcContext, flow: &Flow) -> i32 {
    if !tc_sendable(ctx, flow) {
        return TC_ACT_OK;
    }
    match fib::tc_lookup(ctx, flow) {
        Some((rc, p)) if usable(rc) => send(ctx, flow, rc, &p),
        _ => TC_ACT_OK,
    }
}

/// Sends a packet that passed [`tc_sendable`] where the FIB said: into a pod past its
/// host-side interface, or out of another interface; with neighbour resolution when the
/// FIB had no neighbour.
#[inline(always)]
fn send(ctx: &TcContext, flow: &Flow, rc: u32, p: &bpf_fib_lookup) -> i32 {
    // Both only fail on a packet shorter than sendable() read: not the case here.
    let _ = fib::decrement_ttl(ctx.data(), ctx.data_end(), flow.l3_off);
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH {
        return unsafe { bpf_redirect_neigh(p.ifindex, core::ptr::null_mut(), 0, 0) as i32 };
    }
    let _ = fib::set_macs(ctx.data(), ctx.data_end(), p);
    if is_pod_iface(p.ifindex) {
        // The frame was the host's; the pod takes it only as its own. The MACs say so
        // now, but the skb keeps the type it was received with.
        let _ = unsafe { bpf_skb_change_type(ctx.skb.skb, PACKET_HOST) };
        unsafe { bpf_redirect_peer(p.ifindex, 0) as i32 }
    } else {
        unsafe { bpf_redirect(p.ifindex, 0) as i32 }
    }
}
