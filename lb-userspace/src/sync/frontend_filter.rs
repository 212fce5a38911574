//! The agent's side of the frontend filter (see lb-common's `filter`): how many frontend
//! tuples fall on each slot, so that a slot is marked free of frontends again only when
//! its last tuple has gone, and the words as the map holds them.

use std::collections::HashMap;

use lb_common::filter;

pub struct FrontendFilter {
    counts: HashMap<u32, u32>,
    words: Vec<u64>,
}

/// A word that changed: its index and new value, for the map.
pub type Word = (u32, u64);

impl FrontendFilter {
    /// The filter of these slots (one per frontend tuple); every other slot is marked as
    /// no frontend.
    pub fn new(slots: impl IntoIterator<Item = u32>) -> Self {
        let mut f = Self {
            counts: HashMap::new(),
            words: vec![u64::MAX; filter::WORDS as usize],
        };
        for slot in slots {
            f.add(slot);
        }
        f
    }

    /// Every word, for writing the map whole.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// One more frontend tuple on `slot`; the word to write when it changed.
    pub fn add(&mut self, slot: u32) -> Option<Word> {
        let count = self.counts.entry(slot).or_insert(0);
        *count += 1;
        (*count == 1).then(|| self.set(slot, false))
    }

    /// One frontend tuple fewer on `slot`; the word to write when it changed.
    pub fn remove(&mut self, slot: u32) -> Option<Word> {
        let count = self.counts.get_mut(&slot)?;
        *count -= 1;
        if *count > 0 {
            return None;
        }
        self.counts.remove(&slot);
        Some(self.set(slot, true))
    }

    fn set(&mut self, slot: u32, no_frontend: bool) -> Word {
        let (index, bit) = filter::position(slot);
        let word = &mut self.words[index as usize];
        if no_frontend {
            *word |= bit;
        } else {
            *word &= !bit;
        }
        (index, *word)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marked_free(f: &FrontendFilter, slot: u32) -> bool {
        let (index, bit) = filter::position(slot);
        f.words()[index as usize] & bit != 0
    }

    #[test]
    fn a_slot_is_free_again_only_when_its_last_tuple_goes() {
        let mut f = FrontendFilter::new([7, 7]);
        assert!(!marked_free(&f, 7));
        assert!(marked_free(&f, 8));
        assert_eq!(f.remove(7), None, "another tuple still falls on it");
        assert!(!marked_free(&f, 7));
        let (index, word) = f.remove(7).expect("the word changes");
        assert_eq!(index, 0);
        assert_eq!(word, u64::MAX);
        assert_eq!(f.remove(7), None, "nothing to remove");
        assert_eq!(f.add(70), Some((1, !(1 << 6))));
    }
}
