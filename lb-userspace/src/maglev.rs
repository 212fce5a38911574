//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): a lookup table in which every
//! backend owns an almost equal share of slots, and a change of backends moves few slots.

/// FNV-1a with a seed, enough to spread backend names over the permutation space.
fn hash(name: &str, seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // Final avalanche so that similar names land far apart.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

/// The table of length `len` (a prime) for these backends, as indices into `names`. The
/// permutation comes from the names alone, so the same backends always give the same table.
pub fn table(names: &[String], len: u32) -> Vec<u32> {
    let m = len as u64;
    let mut table = vec![u32::MAX; len as usize];
    if names.is_empty() {
        return Vec::new();
    }
    let perms: Vec<(u64, u64)> = names
        .iter()
        .map(|n| (hash(n, 0x5eed_0001) % m, hash(n, 0x5eed_0002) % (m - 1) + 1))
        .collect();
    let mut next = vec![0u64; names.len()];
    let mut filled = 0u64;
    'fill: loop {
        for (i, &(offset, skip)) in perms.iter().enumerate() {
            let mut slot = (offset + next[i] * skip) % m;
            while table[slot as usize] != u32::MAX {
                next[i] += 1;
                slot = (offset + next[i] * skip) % m;
            }
            table[slot as usize] = i as u32;
            next[i] += 1;
            filled += 1;
            if filled == m {
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

    fn names(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("10.244.{}.{}:8080", i / 200, i % 200 + 1))
            .collect()
    }

    #[test]
    fn every_backend_gets_an_almost_equal_share() {
        for n in [1, 2, 3, 10, 100] {
            let len = maglev_len(n as u32);
            let t = table(&names(n), len);
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
        let all = names(10);
        let len = maglev_len(10);
        let before = table(&all, len);
        let fewer: Vec<String> = all.iter().filter(|n| *n != &all[3]).cloned().collect();
        let after = table(&fewer, len);
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
        assert_eq!(table(&names(5), 509), table(&names(5), 509));
        assert!(table(&[], 251).is_empty());
    }
}
