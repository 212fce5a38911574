//! Frontend lookup and the Maglev choice of a backend.

use lb_common::{
    capacity, filter, scope, service_flags, stats::drop_reason, ServiceKey, ServiceValue,
};

use crate::{
    maps::{BACKENDS, FRONT_FILTER, MAGLEV, NODE_ADDRS, SERVICES},
    parse::Flow,
};

/// False when the agent has said that no frontend is `addr:port` (see lb-common's
/// `filter`): the packet needs no lookup at all.
#[inline(always)]
pub fn maybe_frontend(addr: u32, port: u16, proto_nr: u8) -> bool {
    let (word, bit) = filter::position(filter::slot(addr, port, proto_nr));
    match FRONT_FILTER.get(word) {
        Some(w) => *w & bit == 0,
        None => true,
    }
}

/// The frontend entry for a packet's destination, trying the exact address first and then
/// the NodePort wildcard when the destination is one of this node's addresses.
#[inline(always)]
pub fn frontend(flow: &Flow, scope_nr: u8) -> Option<ServiceValue> {
    lookup(flow.dst, flow.dport, flow.proto, scope_nr, || {
        is_node_address(flow.dst)
    })
}

/// The frontend entry for `dst:dport`; `on_node` says whether NodePorts apply there. It is
/// asked only when no frontend has the exact address, so that packets to a ClusterIP, LB IP
/// or externalIP are spared its lookup.
#[inline(always)]
pub fn lookup(
    dst: u32,
    dport: u16,
    proto_nr: u8,
    scope_nr: u8,
    on_node: impl FnOnce() -> bool,
) -> Option<ServiceValue> {
    let key = ServiceKey::new(dst, dport, proto_nr, scope_nr);
    if let Some(v) = unsafe { SERVICES.get(&key) } {
        return Some(*v);
    }
    if on_node() {
        let key = ServiceKey::new(0, dport, proto_nr, scope_nr);
        if let Some(v) = unsafe { SERVICES.get(&key) } {
            return Some(*v);
        }
    }
    None
}

#[inline(always)]
pub fn is_node_address(addr: u32) -> bool {
    unsafe { NODE_ADDRS.get(&addr) }.is_some()
}

/// A ClusterIP that a service owns (its marker entry exists), whatever the port.
#[inline(always)]
pub fn known_cluster_ip(addr: u32) -> bool {
    let key = ServiceKey::new(addr, 0, 0, scope::INTERNAL);
    match unsafe { SERVICES.get(&key) } {
        Some(v) => v.flags & service_flags::ADDRESS_ONLY != 0,
        None => false,
    }
}

/// An address that carries services: one of the node's or a ClusterIP. Used to decide
/// whether an unparsable packet is worth counting.
#[inline(always)]
pub fn is_service_address(addr: u32) -> bool {
    is_node_address(addr) || known_cluster_ip(addr)
}

#[inline(always)]
pub fn fmix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[inline(always)]
fn flow_hash(flow: &Flow) -> u32 {
    let mut h = client_hash(flow.src);
    h = fmix(h ^ flow.dst);
    h = fmix(h ^ ((flow.sport as u32) << 16 | flow.dport as u32));
    fmix(h ^ flow.proto as u32)
}

/// A backend chosen by the service's Maglev table.
pub struct Choice {
    pub id: u32,
    pub addr: u32,
    pub port: u16,
    /// The backend runs on this node.
    pub local: bool,
}

/// Under session affinity only the client address counts, so that a client's connections
/// agree on a backend on every node, even before (or without) an affinity entry.
#[inline(always)]
pub fn client_hash(client: u32) -> u32 {
    fmix(client ^ 0x9e37_79b9)
}

/// The backend for a new flow, or the drop reason when the table cannot name one.
#[inline(always)]
pub fn select(flow: &Flow, svc: &ServiceValue) -> Result<Choice, u32> {
    let hash = if svc.flags & service_flags::AFFINITY != 0 {
        client_hash(flow.src)
    } else {
        flow_hash(flow)
    };
    select_by_hash(hash, svc)
}

/// The backend in the Maglev slot `hash` falls on.
#[inline(always)]
pub fn select_by_hash(hash: u32, svc: &ServiceValue) -> Result<Choice, u32> {
    if svc.maglev_len == 0 {
        return Err(drop_reason::BAD_MAGLEV_RANGE);
    }
    let slot = svc.maglev_offset as u64 + (hash % svc.maglev_len) as u64;
    if slot >= capacity::MAGLEV as u64 {
        return Err(drop_reason::BAD_MAGLEV_RANGE);
    }
    let id = *MAGLEV
        .get(slot as u32)
        .ok_or(drop_reason::BAD_MAGLEV_RANGE)?;
    let backend = unsafe { BACKENDS.get(&id) }.ok_or(drop_reason::BACKEND_MISSING)?;
    Ok(Choice {
        id,
        addr: backend.addr,
        port: backend.port,
        local: backend.flags & lb_common::backend_flags::LOCAL != 0,
    })
}
