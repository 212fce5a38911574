//! Header parsing. Every access is checked against `data_end`; anything that does not parse
//! as a complete header is reported as [`Unparsed`] and passed untouched by the callers.

use core::mem::size_of;

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// A pointer to a `T` at `off` bytes into the packet, if the packet is long enough.
#[inline(always)]
pub fn ptr_at<T>(data: usize, data_end: usize, off: usize) -> Option<*mut T> {
    // The verifier needs this check where the access is; the compiler would drop it when
    // an earlier check implies it, so the end is read through a volatile load it cannot
    // reason about.
    let data_end = unsafe { core::ptr::read_volatile(&data_end) };
    if data + off + size_of::<T>() > data_end {
        return None;
    }
    Some((data + off) as *mut T)
}

/// What the programs need to know of an IPv4 packet.
#[derive(Clone, Copy)]
pub struct Flow {
    pub l3_off: usize,
    pub l4_off: usize,
    pub proto: u8,
    pub src: u32,
    pub dst: u32,
    /// Ports in wire order; zero for non-first fragments and ICMP.
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
    pub ip_id: u16,
    /// More fragments follow (and this is the first one when `later_fragment` is false).
    pub more_fragments: bool,
    /// Fragment offset is not zero: no L4 header here.
    pub later_fragment: bool,
}

/// Why a frame yields no [`Flow`].
#[derive(Clone, Copy)]
pub enum Unparsed {
    /// Not IPv4: not ours.
    Other,
    /// An IPv4 header too short or inconsistent to trust; `dst` when it could be read.
    Malformed { dst: Option<u32> },
}

/// The L3 offset of an IPv4 packet (after an optional VLAN tag), or `None` for other
/// ethertypes.
#[inline(always)]
fn ipv4_offset(data: usize, data_end: usize) -> Option<usize> {
    let proto: *const u16 = ptr_at(data, data_end, 12)?;
    let mut ethertype = u16::from_be(unsafe { *proto });
    let mut off = ETH_HLEN;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        let inner: *const u16 = ptr_at(data, data_end, 16)?;
        ethertype = u16::from_be(unsafe { *inner });
        off += 4;
    }
    if ethertype != ETH_P_IP {
        return None;
    }
    Some(off)
}

/// Parses Ethernet, IPv4 (with options) and the TCP/UDP/ICMP header.
#[inline(always)]
pub fn parse(data: usize, data_end: usize) -> Result<Flow, Unparsed> {
    let l3_off = ipv4_offset(data, data_end).ok_or(Unparsed::Other)?;
    let Some(ip) = ptr_at::<[u8; 20]>(data, data_end, l3_off) else {
        return Err(Unparsed::Malformed { dst: None });
    };
    let ip = unsafe { &*ip };
    let dst = u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]);
    let malformed = Unparsed::Malformed { dst: Some(dst) };
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    let total_len = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    if ip[0] >> 4 != 4 || ihl < 20 || total_len < ihl {
        return Err(malformed);
    }
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    let more_fragments = frag & 0x2000 != 0;
    let later_fragment = frag & 0x1fff != 0;
    let mut flow = Flow {
        l3_off,
        l4_off: l3_off + ihl,
        proto: ip[9],
        src: u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]),
        dst,
        sport: 0,
        dport: 0,
        tcp_flags: 0,
        ip_id: u16::from_ne_bytes([ip[4], ip[5]]),
        more_fragments,
        later_fragment,
    };
    // The options must be present in full before the L4 header is trusted.
    if data + flow.l4_off > data_end {
        return Err(malformed);
    }
    if later_fragment {
        return Ok(flow);
    }
    match flow.proto {
        lb_common::proto::TCP => {
            let tcp: *const [u8; 20] = ptr_at(data, data_end, flow.l4_off).ok_or(malformed)?;
            let tcp = unsafe { &*tcp };
            if ((tcp[12] >> 4) as usize) * 4 < 20 {
                return Err(malformed);
            }
            flow.sport = u16::from_ne_bytes([tcp[0], tcp[1]]);
            flow.dport = u16::from_ne_bytes([tcp[2], tcp[3]]);
            flow.tcp_flags = tcp[13];
        }
        lb_common::proto::UDP => {
            let udp: *const [u8; 8] = ptr_at(data, data_end, flow.l4_off).ok_or(malformed)?;
            let udp = unsafe { &*udp };
            flow.sport = u16::from_ne_bytes([udp[0], udp[1]]);
            flow.dport = u16::from_ne_bytes([udp[2], udp[3]]);
        }
        lb_common::proto::ICMP => {
            ptr_at::<[u8; 8]>(data, data_end, flow.l4_off).ok_or(malformed)?;
        }
        _ => {}
    }
    Ok(flow)
}

/// Offset of the L4 checksum field, for protocols that have ports.
#[inline(always)]
pub fn l4_csum_off(flow: &Flow) -> usize {
    if flow.proto == lb_common::proto::TCP {
        flow.l4_off + 16
    } else {
        flow.l4_off + 6
    }
}
