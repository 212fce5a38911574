//! ICMP errors (destination unreachable, time exceeded, parameter problem) that quote a
//! translated flow get the flow's translation on the quoted header and on the outer
//! address that equals it, so the sender of the quoted packet recognises its own packet.
//!
//! Direction by direction, with client C, frontend F and backend B:
//! - towards the client (egress programs): the quote is C -> B, found as the reply entry
//!   B -> C; the quoted destination and an outer source B become F;
//! - towards the backend (ingress programs): the quote is F -> C, found as the forward
//!   entry C -> F; the quoted source and the outer destination F become B.
//!
//! ICMP errors carry complete checksums (the kernel computes them when it builds the
//! error), so both hooks update them by arithmetic on the linear packet data.

use lb_common::{ct_flags, ct_kind, proto, CtKey};

use crate::{
    clock, conntrack, csum,
    parse::{ptr_at, Flow},
};

const DEST_UNREACH: u8 = 3;
const TIME_EXCEEDED: u8 = 11;
const PARAMETER_PROBLEM: u8 = 12;
/// The ICMP header in front of the quote.
const ICMP_HLEN: usize = 8;
/// How much of an error must be linear to be translated: ICMP header, the longest quoted
/// IP header and the quoted ports and checksums.
pub const LINEAR_LEN: usize = ICMP_HLEN + 60 + 20;

#[inline(always)]
pub fn is_error(data: usize, data_end: usize, flow: &Flow) -> bool {
    if flow.proto != proto::ICMP || flow.later_fragment {
        return false;
    }
    // The whole header: a one-byte check compiles to a comparison the verifier reads as
    // proving nothing.
    match ptr_at::<[u8; ICMP_HLEN]>(data, data_end, flow.l4_off) {
        Some(h) => matches!(
            unsafe { (*h)[0] },
            DEST_UNREACH | TIME_EXCEEDED | PARAMETER_PROBLEM
        ),
        None => false,
    }
}

/// Which flows' errors a hook translates, by their host routing (ct_flags::DIRECT).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    Any,
    /// Only flows host routing carries: their errors must take the same way.
    Direct,
    /// Only the others: a direct flow's errors are translated by a later hook.
    Stack,
}

/// Translates an ICMP error whose quote matches a conntrack entry of `kind`
/// (`ct_kind::REPLY` on egress, `ct_kind::FORWARD` on ingress) and `routing`. Returns the
/// service id and the entry's flags, or `None` (packet untouched) when the quote is not
/// of such a flow.
#[inline(always)]
pub fn translate(
    data: usize,
    data_end: usize,
    flow: &Flow,
    kind: u8,
    routing: Routing,
) -> Option<(u32, u8)> {
    let inner_l3 = flow.l4_off + ICMP_HLEN;
    let ip: *mut [u8; 20] = ptr_at(data, data_end, inner_l3)?;
    let ip = unsafe { &mut *ip };
    if ip[0] >> 4 != 4 {
        return None;
    }
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    let inner_proto = ip[9];
    let later_fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0;
    if ihl < 20 || later_fragment || (inner_proto != proto::TCP && inner_proto != proto::UDP) {
        return None;
    }
    let inner_l4 = inner_l3 + ihl;
    let l4: *mut [u8; 8] = ptr_at(data, data_end, inner_l4)?;
    let l4 = unsafe { &mut *l4 };
    let src = u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]);
    let dst = u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]);
    let sport = u16::from_ne_bytes([l4[0], l4[1]]);
    let dport = u16::from_ne_bytes([l4[2], l4[3]]);
    // The quoted packet travelled the other way: its reversed tuple is the entry's key.
    let key = CtKey::new(dst, src, dport, sport, inner_proto);
    let ct = conntrack::quoted(&key, kind, clock::now())?;
    // Errors about flows translated at both ends are left to the endpoints' timeouts.
    if ct.flags & (ct_flags::HAIRPIN | ct_flags::SNAT | ct_flags::DSR) != 0 {
        return None;
    }
    let direct = ct.flags & ct_flags::DIRECT != 0;
    if (routing == Routing::Direct && !direct) || (routing == Routing::Stack && direct) {
        return None;
    }
    let icmp_csum: *mut u16 = ptr_at(data, data_end, flow.l4_off + 2)?;
    let outer_csum: *mut u16 = ptr_at(data, data_end, flow.l3_off + 10)?;

    // Which quoted end changes, and which outer end mirrors it.
    let to_client = kind == ct_kind::REPLY;
    let (old_addr, old_port) = if to_client {
        (dst, dport)
    } else {
        (src, sport)
    };
    let (addr_off, port_off, outer_off) = if to_client { (16, 2, 12) } else { (12, 0, 16) };
    let (new_addr, new_port) = (ct.nat_addr, ct.nat_port);
    let outer: *mut u32 = ptr_at(data, data_end, flow.l3_off + outer_off)?;

    let mut icmp = unsafe { icmp_csum.read_unaligned() };
    // The quoted L4 checksum covers the changed address (pseudo header) and port; UDP's
    // sits in the 8 quoted bytes, TCP's only when more was quoted.
    let l4_csum: Option<*mut u16> = if inner_proto == proto::UDP {
        ptr_at(data, data_end, inner_l4 + 6)
    } else {
        ptr_at(data, data_end, inner_l4 + 16)
    };
    if let Some(p) = l4_csum {
        let old = unsafe { p.read_unaligned() };
        if inner_proto == proto::TCP || old != 0 {
            let mut new =
                csum::update16(csum::update32(old, old_addr, new_addr), old_port, new_port);
            if inner_proto == proto::UDP && new == 0 {
                new = 0xffff;
            }
            unsafe { p.write_unaligned(new) };
            icmp = csum::update16(icmp, old, new);
        }
    }
    let port_bytes = new_port.to_ne_bytes();
    l4[port_off] = port_bytes[0];
    l4[port_off + 1] = port_bytes[1];
    icmp = csum::update16(icmp, old_port, new_port);

    let old_ip_csum = u16::from_ne_bytes([ip[10], ip[11]]);
    let new_ip_csum = csum::update32(old_ip_csum, old_addr, new_addr);
    ip[10..12].copy_from_slice(&new_ip_csum.to_ne_bytes());
    ip[addr_off..addr_off + 4].copy_from_slice(&new_addr.to_ne_bytes());
    icmp = csum::update32(icmp, old_addr, new_addr);
    icmp = csum::update16(icmp, old_ip_csum, new_ip_csum);
    unsafe { icmp_csum.write_unaligned(icmp) };

    // The outer header is not covered by the ICMP checksum, only by its own.
    unsafe {
        if outer.read_unaligned() == old_addr {
            outer_csum.write_unaligned(csum::update32(
                outer_csum.read_unaligned(),
                old_addr,
                new_addr,
            ));
            outer.write_unaligned(new_addr);
        }
    }
    Some((ct.service_id, ct.flags))
}
