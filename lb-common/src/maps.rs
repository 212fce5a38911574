//! Names of the BPF maps. The eBPF statics carry these names (BPF object names are at most
//! 15 characters), and they are the file names of the pins under the bpffs directory.

pub const SERVICES: &str = "SERVICES";
pub const BACKENDS: &str = "BACKENDS";
pub const MAGLEV: &str = "MAGLEV";
pub const CONNTRACK: &str = "CONNTRACK";
pub const FRAGMENTS: &str = "FRAGMENTS";
pub const NODE_ADDRESSES: &str = "NODE_ADDRS";
pub const SOURCE_RANGES: &str = "SOURCE_RANGES";
pub const AFFINITY: &str = "AFFINITY";
pub const SOCK_CONFIG: &str = "SOCK_CONFIG";
pub const SNAT_CONFIG: &str = "SNAT_CONFIG";
pub const SNAT: &str = "SNAT";
pub const NEIGH_PENDING: &str = "NEIGH_PENDING";
/// When XDP last noted a packet in NEIGH_PENDING.
pub const NEIGH_NOTED: &str = "NEIGH_NOTED";
pub const SOCK_REVNAT: &str = "SOCK_REVNAT";
pub const CONFIG: &str = "CONFIG";
pub const SERVICE_STATS: &str = "SVC_STATS";
pub const VERDICT_STATS: &str = "VERDICT_STATS";
pub const DROP_STATS: &str = "DROP_STATS";
/// Packets of each service dropped by the programs, indexed by service id.
pub const SERVICE_DROPS: &str = "SVC_DROPS";
/// The bitmap of (address, port, protocol) slots no frontend falls on (see `filter`).
pub const FRONTEND_FILTER: &str = "FRONT_FILTER";
/// A generation per service id, changed whenever one of its frontends goes or changes, so
/// that conntrack entries made under the old frontends are confirmed again.
pub const SERVICE_GENERATIONS: &str = "SVC_GEN";
/// The host-side pod interfaces the agent attached to, by index: where host routing may
/// hand a packet straight to the pod (`bpf_redirect_peer`).
pub const POD_IFACES: &str = "POD_IFACES";

/// `BPF_F_MMAPABLE` (Linux 5.5): the agent writes Maglev tables through a shared mapping
/// of MAGLEV instead of one syscall per slot.
pub const MMAPABLE: u32 = 1 << 10;
/// Bytes between two elements of an array map: the kernel rounds values up to 8.
pub const fn array_stride(value_size: usize) -> usize {
    (value_size + 7) & !7
}

/// Every map the programs declare, in the order `lb reset` and layout checks walk them.
pub const ALL: [&str; 22] = [
    SERVICES,
    BACKENDS,
    MAGLEV,
    CONNTRACK,
    FRAGMENTS,
    NODE_ADDRESSES,
    SOURCE_RANGES,
    AFFINITY,
    SOCK_CONFIG,
    SOCK_REVNAT,
    SNAT_CONFIG,
    SNAT,
    NEIGH_PENDING,
    NEIGH_NOTED,
    CONFIG,
    SERVICE_STATS,
    VERDICT_STATS,
    DROP_STATS,
    SERVICE_DROPS,
    FRONTEND_FILTER,
    SERVICE_GENERATIONS,
    POD_IFACES,
];
