//! Source NAT for flows from outside to a backend on another node: the flow leaves with
//! the node's address and a source port handed out here, so the backend's answer comes
//! back through this node. A port is taken by inserting its reply tuple into SNAT; it is
//! free again once the flow's conntrack entry has expired.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_get_prandom_u32};
use lb_common::{ct_flags, ct_kind, CtKey, SnatValue};

use crate::{
    conntrack,
    maps::{CONNTRACK, SNAT, SNAT_CONFIG},
    parse::Flow,
    select::Choice,
};

/// Ports tried before a flow counts as exhausted: with random starting points a range
/// that is mostly free answers at once, and a full one gives up quickly.
const TRIES: u32 = 8;

/// The node address SNAT flows get; 0 when SNAT is off.
#[inline(always)]
pub fn addr() -> u32 {
    SNAT_CONFIG.get(0).map_or(0, |c| c.addr)
}

/// Is the entry under `key` held by a live flow?
#[inline(always)]
fn held(key: &CtKey, v: &SnatValue, now: u64) -> bool {
    let fwd = CtKey::new(
        v.client_addr,
        v.front_addr,
        v.client_port,
        v.front_port,
        key.proto,
    );
    match unsafe { CONNTRACK.get(&fwd) } {
        Some(ct) => {
            ct.kind == ct_kind::FORWARD
                && ct.flags & ct_flags::SNAT != 0
                && ct.snat_port == key.dst_port
                && conntrack::live(ct, key.proto, now)
        }
        None => false,
    }
}

/// A source port for a new flow of `flow` to `backend`, or None when SNAT is off or no
/// port is free.
#[inline(always)]
pub fn allocate(flow: &Flow, backend: &Choice, now: u64) -> Result<Option<u16>, ()> {
    let Some(cfg) = SNAT_CONFIG.get(0) else {
        return Ok(None);
    };
    if cfg.addr == 0 || cfg.port_max < cfg.port_min {
        return Ok(None);
    }
    let span = (cfg.port_max - cfg.port_min) as u32 + 1;
    let start = unsafe { bpf_get_prandom_u32() };
    let value = SnatValue {
        client_addr: flow.src,
        front_addr: flow.dst,
        client_port: flow.sport,
        front_port: flow.dport,
    };
    for i in 0..TRIES {
        let port = (cfg.port_min as u32 + start.wrapping_add(i) % span) as u16;
        let port = port.to_be();
        let key = CtKey::new(backend.addr, cfg.addr, backend.port, port, flow.proto);
        if SNAT.insert(&key, &value, BPF_NOEXIST as u64).is_ok() {
            return Ok(Some(port));
        }
        let free = match unsafe { SNAT.get(&key) } {
            Some(v) => !held(&key, v, now),
            None => true,
        };
        if free && SNAT.insert(&key, &value, 0).is_ok() {
            return Ok(Some(port));
        }
    }
    Err(())
}

/// The client and frontend of a reply arriving for a SNAT flow.
#[inline(always)]
pub fn reverse(flow: &Flow) -> Option<SnatValue> {
    let cfg = SNAT_CONFIG.get(0)?;
    if cfg.addr == 0 || flow.dst != cfg.addr {
        return None;
    }
    let port = u16::from_be(flow.dport);
    if port < cfg.port_min || port > cfg.port_max {
        return None;
    }
    let key = CtKey::new(flow.src, flow.dst, flow.sport, flow.dport, flow.proto);
    unsafe { SNAT.get(&key) }.copied()
}
