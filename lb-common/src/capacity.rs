//! Map capacities. The data path declares them; the agent checks fill levels against them.

/// Frontend entries: (address, port, protocol, scope), plus one per ClusterIP marking the
/// address as a service's. 50,000 services take about 104,000 entries with their
/// NodePorts; the rest is headroom for LoadBalancer IPs, externalIPs and more ports.
pub const SERVICES: u32 = 262_144;
/// Backends, one per (service port, endpoint address, port).
pub const BACKENDS: u32 = 262_144;
/// Backend ids of all Maglev tables, one range per selection (64 MiB): room for 50,000
/// services of up to two endpoints each (251 slots), or fewer with larger tables.
pub const MAGLEV: u32 = 1 << 24;
/// Conntrack entries, both directions of every flow.
pub const CONNTRACK: u32 = 524_288;
/// First-fragment translations awaiting the later fragments of their datagram.
pub const FRAGMENTS: u32 = 8_192;
pub const NODE_ADDRESSES: u32 = 256;
/// loadBalancerSourceRanges CIDRs, one entry per (service port, CIDR).
pub const SOURCE_RANGES: u32 = 16_384;
/// sessionAffinity clients, one per (service port, client address); least recently used
/// entries make room.
pub const AFFINITY: u32 = 65_536;
/// Sockets translated by the socket programs, remembered for their replies' source.
pub const SOCK_REVNAT: u32 = 65_536;
/// Source-NATed flows to backends on other nodes.
pub const SNAT: u32 = 131_072;
/// Packets XDP handed to TC because their next hop's neighbour was not resolved yet; each
/// entry lives from XDP_PASS to the same packet's TC ingress, so few are ever in use.
pub const NEIGH_PENDING: u32 = 1_024;
/// Pod interfaces on one node; kubelet's default limit is 110 pods.
pub const POD_IFACES: u32 = 4_096;
/// Service ports: per-service counters are indexed by service id, so this is also the id
/// space. Kept apart from SERVICES: per-CPU arrays cost this many entries on every CPU.
pub const SERVICE_STATS: u32 = 65_536;

/// Maglev table sizes. A selection of `n` backends uses the smallest entry with
/// `len >= 100 * n`, or the largest when none is that big.
pub const MAGLEV_LADDER: [u32; 10] = [
    251, 509, 1_021, 2_039, 4_093, 8_191, 16_381, 32_749, 65_521, 131_071,
];

/// The Maglev table length for a selection of `backends` backends.
pub const fn maglev_len(backends: u32) -> u32 {
    let want = backends.saturating_mul(100);
    let mut i = 0;
    while i < MAGLEV_LADDER.len() {
        if MAGLEV_LADDER[i] >= want {
            return MAGLEV_LADDER[i];
        }
        i += 1;
    }
    MAGLEV_LADDER[MAGLEV_LADDER.len() - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ladder_picks_smallest_step_with_100_slots_per_backend() {
        assert_eq!(maglev_len(0), 251);
        assert_eq!(maglev_len(1), 251);
        assert_eq!(maglev_len(2), 251);
        assert_eq!(maglev_len(3), 509);
        assert_eq!(maglev_len(10), 1_021);
        assert_eq!(maglev_len(1_310), 131_071);
        assert_eq!(maglev_len(5_000), 131_071);
    }
}
