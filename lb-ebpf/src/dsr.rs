//! Direct server return over IPIP. The node that chooses a backend on another node sends
//! the client's packet unchanged inside an outer IPv4 header addressed to the backend pod
//! itself (so the FIB routes it to the pod's node), with the backend's port in the outer
//! header's ID field (meaningless otherwise: the outer header is never fragmented). The
//! backend's node sees a tunnel packet to one of its own pods, takes the outer header off,
//! translates the inner destination to the pod and remembers the frontend, so that the
//! pod's answers leave it with the frontend as their source, straight to the client.

use aya_ebpf::{
    bindings::{xdp_action, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS},
    helpers::bpf_xdp_adjust_head,
    programs::XdpContext,
};
use lb_common::{ct_flags, proto, scope, service_flags, stats::drop_reason, stats::verdict};

use crate::{
    clock, conntrack, csum, fib,
    nat::{End, Rewrite},
    parse::{parse, ptr_at, Flow, ETH_HLEN},
    select::{lookup, Choice},
    stats::{count_drop, count_service, count_service_drop, count_verdict},
};

const OUTER_LEN: usize = 20;
const IP_DF: u16 = 0x4000;

/// The outer header: from this node to the backend, carrying the backend port as its ID.
#[inline(always)]
fn outer_header(inner_len: u16, tos: u8, src: u32, dst: u32, port: u16) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[0] = 0x45;
    h[1] = tos;
    h[2..4].copy_from_slice(&(inner_len + OUTER_LEN as u16).to_be_bytes());
    h[4..6].copy_from_slice(&port.to_ne_bytes());
    h[6..8].copy_from_slice(&IP_DF.to_be_bytes());
    h[8] = 64;
    h[9] = proto::IPIP;
    h[12..16].copy_from_slice(&src.to_ne_bytes());
    h[16..20].copy_from_slice(&dst.to_ne_bytes());
    let sum = !csum::fold(csum::sum_words(&h));
    h[10..12].copy_from_slice(&sum.to_ne_bytes());
    h
}

/// Copies the Ethernet header from offset `from` to offset `to` (the two never overlap).
#[inline(always)]
fn move_eth(ctx: &XdpContext, from: usize, to: usize) -> Option<()> {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let src: *const [u8; 14] = ptr_at(data, data_end, from)?;
    let dst: *mut [u8; 14] = ptr_at(data, data_end, to)?;
    // The two headers never overlap: they are OUTER_LEN apart.
    unsafe { crate::bytes::copy::<14>(dst.cast(), src.cast()) };
    Some(())
}

/// Sends the client's packet to `backend` (address, port) on another node, tunnelled.
#[inline(always)]
pub fn xdp_encap(ctx: &XdpContext, flow: &Flow, backend: u32, port: u16) -> u32 {
    let src = crate::snat::addr();
    if flow.l3_off != ETH_HLEN || src == 0 {
        // Tagged frames and a node without an address are not tunnelled.
        count_drop(drop_reason::NO_ROUTE);
        return xdp_action::XDP_DROP;
    }
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let (Some(len), Some(tos)) = (
        ptr_at::<u16>(data, data_end, ETH_HLEN + 2),
        ptr_at::<u8>(data, data_end, ETH_HLEN + 1),
    ) else {
        count_drop(drop_reason::MALFORMED);
        return xdp_action::XDP_DROP;
    };
    let (inner_len, tos) = unsafe { (u16::from_be(len.read_unaligned()), *tos) };
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(OUTER_LEN as i32)) } != 0 {
        count_drop(drop_reason::REWRITE_FAILED);
        return xdp_action::XDP_DROP;
    }
    if move_eth(ctx, OUTER_LEN, 0).is_none() {
        count_drop(drop_reason::MALFORMED);
        return xdp_action::XDP_DROP;
    }
    let header = outer_header(inner_len, tos, src, backend, port);
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let Some(ip) = ptr_at::<[u8; 20]>(data, data_end, ETH_HLEN) else {
        count_drop(drop_reason::MALFORMED);
        return xdp_action::XDP_DROP;
    };
    unsafe { *ip = header };
    let outer = Flow {
        l3_off: ETH_HLEN,
        l4_off: ETH_HLEN + OUTER_LEN,
        proto: proto::IPIP,
        src,
        dst: backend,
        sport: 0,
        dport: 0,
        tcp_flags: 0,
        ip_id: port,
        more_fragments: false,
        later_fragment: false,
    };
    fib::xdp_send(ctx, &outer)
}

/// A tunnel packet from another node for one of this node's pods: the inner packet,
/// translated to the pod, goes on to the stack. Anything else passes untouched.
#[inline(always)]
pub fn xdp_decap(ctx: &XdpContext, outer: &Flow) -> u32 {
    if outer.l3_off != ETH_HLEN || outer.l4_off != ETH_HLEN + OUTER_LEN || outer.later_fragment {
        return xdp_action::XDP_PASS;
    }
    let port = outer.ip_id;
    // Ours only when the outer destination is a pod behind this node: the FIB sends it
    // straight to a local interface.
    let Some((rc, p)) = fib::lookup(ctx, outer) else {
        return xdp_action::XDP_PASS;
    };
    let routed = rc == BPF_FIB_LKUP_RET_SUCCESS || rc == BPF_FIB_LKUP_RET_NO_NEIGH;
    // Directly behind an interface (no gateway replaced the destination), not the one it
    // came in on.
    let direct = unsafe { p.__bindgen_anon_4.ipv4_dst } == outer.dst;
    if !routed || !direct || p.ifindex == unsafe { (*ctx.ctx).ingress_ifindex } {
        return xdp_action::XDP_PASS;
    }
    if move_eth(ctx, 0, OUTER_LEN).is_none() {
        return xdp_action::XDP_PASS;
    }
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, OUTER_LEN as i32) } != 0 {
        count_drop(drop_reason::REWRITE_FAILED);
        return xdp_action::XDP_DROP;
    }
    let inner = match parse(ctx.data(), ctx.data_end()) {
        Ok(f) if f.proto == proto::TCP || f.proto == proto::UDP => f,
        _ => {
            count_drop(drop_reason::MALFORMED);
            return xdp_action::XDP_DROP;
        }
    };
    deliver(ctx, &inner, outer.dst, port)
}

/// Translates a decapsulated packet to the pod the other node chose.
#[inline(always)]
fn deliver(ctx: &XdpContext, inner: &Flow, pod: u32, port: u16) -> u32 {
    // The frontend may be another node's NodePort: any destination address matches.
    let frontend = lookup(inner.dst, inner.dport, inner.proto, scope::EXTERNAL, || {
        true
    });
    let Some(svc) = frontend.filter(|s| s.flags & service_flags::ADDRESS_ONLY == 0) else {
        count_drop(drop_reason::DSR_UNKNOWN_FRONTEND);
        return xdp_action::XDP_DROP;
    };
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let now = clock::now();
    let existing = conntrack::entry(inner).and_then(|ct| conntrack::confirm(inner, ct, &svc, now));
    let (addr, port) = match existing {
        Some(e) => (e.addr, e.port),
        None => {
            let target = Choice {
                id: 0,
                addr: pod,
                port,
                local: true,
            };
            conntrack::create(inner, svc.id, &target, ct_flags::DSR, 0, now);
            (pod, port)
        }
    };
    count_service(svc.id, bytes);
    if ctx.rewrite(inner, End::Dst, addr, port).is_err() {
        count_drop(drop_reason::REWRITE_FAILED);
        count_service_drop(svc.id);
        return xdp_action::XDP_DROP;
    }
    count_verdict(verdict::DNAT, bytes);
    xdp_action::XDP_PASS
}
