//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): a lookup table in which every
//! backend owns an almost equal share of slots, and a change of backends moves few slots.

use std::net::Ipv4Addr;

/// FNV-1a with a seed, enough to spread backend names over the permutation space.
fn hash(name: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for &b in name {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // Final avalanche so that similar names land far apart.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

/// A backend's name as its permutation is derived from: "10.0.0.1:8080", written into a
/// buffer on the stack because a first sync names hundreds of thousands of backends.
struct Name {
    buf: [u8; 21],
    len: usize,
}

impl Name {
    fn new(addr: Ipv4Addr, port: u16) -> Self {
        let mut name = Self {
            buf: [0; 21],
            len: 0,
        };
        for (i, octet) in addr.octets().into_iter().enumerate() {
            if i > 0 {
                name.push(b'.');
            }
            name.push_decimal(octet.into());
        }
        name.push(b':');
        name.push_decimal(port);
        name
    }

    fn push(&mut self, b: u8) {
        self.buf[self.len] = b;
        self.len += 1;
    }

    fn push_decimal(&mut self, mut v: u16) {
        let mut digits = [0u8; 5];
        let mut n = 0;
        loop {
            digits[n] = b'0' + (v % 10) as u8;
            n += 1;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        for &d in digits[..n].iter().rev() {
            self.push(d);
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// The table of length `len` (a prime) for these backends (address, port), as indices
/// into `backends`. The permutation comes from the backends alone, so the same backends
/// always give the same table, also across agent versions: a restarted agent keeps the
/// tables it finds.
pub fn table(backends: impl IntoIterator<Item = (Ipv4Addr, u16)>, len: u32) -> Vec<u32> {
    let m = u64::from(len);
    // Each backend's next preferred slot, (offset + k * skip) mod len for its k-th choice,
    // kept by addition: a division per probe cost more than the rest of the fill.
    let mut cursors: Vec<(u32, u32)> = backends
        .into_iter()
        .map(|(addr, port)| {
            let name = Name::new(addr, port);
            let offset = hash(name.bytes(), 0x5eed_0001) % m;
            let skip = hash(name.bytes(), 0x5eed_0002) % (m - 1) + 1;
            (offset as u32, skip as u32)
        })
        .collect();
    if cursors.is_empty() {
        return Vec::new();
    }
    let advance = |slot: u32, skip: u32| {
        let next = slot + skip;
        if next >= len {
            next - len
        } else {
            next
        }
    };
    let mut table = vec![u32::MAX; len as usize];
    let mut filled = 0;
    'fill: loop {
        for (i, (slot, skip)) in cursors.iter_mut().enumerate() {
            while table[*slot as usize] != u32::MAX {
                *slot = advance(*slot, *skip);
            }
            table[*slot as usize] = i as u32;
            *slot = advance(*slot, *skip);
            filled += 1;
            if filled == len {
                break 'fill;
            }
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::capacity::maglev_len;

    fn backends(n: usize) -> Vec<(Ipv4Addr, u16)> {
        (0..n)
            .map(|i| {
                (
                    Ipv4Addr::new(10, 244, (i / 200) as u8, (i % 200 + 1) as u8),
                    8080,
                )
            })
            .collect()
    }

    #[test]
    fn every_backend_gets_an_almost_equal_share() {
        for n in [1, 2, 3, 10, 100] {
            let len = maglev_len(n as u32);
            let t = table(backends(n), len);
            assert_eq!(t.len(), len as usize);
            let mut counts = vec![0usize; n];
            for &i in &t {
                counts[i as usize] += 1;
            }
            let ideal = len as f64 / n as f64;
            for c in counts {
                assert!(
                    (c as f64 - ideal).abs() <= ideal * 0.1 + 1.0,
                    "n={n} c={c} ideal={ideal}"
                );
            }
        }
    }

    #[test]
    fn removing_a_backend_moves_few_other_slots() {
        let all = backends(10);
        let len = maglev_len(10);
        let before = table(all.clone(), len);
        let fewer: Vec<(Ipv4Addr, u16)> = all.iter().filter(|b| **b != all[3]).copied().collect();
        let after = table(fewer.clone(), len);
        let moved = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| **b != 3 && all[**b as usize] != fewer[**a as usize])
            .count();
        // The removed backend's slots must move; others should mostly stay.
        assert!(moved < (len as usize) / 10, "moved {moved} of {len}");
    }

    #[test]
    fn tables_are_deterministic() {
        assert_eq!(table(backends(5), 509), table(backends(5), 509));
        assert!(table([], 251).is_empty());
    }

    #[test]
    fn names_are_written_as_addresses_are_displayed() {
        for (addr, port) in [
            (Ipv4Addr::new(0, 0, 0, 0), 0),
            (Ipv4Addr::new(10, 244, 3, 17), 8080),
            (Ipv4Addr::new(255, 255, 255, 255), 65535),
            (Ipv4Addr::new(192, 168, 100, 9), 443),
        ] {
            let name = Name::new(addr, port);
            assert_eq!(name.bytes(), format!("{addr}:{port}").as_bytes());
        }
    }

    /// Tables as earlier versions of the agent computed them (from the names formatted by
    /// `format!` and a division per probe): a restarted agent must find its tables right.
    #[test]
    fn tables_are_those_of_earlier_versions() {
        let golden: [(usize, u32, u64, [u32; 8]); 5] = [
            (1, 251, 0x99a2_8942_9e20_8ad7, [0, 0, 0, 0, 0, 0, 0, 0]),
            (2, 251, 0xef71_c5b6_2ec5_b612, [1, 0, 1, 0, 1, 1, 1, 0]),
            (3, 509, 0xf415_3340_a889_709f, [2, 0, 2, 0, 2, 0, 1, 2]),
            (10, 1021, 0x4b90_de81_57b9_aaf7, [3, 9, 8, 0, 7, 7, 4, 3]),
            (
                100,
                16381,
                0x219a_d109_3a3b_ded5,
                [71, 4, 16, 73, 54, 77, 18, 25],
            ),
        ];
        for (n, len, digest, head) in golden {
            let backends: Vec<(Ipv4Addr, u16)> = (0..n)
                .map(|i| {
                    let addr =
                        Ipv4Addr::new(10, (i % 7) as u8, (i / 200) as u8, (i % 200 + 1) as u8);
                    (addr, 8000 + i as u16)
                })
                .collect();
            let t = table(backends, len);
            let fnv = t.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &v| {
                (h ^ u64::from(v)).wrapping_mul(0x0000_0100_0000_01b3)
            });
            assert_eq!((fnv, &t[..8]), (digest, &head[..]), "{n} backends");
        }
    }
}
