//! loadBalancerSourceRanges: a service's LB IPs accept only sources inside its ranges.

use aya_ebpf::maps::lpm_trie::Key;
use lb_common::SourceRangeKey;

use crate::maps::SOURCE_RANGES;

/// Is `src` inside one of the ranges of service port `service_id`? The trie finds the
/// longest matching prefix; any match at all is inside.
#[inline(always)]
pub fn allowed(service_id: u32, src: u32) -> bool {
    let key = Key::new(
        SourceRangeKey::prefix_len(32),
        SourceRangeKey {
            service_id,
            addr: src,
        },
    );
    SOURCE_RANGES.get(&key).is_some()
}
