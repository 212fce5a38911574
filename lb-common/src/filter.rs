//! The frontend filter: a bitmap over hashed (address, port, protocol) tuples in which a set
//! bit says that no frontend falls on that slot. Most packets a node sees are not for a
//! service; one inlined array read lets them pass without the hash-map lookups a frontend
//! needs. A clear bit only means "maybe": the lookups decide. An all-zero map (programs
//! loaded before the agent wrote it) therefore filters nothing.
//!
//! The agent clears the slot of every SERVICES key with an address, of every ClusterIP
//! marker (port and protocol 0), and of every NodePort on every node address.

/// Bits in the map: 2^21, so that 100,000 frontend tuples leave about 95% of slots set.
pub const BITS: u32 = 1 << 21;
/// u64 words in the map.
pub const WORDS: u32 = BITS / 64;

/// The slot of a tuple (address and port in wire order).
#[inline(always)]
pub const fn slot(addr: u32, port: u16, proto: u8) -> u32 {
    let mut h = addr ^ ((port as u32) << 8 | proto as u32).wrapping_mul(0x9e37_79b9);
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h & (BITS - 1)
}

/// The word holding `slot` and the slot's bit in it.
#[inline(always)]
pub const fn position(slot: u32) -> (u32, u64) {
    (slot / 64, 1 << (slot % 64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_spread_over_the_map() {
        // A /16 of ClusterIPs on one port must not pile onto a few words.
        let mut words = [0u8; WORDS as usize];
        for i in 0..65_536u32 {
            let addr = (10u32 << 24 | 96 << 16 | i).to_be();
            let (w, _) = position(slot(addr, 80u16.to_be(), 6));
            words[w as usize] = words[w as usize].saturating_add(1);
        }
        let max = *words.iter().max().unwrap();
        assert!(max < 16, "a word holds {max} of 65,536 addresses");
    }

    #[test]
    fn port_and_protocol_change_the_slot() {
        let a = 0x0a00_0001;
        assert_ne!(slot(a, 80, 6), slot(a, 81, 6));
        assert_ne!(slot(a, 80, 6), slot(a, 80, 17));
        assert_ne!(slot(a, 80, 6), slot(a, 0, 0));
    }
}
