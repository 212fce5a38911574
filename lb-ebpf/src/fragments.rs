//! Later IP fragments carry no ports: they follow the translation of their datagram's
//! first fragment, remembered by (source, destination, IP id, protocol).

use lb_common::{FragKey, FragValue};

use crate::{maps::FRAGMENTS, parse::Flow};

/// Remembers a first fragment's translation for the later fragments of its datagram.
#[inline(always)]
pub fn remember(flow: &Flow, new_src: u32, new_dst: u32) {
    if flow.more_fragments && !flow.later_fragment {
        let key = FragKey::new(flow.src, flow.dst, flow.ip_id, flow.proto);
        // An LRU map evicts instead of failing; a lost entry only leaves fragments untouched.
        let _ = FRAGMENTS.insert(&key, &FragValue { new_src, new_dst }, 0);
    }
}

/// The translation of a later fragment's datagram, if its first fragment was translated.
#[inline(always)]
pub fn lookup(flow: &Flow) -> Option<FragValue> {
    let key = FragKey::new(flow.src, flow.dst, flow.ip_id, flow.proto);
    unsafe { FRAGMENTS.get(&key) }.copied()
}
