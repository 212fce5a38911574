//! Numeric ids handed out lowest-free-first in O(log n), so that programming tens of
//! thousands of services never scans the ids already in use.

use std::collections::BTreeSet;

#[derive(Debug)]
pub struct IdPool {
    /// Free ids below `next`.
    free: BTreeSet<u32>,
    /// Every id at or above is free.
    next: u32,
    /// Ids are in `first..limit`.
    first: u32,
    limit: u32,
}

impl IdPool {
    pub fn new(first: u32, limit: u32) -> Self {
        Self {
            free: BTreeSet::new(),
            next: first,
            first,
            limit,
        }
    }

    /// Marks `id` as used (an id found in the maps); false when it is already used or out
    /// of range.
    pub fn take(&mut self, id: u32) -> bool {
        if id < self.first || id >= self.limit {
            return false;
        }
        if id >= self.next {
            self.free.extend(self.next..id);
            self.next = id + 1;
            true
        } else {
            self.free.remove(&id)
        }
    }

    pub fn alloc(&mut self) -> Option<u32> {
        if let Some(id) = self.free.pop_first() {
            return Some(id);
        }
        if self.next >= self.limit {
            return None;
        }
        self.next += 1;
        Some(self.next - 1)
    }

    pub fn release(&mut self, id: u32) {
        if id >= self.first && id < self.next {
            self.free.insert(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowest_free_first_and_taken_ids_skipped() {
        let mut p = IdPool::new(1, 6);
        assert!(p.take(3));
        assert!(!p.take(3), "taken twice");
        assert_eq!(p.alloc(), Some(1));
        assert_eq!(p.alloc(), Some(2));
        assert_eq!(p.alloc(), Some(4));
        p.release(2);
        assert_eq!(p.alloc(), Some(2));
        assert_eq!(p.alloc(), Some(5));
        assert_eq!(p.alloc(), None, "the limit is exclusive");
        assert!(!p.take(0) && !p.take(6));
    }
}
