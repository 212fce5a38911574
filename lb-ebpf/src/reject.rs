//! Builds the refusal for a service without endpoints, in place of the packet: a TCP RST
//! for TCP and an ICMP port unreachable for UDP, addressed back to the sender.

use crate::{
    csum,
    parse::{ptr_at, Flow, TCP_ACK, TCP_FIN, TCP_SYN},
};
use lb_common::proto;

const TTL: u8 = 64;
/// Room the ICMP reply needs in front of the quoted IP header: its own IP and ICMP headers.
pub const ICMP_ROOM: usize = 28;
/// Quoted original datagram: the IP header and the first 8 bytes after it.
const QUOTE_EXTRA: usize = 8;

/// Swaps the Ethernet addresses of the frame starting at `data`.
#[inline(always)]
pub fn swap_macs(data: usize, data_end: usize) -> Option<()> {
    let eth: *mut [u8; 12] = ptr_at(data, data_end, 0)?;
    let eth = unsafe { &mut *eth };
    let mut i = 0;
    while i < 6 {
        eth.swap(i, i + 6);
        i += 1;
    }
    Some(())
}

#[inline(always)]
fn ipv4_header(total_len: u16, proto_nr: u8, src: u32, dst: u32) -> [u8; 20] {
    let t = total_len.to_be_bytes();
    let s = src.to_ne_bytes();
    let d = dst.to_ne_bytes();
    let mut h = [
        0x45, 0, t[0], t[1], 0, 0, 0x40, 0, TTL, proto_nr, 0, 0, s[0], s[1], s[2], s[3], d[0],
        d[1], d[2], d[3],
    ];
    let c = !csum::fold(csum::sum_words(&h));
    h[10..12].copy_from_slice(&c.to_ne_bytes());
    h
}

/// Rewrites a TCP packet into the RST that answers it. Returns the new frame length; the
/// caller trims the frame to it.
#[inline(always)]
pub fn tcp_rst(data: usize, data_end: usize, flow: &Flow) -> Option<usize> {
    let ip: *const [u8; 4] = ptr_at(data, data_end, flow.l3_off)?;
    let ip = unsafe { &*ip };
    let tcp: *const [u8; 20] = ptr_at(data, data_end, flow.l4_off)?;
    let tcp = unsafe { &*tcp };
    let total_len = u16::from_be_bytes([ip[2], ip[3]]) as u32;
    let ihl = ((ip[0] & 0x0f) as u32) * 4;
    let doff = ((tcp[12] >> 4) as u32) * 4;
    let payload = total_len.saturating_sub(ihl + doff);
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    let ack = u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]);
    let flags = tcp[13];

    // RFC 793: answer an ACK with a RST carrying its ack number; anything else with RST+ACK
    // acknowledging everything it occupied.
    let (rst_seq, rst_ack, rst_flags) = if flags & TCP_ACK != 0 {
        (ack, 0, 0x04)
    } else {
        let len = payload + (flags & TCP_SYN != 0) as u32 + (flags & TCP_FIN != 0) as u32;
        (0, seq.wrapping_add(len), 0x14)
    };
    let s = rst_seq.to_be_bytes();
    let a = rst_ack.to_be_bytes();
    let sp = flow.dport.to_ne_bytes();
    let dp = flow.sport.to_ne_bytes();
    let mut out = [
        sp[0], sp[1], dp[0], dp[1], s[0], s[1], s[2], s[3], a[0], a[1], a[2], a[3], 0x50,
        rst_flags, 0, 0, 0, 0, 0, 0,
    ];
    let pseudo = (flow.dst & 0xffff) as u64
        + (flow.dst >> 16) as u64
        + (flow.src & 0xffff) as u64
        + (flow.src >> 16) as u64
        + (proto::TCP as u16).to_be() as u64
        + 20u16.to_be() as u64;
    let c = !csum::fold(pseudo + csum::sum_words(&out));
    out[16..18].copy_from_slice(&c.to_ne_bytes());

    let ip_out = ipv4_header(40, proto::TCP, flow.dst, flow.src);
    let ip_ptr: *mut [u8; 20] = ptr_at(data, data_end, flow.l3_off)?;
    let tcp_ptr: *mut [u8; 20] = ptr_at(data, data_end, flow.l3_off + 20)?;
    unsafe {
        *ip_ptr = ip_out;
        *tcp_ptr = out;
    }
    swap_macs(data, data_end)?;
    Some(flow.l3_off + 40)
}

/// Writes an ICMP port unreachable into a frame laid out as
/// `[ethernet][ICMP_ROOM free bytes][original IP header ...]`, the layout after the caller
/// made room behind the Ethernet header. `flow` describes the original packet. Returns the
/// new frame length; the caller trims the frame to it.
#[inline(always)]
pub fn icmp_port_unreachable(data: usize, data_end: usize, flow: &Flow) -> Option<usize> {
    let l3 = flow.l3_off;
    let ihl = flow.l4_off - flow.l3_off;
    let quoted = ihl + QUOTE_EXTRA;
    // The quoted bytes must be in the frame.
    if data + l3 + ICMP_ROOM + quoted > data_end {
        return None;
    }
    let ip_out = ipv4_header((ICMP_ROOM + quoted) as u16, proto::ICMP, flow.dst, flow.src);
    let icmp: *mut [u8; 8] = ptr_at(data, data_end, l3 + 20)?;
    let ip_ptr: *mut [u8; 20] = ptr_at(data, data_end, l3)?;
    unsafe {
        *ip_ptr = ip_out;
        *icmp = [3, 3, 0, 0, 0, 0, 0, 0];
    }
    // ICMP checksum over its header and the quote: at most 8 + 60 + 8 bytes.
    let mut sum = 0u64;
    let start = l3 + 20;
    let len = 8 + quoted;
    let mut i = 0;
    while i < 38 {
        if i * 2 + 1 >= len {
            break;
        }
        // Opaque to LLVM's loop strength reduction, which would otherwise count a negative
        // offset up to zero: newer verifiers (7.x) refuse a packet pointer below its start
        // ("unbounded memory access").
        let at = core::hint::black_box(start + i * 2);
        let w: *const u16 = ptr_at(data, data_end, at)?;
        sum += unsafe { w.read_unaligned() } as u64;
        i += 1;
    }
    let c = !csum::fold(sum);
    let c_ptr: *mut u16 = ptr_at(data, data_end, l3 + 22)?;
    unsafe { c_ptr.write_unaligned(c) };
    swap_macs(data, data_end)?;
    Some(l3 + ICMP_ROOM + quoted)
}
