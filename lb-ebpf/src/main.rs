//! The in-kernel data path: XDP on node uplinks for traffic from outside, TC on pod
//! interfaces for traffic from pods, TC egress for reverse NAT of replies, cgroup socket
//! hooks for the node's own processes.
#![no_std]
#![no_main]

mod affinity;
mod bytes;
mod clock;
mod conntrack;
mod csum;
mod dsr;
mod fib;
mod fragments;
mod host_routing;
mod icmp_error;
mod maps;
mod mss;
mod nat;
mod parse;
mod reject;
mod select;
mod service;
mod snat;
mod socket_lb;
mod source_range;
mod stats;

use aya_ebpf::{
    bindings::{bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, xdp_action, TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_redirect, bpf_skb_change_tail, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use lb_common::{
    ct_flags, ct_kind, proto, scope,
    stats::{drop_reason, verdict},
    SnatValue,
};

use crate::{
    icmp_error::Routing,
    nat::{End, Rewrite},
    parse::{parse, Flow, Unparsed},
    service::{Forward, Route},
    stats::{count_drop, count_service, count_service_drop, count_verdict},
};

/// What a program does with the packet, before it is mapped to the hook's return code.
/// Outcomes that may still fail carry the service id, so that such a drop is counted
/// for the service too.
enum Outcome {
    Pass,
    Translated,
    /// Translated, and to be sent back out of the interface it came in on (hairpin).
    Hairpin(u32),
    /// Translated, and to be sent to its next hop as the FIB says (SNAT, from XDP).
    Fib(u32),
    /// To be tunnelled, untranslated, to this backend (address, port) on another node.
    Tunnel(u32, u16, u32),
    /// Translated, for this local backend (address, port), to be sent to its pod past the
    /// node's stack (host routing).
    Direct(u32, u16),
    /// An ICMP error of a flow host routing carries, translated, to be sent its way.
    DirectIcmp,
    Reject(u32),
    /// Dropped; the reason (and the service, when known) are counted already.
    Drop,
}

#[inline(always)]
fn translates(flow: &Flow) -> bool {
    flow.proto == proto::TCP || flow.proto == proto::UDP
}

/// Counts a packet whose headers could not be trusted, when it was addressed to a
/// service address; anything else unparsable is simply not ours.
#[inline(always)]
fn unparsed(why: Unparsed) {
    if let Unparsed::Malformed { dst: Some(dst) } = why {
        if select::is_service_address(dst) {
            count_drop(drop_reason::MALFORMED);
        }
    }
}

/// ICMP errors quoting a translated flow; other ICMP is not ours. `kind` is the
/// conntrack direction the quote must match, `routing` the flows to take (see icmp_error).
#[inline(always)]
fn icmp<C: Rewrite>(ctx: &C, flow: &Flow, kind: u8, routing: Routing, bytes: u64) -> Outcome {
    let (data, data_end) = ctx.linear(flow.l4_off + 1);
    if !icmp_error::is_error(data, data_end, flow) {
        return Outcome::Pass;
    }
    let (data, data_end) = ctx.linear(flow.l4_off + icmp_error::LINEAR_LEN);
    match icmp_error::translate(data, data_end, flow, kind, routing) {
        Some((service, flags)) => {
            count_service(service, bytes);
            count_verdict(verdict::ICMP_ERROR_NAT, bytes);
            if flags & ct_flags::DIRECT != 0 {
                Outcome::DirectIcmp
            } else {
                Outcome::Translated
            }
        }
        None => Outcome::Pass,
    }
}

/// Later fragments carry no ports: they follow their first fragment's translation, or
/// pass untouched when it was not seen.
#[inline(always)]
fn follow_fragment<C: Rewrite>(ctx: &C, flow: &Flow) -> Outcome {
    match fragments::lookup(flow) {
        Some(t) => {
            let ok = (t.new_src == flow.src || ctx.rewrite(flow, End::Src, t.new_src, 0).is_ok())
                && (t.new_dst == flow.dst || ctx.rewrite(flow, End::Dst, t.new_dst, 0).is_ok());
            if ok {
                count_verdict(verdict::FRAGMENT, 0);
                Outcome::Pass
            } else {
                count_drop(drop_reason::REWRITE_FAILED);
                Outcome::Drop
            }
        }
        None => Outcome::Pass,
    }
}

/// Translation towards a backend; shared by the XDP and TC ingress programs.
#[inline(always)]
fn forward<C: Rewrite>(ctx: &C, flow: &Flow, scope_nr: u8, bytes: u64) -> Outcome {
    if flow.later_fragment {
        return follow_fragment(ctx, flow);
    }
    if flow.proto == proto::ICMP {
        // XDP leaves a direct flow's errors to the uplink's TC ingress, which can send
        // them into the pod.
        let routing = if scope_nr == scope::EXTERNAL {
            Routing::Stack
        } else {
            Routing::Any
        };
        return icmp(ctx, flow, ct_kind::FORWARD, routing, bytes);
    }
    if !translates(flow) {
        return Outcome::Pass;
    }
    if scope_nr == scope::INTERNAL && flow.dst == conntrack::hairpin_addr() {
        return hairpin_reply(ctx, flow, bytes);
    }
    if scope_nr == scope::EXTERNAL {
        if let Some(t) = snat::reverse(flow) {
            return snat_reply(ctx, flow, &t, bytes);
        }
    }
    match service::forward(flow, scope_nr) {
        Forward::Pass => Outcome::Pass,
        Forward::Dnat {
            addr,
            port,
            service,
            snat,
            route,
        } => {
            count_service(service, bytes);
            if route == Route::Tunnel {
                count_verdict(verdict::DNAT, bytes);
                return Outcome::Tunnel(addr, port, service);
            }
            if ctx.rewrite(flow, End::Dst, addr, port).is_err() {
                count_drop(drop_reason::REWRITE_FAILED);
                count_service_drop(service);
                return Outcome::Drop;
            }
            let (src, sport) = snat.unwrap_or((flow.src, flow.sport));
            if snat.is_some() && ctx.rewrite(flow, End::Src, src, sport).is_err() {
                count_drop(drop_reason::REWRITE_FAILED);
                count_service_drop(service);
                return Outcome::Drop;
            }
            fragments::remember(flow, src, addr);
            count_verdict(verdict::DNAT, bytes);
            match route {
                Route::Stack => Outcome::Translated,
                Route::Hairpin => Outcome::Hairpin(service),
                Route::Fib => Outcome::Fib(service),
                Route::Tunnel => Outcome::Tunnel(addr, port, service),
                Route::Direct => Outcome::Direct(addr, port),
            }
        }
        Forward::Reject { service } => {
            count_service(service, bytes);
            Outcome::Reject(service)
        }
        Forward::Drop { service, reason } => {
            count_service(service, bytes);
            count_drop(reason);
            count_service_drop(service);
            Outcome::Drop
        }
    }
}

/// A pod's answer to the service-loopback address, for a flow it opened to its own
/// service: both ends are restored (the service as the source, the pod as the
/// destination) and the packet goes straight back to the pod.
#[inline(always)]
fn hairpin_reply<C: Rewrite>(ctx: &C, flow: &Flow, bytes: u64) -> Outcome {
    match conntrack::reply(flow, (flow.src, flow.dport), clock::now()) {
        Some((addr, port, service, flags)) if flags & ct_flags::HAIRPIN != 0 => {
            let ok = ctx.rewrite(flow, End::Src, addr, port).is_ok()
                && ctx.rewrite(flow, End::Dst, flow.src, flow.dport).is_ok();
            if !ok {
                count_drop(drop_reason::REWRITE_FAILED);
                count_service_drop(service);
                return Outcome::Drop;
            }
            fragments::remember(flow, addr, flow.src);
            count_service(service, bytes);
            count_verdict(verdict::REVERSE_NAT, bytes);
            Outcome::Hairpin(service)
        }
        _ => Outcome::Pass,
    }
}

/// A backend's answer on another node to a SNAT flow, arriving at this node's address:
/// the frontend becomes the source and the client the destination again, and it goes back
/// out towards the client.
#[inline(always)]
fn snat_reply<C: Rewrite>(ctx: &C, flow: &Flow, t: &SnatValue, bytes: u64) -> Outcome {
    let client = (t.client_addr, t.client_port);
    let Some((addr, port, service, _)) = conntrack::reply(flow, client, clock::now()) else {
        return Outcome::Pass;
    };
    let ok = ctx.rewrite(flow, End::Src, addr, port).is_ok()
        && ctx
            .rewrite(flow, End::Dst, t.client_addr, t.client_port)
            .is_ok();
    if !ok {
        count_drop(drop_reason::REWRITE_FAILED);
        count_service_drop(service);
        return Outcome::Drop;
    }
    fragments::remember(flow, addr, t.client_addr);
    count_service(service, bytes);
    count_verdict(verdict::REVERSE_NAT, bytes);
    Outcome::Fib(service)
}

/// Reverse NAT of replies; shared by both egress programs.
#[inline(always)]
fn reply(ctx: &TcContext, flow: &Flow, bytes: u64) -> Outcome {
    if flow.later_fragment {
        return follow_fragment(ctx, flow);
    }
    if flow.proto == proto::ICMP {
        // On egress the packet is on its way out already, whichever way its flow takes.
        return match icmp(ctx, flow, ct_kind::REPLY, Routing::Any, bytes) {
            Outcome::DirectIcmp => Outcome::Translated,
            other => other,
        };
    }
    if !translates(flow) {
        return Outcome::Pass;
    }
    match conntrack::reply(flow, (flow.dst, flow.dport), clock::now()) {
        Some((addr, port, service, flags)) => {
            if ctx.rewrite(flow, End::Src, addr, port).is_err() {
                count_drop(drop_reason::REWRITE_FAILED);
                count_service_drop(service);
                return Outcome::Drop;
            }
            let syn = flow.proto == proto::TCP && flow.tcp_flags & parse::TCP_SYN != 0;
            if flags & ct_flags::DSR != 0 && syn && mss::clamp(ctx, flow).is_err() {
                count_drop(drop_reason::REWRITE_FAILED);
                count_service_drop(service);
                return Outcome::Drop;
            }
            fragments::remember(flow, addr, flow.dst);
            count_service(service, bytes);
            count_verdict(verdict::REVERSE_NAT, bytes);
            Outcome::Translated
        }
        None => Outcome::Pass,
    }
}

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    let flow = match parse(ctx.data(), ctx.data_end()) {
        Ok(flow) => flow,
        Err(why) => {
            unparsed(why);
            return xdp_action::XDP_PASS;
        }
    };
    if flow.proto == proto::IPIP {
        return dsr::xdp_decap(&ctx, &flow);
    }
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    match forward(&ctx, &flow, scope::EXTERNAL, bytes) {
        // Hairpin needs a pod as the client: it never happens on an uplink; nor do direct
        // ICMP errors, left to TC.
        Outcome::Pass | Outcome::Translated | Outcome::Hairpin(_) | Outcome::DirectIcmp => {
            xdp_action::XDP_PASS
        }
        Outcome::Direct(addr, port) => host_routing::xdp_to_pod(&ctx, &flow, addr, port),
        Outcome::Fib(service) => {
            // The reason (no route, MTU) is counted where the FIB said so.
            let action = fib::xdp_send(&ctx, &flow);
            if action == xdp_action::XDP_DROP {
                count_service_drop(service);
                count_verdict(verdict::DROP, bytes);
            }
            action
        }
        Outcome::Tunnel(addr, port, service) => {
            let action = dsr::xdp_encap(&ctx, &flow, addr, port);
            if action == xdp_action::XDP_DROP {
                count_service_drop(service);
                count_verdict(verdict::DROP, bytes);
            }
            action
        }
        Outcome::Drop => {
            count_verdict(verdict::DROP, bytes);
            xdp_action::XDP_DROP
        }
        Outcome::Reject(service) => match xdp_reject(&ctx, &flow) {
            Some(()) => {
                count_verdict(verdict::REJECT, bytes);
                xdp_action::XDP_TX
            }
            None => {
                count_drop(drop_reason::REJECT_FAILED);
                count_service_drop(service);
                count_verdict(verdict::DROP, bytes);
                xdp_action::XDP_DROP
            }
        },
    }
}

#[inline(always)]
fn xdp_trim(ctx: &XdpContext, new_len: usize) -> Option<()> {
    // Materialise the length first: the verifier refuses arithmetic that the compiler
    // would otherwise reassociate onto the packet-end pointer.
    let cur = ctx.data_end() - ctx.data();
    let cur = unsafe { core::ptr::read_volatile(&cur) };
    let delta = new_len as i64 - cur as i64;
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta as i32) } != 0 {
        return None;
    }
    Some(())
}

fn xdp_reject(ctx: &XdpContext, flow: &Flow) -> Option<()> {
    if flow.proto == proto::TCP {
        let len = reject::tcp_rst(ctx.data(), ctx.data_end(), flow)?;
        return xdp_trim(ctx, len);
    }
    let room = reject::ICMP_ROOM as i32;
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -room) } != 0 {
        return None;
    }
    let (data, data_end) = (ctx.data(), ctx.data_end());
    // Move the Ethernet header (and VLAN tag) to the new start of the frame.
    let l3 = flow.l3_off;
    if l3 == parse::ETH_HLEN {
        let from: *const [u8; 14] = parse::ptr_at(data, data_end, reject::ICMP_ROOM)?;
        let to: *mut [u8; 14] = parse::ptr_at(data, data_end, 0)?;
        unsafe { bytes::copy::<14>(to.cast(), from.cast()) };
    } else {
        let from: *const [u8; 18] = parse::ptr_at(data, data_end, reject::ICMP_ROOM)?;
        let to: *mut [u8; 18] = parse::ptr_at(data, data_end, 0)?;
        unsafe { bytes::copy::<18>(to.cast(), from.cast()) };
    }
    let len = reject::icmp_port_unreachable(data, data_end, flow)?;
    xdp_trim(ctx, len)
}

#[inline(always)]
fn tc_verdict(outcome: Outcome, ctx: &TcContext, flow: &Flow, bytes: u64) -> i32 {
    match outcome {
        // SNAT and DSR flows are only made by XDP, which sends them itself.
        Outcome::Pass | Outcome::Translated | Outcome::Fib(_) | Outcome::Tunnel(..) => TC_ACT_OK,
        Outcome::Direct(addr, port) => host_routing::tc_to_pod(ctx, flow, addr, port),
        Outcome::DirectIcmp => host_routing::tc_route(ctx, flow),
        Outcome::Hairpin(service) => {
            if reject::swap_macs(ctx.data(), ctx.data_end()).is_none() {
                count_drop(drop_reason::REWRITE_FAILED);
                count_service_drop(service);
                count_verdict(verdict::DROP, bytes);
                return TC_ACT_SHOT;
            }
            // Back to the pod it came from, past the node's routing (and its rp_filter).
            unsafe { bpf_redirect((*ctx.skb.skb).ifindex, 0) as i32 }
        }
        Outcome::Drop => {
            count_verdict(verdict::DROP, bytes);
            TC_ACT_SHOT
        }
        Outcome::Reject(service) => match tc_reject(ctx, flow) {
            Some(()) => {
                count_verdict(verdict::REJECT, bytes);
                // Back out of the interface it came in on, to the pod that sent it.
                unsafe { bpf_redirect((*ctx.skb.skb).ifindex, 0) as i32 }
            }
            None => {
                count_drop(drop_reason::REJECT_FAILED);
                count_service_drop(service);
                count_verdict(verdict::DROP, bytes);
                TC_ACT_SHOT
            }
        },
    }
}

fn tc_reject(ctx: &TcContext, flow: &Flow) -> Option<()> {
    let len = if flow.proto == proto::TCP {
        reject::tcp_rst(ctx.data(), ctx.data_end(), flow)?
    } else {
        if flow.l3_off != parse::ETH_HLEN {
            return None;
        }
        ctx.adjust_room(reject::ICMP_ROOM as i32, BPF_ADJ_ROOM_MAC, 0)
            .ok()?;
        // adjust_room invalidates packet pointers; make the headers directly readable.
        let want = (flow.l4_off + reject::ICMP_ROOM + 8) as u32;
        ctx.pull_data(want).ok()?;
        reject::icmp_port_unreachable(ctx.data(), ctx.data_end(), flow)?
    };
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, len as u32, 0) } != 0 {
        return None;
    }
    Some(())
}

#[inline(always)]
fn tc_flow(ctx: &TcContext) -> Option<Flow> {
    match parse(ctx.data(), ctx.data_end()) {
        Ok(flow) => Some(flow),
        Err(why) => {
            unparsed(why);
            None
        }
    }
}

/// Ingress of a host-side pod interface: packets sent by the pod.
#[classifier]
pub fn lb_pod_ingress(ctx: TcContext) -> i32 {
    let Some(flow) = tc_flow(&ctx) else {
        return TC_ACT_OK;
    };
    let bytes = ctx.len() as u64;
    let outcome = forward(&ctx, &flow, scope::INTERNAL, bytes);
    // What is not for a service may be a local backend's reply on a flow host routing
    // carries, or its error about one: it goes back the same way.
    if let Outcome::Pass = outcome {
        if !flow.later_fragment && host_routing::allowed(host_routing::ANY) {
            if translates(&flow) {
                if let Some(action) = host_routing::tc_reply(&ctx, &flow, bytes) {
                    return action;
                }
            } else if let Outcome::DirectIcmp =
                icmp(&ctx, &flow, ct_kind::REPLY, Routing::Direct, bytes)
            {
                return host_routing::tc_route(&ctx, &flow);
            }
        }
    }
    tc_verdict(outcome, &ctx, &flow, bytes)
}

/// Egress of a host-side pod interface: replies on their way to a client pod.
#[classifier]
pub fn lb_pod_egress(ctx: TcContext) -> i32 {
    egress(ctx)
}

/// Ingress of an uplink: packets XDP translated for another node whose next hop must
/// first be resolved, and errors about flows host routing carries, which XDP leaves.
#[classifier]
pub fn lb_uplink_ingress(ctx: TcContext) -> i32 {
    // Most packets are neither: one look at the IP protocol of an untagged frame.
    let is_icmp = parse::ptr_at::<[u8; 24]>(ctx.data(), ctx.data_end(), 0)
        .is_some_and(|h| unsafe { (*h)[12] == 0x08 && (*h)[13] == 0 && (*h)[23] == proto::ICMP });
    if !is_icmp && !fib::notes_pending() {
        return TC_ACT_OK;
    }
    let Ok(flow) = parse(ctx.data(), ctx.data_end()) else {
        return TC_ACT_OK;
    };
    if is_icmp {
        let bytes = ctx.len() as u64;
        if let Outcome::DirectIcmp = icmp(&ctx, &flow, ct_kind::FORWARD, Routing::Direct, bytes) {
            return host_routing::tc_route(&ctx, &flow);
        }
    }
    fib::tc_send_pending(&ctx, &flow)
}

/// Egress of an uplink: replies leaving the node.
#[classifier]
pub fn lb_uplink_egress(ctx: TcContext) -> i32 {
    egress(ctx)
}

#[inline(always)]
fn egress(ctx: TcContext) -> i32 {
    let Some(flow) = tc_flow(&ctx) else {
        return TC_ACT_OK;
    };
    let bytes = ctx.len() as u64;
    let outcome = reply(&ctx, &flow, bytes);
    tc_verdict(outcome, &ctx, &flow, bytes)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
