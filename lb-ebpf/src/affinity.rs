//! sessionAffinity ClientIP: a client's new connections go where its last one went, while
//! that was less than the timeout ago and that backend still belongs to the selection.

use lb_common::{
    backend_flags, backend_state, service_flags, AffinityKey, AffinityValue, BackendValue,
    ServiceValue,
};

use crate::{
    maps::{AFFINITY, BACKENDS},
    select::Choice,
};

const NS: u64 = 1_000_000_000;

#[inline(always)]
fn key_of(client: u32, svc: &ServiceValue) -> AffinityKey {
    AffinityKey {
        service_id: svc.id,
        client,
    }
}

/// Would the agent have put this backend in the frontend's selection? The selection is
/// the ready endpoints (local ones only under a Local policy), or the serving terminating
/// ones when none is ready; the flags say which rule made it.
#[inline(always)]
fn in_selection(b: &BackendValue, svc: &ServiceValue) -> bool {
    let state = if svc.flags & service_flags::TERMINATING_FALLBACK != 0 {
        backend_state::TERMINATING
    } else {
        backend_state::ACTIVE
    };
    let local_ok =
        svc.flags & service_flags::LOCAL_POLICY == 0 || b.flags & backend_flags::LOCAL != 0;
    b.service_id == svc.id && b.state == state && local_ok
}

/// The backend this client (address) is bound to, if the binding is still good.
#[inline(always)]
pub fn lookup(client: u32, svc: &ServiceValue, now: u64) -> Option<Choice> {
    let a = unsafe { AFFINITY.get(&key_of(client, svc)) }?;
    if now.saturating_sub(a.last_used_ns) > svc.affinity_timeout as u64 * NS {
        return None;
    }
    let id = a.backend_id;
    let b = unsafe { BACKENDS.get(&id) }?;
    if !in_selection(b, svc) {
        return None;
    }
    Some(Choice {
        id,
        addr: b.addr,
        port: b.port,
        local: b.flags & backend_flags::LOCAL != 0,
    })
}

/// Binds the client to the backend of its new connection, from now.
#[inline(always)]
pub fn remember(client: u32, svc: &ServiceValue, backend: &Choice, now: u64) {
    // An LRU map evicts instead of failing; a lost binding only costs stickiness.
    let _ = AFFINITY.insert(
        &key_of(client, svc),
        &AffinityValue::new(backend.id, now),
        0,
    );
}
