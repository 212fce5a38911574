//! Indices of the per-CPU counter arrays and their display names.

/// Outcome of one packet, counted in VERDICT_STATS.
pub mod verdict {
    /// Not addressed to a service, or not ours to translate: passed untouched.
    pub const PASS: u32 = 0;
    /// Destination translated to a backend.
    pub const DNAT: u32 = 1;
    /// Reply translated back to the service address.
    pub const REVERSE_NAT: u32 = 2;
    /// Answered with a TCP RST or ICMP port unreachable.
    pub const REJECT: u32 = 3;
    /// Dropped; the reason is counted in DROP_STATS.
    pub const DROP: u32 = 4;
    /// A later fragment that followed its first fragment's translation.
    pub const FRAGMENT: u32 = 5;
    /// An ICMP error quoting a translated flow, translated like the flow.
    pub const ICMP_ERROR_NAT: u32 = 6;
    /// A socket's destination translated at connect or sendmsg (bytes are not counted).
    pub const SOCKET: u32 = 7;
    pub const COUNT: u32 = 8;
    pub const NAMES: [&str; COUNT as usize] = [
        "pass",
        "dnat",
        "reverse_nat",
        "reject",
        "drop",
        "fragment",
        "icmp_error_nat",
        "socket",
    ];
}

/// Why a packet was dropped, counted in DROP_STATS.
pub mod drop_reason {
    /// A Local traffic policy with no endpoint on this node.
    pub const NO_LOCAL_ENDPOINT: u32 = 0;
    /// Headers too short or inconsistent to translate safely.
    pub const MALFORMED: u32 = 1;
    /// The Maglev slot named a backend that was just removed (a table flip in flight).
    pub const BACKEND_MISSING: u32 = 2;
    /// A service entry whose Maglev range lies outside the table.
    pub const BAD_MAGLEV_RANGE: u32 = 3;
    /// Building the reject reply failed.
    pub const REJECT_FAILED: u32 = 4;
    /// A packet rewrite helper failed.
    pub const REWRITE_FAILED: u32 = 5;
    /// Source address outside loadBalancerSourceRanges.
    pub const SOURCE_RANGE: u32 = 6;
    /// No free SNAT source port for a flow to a backend on another node.
    pub const SNAT_EXHAUSTED: u32 = 7;
    /// A translated packet for another node found no route out of this one.
    pub const NO_ROUTE: u32 = 8;
    /// A tunnelled (DSR) packet would exceed the uplink's MTU.
    pub const MTU_EXCEEDED: u32 = 9;
    /// A DSR tunnel packet whose inner destination is no frontend of this node.
    pub const DSR_UNKNOWN_FRONTEND: u32 = 10;
    pub const COUNT: u32 = 16;
    pub const NAMES: [&str; COUNT as usize] = [
        "no_local_endpoint",
        "malformed",
        "backend_missing",
        "bad_maglev_range",
        "reject_failed",
        "rewrite_failed",
        "source_range",
        "snat_exhausted",
        "no_route",
        "mtu_exceeded",
        "dsr_unknown_frontend",
        "unused",
        "unused",
        "unused",
        "unused",
        "unused",
    ];
}
