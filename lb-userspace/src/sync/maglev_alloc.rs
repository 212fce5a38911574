//! Ranges of the shared MAGLEV array. A freed range waits out a grace period before it is
//! handed out again.

use std::time::{Duration, Instant};

pub const GRACE: Duration = Duration::from_secs(2);

#[derive(Debug)]
pub struct RangeAllocator {
    capacity: u32,
    /// Free ranges (offset, len), reusable now.
    free: Vec<(u32, u32)>,
    /// Freed ranges waiting for the grace period.
    cooling: Vec<(Instant, u32, u32)>,
    /// Everything at or above is free.
    top: u32,
}

impl RangeAllocator {
    /// An allocator in which `used` ranges are taken.
    pub fn new(capacity: u32, mut used: Vec<(u32, u32)>) -> Self {
        used.sort();
        let mut free = Vec::new();
        let mut pos = 0;
        for (off, len) in used {
            if off > pos {
                free.push((pos, off - pos));
            }
            pos = pos.max(off + len);
        }
        Self {
            capacity,
            free,
            cooling: Vec::new(),
            top: pos,
        }
    }

    pub fn alloc(&mut self, len: u32) -> Option<u32> {
        if let Some(i) = self.free.iter().position(|&(_, l)| l >= len) {
            let (off, l) = self.free[i];
            if l == len {
                self.free.remove(i);
            } else {
                self.free[i] = (off + len, l - len);
            }
            return Some(off);
        }
        if self.top.checked_add(len)? > self.capacity {
            return None;
        }
        let off = self.top;
        self.top += len;
        Some(off)
    }

    pub fn release(&mut self, offset: u32, len: u32, now: Instant) {
        self.cooling.push((now, offset, len));
    }

    /// Makes ranges whose grace period is over reusable.
    pub fn reclaim(&mut self, now: Instant) {
        let (ready, waiting): (Vec<_>, Vec<_>) = self
            .cooling
            .drain(..)
            .partition(|(t, _, _)| now.duration_since(*t) >= GRACE);
        self.cooling = waiting;
        self.free.extend(ready.into_iter().map(|(_, o, l)| (o, l)));
        self.free.sort();
        // Merge neighbours so that large tables find room again.
        let mut merged: Vec<(u32, u32)> = Vec::new();
        for (o, l) in self.free.drain(..) {
            match merged.last_mut() {
                Some((mo, ml)) if *mo + *ml == o => *ml += l,
                _ => merged.push((o, l)),
            }
        }
        if let Some(&(o, l)) = merged.last() {
            if o + l == self.top {
                merged.pop();
                self.top = o;
            }
        }
        self.free = merged;
    }

    /// Slots that cannot be handed out now: ranges in use and ranges in their grace period.
    pub fn used(&self) -> u32 {
        self.top - self.free.iter().map(|&(_, l)| l).sum::<u32>()
    }

    #[cfg(test)]
    pub fn cooling(&self) -> usize {
        self.cooling.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_ranges_wait_for_the_grace_period() {
        let mut a = RangeAllocator::new(1000, vec![]);
        let t0 = Instant::now();
        let r = a.alloc(251).unwrap();
        a.release(r, 251, t0);
        a.reclaim(t0 + Duration::from_millis(100));
        assert_ne!(a.alloc(251), Some(r), "reused before the grace period");
        a.reclaim(t0 + GRACE);
        assert_eq!(a.cooling(), 0);
    }

    #[test]
    fn used_slots_count_ranges_in_use_and_cooling_not_gaps() {
        let mut a = RangeAllocator::new(2000, vec![(251, 251), (1000, 509)]);
        assert_eq!(a.used(), 251 + 509, "the gaps before and between are free");
        let t0 = Instant::now();
        a.release(1000, 509, t0);
        a.reclaim(t0);
        assert_eq!(
            a.used(),
            251 + 509,
            "a range in its grace period is still used"
        );
        a.reclaim(t0 + GRACE);
        assert_eq!(a.used(), 251);
        let r = a.alloc(509).unwrap();
        assert_eq!(a.used(), 251 + 509, "allocated at {r}");
    }

    #[test]
    fn recovers_used_ranges_and_fills_gaps() {
        let mut a = RangeAllocator::new(2000, vec![(251, 251), (1000, 509)]);
        assert_eq!(a.alloc(251), Some(0));
        assert_eq!(a.alloc(251), Some(502));
        assert_eq!(a.alloc(400), Some(1509));
        assert_eq!(a.alloc(1000), None, "beyond capacity must fail");
    }
}
