//! Conversions between host values and the wire-order integers stored in the maps.

/// An IPv4 address as stored in the maps: its four octets in wire order.
pub const fn ipv4(octets: [u8; 4]) -> u32 {
    u32::from_ne_bytes(octets)
}

/// The octets of an address stored in the maps.
pub const fn ipv4_octets(stored: u32) -> [u8; 4] {
    stored.to_ne_bytes()
}

/// A port as stored in the maps (network byte order).
pub const fn port(host_order: u16) -> u16 {
    host_order.to_be()
}

/// A stored port back in host order.
pub const fn port_host(stored: u16) -> u16 {
    u16::from_be(stored)
}
