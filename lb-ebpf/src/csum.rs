//! Internet checksum arithmetic (RFC 1071, incremental updates per RFC 1624).

#[inline(always)]
pub fn fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The checksum field after a 32-bit word of the covered data changed from `old` to `new`.
/// All values are as stored in the packet (wire order in native integers).
#[inline(always)]
pub fn update32(csum: u16, old: u32, new: u32) -> u16 {
    let sum = (!csum & 0xffff) as u64
        + (!old & 0xffff) as u64
        + ((!old) >> 16) as u64
        + (new & 0xffff) as u64
        + (new >> 16) as u64;
    !fold(sum)
}

/// The checksum field after a 16-bit word changed from `old` to `new`.
#[inline(always)]
pub fn update16(csum: u16, old: u16, new: u16) -> u16 {
    let sum = (!csum) as u64 + (!old) as u64 + new as u64;
    !fold(sum)
}

/// The sum of 16-bit words of a fixed-size header, not yet folded or complemented.
#[inline(always)]
pub fn sum_words<const N: usize>(bytes: &[u8; N]) -> u64 {
    let mut sum = 0u64;
    let mut i = 0;
    while i + 1 < N {
        sum += u16::from_ne_bytes([bytes[i], bytes[i + 1]]) as u64;
        i += 2;
    }
    sum
}
