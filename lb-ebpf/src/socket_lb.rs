//! Socket-level load balancing for the node's own processes (hostNetwork pods, the
//! kubelet, an operator's curl). The cgroup hooks translate a socket's destination once,
//! at connect or sendmsg, with the same tables and rules as the packet path, and restore
//! the service address as the peer the socket sees (recvmsg, getpeername). They act only
//! for sockets in the agent's own network namespace: pods and other namespaces on the
//! machine stay on the packet path.

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
    EbpfContext,
};
use lb_common::{
    proto, scope, service_flags, stats::verdict, SockConfig, SockRevKey, SockRevValue,
};

use crate::{
    affinity, clock,
    maps::{SOCK_CONFIG, SOCK_REVNAT},
    select::{client_hash, fmix, is_node_address, known_cluster_ip, lookup, select_by_hash},
    source_range,
    stats::{count_drop, count_service, count_service_drop, count_verdict},
};

const AF_INET: u32 = 2;
const ECONNREFUSED: i32 = 111;
/// Return codes of sock_addr programs.
const ALLOW: i32 = 1;
const DENY: i32 = 0;

enum Decision {
    Pass,
    To { addr: u32, port: u16, service: u32 },
    Reject,
}

/// The settings, when this socket is in the agent's network namespace.
#[inline(always)]
fn ours(ctx: &SockAddrContext) -> Option<SockConfig> {
    let cfg = SOCK_CONFIG.get(0)?;
    if cfg.netns_cookie == 0 {
        return None;
    }
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    (cookie == cfg.netns_cookie).then_some(*cfg)
}

/// The agent's connect to the nonce tells which network namespace is the agent's.
#[inline(always)]
fn learn(ctx: &SockAddrContext, sa: &bpf_sock_addr) {
    let Some(cfg) = SOCK_CONFIG.get_ptr_mut(0) else {
        return;
    };
    let cfg = unsafe { &mut *cfg };
    if cfg.nonce_port != 0 && sa.user_ip4 == cfg.nonce_addr && sa.user_port as u16 == cfg.nonce_port
    {
        cfg.netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    }
}

/// Loopback, 127.0.0.0/8 (the first octet is the lowest byte of a wire-order address):
/// kube-proxy's iptables mode serves NodePorts on every local address.
#[inline(always)]
fn is_loopback(addr: u32) -> bool {
    addr & 0xff == 127
}

/// Where a socket of this node dialling `dst:dport` goes. The node is one client whose
/// address is `cfg.node_addr`; the Maglev hash is the socket cookie's (the source port is
/// not chosen yet), so one process's connections spread over the backends.
#[inline(always)]
fn decide(dst: u32, dport: u16, proto_nr: u8, cookie: u64, cfg: &SockConfig) -> Decision {
    if proto_nr != proto::TCP && proto_nr != proto::UDP {
        return Decision::Pass;
    }
    let on_node = || is_loopback(dst) || is_node_address(dst);
    let svc = match lookup(dst, dport, proto_nr, scope::INTERNAL, on_node) {
        Some(s) if s.flags & service_flags::ADDRESS_ONLY == 0 => s,
        _ => {
            if known_cluster_ip(dst) {
                return Decision::Reject;
            }
            return Decision::Pass;
        }
    };
    let client = cfg.node_addr;
    if svc.flags & service_flags::SOURCE_RANGES != 0 && !source_range::allowed(svc.id, client) {
        return Decision::Reject;
    }
    if svc.backend_count == 0 {
        return Decision::Reject;
    }
    let now = clock::now();
    let affine = svc.flags & service_flags::AFFINITY != 0;
    let bound = if affine {
        affinity::lookup(client, &svc, now)
    } else {
        None
    };
    let backend = match bound {
        Some(b) => b,
        None => {
            let hash = if affine {
                client_hash(client)
            } else {
                fmix(cookie as u32 ^ fmix((cookie >> 32) as u32))
            };
            match select_by_hash(hash, &svc) {
                Ok(b) => b,
                Err(reason) => {
                    count_drop(reason);
                    count_service_drop(svc.id);
                    return Decision::Reject;
                }
            }
        }
    };
    if affine {
        affinity::remember(client, &svc, &backend, now);
    }
    Decision::To {
        addr: backend.addr,
        port: backend.port,
        service: svc.id,
    }
}

/// Rewrites the destination of a connect or sendmsg. `RETVAL`: the kernel has
/// `bpf_set_retval` (5.18), so a refusal reads ECONNREFUSED instead of EPERM.
#[inline(always)]
fn translate<const RETVAL: bool>(ctx: &SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(cfg) = ours(ctx) else {
        return ALLOW;
    };
    if sa.user_family != AF_INET {
        return ALLOW;
    }
    let (dst, dport) = (sa.user_ip4, sa.user_port as u16);
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    match decide(dst, dport, sa.protocol as u8, cookie, &cfg) {
        Decision::Pass => ALLOW,
        Decision::To {
            addr,
            port,
            service,
        } => {
            // An LRU map evicts instead of failing; a lost entry only shows the backend as
            // a UDP reply's source.
            let _ = SOCK_REVNAT.insert(
                &SockRevKey::new(cookie, addr, port),
                &SockRevValue::new(dst, dport),
                0,
            );
            sa.user_ip4 = addr;
            sa.user_port = port as u32;
            count_service(service, 0);
            count_verdict(verdict::SOCKET, 0);
            ALLOW
        }
        Decision::Reject => {
            count_verdict(verdict::REJECT, 0);
            if RETVAL {
                unsafe { bpf_set_retval(-ECONNREFUSED) };
            }
            DENY
        }
    }
}

/// Shows the service address in place of the backend a translated socket talks to.
#[inline(always)]
fn restore_peer(ctx: &SockAddrContext) -> i32 {
    if ours(ctx).is_none() {
        return ALLOW;
    }
    let sa = unsafe { &mut *ctx.sock_addr };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRevKey::new(cookie, sa.user_ip4, sa.user_port as u16);
    if let Some(v) = unsafe { SOCK_REVNAT.get(&key) } {
        sa.user_ip4 = v.addr;
        sa.user_port = v.port as u32;
    }
    ALLOW
}

#[cgroup_sock_addr(connect4)]
pub fn lb_connect4(ctx: SockAddrContext) -> i32 {
    learn(&ctx, unsafe { &*ctx.sock_addr });
    translate::<true>(&ctx)
}

/// For kernels without `bpf_set_retval`: refusals read EPERM.
#[cgroup_sock_addr(connect4)]
pub fn lb_connect4_compat(ctx: SockAddrContext) -> i32 {
    learn(&ctx, unsafe { &*ctx.sock_addr });
    translate::<false>(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sendmsg4(ctx: SockAddrContext) -> i32 {
    translate::<true>(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sendmsg4_compat(ctx: SockAddrContext) -> i32 {
    translate::<false>(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn lb_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore_peer(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn lb_getpeername4(ctx: SockAddrContext) -> i32 {
    restore_peer(&ctx)
}
