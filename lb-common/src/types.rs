//! Keys and values of the BPF maps.

use core::mem::size_of;

/// IP protocol numbers as they appear in the IPv4 header.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    /// IPv4 in IPv4, the DSR tunnel.
    pub const IPIP: u8 = 4;
}

/// Which traffic a frontend entry serves.
pub mod scope {
    /// Traffic from outside the node, looked up by XDP on uplinks. Follows
    /// externalTrafficPolicy. ClusterIPs have no entry in this scope.
    pub const EXTERNAL: u8 = 0;
    /// Traffic from pods on this node, looked up by TC on pod interfaces. ClusterIPs follow
    /// internalTrafficPolicy; NodePorts, LB IPs and externalIPs dialled from pods use all
    /// endpoints (kube-proxy's short-circuit for in-cluster clients).
    pub const INTERNAL: u8 = 1;
}

/// The kind of address a frontend entry was made for (shown by `lb services`).
pub mod kind {
    pub const CLUSTER_IP: u8 = 0;
    pub const NODE_PORT: u8 = 1;
    pub const LOAD_BALANCER: u8 = 2;
    pub const EXTERNAL_IP: u8 = 3;
}

/// Bits of [`ServiceValue::flags`].
pub mod service_flags {
    /// The entry's traffic policy is Local: with no backend, drop instead of reject.
    pub const LOCAL_POLICY: u16 = 1 << 0;
    /// A marker `{ClusterIP, port 0, protocol 0}`: the address belongs to a service, so a
    /// packet to any port the service does not declare is rejected.
    pub const ADDRESS_ONLY: u16 = 1 << 1;
    /// sessionAffinity ClientIP; `affinity_timeout` holds the timeout in seconds.
    pub const AFFINITY: u16 = 1 << 2;
    /// The selection is made of serving, terminating endpoints because none is ready
    /// (kube-proxy's fallback). Tells which backend states belong to the selection.
    pub const TERMINATING_FALLBACK: u16 = 1 << 3;
    /// loadBalancerSourceRanges: only sources in SOURCE_RANGES under this service id pass.
    pub const SOURCE_RANGES: u16 = 1 << 4;
    /// Direct server return: traffic from outside to a backend on another node is sent
    /// there in an IPIP tunnel and answered from there.
    pub const DSR: u16 = 1 << 5;
}

/// States of a backend. Only the agent decides which backends enter a Maglev table; the
/// state lets the data path and `lb services` tell them apart.
pub mod backend_state {
    /// Ready.
    pub const ACTIVE: u8 = 0;
    /// Serving and terminating: existing flows keep it; new ones pick it only as fallback.
    pub const TERMINATING: u8 = 1;
    /// Listed but neither ready nor serving: existing flows keep it.
    pub const INACTIVE: u8 = 2;
}

/// Bits of [`BackendValue::flags`].
pub mod backend_flags {
    /// The endpoint runs on this node.
    pub const LOCAL: u8 = 1 << 0;
}

/// Frontend key. NodePorts use address 0 and match when the destination is one of
/// NODE_ADDRESSES.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
    pub scope: u8,
}

impl ServiceKey {
    pub const fn new(addr: u32, port: u16, proto: u8, scope: u8) -> Self {
        Self {
            addr,
            port,
            proto,
            scope,
        }
    }
}

/// Frontend value: which service it is and where its Maglev table lies.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceValue {
    /// Service port id (1..capacity::SERVICE_STATS), the index of its counters.
    pub id: u32,
    pub flags: u16,
    pub kind: u8,
    _pad: u8,
    /// First slot of this entry's table in MAGLEV.
    pub maglev_offset: u32,
    /// Table length (from the ladder), 0 when there is no backend.
    pub maglev_len: u32,
    /// Backends in the table.
    pub backend_count: u32,
    /// sessionAffinity timeout in seconds, when the AFFINITY flag is set.
    pub affinity_timeout: u32,
}

impl ServiceValue {
    pub const fn new(
        id: u32,
        flags: u16,
        kind: u8,
        maglev_offset: u32,
        maglev_len: u32,
        backend_count: u32,
        affinity_timeout: u32,
    ) -> Self {
        Self {
            id,
            flags,
            kind,
            _pad: 0,
            maglev_offset,
            maglev_len,
            backend_count,
            affinity_timeout,
        }
    }
}

/// Backend value, keyed by backend id (u32, 1..capacity::BACKENDS). Ids are per service
/// port, so removing an endpoint from one service never leaves it reachable through
/// another service's id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendValue {
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
    pub state: u8,
    /// The service port this backend belongs to (recovers ids after a restart).
    pub service_id: u32,
    pub flags: u8,
    _pad: [u8; 3],
}

impl BackendValue {
    pub const fn new(
        addr: u32,
        port: u16,
        proto: u8,
        state: u8,
        service_id: u32,
        flags: u8,
    ) -> Self {
        Self {
            addr,
            port,
            proto,
            state,
            service_id,
            flags,
            _pad: [0; 3],
        }
    }
}

/// Conntrack key: the 5-tuple of a packet as it is seen on the wire, before translation for
/// a forward entry, and as the reply arrives for a reply entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub src_addr: u32,
    pub dst_addr: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    // Two fields rather than `[u8; 3]`: the compiler zeroes an odd-sized array with a call
    // to memset, which the data path would pay for every conntrack key it builds.
    _pad0: u8,
    _pad1: u16,
}

impl CtKey {
    pub const fn new(
        src_addr: u32,
        dst_addr: u32,
        src_port: u16,
        dst_port: u16,
        proto: u8,
    ) -> Self {
        Self {
            src_addr,
            dst_addr,
            src_port,
            dst_port,
            proto,
            _pad0: 0,
            _pad1: 0,
        }
    }
}

/// Which direction a conntrack entry describes.
pub mod ct_kind {
    /// Client to service: `nat_addr:nat_port` is the backend to send to.
    pub const FORWARD: u8 = 0;
    /// Backend to client: `nat_addr:nat_port` is the frontend to restore as the source.
    pub const REPLY: u8 = 1;
}

/// Bits of [`CtValue::flags`].
pub mod ct_flags {
    /// A pod reaching its own service and given itself as the backend: the flow is also
    /// source-NATed to the service-loopback address, so the pod answers through the node.
    pub const HAIRPIN: u8 = 1 << 0;
    /// A flow from outside to a backend on another node: source-NATed to the node's
    /// address and `snat_port`, forwarded from XDP.
    pub const SNAT: u8 = 1 << 1;
    /// A direct-server-return flow: on the node that chose the backend, tunnelled to it;
    /// on the backend's node, its answers leave with the frontend as their source.
    pub const DSR: u8 = 1 << 2;
    /// Made through a frontend with loadBalancerSourceRanges: every packet's source is
    /// checked against the service port's ranges, also on the path that skips the frontend.
    pub const SOURCE_RANGES: u8 = 1 << 3;
    /// Made by a pod's packet (TC): only packets from pods take the path that skips the
    /// frontend, so that one from outside with the same tuple meets its scope's frontends.
    pub const INTERNAL: u8 = 1 << 4;
    /// Host routing: the flow's packets go between the pod's interface and the client's
    /// (a pod's, or the uplink) by the programs, in both directions, past the node's
    /// stack and its netfilter. Cleared when a packet of the flow could not be routed so,
    /// so that both directions then take the stack.
    pub const DIRECT: u8 = 1 << 5;
}

/// [`Config::host_routing`] bits: which hooks may route translated flows to a local
/// backend past the node's stack.
pub mod host_routing {
    /// TC on pod interfaces (pod to service, and every reply from a local backend).
    pub const PODS: u32 = 1 << 0;
    /// XDP on uplinks, set only where XDP redirects to a veth reliably (generic mode).
    pub const UPLINKS: u32 = 1 << 1;
}

/// TCP state tracked per flow, which chooses the entry's lifetime.
pub mod tcp_state {
    /// SYN seen, no reply yet (also used for UDP and other protocols).
    pub const OPENING: u8 = 0;
    pub const ESTABLISHED: u8 = 1;
    /// FIN or RST seen.
    pub const CLOSING: u8 = 2;
}

/// Conntrack value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtValue {
    pub kind: u8,
    pub tcp_state: u8,
    /// [`ct_flags`].
    pub flags: u8,
    _pad0: u8,
    pub service_id: u32,
    pub backend_id: u32,
    pub nat_addr: u32,
    pub nat_port: u16,
    /// The source port a SNAT flow was given (wire order), with [`ct_flags::SNAT`].
    pub snat_port: u16,
    /// The service port's generation (SVC_GEN) when the entry was made or last confirmed
    /// against its frontend. It fills what was padding before `last_seen_ns`, so entries of
    /// earlier programs read with some other value and are confirmed once.
    pub generation: u32,
    /// `bpf_ktime_get_ns` of the last packet; an entry older than its lifetime is ignored.
    pub last_seen_ns: u64,
}

impl CtValue {
    #[allow(clippy::too_many_arguments)]
    pub const fn new(
        kind: u8,
        tcp_state: u8,
        service_id: u32,
        backend_id: u32,
        nat_addr: u32,
        nat_port: u16,
        last_seen_ns: u64,
    ) -> Self {
        Self {
            kind,
            tcp_state,
            flags: 0,
            _pad0: 0,
            service_id,
            backend_id,
            nat_addr,
            nat_port,
            snat_port: 0,
            generation: 0,
            last_seen_ns,
        }
    }
}

/// The single entry of SNAT_CONFIG: how flows to backends on other nodes are source-NATed.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SnatConfig {
    /// The node address flows get as their source (wire order); 0 turns SNAT off.
    pub addr: u32,
    /// The source ports handed out, inclusive, in host order.
    pub port_min: u16,
    pub port_max: u16,
}

/// SNAT value, keyed by a reply's tuple as it arrives (backend -> node address:port):
/// the client to restore as the destination and the frontend as the source.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnatValue {
    pub client_addr: u32,
    pub front_addr: u32,
    pub client_port: u16,
    pub front_port: u16,
}

/// Identifies an IPv4 datagram: a fragmented one whose first fragment was translated, or
/// one XDP handed to TC to resolve its next hop.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub src_addr: u32,
    pub dst_addr: u32,
    pub ip_id: u16,
    pub proto: u8,
    _pad: u8,
}

impl FragKey {
    pub const fn new(src_addr: u32, dst_addr: u32, ip_id: u16, proto: u8) -> Self {
        Self {
            src_addr,
            dst_addr,
            ip_id,
            proto,
            _pad: 0,
        }
    }
}

/// The addresses the later fragments of a datagram get (one of them unchanged).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FragValue {
    pub new_src: u32,
    pub new_dst: u32,
}

/// The data of a SOURCE_RANGES trie key. The trie's prefix length is 32 plus the CIDR's,
/// so the service id always matches whole and the address by the CIDR's length.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRangeKey {
    pub service_id: u32,
    /// The range's network address, as on the wire.
    pub addr: u32,
}

impl SourceRangeKey {
    /// The trie prefix length that matches a CIDR of `cidr_len` bits.
    pub const fn prefix_len(cidr_len: u8) -> u32 {
        32 + cidr_len as u32
    }
}

/// AFFINITY key: one client of one service port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub service_id: u32,
    pub client: u32,
}

/// The backend a client was last sent to and when (`bpf_ktime_get_ns` of its last new
/// connection, as kube-proxy's `recent` match counts from the last connection).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AffinityValue {
    pub backend_id: u32,
    _pad: u32,
    pub last_used_ns: u64,
}

impl AffinityValue {
    pub const fn new(backend_id: u32, last_used_ns: u64) -> Self {
        Self {
            backend_id,
            _pad: 0,
            last_used_ns,
        }
    }
}

/// The single entry of SOCK_CONFIG: what the socket programs need to know of the node.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockConfig {
    /// The agent's network namespace; the socket programs act only for sockets in it.
    /// Learned by the program itself (see `nonce_*`); 0 until then, and then they act for
    /// none.
    pub netns_cookie: u64,
    /// A connect to this loopback address and port, made by the agent, tells the program
    /// the agent's network namespace cookie (SO_NETNS_COOKIE is missing before 5.14).
    pub nonce_addr: u32,
    pub nonce_port: u16,
    _pad: u16,
    /// The node's address as a client: the source kube-proxy would see for the node's own
    /// connections, for session affinity and source ranges.
    pub node_addr: u32,
    _pad1: u32,
}

impl SockConfig {
    pub const fn new(netns_cookie: u64, nonce_addr: u32, nonce_port: u16, node_addr: u32) -> Self {
        Self {
            netns_cookie,
            nonce_addr,
            nonce_port,
            _pad: 0,
            node_addr,
            _pad1: 0,
        }
    }
}

/// SOCK_REVNAT key: a backend as one socket sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockRevKey {
    pub cookie: u64,
    pub addr: u32,
    pub port: u16,
    _pad: u16,
}

impl SockRevKey {
    pub const fn new(cookie: u64, addr: u32, port: u16) -> Self {
        Self {
            cookie,
            addr,
            port,
            _pad: 0,
        }
    }
}

/// The service address a socket asked for, restored as the peer (recvmsg, getpeername).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockRevValue {
    pub addr: u32,
    pub port: u16,
    _pad: u16,
}

impl SockRevValue {
    pub const fn new(addr: u32, port: u16) -> Self {
        Self {
            addr,
            port,
            _pad: 0,
        }
    }
}

/// Agent-written settings, the single entry of the CONFIG array.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// [`crate::LAYOUT_VERSION`] of the agent that created the maps.
    pub layout_version: u32,
    pub tcp_established_s: u32,
    pub tcp_opening_s: u32,
    pub tcp_closing_s: u32,
    pub udp_s: u32,
    pub other_s: u32,
    /// The source a hairpinned flow gets (wire order); 0 means [`DEFAULT_HAIRPIN_ADDR`].
    pub hairpin_addr: u32,
    /// [`host_routing`] bits; 0 (the default) hands every translated packet to the stack.
    pub host_routing: u32,
}

/// Cilium's service-loopback address, 169.254.42.1: link-local, so no pod or node owns it.
pub const DEFAULT_HAIRPIN_ADDR: u32 = u32::from_ne_bytes([169, 254, 42, 1]);

impl Config {
    pub const fn new(
        tcp_established_s: u32,
        tcp_opening_s: u32,
        tcp_closing_s: u32,
        udp_s: u32,
        other_s: u32,
    ) -> Self {
        Self {
            layout_version: crate::LAYOUT_VERSION,
            tcp_established_s,
            tcp_opening_s,
            tcp_closing_s,
            udp_s,
            other_s,
            hairpin_addr: DEFAULT_HAIRPIN_ADDR,
            host_routing: 0,
        }
    }
}

impl Default for Config {
    /// Cilium's defaults: TCP established 6 h, opening 60 s, closing 10 s, others 60 s.
    fn default() -> Self {
        Self::new(6 * 3600, 60, 10, 60, 60)
    }
}

/// Packets and bytes, one slot per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

const _: () = {
    assert!(size_of::<ServiceKey>() == 8);
    assert!(size_of::<ServiceValue>() == 24);
    assert!(size_of::<BackendValue>() == 16);
    assert!(size_of::<CtKey>() == 16);
    assert!(size_of::<CtValue>() == 32);
    assert!(size_of::<FragKey>() == 12);
    assert!(size_of::<FragValue>() == 8);
    assert!(size_of::<SourceRangeKey>() == 8);
    assert!(size_of::<AffinityKey>() == 8);
    assert!(size_of::<AffinityValue>() == 16);
    assert!(size_of::<SockConfig>() == 24);
    assert!(size_of::<SnatConfig>() == 8);
    assert!(size_of::<SnatValue>() == 12);
    assert!(size_of::<SockRevKey>() == 16);
    assert!(size_of::<SockRevValue>() == 8);
    assert!(size_of::<Config>() == 32);
    assert!(size_of::<Counter>() == 16);
};

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all are repr(C) plain integers with explicit padding, valid for any bytes.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for BackendValue {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragValue {}
    unsafe impl aya::Pod for SourceRangeKey {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for SockConfig {}
    unsafe impl aya::Pod for SnatConfig {}
    unsafe impl aya::Pod for SnatValue {}
    unsafe impl aya::Pod for SockRevKey {}
    unsafe impl aya::Pod for SockRevValue {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for Counter {}
}
