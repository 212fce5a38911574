//! Where a packet addressed to a frontend goes: a source outside the service's ranges is
//! dropped, an existing flow keeps its backend, a new one goes to its client's affine
//! backend or gets the Maglev choice, a service without backends rejects or drops.

use lb_common::{ct_flags, host_routing, scope, service_flags, stats::drop_reason};

use crate::{
    affinity, clock, conntrack, host_routing as routing,
    parse::Flow,
    select::{frontend, known_cluster_ip, maybe_frontend, select},
    snat, source_range,
};

/// Where a translated packet goes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// On to this node's stack: the backend is local.
    Stack,
    /// Back out of the interface it came in on, to the pod that sent it (hairpin).
    Hairpin,
    /// Out towards another node, by the FIB (a SNAT flow).
    Fib,
    /// Untranslated, in a tunnel to the backend's node (DSR).
    Tunnel,
    /// Straight to the local backend's pod, past the node's stack (host routing).
    Direct,
}

pub enum Forward {
    /// Not a service: leave the packet alone.
    Pass,
    /// Send to this backend; with `snat`, also from this source (address, port).
    Dnat {
        addr: u32,
        port: u16,
        service: u32,
        snat: Option<(u32, u16)>,
        route: Route,
    },
    Reject {
        service: u32,
    },
    Drop {
        service: u32,
        reason: u32,
    },
}

/// Decides the fate of a TCP or UDP packet that may be addressed to a service.
#[inline(always)]
pub fn forward(flow: &Flow, scope_nr: u8) -> Forward {
    if !maybe_frontend(flow.dst, flow.dport, flow.proto) {
        return not_a_frontend(flow, scope_nr);
    }
    let now = clock::now();
    let ct = conntrack::entry(flow);
    if let Some(ct) = ct {
        if let Some(e) = conntrack::established(flow, ct, scope_nr, now) {
            return existing(flow, &e);
        }
    }
    let svc = match frontend(flow, scope_nr) {
        Some(s) if s.flags & service_flags::ADDRESS_ONLY == 0 => s,
        _ => return not_a_frontend(flow, scope_nr),
    };
    // Every packet, not only new flows: a range removed cuts its established flows, as
    // a firewall does.
    if svc.flags & service_flags::SOURCE_RANGES != 0 && !source_range::allowed(svc.id, flow.src) {
        return Forward::Drop {
            service: svc.id,
            reason: drop_reason::SOURCE_RANGE,
        };
    }
    if let Some(ct) = ct {
        if let Some(e) = conntrack::confirm(flow, ct, &svc, now) {
            return existing(flow, &e);
        }
    }
    if svc.backend_count == 0 {
        if svc.flags & service_flags::LOCAL_POLICY != 0 {
            return Forward::Drop {
                service: svc.id,
                reason: drop_reason::NO_LOCAL_ENDPOINT,
            };
        }
        return Forward::Reject { service: svc.id };
    }
    let affine = svc.flags & service_flags::AFFINITY != 0;
    let bound = if affine {
        affinity::lookup(flow.src, &svc, now)
    } else {
        None
    };
    let backend = match bound {
        Some(b) => b,
        None => match select(flow, &svc) {
            Ok(b) => b,
            Err(reason) => {
                return Forward::Drop {
                    service: svc.id,
                    reason,
                }
            }
        },
    };
    if affine {
        affinity::remember(flow.src, &svc, &backend, now);
    }
    // A pod given itself as the backend would see a packet from its own address and drop
    // it; from the service-loopback address it answers, and the answer comes back through
    // the node to be translated. A flow from outside to another node's pod leaves with
    // this node's address, so that its answer comes back here.
    let (flags, snat_port) = if backend.addr == flow.src {
        (ct_flags::HAIRPIN, 0)
    } else if scope_nr == scope::EXTERNAL && !backend.local && svc.flags & service_flags::DSR != 0 {
        (ct_flags::DSR, 0)
    } else if scope_nr == scope::EXTERNAL && !backend.local {
        match snat::allocate(flow, &backend, now) {
            Ok(Some(port)) => (ct_flags::SNAT, port),
            Ok(None) => (0, 0),
            Err(()) => {
                return Forward::Drop {
                    service: svc.id,
                    reason: drop_reason::SNAT_EXHAUSTED,
                }
            }
        }
    } else if backend.local && routing::allowed(routing_bit(scope_nr)) {
        (ct_flags::DIRECT, 0)
    } else {
        (0, 0)
    };
    let ct_flags = conntrack::new_flags(flags, &svc, scope_nr);
    conntrack::create(flow, svc.id, &backend, ct_flags, snat_port, now);
    let (snat, route) = translation(flow, flags, snat_port);
    Forward::Dnat {
        addr: backend.addr,
        port: backend.port,
        service: svc.id,
        snat,
        route,
    }
}

/// The host_routing bit of the hook that handles `scope_nr`'s packets.
#[inline(always)]
fn routing_bit(scope_nr: u8) -> u32 {
    if scope_nr == scope::INTERNAL {
        host_routing::PODS
    } else {
        host_routing::UPLINKS
    }
}

/// A packet to no frontend passes, but for a ClusterIP's undeclared port, which is refused
/// as kube-proxy does.
#[inline(always)]
fn not_a_frontend(flow: &Flow, scope_nr: u8) -> Forward {
    if scope_nr == scope::INTERNAL && maybe_frontend(flow.dst, 0, 0) && known_cluster_ip(flow.dst) {
        return Forward::Reject { service: 0 };
    }
    Forward::Pass
}

/// The translation of an existing flow.
#[inline(always)]
fn existing(flow: &Flow, e: &conntrack::Existing) -> Forward {
    let (snat, route) = translation(flow, e.flags, e.snat_port);
    Forward::Dnat {
        addr: e.addr,
        port: e.port,
        service: e.service,
        snat,
        route,
    }
}

/// The source rewrite and the route a flow's `ct_flags` call for.
#[inline(always)]
fn translation(flow: &Flow, flags: u8, snat_port: u16) -> (Option<(u32, u16)>, Route) {
    if flags & ct_flags::HAIRPIN != 0 {
        (
            Some((conntrack::hairpin_addr(), flow.sport)),
            Route::Hairpin,
        )
    } else if flags & ct_flags::SNAT != 0 {
        (Some((snat::addr(), snat_port)), Route::Fib)
    } else if flags & ct_flags::DSR != 0 {
        (None, Route::Tunnel)
    } else if flags & ct_flags::DIRECT != 0 {
        (None, Route::Direct)
    } else {
        (None, Route::Stack)
    }
}
