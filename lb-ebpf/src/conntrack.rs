//! The shared conntrack map: a forward entry per flow (client tuple -> backend) and a
//! reply entry (backend tuple -> frontend), with lifetimes from CONFIG.

use lb_common::{
    ct_flags, ct_kind, proto, scope, service_flags, tcp_state, Config, CtKey, CtValue,
    ServiceValue, DEFAULT_HAIRPIN_ADDR,
};

use crate::{
    maps::{BACKENDS, CONFIG, CONNTRACK, SVC_GEN},
    parse::{Flow, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    select::Choice,
    source_range,
};

const NS: u64 = 1_000_000_000;
/// Refreshing `last_seen_ns` on every packet would write a shared cache line per packet;
/// lifetimes are seconds to hours, so once a second is precise enough.
const REFRESH_NS: u64 = NS;

/// The service-loopback address hairpinned flows are source-NATed to.
#[inline(always)]
pub fn hairpin_addr() -> u32 {
    match CONFIG.get(0) {
        Some(c) if c.hairpin_addr != 0 => c.hairpin_addr,
        _ => DEFAULT_HAIRPIN_ADDR,
    }
}

#[inline(always)]
fn lifetime_ns(proto_nr: u8, state: u8) -> u64 {
    // An agent that has not written CONFIG yet leaves it zeroed: use the defaults, built
    // only then (they would otherwise be written to the stack for every packet).
    let s = match CONFIG.get(0) {
        Some(c) if c.layout_version != 0 => lifetime_s(c, proto_nr, state),
        _ => lifetime_s(&Config::default(), proto_nr, state),
    };
    s as u64 * NS
}

#[inline(always)]
fn lifetime_s(c: &Config, proto_nr: u8, state: u8) -> u32 {
    match (proto_nr, state) {
        (proto::TCP, tcp_state::ESTABLISHED) => c.tcp_established_s,
        (proto::TCP, tcp_state::CLOSING) => c.tcp_closing_s,
        (proto::TCP, _) => c.tcp_opening_s,
        (proto::UDP, _) => c.udp_s,
        _ => c.other_s,
    }
}

/// An entry older than its lifetime is treated as absent (the LRU map reclaims it later).
#[inline(always)]
pub fn live(ct: &CtValue, proto_nr: u8, now: u64) -> bool {
    now.saturating_sub(ct.last_seen_ns) <= lifetime_ns(proto_nr, ct.tcp_state)
}

#[inline(always)]
fn next_tcp_state(current: u8, flags: u8) -> u8 {
    if flags & (TCP_FIN | TCP_RST) != 0 {
        tcp_state::CLOSING
    } else {
        current
    }
}

/// Does a forward entry still name a usable backend? TCP flows keep their backend for
/// their life (the pod may still serve them); other protocols re-select once the endpoint
/// has left, so they are never black-holed.
#[inline(always)]
fn backend_still_valid(flow: &Flow, ct: &CtValue) -> bool {
    if flow.proto == proto::TCP {
        return true;
    }
    match unsafe { BACKENDS.get(&ct.backend_id) } {
        Some(b) => b.addr == ct.nat_addr && b.port == ct.nat_port && b.service_id == ct.service_id,
        None => false,
    }
}

#[inline(always)]
fn key_of(flow: &Flow) -> CtKey {
    CtKey::new(flow.src, flow.dst, flow.sport, flow.dport, flow.proto)
}

/// An existing flow's translation.
pub struct Existing {
    pub service: u32,
    pub addr: u32,
    pub port: u16,
    /// `ct_flags`.
    pub flags: u8,
    pub snat_port: u16,
}

/// A flow's forward entry, if it has one. Looked up before the frontend, so that an
/// established flow needs no other lookup.
#[inline(always)]
pub fn entry(flow: &Flow) -> Option<*mut CtValue> {
    CONNTRACK.get_ptr_mut(&key_of(flow))
}

/// Service id `id`'s generation, as the agent last set it.
#[inline(always)]
pub fn generation(id: u32) -> u32 {
    SVC_GEN.get(id).copied().unwrap_or(0)
}

/// An established flow's translation from its entry alone: good while the service port's
/// generation is the entry's, since the agent changes it whenever one of the service
/// port's frontends goes or changes. None sends the packet to its frontend, which decides.
#[inline(always)]
pub fn established(flow: &Flow, ct: *mut CtValue, scope_nr: u8, now: u64) -> Option<Existing> {
    let ct = unsafe { &mut *ct };
    let internal = ct.flags & ct_flags::INTERNAL != 0;
    if ct.kind != ct_kind::FORWARD
        || internal != (scope_nr == scope::INTERNAL)
        || ct.generation != generation(ct.service_id)
    {
        return None;
    }
    if ct.flags & ct_flags::SOURCE_RANGES != 0 && !source_range::allowed(ct.service_id, flow.src) {
        return None;
    }
    proceed(flow, ct, now)
}

/// The backend of an existing flow of `svc`, found through its frontend. The entry is
/// confirmed under the current generation, with the frontend's source-range check, so
/// that the flow's next packets take the short way again.
#[inline(always)]
pub fn confirm(flow: &Flow, ct: *mut CtValue, svc: &ServiceValue, now: u64) -> Option<Existing> {
    let ct = unsafe { &mut *ct };
    if ct.kind != ct_kind::FORWARD || ct.service_id != svc.id {
        return None;
    }
    let existing = proceed(flow, ct, now)?;
    let generation = generation(svc.id);
    let flags = with_source_ranges(ct.flags, svc);
    if ct.generation != generation || ct.flags != flags {
        ct.generation = generation;
        ct.flags = flags;
    }
    Some(existing)
}

/// A new entry's flags: the translation's, with the frontend's source-range check and the
/// scope it was made in.
#[inline(always)]
pub fn new_flags(translation: u8, svc: &ServiceValue, scope_nr: u8) -> u8 {
    let flags = with_source_ranges(translation, svc);
    if scope_nr == scope::INTERNAL {
        flags | ct_flags::INTERNAL
    } else {
        flags
    }
}

/// `flags` with SOURCE_RANGES as the frontend `svc` asks.
#[inline(always)]
fn with_source_ranges(flags: u8, svc: &ServiceValue) -> u8 {
    if svc.flags & service_flags::SOURCE_RANGES != 0 {
        flags | ct_flags::SOURCE_RANGES
    } else {
        flags & !ct_flags::SOURCE_RANGES
    }
}

/// The flow's packet goes on with its entry's backend, if the entry is still good for
/// it; its state and time are brought up to date.
#[inline(always)]
fn proceed(flow: &Flow, ct: &mut CtValue, now: u64) -> Option<Existing> {
    if !live(ct, flow.proto, now) || !backend_still_valid(flow, ct) {
        return None;
    }
    // A fresh SYN on a closed flow's tuple is a new connection: choose again.
    let syn_only = flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if flow.proto == proto::TCP && syn_only && ct.tcp_state == tcp_state::CLOSING {
        return None;
    }
    let mut state = next_tcp_state(ct.tcp_state, flow.tcp_flags);
    // A tunnelled flow's answers never pass this node: the client's first ACK is the sign
    // that the handshake completed.
    let acked = flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_ACK;
    if ct.flags & ct_flags::DSR != 0 && state == tcp_state::OPENING && acked {
        state = tcp_state::ESTABLISHED;
    }
    if state != ct.tcp_state || now.saturating_sub(ct.last_seen_ns) > REFRESH_NS {
        ct.tcp_state = state;
        ct.last_seen_ns = now;
        refresh_reply(flow, ct, now);
    }
    Some(Existing {
        service: ct.service_id,
        addr: ct.nat_addr,
        port: ct.nat_port,
        flags: ct.flags,
        snat_port: ct.snat_port,
    })
}

/// The client's address and port as the backend sees them: its own, the
/// service-loopback address for a hairpinned flow, the node's for a SNAT one.
#[inline(always)]
fn seen_src(flow: &Flow, flags: u8, snat_port: u16) -> (u32, u16) {
    if flags & ct_flags::HAIRPIN != 0 {
        (hairpin_addr(), flow.sport)
    } else if flags & ct_flags::SNAT != 0 {
        (crate::snat::addr(), snat_port)
    } else {
        (flow.src, flow.sport)
    }
}

/// Keeps the reply entry alive as long as the forward direction is.
#[inline(always)]
fn refresh_reply(flow: &Flow, ct: &CtValue, now: u64) {
    let (src, sport) = seen_src(flow, ct.flags, ct.snat_port);
    let rev_key = CtKey::new(ct.nat_addr, src, ct.nat_port, sport, flow.proto);
    if let Some(rev) = CONNTRACK.get_ptr_mut(&rev_key) {
        unsafe {
            (*rev).last_seen_ns = now;
            (*rev).tcp_state = ct.tcp_state;
        }
    }
}

/// Records a new flow: the forward entry under the client's tuple and the reply entry
/// under the backend's, which restores the frontend as the reply's source. `flags` are
/// [`lb_common::ct_flags`].
#[inline(always)]
pub fn create(flow: &Flow, service_id: u32, backend: &Choice, flags: u8, snat_port: u16, now: u64) {
    let state = next_tcp_state(tcp_state::OPENING, flow.tcp_flags);
    let mut fwd = CtValue::new(
        ct_kind::FORWARD,
        state,
        service_id,
        backend.id,
        backend.addr,
        backend.port,
        now,
    );
    let mut rev = CtValue::new(
        ct_kind::REPLY,
        state,
        service_id,
        backend.id,
        flow.dst,
        flow.dport,
        now,
    );
    fwd.flags = flags;
    rev.flags = flags;
    fwd.snat_port = snat_port;
    rev.snat_port = snat_port;
    fwd.generation = generation(service_id);
    let (src, sport) = seen_src(flow, flags, snat_port);
    let rev_key = CtKey::new(backend.addr, src, backend.port, sport, flow.proto);
    // An LRU map evicts instead of failing; a failed insert only loses this flow's state.
    let _ = CONNTRACK.insert(&rev_key, &rev, 0);
    let _ = CONNTRACK.insert(&key_of(flow), &fwd, 0);
}

/// Takes a direct flow (ct_flags::DIRECT) back to the stack, in both directions, from a
/// packet of its client: the forward entry under the client's tuple and the reply entry
/// under the backend's (`addr`, `port`).
#[inline(always)]
pub fn demote(flow: &Flow, addr: u32, port: u16) {
    clear_direct(&key_of(flow));
    clear_direct(&CtKey::new(addr, flow.src, port, flow.sport, flow.proto));
}

/// [`demote`] from a reply of the backend, whose flow's frontend is (`addr`, `port`).
#[inline(always)]
pub fn demote_reply(flow: &Flow, addr: u32, port: u16) {
    clear_direct(&key_of(flow));
    clear_direct(&CtKey::new(flow.dst, addr, flow.dport, port, flow.proto));
}

#[inline(always)]
fn clear_direct(key: &CtKey) {
    if let Some(ct) = CONNTRACK.get_ptr_mut(key) {
        unsafe { (*ct).flags &= !ct_flags::DIRECT };
    }
}

/// The frontend to restore as the source of a reply (address, port, service id, flags),
/// if the packet is a reply of a translated flow. `client` is the flow's client as it sent
/// its packets (address, port). A reply establishes an opening TCP flow.
#[inline(always)]
pub fn reply(flow: &Flow, client: (u32, u16), now: u64) -> Option<(u32, u16, u32, u8)> {
    reply_of(flow, entry(flow)?, client, now)
}

/// [`reply`] with the packet's entry already looked up ([`entry`]).
#[inline(always)]
pub fn reply_of(
    flow: &Flow,
    ct: *mut CtValue,
    client: (u32, u16),
    now: u64,
) -> Option<(u32, u16, u32, u8)> {
    let ct = unsafe { &mut *ct };
    if ct.kind != ct_kind::REPLY || !live(ct, flow.proto, now) {
        return None;
    }
    let mut state = ct.tcp_state;
    if flow.proto == proto::TCP && state == tcp_state::OPENING {
        state = tcp_state::ESTABLISHED;
        let fwd_key = CtKey::new(client.0, ct.nat_addr, client.1, ct.nat_port, flow.proto);
        if let Some(fwd) = CONNTRACK.get_ptr_mut(&fwd_key) {
            unsafe {
                if (*fwd).tcp_state == tcp_state::OPENING {
                    (*fwd).tcp_state = tcp_state::ESTABLISHED;
                }
                (*fwd).last_seen_ns = now;
            }
        }
    }
    let state = next_tcp_state(state, flow.tcp_flags);
    if state != ct.tcp_state || now.saturating_sub(ct.last_seen_ns) > REFRESH_NS {
        ct.tcp_state = state;
        ct.last_seen_ns = now;
    }
    Some((ct.nat_addr, ct.nat_port, ct.service_id, ct.flags))
}

/// A live entry of `kind` under `key`, for the flow an ICMP error quotes.
#[inline(always)]
pub fn quoted(key: &CtKey, kind: u8, now: u64) -> Option<CtValue> {
    let ct = unsafe { CONNTRACK.get(key) }?;
    if ct.kind != kind || !live(ct, key.proto, now) {
        return None;
    }
    Some(*ct)
}
