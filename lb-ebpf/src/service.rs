//! Frontend lookup, backend choice and conntrack: everything that decides where a packet
//! goes, shared by the XDP and TC programs.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{
    ct_kind, proto, scope, service_flags, stats::drop_reason, tcp_state, CtKey,
    CtValue, FragKey, FragValue, ServiceKey, ServiceValue, capacity,
};

use crate::{
    maps::{BACKENDS, CONFIG, CONNTRACK, FRAGMENTS, MAGLEV, NODE_ADDRS, SERVICES},
    parse::{Flow, TCP_FIN, TCP_RST},
};

/// What to do with a packet addressed to a service frontend.
pub enum Forward {
    /// Not a service: leave the packet alone.
    Pass,
    /// Send to this backend.
    Dnat { addr: u32, port: u16, service: u32 },
    Reject { service: u32 },
    Drop { service: u32, reason: u32 },
}

const NS: u64 = 1_000_000_000;

#[inline(always)]
fn lifetime_ns(proto_nr: u8, state: u8) -> u64 {
    let (est, opening, closing, udp, other) = match CONFIG.get(0) {
        Some(c) if c.layout_version != 0 => {
            (c.tcp_established_s, c.tcp_opening_s, c.tcp_closing_s, c.udp_s, c.other_s)
        }
        _ => (6 * 3600, 60, 10, 60, 60),
    };
    let s = match (proto_nr, state) {
        (proto::TCP, tcp_state::ESTABLISHED) => est,
        (proto::TCP, tcp_state::CLOSING) => closing,
        (proto::TCP, _) => opening,
        (proto::UDP, _) => udp,
        _ => other,
    };
    s as u64 * NS
}

#[inline(always)]
fn live(ct: &CtValue, proto_nr: u8, now: u64) -> bool {
    now.saturating_sub(ct.last_seen_ns) <= lifetime_ns(proto_nr, ct.tcp_state)
}

/// The frontend entry for a destination, trying the exact address first and then the
/// NodePort wildcard when the destination is one of this node's addresses.
#[inline(always)]
fn frontend(flow: &Flow, scope_nr: u8) -> Option<ServiceValue> {
    let key = ServiceKey::new(flow.dst, flow.dport, flow.proto, scope_nr);
    if let Some(v) = unsafe { SERVICES.get(&key) } {
        return Some(*v);
    }
    if unsafe { NODE_ADDRS.get(&flow.dst) }.is_some() {
        let key = ServiceKey::new(0, flow.dport, flow.proto, scope_nr);
        if let Some(v) = unsafe { SERVICES.get(&key) } {
            return Some(*v);
        }
    }
    None
}

/// A known ClusterIP (its marker entry exists) on a port no service declares.
#[inline(always)]
fn known_cluster_ip(flow: &Flow) -> bool {
    let key = ServiceKey::new(flow.dst, 0, 0, scope::INTERNAL);
    match unsafe { SERVICES.get(&key) } {
        Some(v) => v.flags & service_flags::ADDRESS_ONLY != 0,
        None => false,
    }
}

#[inline(always)]
fn fmix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[inline(always)]
fn flow_hash(flow: &Flow) -> u32 {
    let mut h = fmix(flow.src ^ 0x9e37_79b9);
    h = fmix(h ^ flow.dst);
    h = fmix(h ^ ((flow.sport as u32) << 16 | flow.dport as u32));
    fmix(h ^ flow.proto as u32)
}

/// A backend from the service's Maglev table.
#[inline(always)]
fn select(flow: &Flow, svc: &ServiceValue) -> Result<(u32, u32, u16), u32> {
    if svc.maglev_len == 0 {
        return Err(drop_reason::BAD_MAGLEV_RANGE);
    }
    let slot = svc.maglev_offset as u64 + (flow_hash(flow) % svc.maglev_len) as u64;
    if slot >= capacity::MAGLEV as u64 {
        return Err(drop_reason::BAD_MAGLEV_RANGE);
    }
    let id = *MAGLEV.get(slot as u32).ok_or(drop_reason::BAD_MAGLEV_RANGE)?;
    let backend = unsafe { BACKENDS.get(&id) }.ok_or(drop_reason::BACKEND_MISSING)?;
    Ok((id, backend.addr, backend.port))
}

#[inline(always)]
fn next_tcp_state(current: u8, flags: u8) -> u8 {
    if flags & (TCP_FIN | TCP_RST) != 0 {
        tcp_state::CLOSING
    } else {
        current
    }
}

/// Does a conntrack entry still name a backend of its service? TCP flows keep their
/// backend for their life (the pod may still serve them); other protocols re-select once
/// the endpoint has left.
#[inline(always)]
fn backend_still_valid(flow: &Flow, ct: &CtValue) -> bool {
    if flow.proto == proto::TCP {
        return true;
    }
    match unsafe { BACKENDS.get(&ct.backend_id) } {
        Some(b) => {
            b.addr == ct.nat_addr && b.port == ct.nat_port && b.service_id == ct.service_id
        }
        None => false,
    }
}

/// Decides the fate of a packet that may be addressed to a service.
#[inline(always)]
pub fn forward(flow: &Flow, scope_nr: u8) -> Forward {
    let svc = match frontend(flow, scope_nr) {
        Some(s) if s.flags & service_flags::ADDRESS_ONLY == 0 => s,
        _ => {
            if scope_nr == scope::INTERNAL && known_cluster_ip(flow) {
                return Forward::Reject { service: 0 };
            }
            return Forward::Pass;
        }
    };
    let now = unsafe { bpf_ktime_get_ns() };
    let key = CtKey::new(flow.src, flow.dst, flow.sport, flow.dport, flow.proto);
    if let Some(ct) = CONNTRACK.get_ptr_mut(&key) {
        let ct = unsafe { &mut *ct };
        if ct.kind == ct_kind::FORWARD
            && ct.service_id == svc.id
            && live(ct, flow.proto, now)
            && backend_still_valid(flow, ct)
        {
            ct.tcp_state = next_tcp_state(ct.tcp_state, flow.tcp_flags);
            if now.saturating_sub(ct.last_seen_ns) > NS || ct.tcp_state == tcp_state::CLOSING {
                ct.last_seen_ns = now;
                refresh_reply(flow, ct, now);
            }
            return Forward::Dnat { addr: ct.nat_addr, port: ct.nat_port, service: svc.id };
        }
    }
    if svc.backend_count == 0 {
        if svc.flags & service_flags::LOCAL_POLICY != 0 {
            return Forward::Drop { service: svc.id, reason: drop_reason::NO_LOCAL_ENDPOINT };
        }
        return Forward::Reject { service: svc.id };
    }
    let (backend_id, addr, port) = match select(flow, &svc) {
        Ok(b) => b,
        Err(reason) => return Forward::Drop { service: svc.id, reason },
    };
    let state = next_tcp_state(tcp_state::OPENING, flow.tcp_flags);
    let fwd = CtValue::new(ct_kind::FORWARD, state, svc.id, backend_id, addr, port, now);
    let rev = CtValue::new(ct_kind::REPLY, state, svc.id, backend_id, flow.dst, flow.dport, now);
    let rev_key = CtKey::new(addr, flow.src, port, flow.sport, flow.proto);
    // An LRU map evicts instead of failing; a failed insert only costs the flow's memory.
    let _ = CONNTRACK.insert(&rev_key, &rev, 0);
    let _ = CONNTRACK.insert(&key, &fwd, 0);
    Forward::Dnat { addr, port, service: svc.id }
}

/// Keeps the reply entry alive as long as the forward direction is.
#[inline(always)]
fn refresh_reply(flow: &Flow, ct: &CtValue, now: u64) {
    let rev_key = CtKey::new(ct.nat_addr, flow.src, ct.nat_port, flow.sport, flow.proto);
    if let Some(rev) = CONNTRACK.get_ptr_mut(&rev_key) {
        unsafe {
            (*rev).last_seen_ns = now;
            (*rev).tcp_state = ct.tcp_state;
        }
    }
}

/// The frontend to restore as the source of a reply, if the packet is a reply of a
/// translated flow.
#[inline(always)]
pub fn reply(flow: &Flow) -> Option<(u32, u16, u32)> {
    let key = CtKey::new(flow.src, flow.dst, flow.sport, flow.dport, flow.proto);
    let ct = CONNTRACK.get_ptr_mut(&key)?;
    let ct = unsafe { &mut *ct };
    if ct.kind != ct_kind::REPLY {
        return None;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    if !live(ct, flow.proto, now) {
        return None;
    }
    let mut state = ct.tcp_state;
    if flow.proto == proto::TCP && state == tcp_state::OPENING {
        // A reply completes the opening: the forward entry gets the long lifetime.
        state = tcp_state::ESTABLISHED;
        let fwd_key = CtKey::new(flow.dst, ct.nat_addr, flow.dport, ct.nat_port, flow.proto);
        if let Some(fwd) = CONNTRACK.get_ptr_mut(&fwd_key) {
            unsafe {
                if (*fwd).tcp_state == tcp_state::OPENING {
                    (*fwd).tcp_state = tcp_state::ESTABLISHED;
                }
                (*fwd).last_seen_ns = now;
            }
        }
    }
    ct.tcp_state = next_tcp_state(state, flow.tcp_flags);
    if now.saturating_sub(ct.last_seen_ns) > NS || ct.tcp_state != state {
        ct.last_seen_ns = now;
    }
    Some((ct.nat_addr, ct.nat_port, ct.service_id))
}

/// Remembers a first fragment's translation for the later fragments of its datagram.
#[inline(always)]
pub fn remember_fragment(flow: &Flow, new_src: u32, new_dst: u32) {
    if flow.more_fragments && !flow.later_fragment {
        let key = FragKey::new(flow.src, flow.dst, flow.ip_id, flow.proto);
        let _ = FRAGMENTS.insert(&key, &FragValue { new_src, new_dst }, 0);
    }
}

/// The translation of a later fragment's datagram, if its first fragment was translated.
#[inline(always)]
pub fn fragment(flow: &Flow) -> Option<FragValue> {
    let key = FragKey::new(flow.src, flow.dst, flow.ip_id, flow.proto);
    unsafe { FRAGMENTS.get(&key) }.copied()
}

