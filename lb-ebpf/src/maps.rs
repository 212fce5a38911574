//! The maps, named and sized as lb-common says, pinned by name so that they outlive the
//! agent and are found again by the next one (all but the programs' own scratch state).

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use lb_common::{
    capacity, filter, stats, AffinityKey, AffinityValue, BackendValue, Config, Counter, CtKey,
    CtValue, FragKey, FragValue, ServiceKey, ServiceValue, SnatConfig, SnatValue, SockConfig,
    SockRevKey, SockRevValue, SourceRangeKey,
};

use crate::clock;

#[map]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(capacity::SERVICES, 0);
#[map]
pub static BACKENDS: HashMap<u32, BackendValue> = HashMap::pinned(capacity::BACKENDS, 0);
#[map]
/// Mappable: the agent writes tables into it directly (see lb-common's `maps::MMAPABLE`).
pub static MAGLEV: Array<u32> = Array::pinned(capacity::MAGLEV, lb_common::maps::MMAPABLE);
#[map]
pub static CONNTRACK: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(capacity::CONNTRACK, 0);
#[map]
pub static FRAGMENTS: LruHashMap<FragKey, FragValue> = LruHashMap::pinned(capacity::FRAGMENTS, 0);
#[map]
pub static NODE_ADDRS: HashMap<u32, u32> = HashMap::pinned(capacity::NODE_ADDRESSES, 0);
#[map]
pub static SOURCE_RANGES: LpmTrie<SourceRangeKey, u8> = LpmTrie::pinned(capacity::SOURCE_RANGES, 0);
#[map]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::pinned(capacity::AFFINITY, 0);
#[map]
pub static SOCK_CONFIG: Array<SockConfig> = Array::pinned(1, 0);
#[map]
pub static SOCK_REVNAT: LruHashMap<SockRevKey, SockRevValue> =
    LruHashMap::pinned(capacity::SOCK_REVNAT, 0);
#[map]
pub static SNAT_CONFIG: Array<SnatConfig> = Array::pinned(1, 0);
#[map]
pub static SNAT: LruHashMap<CtKey, SnatValue> = LruHashMap::pinned(capacity::SNAT, 0);
/// (source, destination, IP id, protocol) of a packet XDP passed up for TC to send, with
/// the interface the FIB chose.
#[map]
pub static NEIGH_PENDING: LruHashMap<FragKey, u32> = LruHashMap::pinned(capacity::NEIGH_PENDING, 0);
/// The time (clock::now) XDP last noted a packet in NEIGH_PENDING.
#[map]
pub static NEIGH_NOTED: Array<u64> = Array::pinned(1, 0);
#[map]
pub static CONFIG: Array<Config> = Array::pinned(1, 0);
/// Mappable, like MAGLEV: the agent sets and clears bits with plain stores.
#[map]
pub static FRONT_FILTER: Array<u64> = Array::pinned(filter::WORDS, lb_common::maps::MMAPABLE);
/// Each service id's generation (see lb-common's `maps::SERVICE_GENERATIONS`); mappable.
#[map]
pub static SVC_GEN: Array<u32> = Array::pinned(capacity::SERVICE_STATS, lb_common::maps::MMAPABLE);
/// Host-side pod interfaces by index (see lb-common's `maps::POD_IFACES`).
#[map]
pub static POD_IFACES: HashMap<u32, u32> = HashMap::pinned(capacity::POD_IFACES, 0);
#[map]
pub static SVC_STATS: PerCpuArray<Counter> = PerCpuArray::pinned(capacity::SERVICE_STATS, 0);
#[map]
pub static VERDICT_STATS: PerCpuArray<Counter> = PerCpuArray::pinned(stats::verdict::COUNT, 0);
#[map]
pub static DROP_STATS: PerCpuArray<u64> = PerCpuArray::pinned(stats::drop_reason::COUNT, 0);
/// Dropped packets per service id (the reasons are counted in DROP_STATS).
#[map]
pub static SVC_DROPS: PerCpuArray<u64> = PerCpuArray::pinned(capacity::SERVICE_STATS, 0);
/// Each CPU's last clock reading (see clock). Scratch state of the programs: not pinned,
/// a new one per load.
#[map]
pub static CLOCK: PerCpuArray<clock::Reading> = PerCpuArray::with_max_entries(1, 0);
