//! Packet fixtures: the real programs run through BPF_PROG_TEST_RUN on crafted packets with
//! seeded maps; every case asserts the verdict and the exact bytes that come out, checksums
//! included, against a packet built the way the output should look.
//! Needs root and the eBPF object: run through `cargo xtask test`.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
    Ebpf, EbpfLoader, Pod,
};
use lb_common::{
    addr, backend_state, capacity, ct_kind, filter, kind, maps, proto, scope, service_flags,
    stats::{drop_reason, verdict},
    tcp_state, BackendValue, Counter, CtKey, CtValue, ServiceKey, ServiceValue,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

const XDP: &str = "lb_xdp";
const POD_INGRESS: &str = "lb_pod_ingress";
const POD_EGRESS: &str = "lb_pod_egress";
const UPLINK_INGRESS: &str = "lb_uplink_ingress";
const UPLINK_EGRESS: &str = "lb_uplink_egress";

const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const POD_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 7);
const LB_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const BACKEND_A: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 21);
const BACKEND_B: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 22);
const OTHER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 99);
const NODE_PORT: u16 = 30080;
const BACKEND_PORT: u16 = 8080;
const CLIENT_PORT: u16 = 40000;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const IP_MF: u16 = 0x2000;
const IP_DF: u16 = 0x4000;

// ---------------------------------------------------------------------------------------
// Packet builder

/// RFC 1071 sum of 16-bit big-endian words, not yet complemented.
fn sum16(data: &[u8]) -> u32 {
    data.chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum()
}

fn checksum(sum: u32) -> u16 {
    let mut s = sum;
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

#[derive(Clone, Debug)]
enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        seq: u32,
        ack: u32,
        flags: u8,
        window: u16,
        payload: Vec<u8>,
    },
    Udp {
        sport: u16,
        dport: u16,
        payload: Vec<u8>,
        checksum: bool,
    },
    Icmp {
        kind: u8,
        code: u8,
        rest: [u8; 4],
        payload: Vec<u8>,
    },
    /// A later fragment: bytes of the datagram without an L4 header.
    Raw { proto: u8, bytes: Vec<u8> },
}

#[derive(Clone, Debug)]
struct Packet {
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    vlan: Option<u16>,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    id: u16,
    /// Flags and fragment offset, as in the header.
    frag: u16,
    ttl: u8,
    options: Vec<u8>,
    l4: L4,
}

impl Packet {
    fn new(src: Ipv4Addr, dst: Ipv4Addr, l4: L4) -> Self {
        Self {
            src_mac: CLIENT_MAC,
            dst_mac: NODE_MAC,
            vlan: None,
            src,
            dst,
            id: 0x1234,
            frag: IP_DF,
            ttl: 63,
            options: Vec::new(),
            l4,
        }
    }

    fn tcp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8) -> Self {
        let l4 = L4::Tcp {
            sport: src.1,
            dport: dst.1,
            seq: 1000,
            ack: if flags & TCP_ACK != 0 { 5000 } else { 0 },
            flags,
            window: 64240,
            payload: Vec::new(),
        };
        Self::new(src.0, dst.0, l4)
    }

    fn udp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), payload: &[u8]) -> Self {
        let l4 = L4::Udp {
            sport: src.1,
            dport: dst.1,
            payload: payload.to_vec(),
            checksum: true,
        };
        Self::new(src.0, dst.0, l4)
    }

    fn proto(&self) -> u8 {
        match &self.l4 {
            L4::Tcp { .. } => proto::TCP,
            L4::Udp { .. } => proto::UDP,
            L4::Icmp { .. } => proto::ICMP,
            L4::Raw { proto, .. } => *proto,
        }
    }

    fn with_src(mut self, addr: Ipv4Addr, port: u16) -> Self {
        self.src = addr;
        match &mut self.l4 {
            L4::Tcp { sport, .. } | L4::Udp { sport, .. } => *sport = port,
            _ => {}
        }
        self
    }

    fn with_dst(mut self, addr: Ipv4Addr, port: u16) -> Self {
        self.dst = addr;
        match &mut self.l4 {
            L4::Tcp { dport, .. } | L4::Udp { dport, .. } => *dport = port,
            _ => {}
        }
        self
    }

    fn l4_bytes(&self) -> Vec<u8> {
        let pseudo = |len: usize| {
            let mut p = Vec::new();
            p.extend(self.src.octets());
            p.extend(self.dst.octets());
            p.extend([0, self.proto()]);
            p.extend((len as u16).to_be_bytes());
            sum16(&p)
        };
        match &self.l4 {
            L4::Tcp {
                sport,
                dport,
                seq,
                ack,
                flags,
                window,
                payload,
            } => {
                let mut b = Vec::new();
                b.extend(sport.to_be_bytes());
                b.extend(dport.to_be_bytes());
                b.extend(seq.to_be_bytes());
                b.extend(ack.to_be_bytes());
                b.extend([0x50, *flags]);
                b.extend(window.to_be_bytes());
                b.extend([0, 0, 0, 0]);
                b.extend(payload);
                let c = checksum(pseudo(b.len()) + sum16(&b));
                b[16..18].copy_from_slice(&c.to_be_bytes());
                b
            }
            L4::Udp {
                sport,
                dport,
                payload,
                checksum: with_checksum,
            } => {
                let mut b = Vec::new();
                b.extend(sport.to_be_bytes());
                b.extend(dport.to_be_bytes());
                b.extend(((8 + payload.len()) as u16).to_be_bytes());
                b.extend([0, 0]);
                b.extend(payload);
                if *with_checksum {
                    let c = match checksum(pseudo(b.len()) + sum16(&b)) {
                        0 => 0xffff,
                        c => c,
                    };
                    b[6..8].copy_from_slice(&c.to_be_bytes());
                }
                b
            }
            L4::Icmp {
                kind,
                code,
                rest,
                payload,
            } => {
                let mut b = vec![*kind, *code, 0, 0];
                b.extend(rest);
                b.extend(payload);
                let c = checksum(sum16(&b));
                b[2..4].copy_from_slice(&c.to_be_bytes());
                b
            }
            L4::Raw { bytes, .. } => bytes.clone(),
        }
    }

    /// The IP datagram (header and everything after it).
    fn ip_bytes(&self) -> Vec<u8> {
        let l4 = self.l4_bytes();
        let ihl = 20 + self.options.len();
        assert!(
            ihl.is_multiple_of(4) && ihl <= 60,
            "IP options must pad to 4 bytes"
        );
        let mut h = vec![0x40 | (ihl / 4) as u8, 0];
        h.extend(((ihl + l4.len()) as u16).to_be_bytes());
        h.extend(self.id.to_be_bytes());
        h.extend(self.frag.to_be_bytes());
        h.extend([self.ttl, self.proto(), 0, 0]);
        h.extend(self.src.octets());
        h.extend(self.dst.octets());
        h.extend(&self.options);
        let c = checksum(sum16(&h));
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h.extend(l4);
        h
    }

    fn bytes(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend(self.dst_mac);
        b.extend(self.src_mac);
        if let Some(tci) = self.vlan {
            b.extend([0x81, 0x00]);
            b.extend(tci.to_be_bytes());
        }
        b.extend([0x08, 0x00]);
        b.extend(self.ip_bytes());
        b
    }

    /// The frame the data path sends back in place of this one: the MAC addresses
    /// swapped, a fresh IP header from the original destination to the sender.
    fn answer(&self, l4: L4) -> Packet {
        Packet {
            src_mac: self.dst_mac,
            dst_mac: self.src_mac,
            vlan: self.vlan,
            src: self.dst,
            dst: self.src,
            id: 0,
            frag: IP_DF,
            ttl: 64,
            options: Vec::new(),
            l4,
        }
    }

    /// The TCP RST|ACK answering this segment (which carries no ACK).
    fn rst(&self) -> Packet {
        let L4::Tcp {
            sport,
            dport,
            seq,
            flags,
            payload,
            ..
        } = &self.l4
        else {
            panic!("not TCP")
        };
        let len = payload.len() as u32 + (flags & (TCP_SYN | TCP_FIN) != 0) as u32;
        self.answer(L4::Tcp {
            sport: *dport,
            dport: *sport,
            seq: 0,
            ack: seq + len,
            flags: TCP_RST | TCP_ACK,
            window: 0,
            payload: Vec::new(),
        })
    }

    /// The ICMP error of `kind`/`code` quoting this packet's IP header and 8 more bytes.
    fn icmp_error(&self, kind: u8, code: u8) -> L4 {
        let ip = self.ip_bytes();
        let quote = ip[..20 + self.options.len() + 8].to_vec();
        L4::Icmp {
            kind,
            code,
            rest: [0; 4],
            payload: quote,
        }
    }
}

// ---------------------------------------------------------------------------------------
// The loaded data path

/// A bpffs directory of its own for one test's pins, removed even when the test fails.
struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Datapath {
    ebpf: Ebpf,
    pins: PinDir,
    /// The frontend tuples (address, port, protocol) let through the filter, as the agent
    /// lets them: NodePorts on every node address.
    frontends: Vec<(u32, u16, u8)>,
    node_addrs: Vec<u32>,
}

struct Backend {
    id: u32,
    addr: Ipv4Addr,
    port: u16,
}

const fn backend(id: u32, addr: Ipv4Addr, port: u16) -> Backend {
    Backend { id, addr, port }
}

const MAGLEV_LEN: u32 = capacity::MAGLEV_LADDER[0];

/// A backend's port unreachable about `delivered` (the translated `sent`), and that error
/// as the client must get it: from the frontend, quoting `sent`.
fn backend_refusal(sent: &Packet, delivered: &Packet) -> (Packet, Packet) {
    let mut error = delivered.answer(delivered.icmp_error(3, 3));
    error.ttl = 64;
    let mut expected = sent.answer(sent.icmp_error(3, 3));
    (expected.src_mac, expected.dst_mac, expected.ttl) = (error.src_mac, error.dst_mac, 64);
    (error, expected)
}

/// The SERVICES key of a frontend (address and port in host order).
fn frontend_key(frontend: (Ipv4Addr, u16), proto_nr: u8, scope_nr: u8) -> ServiceKey {
    ServiceKey::new(
        addr::ipv4(frontend.0.octets()),
        addr::port(frontend.1),
        proto_nr,
        scope_nr,
    )
}

impl Datapath {
    fn load() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = PathBuf::from("/sys/fs/bpf").join(format!(
            "lb-fixture-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("a pin directory (is bpffs mounted?)");
        let pins = PinDir(dir);
        let object = lb_userspace::object::ebpf_object().expect("LB_EBPF_OBJECT at build time");
        // Kernels before 5.11 charge maps to RLIMIT_MEMLOCK (the agent raises it the same way).
        let unlimited = libc::rlimit {
            rlim_cur: libc::RLIM_INFINITY,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: a valid rlimit struct.
        unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&pins.0)
            .load(object)
            .expect("load the object");
        let xdp: &mut Xdp = ebpf.program_mut(XDP).expect(XDP).try_into().unwrap();
        xdp.load().expect("load lb_xdp");
        for name in [POD_INGRESS, POD_EGRESS, UPLINK_INGRESS, UPLINK_EGRESS] {
            let p: &mut SchedClassifier = ebpf.program_mut(name).expect(name).try_into().unwrap();
            p.load().unwrap_or_else(|e| panic!("load {name}: {e:?}"));
        }
        let mut dp = Self {
            ebpf,
            pins,
            frontends: Vec::new(),
            node_addrs: Vec::new(),
        };
        // As the agent starts: every slot marked free of frontends.
        for i in 0..filter::WORDS {
            dp.filter().set(i, u64::MAX, 0).unwrap();
        }
        dp
    }

    fn filter(&mut self) -> Array<&mut MapData, u64> {
        Array::try_from(self.ebpf.map_mut(maps::FRONTEND_FILTER).unwrap()).unwrap()
    }

    /// Marks a tuple's slot in the filter: free of frontends or not.
    fn mark(&mut self, (a, port, proto_nr): (u32, u16, u8), free: bool) {
        let (index, bit) = filter::position(filter::slot(a, port, proto_nr));
        let mut words = self.filter();
        let w = words.get(&index, 0).unwrap();
        words
            .set(index, if free { w | bit } else { w & !bit }, 0)
            .unwrap();
    }

    /// The tuples a frontend key lets through the filter.
    fn tuples(&self, key: &ServiceKey) -> Vec<(u32, u16, u8)> {
        if key.addr != 0 {
            return vec![(key.addr, key.port, key.proto)];
        }
        self.node_addrs
            .iter()
            .map(|a| (*a, key.port, key.proto))
            .collect()
    }

    fn admit(&mut self, key: &ServiceKey) {
        for t in self.tuples(key) {
            self.frontends.push(t);
            self.mark(t, false);
        }
    }

    /// Removes a frontend entry as the agent does: the entry, then its filter slots when no
    /// other frontend falls on them, then the service id's next generation.
    fn remove_frontend(&mut self, frontend: (Ipv4Addr, u16), proto_nr: u8, scope_nr: u8) {
        let key = frontend_key(frontend, proto_nr, scope_nr);
        let mut services = self.hash::<ServiceKey, ServiceValue>(maps::SERVICES);
        let id = services.get(&key, 0).expect("the frontend").id;
        services.remove(&key).unwrap();
        for t in self.tuples(&key) {
            let i = self.frontends.iter().position(|f| *f == t).unwrap();
            self.frontends.swap_remove(i);
            if !self.frontends.contains(&t) {
                self.mark(t, true);
            }
        }
        let mut generations =
            Array::<_, u32>::try_from(self.ebpf.map_mut(maps::SERVICE_GENERATIONS).unwrap())
                .unwrap();
        let g = generations.get(&id, 0).unwrap();
        generations.set(id, g.wrapping_add(1), 0).unwrap();
    }

    fn hash<K: Pod, V: Pod>(&mut self, name: &str) -> HashMap<&mut MapData, K, V> {
        HashMap::try_from(self.ebpf.map_mut(name).expect(name)).unwrap()
    }

    fn node_addr(&mut self, ip: Ipv4Addr) {
        let a = addr::ipv4(ip.octets());
        let node_ports: Vec<ServiceKey> = self
            .hash::<ServiceKey, ServiceValue>(maps::SERVICES)
            .keys()
            .map(Result::unwrap)
            .filter(|k| k.addr == 0)
            .collect();
        for k in node_ports {
            self.frontends.push((a, k.port, k.proto));
            self.mark((a, k.port, k.proto), false);
        }
        self.node_addrs.push(a);
        self.hash::<u32, u32>(maps::NODE_ADDRESSES)
            .insert(a, 1, 0)
            .unwrap();
    }

    fn put_backends(&mut self, service_id: u32, proto_nr: u8, backends: &[Backend]) {
        let mut map = self.hash::<u32, BackendValue>(maps::BACKENDS);
        for b in backends {
            let v = BackendValue::new(
                addr::ipv4(b.addr.octets()),
                addr::port(b.port),
                proto_nr,
                backend_state::ACTIVE,
                service_id,
                lb_common::backend_flags::LOCAL,
            );
            map.insert(b.id, v, 0).unwrap();
        }
    }

    fn remove_backend(&mut self, id: u32) {
        self.hash::<u32, BackendValue>(maps::BACKENDS)
            .remove(&id)
            .unwrap();
    }

    /// A frontend whose Maglev table (a range of its own, by service id) spreads over
    /// `backends` in turn.
    #[allow(clippy::too_many_arguments)]
    fn service(
        &mut self,
        id: u32,
        frontend: (Ipv4Addr, u16),
        proto_nr: u8,
        scope_nr: u8,
        kind_nr: u8,
        flags: u16,
        backends: &[Backend],
    ) {
        self.put_backends(id, proto_nr, backends);
        let offset = id * MAGLEV_LEN;
        let len = if backends.is_empty() { 0 } else { MAGLEV_LEN };
        let mut table =
            Array::<_, u32>::try_from(self.ebpf.map_mut(maps::MAGLEV).unwrap()).unwrap();
        for slot in 0..len {
            table
                .set(
                    offset + slot,
                    backends[(slot as usize) % backends.len()].id,
                    0,
                )
                .unwrap();
        }
        let key = frontend_key(frontend, proto_nr, scope_nr);
        let value = ServiceValue::new(id, flags, kind_nr, offset, len, backends.len() as u32, 0);
        self.admit(&key);
        self.hash::<ServiceKey, ServiceValue>(maps::SERVICES)
            .insert(key, value, 0)
            .unwrap();
    }

    /// The marker that makes every undeclared port of a ClusterIP reject.
    fn cluster_ip_marker(&mut self, ip: Ipv4Addr) {
        let key = ServiceKey::new(addr::ipv4(ip.octets()), 0, 0, scope::INTERNAL);
        let value = ServiceValue::new(0, service_flags::ADDRESS_ONLY, kind::CLUSTER_IP, 0, 0, 0, 0);
        self.admit(&key);
        self.hash::<ServiceKey, ServiceValue>(maps::SERVICES)
            .insert(key, value, 0)
            .unwrap();
    }

    fn conntrack(
        &mut self,
        src: (Ipv4Addr, u16),
        dst: (Ipv4Addr, u16),
        proto_nr: u8,
    ) -> Option<CtValue> {
        let key = CtKey::new(
            addr::ipv4(src.0.octets()),
            addr::ipv4(dst.0.octets()),
            addr::port(src.1),
            addr::port(dst.1),
            proto_nr,
        );
        self.hash::<CtKey, CtValue>(maps::CONNTRACK)
            .get(&key, 0)
            .ok()
    }

    fn counter(&mut self, map: &str, index: u32) -> Counter {
        let a = PerCpuArray::<_, Counter>::try_from(self.ebpf.map_mut(map).unwrap()).unwrap();
        a.get(&index, 0)
            .unwrap()
            .iter()
            .fold(Counter::default(), |acc, c| Counter {
                packets: acc.packets + c.packets,
                bytes: acc.bytes + c.bytes,
            })
    }

    fn drops(&mut self, reason: u32) -> u64 {
        let a =
            PerCpuArray::<_, u64>::try_from(self.ebpf.map_mut(maps::DROP_STATS).unwrap()).unwrap();
        a.get(&reason, 0).unwrap().iter().sum()
    }

    /// Dropped packets of one service, over all CPUs.
    fn service_drops(&mut self, service_id: u32) -> u64 {
        let a = PerCpuArray::<_, u64>::try_from(self.ebpf.map_mut(maps::SERVICE_DROPS).unwrap())
            .unwrap();
        a.get(&service_id, 0).unwrap().iter().sum()
    }

    /// Runs a program once on `packet` (the kernel re-runs on the rewritten buffer with
    /// repeat > 1) and returns its verdict and the packet as it left.
    fn run(&mut self, program: &str, packet: &[u8]) -> (u32, Vec<u8>) {
        let mut out = vec![0u8; packet.len() + 512];
        let prog = self.ebpf.program(program).expect(program);
        let opts = TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            repeat: 1,
            ..Default::default()
        };
        let result = match prog {
            aya::programs::Program::Xdp(p) => p.test_run(opts),
            aya::programs::Program::SchedClassifier(p) => p.test_run(opts),
            _ => panic!("{program}: unexpected program type"),
        }
        .unwrap_or_else(|e| panic!("test run of {program}: {e:?}"));
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }
}

#[track_caller]
fn assert_packet(actual: &[u8], expected: &[u8]) {
    if actual != expected {
        let hex = |b: &[u8]| {
            b.iter()
                .map(|x| format!("{x:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let first = actual.iter().zip(expected).position(|(a, e)| a != e);
        panic!(
            "packets differ (first at byte {first:?}, lengths {} vs {})\n  actual: {}\nexpected: {}",
            actual.len(),
            expected.len(),
            hex(actual),
            hex(expected)
        );
    }
}

/// Runs `program` and checks its verdict and output frame.
#[track_caller]
fn expect(dp: &mut Datapath, program: &str, input: &Packet, verdict_nr: u32, output: &[u8]) {
    let (rc, out) = dp.run(program, &input.bytes());
    assert_eq!(rc, verdict_nr, "{program} verdict");
    assert_packet(&out, output);
}

#[track_caller]
fn expect_untouched(dp: &mut Datapath, program: &str, input: &[u8], verdict_nr: u32) {
    let (rc, out) = dp.run(program, input);
    assert_eq!(rc, verdict_nr, "{program} verdict");
    assert_packet(&out, input);
}

/// A NodePort service (TCP and UDP on NODE_PORT) reachable through the node address, and
/// the same service from pods.
fn nodeport_datapath(backends: &[Backend]) -> Datapath {
    let mut dp = Datapath::load();
    dp.node_addr(NODE_IP);
    let wildcard = Ipv4Addr::UNSPECIFIED;
    dp.service(
        1,
        (wildcard, NODE_PORT),
        proto::TCP,
        scope::EXTERNAL,
        kind::NODE_PORT,
        0,
        backends,
    );
    dp.service(
        2,
        (wildcard, NODE_PORT),
        proto::UDP,
        scope::EXTERNAL,
        kind::NODE_PORT,
        0,
        backends,
    );
    dp
}

const ONE_BACKEND: [Backend; 1] = [backend(11, BACKEND_A, BACKEND_PORT)];

// ---------------------------------------------------------------------------------------
// Cases

#[test]
#[ignore = "needs root and the eBPF object: cargo xtask test"]
fn xdp_nodeport_dnat_and_uplink_reverse_nat() {
    let mut dp = nodeport_datapath(&ONE_BACKEND);
    let syn = Packet::tcp((CLIENT, CLIENT_PORT), (NODE_IP, NODE_PORT), TCP_SYN);
    let dnat = syn.clone().with_dst(BACKEND_A, BACKEND_PORT);
    expect(&mut dp, XDP, &syn, XDP_PASS, &dnat.bytes());

    let fwd = dp
        .conntrack((CLIENT, CLIENT_PORT), (NODE_IP, NODE_PORT), proto::TCP)
        .expect("forward entry");
    assert_eq!(
        (fwd.kind, fwd.tcp_state, fwd.service_id, fwd.backend_id),
        (ct_kind::FORWARD, tcp_state::OPENING, 1, 11)
    );
    assert_eq!(
        (fwd.nat_addr, fwd.nat_port),
        (addr::ipv4(BACKEND_A.octets()), addr::port(BACKEND_PORT))
    );
    let rev = dp
        .conntrack((BACKEND_A, BACKEND_PORT), (CLIENT, CLIENT_PORT), proto::TCP)
        .expect("reply entry");
    assert_eq!(
        (rev.kind, rev.nat_addr, rev.nat_port),
        (
            ct_kind::REPLY,
            addr::ipv4(NODE_IP.octets()),
            addr::port(NODE_PORT)
        )
    );

    // The backend's SYN-ACK leaves through the uplink with the NodePort as its source.
    let mut syn_ack = Packet::tcp(
        (BACKEND_A, BACKEND_PORT),
        (CLIENT, CLIENT_PORT),
        TCP_SYN | TCP_ACK,
    );
    (syn_ack.src_mac, syn_ack.dst_mac) = (NODE_MAC, CLIENT_MAC);
    let restored = syn_ack.clone().with_src(NODE_IP, NODE_PORT);
    expect(
        &mut dp,
        UPLINK_EGRESS,
        &syn_ack,
        TC_ACT_OK,
        &restored.bytes(),
    );
    let fwd = dp
        .conntrack((CLIENT, CLIENT_PORT), (NODE_IP, NODE_PORT), proto::TCP)
        .unwrap();
    assert_eq!(
        fwd.tcp_state,
        tcp_state::ESTABLISHED,
        "a reply establishes the flow"
    );

    assert_eq!(dp.counter(maps::VERDICT_STATS, verdict::DNAT).packets, 1);
    assert_eq!(
        dp.counter(maps::VERDICT_STATS, verdict::REVERSE_NAT)
            .packets,
        1
    );
    let svc = dp.counter(maps::SERVICE_STATS, 1);
    assert_eq!(svc.packets, 2);
    assert_eq!(
        svc.bytes,
        (syn.bytes().len() + syn_ack.bytes().len()) as u64
    );
}

#[test]
#[ignore = "needs root and the eBPF object: cargo xtask test"]
fn xdp_nodeport_is_not_served_on_other_addresses() {
    let mut dp = nodeport_datapath(&ONE_BACKEND);
    let to_other = Packet::tcp((CLIENT, CLIENT_PORT), (OTHER, NODE_PORT), TCP_SYN);
    expect_untouched(&mut dp, XDP, &to_other.bytes(), XDP_PASS);
}

#[test]
#[ignore = "needs root and the eBPF object: cargo xtask test"]
fn xdp_lb_ip_and_external_ip_dnat() {
    let mut dp = Datapath::load();
    let backends = [backend(21, BACKEND_A, BACKEND_PORT)];
    dp.service(
        3,
        (LB_IP, 80),
        proto::UDP,
        scope::EXTERNAL,
        kind::LOAD_BALANCER,
        0,
        &backends,
    );
    dp.service(
        4,
        (EXTERNAL_IP, 443),
        proto::TCP,
        scope::EXTERNAL,
        kind::EXTERNAL_IP,
        0,
        &backends,
    );

    let udp = Packet::udp((CLIENT, CLIENT_PORT), (LB_IP, 80), b"query");
    expect(
        &mut dp,
        XDP,
        &udp,
        XDP_PASS,
        &udp.clone().with_dst(BACKEND_A, BACKEND_PORT).bytes(),
    );

    let syn = Packet::tcp((CLIENT, CLIENT_PORT), (EXTERNAL_IP, 443), TCP_SYN);
    expect(
        &mut dp,
        XDP,
        &syn,
        XDP_PASS,
        &syn.clone().with_dst(BACKEND_A, BACKEND_PORT).bytes(),
    );
}

#[test]
#[ignore = "needs root and the eBPF object: cargo xtask test"]
fn xdp_udp_without_checksum_keeps_it_zero() {
    let mut dp = nodeport_datapath(&ONE_BACKEND);
    let mut udp = Packet::udp((CLIENT, CLIENT_PORT), (NODE_IP, NODE_PORT), b"no checksum");
    if let L4::Udp { checksum, .. } = &mut udp.l4 {
        *checksum = false;
    }
    expect(
        &mut dp,
        XDP,
        &udp,
        XDP_PASS,
        &udp.clone().with_dst(BACKEND_A, BACKEND_PORT).bytes(),
    );
}

#[test]
#[ignore = "needs root and the eBPF object: cargo xtask test"]
fn xdp_vlan_tagged_dnat() {
    let mut dp = nodeport_datapath(&ONE_BACKEND);
    let mut syn = Packet::tcp((CLIENT, CLIENT_PORT), (NODE_IP, NODE_PORT), TCP_SYN);
    syn.vlan = Some(42);
    expect(
        &mut dp,
        XDP,
        &syn,
        XDP_PASS,
        &syn.clone().with_dst(BACKEND_A, BACKEND_PORT).bytes(),
    );
}

#[test]
#[ignore = "needs root and the eBPF object: cargo xtask test"]
fn cluster_ip_is_served_to_pods_only() {
    let mut dp = Datapath::load();
    let backends = [backend(31, BACKEND_A, BACKEND_PORT)];
    dp.service(
        5,
        (CLUSTER_IP, 80),
        proto::TCP,
        scope::INTERNAL,
        kind::CLUSTER_IP,
        0,
        &backends,
    );
    dp.cluster_ip_marker(CLUSTER_IP);

    let mut syn = Packet::tcp((POD_CLIENT, CLIENT_PORT), (CLUSTER_IP, 80), TCP_SYN);
    syn.ttl = 64;
    let dnat = syn.clone().with_dst(BACKEND_A, BACKEND_PORT);
    expect(&mut dp, POD_INGRESS, &syn, TC_ACT_OK, &dnat.bytes());
    // Arriving on an uplink, a ClusterIP is not a frontend.
    expect_untouched(&mut dp, XDP, &syn.bytes(), XDP_PASS);

    // The backend's answer, on its way to the client pod, comes from the ClusterIP.
    let mut reply = Packet::tcp(
        (BACKEND_A, BACKEND_PORT),
        (POD_CLIENT, CLIENT_PORT),
        TCP_SYN | TCP_ACK,
    );
    (reply.src_mac, reply.dst_mac) = (NODE_MAC, CLIENT_MAC);
    expect(
        &mut dp,
        POD_EGRESS,
        &reply,
        TC_ACT_OK,
        &reply.clone().with_src(CLUSTER_IP, 80).bytes(),
    );

    // The next segment of the flow goes through conntrack to the same backend.
    let ack = Packet::tcp((POD_CLIENT, CLIENT_PORT), (CLUSTER_IP, 80), TCP_ACK);
    expect(
        &mut dp,
        POD_INGRESS,
        &ack,
        TC_ACT_OK,
        &ack.clone().with_dst(BACKEND_A, BACKEND_PORT).bytes(),
    );
}

#[test]
#[ignore = "needs root and the eBPF object: cargo xtask test"]
fn cluster_ip_on_unknown_port_rejects() {
    let mut dp = Datapath::load();
    let backends = [backend(31, BACKEND_A, BACKEND_PORT)];
    dp.service(
        5,
        (CLUSTER_IP, 80),
        proto::TCP,
        scope::INTERNAL,
        kind::CLUSTER_IP,
        0,
        &backends,
    );
    dp.cluster_ip_marker(CLUSTER_IP);

    let syn = Packet::tcp((POD_CLIENT, CLIENT_PORT), (CLUSTER_IP, 81), TCP_SYN);
    expect(
        &mut dp,
        POD_INGRESS,
        &syn,
        TC_ACT_REDIRECT,
        &syn.rst().bytes(),
    );
    let udp = Packet::udp((POD_CLIENT, CLIENT_PORT), (CLUSTER_IP, 80), b"q");
    expect(
        &mut dp,
        POD_INGRESS,
        &udp,
        TC_ACT_REDIRECT,
        &udp.answer(udp.icmp_error(3, 3)).bytes(),
    );
    assert_eq!(dp.counter(maps::VERDICT_STATS, verdict::REJECT).packets, 2);
}

/// A NodePort and a ClusterIP without endpoints.
fn empty_services() -> Datapath {
    let mut dp = nodeport_datapath(&[]);
    dp.service(
        6,
        (CLUSTER_IP, 80),
        proto::TCP,
        scope::INTERNAL,
        kind::CLUSTER_IP,
        0,
        &[],
    );
    dp.service(
        7,
        (CLUSTER_IP, 53),
        proto::UDP,
        scope::INTERNAL,
        kind::CLUSTER_IP,
        0,
        &[],
    );
    dp
}

#[test]
#[ignore = "needs root and the eBPF object: cargo xtask test"]
fn xdp_rejects_tcp_with_rst() {
    let mut dp = empty_services();
    let syn = Packet::tcp((CLIENT, CLIENT_PORT), (NODE_IP, NODE_PORT), TCP_SYN);
    expect(&mut dp, XDP, &syn, XDP_TX, &syn.rst().bytes());

    // Data on a connection the node does not know: the RST acknowledges the payload.
    let mut push = Packet::tcp((CLIENT, CLIENT_PORT), (NODE_IP, NODE_PORT), 0x08);
    if let L4::Tcp { payload, .. } = &mut push.l4 {
        *payload = b"GET / HTTP/1.1\r\n\r\n".to_vec();
    }
    expect(&mut dp, XDP, &push, XDP_TX, &push.rst().bytes());

    // A segment with ACK is answered with a bare RST carrying its acknowledgement number.
    let ack = Packet::tcp((CLIENT, CLIENT_PORT), (NODE_IP, NODE_PORT), TCP_ACK);
    let rst = ack.answer(L4::Tcp {
        sport: NODE_PORT,
        dport: CLIENT_PORT,
        seq: 5000,
        ack: 0,
        flags: TCP_RST,
        window: 0,
        payload: Vec::new(),
    });
    expect(&mut dp, XDP, &ack, XDP_TX, &rst.bytes());
    assert_eq!(dp.counter(maps::VERDICT_STATS, verdict::REJECT).packets, 3);
    assert_eq!(dp.counter(maps::SERVICE_STATS, 1).packets, 3);
    assert_eq!(dp.service_drops(1), 0, "a reject is no drop");
}

#[test]
#[ignore = "needs root and the eBPF object: cargo xtask test"]
fn xdp_rejects_udp_with_port_unreachable() {
    let mut dp = empty_services();
    let udp = Packet::udp(
        (CLIENT, CLIENT_PORT),
        (NODE_IP, NODE_PORT),
        b"hello, anybody there?",
    );
    expect(
        &mut dp,
        XDP,
        &udp,
        XDP_TX,
        &udp.answer(udp.icmp_error(3, 3)).bytes(),
    );

    let mut with_options = udp.clone();
    with_options.options = vec![0x94, 0x04, 0, 0]; // router alert
    let answer = with_options.answer(with_options.icmp_error(3, 3));
    expect(&mut dp, XDP, &with_options, XDP_TX, &answer.bytes());
}

#[test]
#[ignore = "needs root and the eBPF object: cargo xtask test"]
fn tc_rejects_from_pods() {
    let mut dp = empty_services();
    let syn = Packet::tcp((POD_CLIENT, CLIENT_PORT), (CLUSTER_IP, 80), TCP_SYN);
    expect(
        &mut dp,
        POD_INGRESS,
        &syn,
        TC_ACT_REDIRECT,
        &syn.rst().bytes(),
    );
    let udp = Packet::udp((POD_CLIENT, CLIENT_PORT), (CLUSTER_IP, 53), b"query");
    expect(
        &mut dp,
        POD_INGRESS,
        &udp,
        TC_ACT_REDIRECT,
        &udp.answer(udp.icmp_error(3, 3)).bytes(),
    );
}

#[test]
#[ignore = "needs root and the eBPF object: cargo xtask test"]
fn local_policy_without_local_endpoint_drops() {
    let mut dp = Datapath::load();
    dp.service(
        8,
        (LB_IP, 80),
        proto::TCP,
        scope::EXTERNAL,
        kind::LOAD_BALANCER,
        service_flags::LOCAL_POLICY,
        &[],
    );
    let syn = Packet::tcp((CLIENT, CLIENT_PORT), (LB_IP, 80), TCP_SYN);
    let (rc, _) = dp.run(XDP, &syn.bytes());
    assert_eq!(rc, XDP_DROP);
    let local = service_flags::LOCAL_POLICY;
    dp.service(
        9,
        (CLUSTER_IP, 80),
        proto::UDP,
        scope::INTERNAL,
        kind::CLUSTER_IP,
        local,
        &[],
    );
    let udp = Packet::udp((POD_CLIENT, CLIENT_PORT), (CLUSTER_IP, 80), b"q");
    let (rc, _) = dp.run(POD_INGRESS, &udp.bytes());
    assert_eq!(rc, TC_ACT_SHOT);
    assert_eq!(dp.drops(drop_reason::NO_LOCAL_ENDPOINT), 2);
    assert_eq!(dp.counter(maps::VERDICT_STATS, verdict::DROP).packets, 2);
    // Each drop is counted for its service, in XDP and in TC.
    assert_eq!((dp.service_drops(8), dp.service_drops(9)), (1, 1));
    dp.run(POD_INGRESS, &udp.bytes());
    assert_eq!((dp.service_drops(8), dp.service_drops(9)), (1, 2));
    assert_eq!(dp.counter(maps::SERVICE_STATS, 9).packets, 2);
}

#[test]
#[ignore = "needs root and the eBPF object: cargo xtask test"]
fn traffic_not_for_a_service_passes_untouched() {
    let mut dp = nodeport_datapath(&ONE_BACKEND);
    let other_port = Packet::tcp((CLIENT, CLIENT_PORT), (NODE_IP, 22), TCP_SYN);
    let other_proto = Packet::udp((CLIENT, CLIENT_PORT), (NODE_IP, NODE_PORT), b"x");
    let mut other_proto = other_proto;
    other_proto.l4 = L4::Raw {
        proto: 47,
        bytes: vec![0; 16],
    };
    let ping = Packet::new(
        CLIENT,
        NODE_IP,
        L4::Icmp {
            kind: 8,
            code: 0,
            rest: [0, 1, 0, 1],
            payload: vec![7; 8],
        },
    );
    let mut arp = vec![0xff; 6];
    arp.extend(CLIENT_MAC);
    arp.extend([0x08, 0x06]);
    arp.extend([0u8; 28]);
    let mut ipv6 = Packet::tcp((CLIENT, CLIENT_PORT), (NODE_IP, NODE_PORT), TCP_SYN).bytes();
    ipv6[12..14].copy_from_slice(&[0x86, 0xdd]);
    for frame in [
        other_port.bytes(),
        other_proto.bytes(),
        ping.bytes(),
        arp,
        ipv6,
    ] {
        expect_untouched(&mut dp, XDP, &frame, XDP_PASS);
        expect_untouched(&mut dp, POD_INGRESS, &frame, TC_ACT_OK);
        expect_untouched(&mut dp, POD_EGRESS, &frame, TC_ACT_OK);
        expect_untouched(&mut dp, UPLINK_EGRESS, &frame, TC_ACT_OK);
    }
    // A reply of a flow the data path never translated.
    let reply = Packet::tcp((BACKEND_A, BACKEND_PORT), (CLIENT, CLIENT_PORT), TCP_ACK);
    expect_untouched(&mut dp, UPLINK_EGRESS, &reply.bytes(), TC_ACT_OK);
    assert_eq!(dp.counter(maps::VERDICT_STATS, verdict::DNAT).packets, 0);
}

#[test]
#[ignore = "needs root and the eBPF object: cargo xtask test"]
fn ip_options_are_skipped_through_ihl() {
    let mut dp = nodeport_datapath(&ONE_BACKEND);
    for options in [
        vec![0x01, 0x01, 0x01, 0x00],
        vec![0x07, 0x0b, 0x04, 0, 0, 0, 0, 0, 0, 0, 0, 0x00],
    ] {
        let mut syn = Packet::tcp((CLIENT, CLIENT_PORT), (NODE_IP, NODE_PORT), TCP_SYN);
        syn.options = options;
        expect(
            &mut dp,
            XDP,
            &syn,
            XDP_PASS,
            &syn.clone().with_dst(BACKEND_A, BACKEND_PORT).bytes(),
        );
    }
    let mut udp = Packet::udp(
        (POD_CLIENT, CLIENT_PORT),
        (NODE_IP, NODE_PORT),
        b"from a pod",
    );
    udp.options = vec![0x94, 0x04, 0, 0];
    let mut dp = nodeport_datapath(&ONE_BACKEND);
    dp.service(
        9,
        (Ipv4Addr::UNSPECIFIED, NODE_PORT),
        proto::UDP,
        scope::INTERNAL,
        kind::NODE_PORT,
        0,
        &ONE_BACKEND,
    );
    expect(
        &mut dp,
        POD_INGRESS,
        &udp,
        TC_ACT_OK,
        &udp.clone().with_dst(BACKEND_A, BACKEND_PORT).bytes(),
    );
}

#[test]
#[ignore = "needs root and the eBPF object: cargo xtask test"]
fn truncated_headers_pass_untouched() {
    let mut dp = nodeport_datapath(&ONE_BACKEND);
    let syn = Packet::tcp((CLIENT, CLIENT_PORT), (NODE_IP, NODE_PORT), TCP_SYN).bytes();
    let mut with_options = Packet::tcp((CLIENT, CLIENT_PORT), (NODE_IP, NODE_PORT), TCP_SYN);
    with_options.options = vec![0x01; 20];
    let with_options = with_options.bytes();
    // Cut inside the TCP header and inside the IP options.
    for frame in [&syn[..14 + 20 + 12], &with_options[..14 + 20 + 8]] {
        expect_untouched(&mut dp, XDP, frame, XDP_PASS);
        expect_untouched(&mut dp, POD_INGRESS, frame, TC_ACT_OK);
    }
    // Cut inside the IP header (the kernel's test run refuses such an skb, so XDP only).
    expect_untouched(&mut dp, XDP, &syn[..30], XDP_PASS);
    // An IHL below the minimum.
    let mut bad_ihl = syn.clone();
    bad_ihl[14] = 0x44;
    expect_untouched(&mut dp, XDP, &bad_ihl, XDP_PASS);
    // Counted where the destination could be read and is the node's.
    assert_eq!(dp.drops(drop_reason::MALFORMED), 5);
    assert_eq!(dp.counter(maps::VERDICT_STATS, verdict::DNAT).packets, 0);
    assert!(dp
        .conntrack((CLIENT, CLIENT_PORT), (NODE_IP, NODE_PORT), proto::TCP)
        .is_none());
}

#[test]
#[ignore = "needs root and the eBPF object: cargo xtask test"]
fn later_fragments_follow_the_first() {
    let mut dp = nodeport_datapath(&ONE_BACKEND);
    let mut first = Packet::udp((CLIENT, CLIENT_PORT), (NODE_IP, NODE_PORT), &[0xab; 24]);
    first.frag = IP_MF;
    first.id = 0x4242;
    expect(
        &mut dp,
        XDP,
        &first,
        XDP_PASS,
        &first.clone().with_dst(BACKEND_A, BACKEND_PORT).bytes(),
    );

    let mut later = first.clone();
    later.frag = 4; // offset 32 bytes, last fragment
    later.l4 = L4::Raw {
        proto: proto::UDP,
        bytes: vec![0xcd; 20],
    };
    let mut moved = later.clone();
    moved.dst = BACKEND_A;
    expect(&mut dp, XDP, &later, XDP_PASS, &moved.bytes());
    assert_eq!(
        dp.counter(maps::VERDICT_STATS, verdict::FRAGMENT).packets,
        1
    );

    // A fragment of another datagram whose first fragment was never seen.
    let mut unknown = later.clone();
    unknown.id = 0x4343;
    expect_untouched(&mut dp, XDP, &unknown.bytes(), XDP_PASS);
}

#[test]
#[ignore = "needs root and the eBPF object: cargo xtask test"]
fn icmp_error_from_backend_is_reverse_natted() {
    let mut dp = nodeport_datapath(&ONE_BACKEND);
    let udp = Packet::udp((CLIENT, CLIENT_PORT), (NODE_IP, NODE_PORT), b"query");
    let delivered = udp.clone().with_dst(BACKEND_A, BACKEND_PORT);
    expect(&mut dp, XDP, &udp, XDP_PASS, &delivered.bytes());

    // The backend has no listener and says so, quoting the packet it got.
    let (error, expected) = backend_refusal(&udp, &delivered);
    expect(&mut dp, UPLINK_EGRESS, &error, TC_ACT_OK, &expected.bytes());
    assert_eq!(
        dp.counter(maps::VERDICT_STATS, verdict::ICMP_ERROR_NAT)
            .packets,
        1
    );

    // A router on the way reports on the same flow: only the quote changes.
    let router = Ipv4Addr::new(10, 244, 0, 1);
    let mut ttl_error = error.clone();
    ttl_error.src = router;
    ttl_error.l4 = delivered.icmp_error(11, 0);
    let mut expected = ttl_error.clone();
    expected.l4 = udp.icmp_error(11, 0);
    expect(
        &mut dp,
        POD_EGRESS,
        &ttl_error,
        TC_ACT_OK,
        &expected.bytes(),
    );
}

#[test]
#[ignore = "needs root and the eBPF object: cargo xtask test"]
fn icmp_error_from_client_reaches_the_backend() {
    let mut dp = nodeport_datapath(&ONE_BACKEND);
    let udp = Packet::udp((CLIENT, CLIENT_PORT), (NODE_IP, NODE_PORT), b"query");
    dp.run(XDP, &udp.bytes());
    // The backend's reply as the client saw it, and the client's complaint about it.
    let reply_seen = Packet::udp((NODE_IP, NODE_PORT), (CLIENT, CLIENT_PORT), b"answer");
    let error = Packet::new(CLIENT, NODE_IP, reply_seen.icmp_error(3, 3));
    let reply_sent = reply_seen.clone().with_src(BACKEND_A, BACKEND_PORT);
    let mut expected = Packet::new(CLIENT, BACKEND_A, reply_sent.icmp_error(3, 3));
    expected.ttl = error.ttl;
    expect(&mut dp, XDP, &error, XDP_PASS, &expected.bytes());
}

#[test]
#[ignore = "needs root and the eBPF object: cargo xtask test"]
fn icmp_error_to_a_pod_client_is_reverse_natted() {
    let mut dp = Datapath::load();
    dp.service(
        5,
        (CLUSTER_IP, 53),
        proto::UDP,
        scope::INTERNAL,
        kind::CLUSTER_IP,
        0,
        &[backend(31, BACKEND_A, BACKEND_PORT)],
    );
    dp.cluster_ip_marker(CLUSTER_IP);
    let udp = Packet::udp((POD_CLIENT, CLIENT_PORT), (CLUSTER_IP, 53), b"query");
    let delivered = udp.clone().with_dst(BACKEND_A, BACKEND_PORT);
    expect(&mut dp, POD_INGRESS, &udp, TC_ACT_OK, &delivered.bytes());
    // The pod-made flow's entry carries flags of its own (its scope): still translated.
    let (error, expected) = backend_refusal(&udp, &delivered);
    expect(&mut dp, POD_EGRESS, &error, TC_ACT_OK, &expected.bytes());
}

#[test]
#[ignore = "needs root and the eBPF object: cargo xtask test"]
fn tcp_keeps_its_backend_while_udp_reselects() {
    let mut dp = nodeport_datapath(&ONE_BACKEND);
    let syn = Packet::tcp((CLIENT, CLIENT_PORT), (NODE_IP, NODE_PORT), TCP_SYN);
    dp.run(XDP, &syn.bytes());
    let syn_ack = Packet::tcp(
        (BACKEND_A, BACKEND_PORT),
        (CLIENT, CLIENT_PORT),
        TCP_SYN | TCP_ACK,
    );
    dp.run(UPLINK_EGRESS, &syn_ack.bytes());
    let udp = Packet::udp((CLIENT, CLIENT_PORT), (NODE_IP, NODE_PORT), b"q");
    expect(
        &mut dp,
        XDP,
        &udp,
        XDP_PASS,
        &udp.clone().with_dst(BACKEND_A, BACKEND_PORT).bytes(),
    );

    // The endpoint leaves: the tables now name another backend only.
    dp.remove_backend(11);
    let moved = [backend(12, BACKEND_B, BACKEND_PORT)];
    let wildcard = Ipv4Addr::UNSPECIFIED;
    dp.service(
        1,
        (wildcard, NODE_PORT),
        proto::TCP,
        scope::EXTERNAL,
        kind::NODE_PORT,
        0,
        &moved,
    );
    dp.service(
        2,
        (wildcard, NODE_PORT),
        proto::UDP,
        scope::EXTERNAL,
        kind::NODE_PORT,
        0,
        &moved,
    );

    let ack = Packet::tcp((CLIENT, CLIENT_PORT), (NODE_IP, NODE_PORT), TCP_ACK);
    expect(
        &mut dp,
        XDP,
        &ack,
        XDP_PASS,
        &ack.clone().with_dst(BACKEND_A, BACKEND_PORT).bytes(),
    );
    expect(
        &mut dp,
        XDP,
        &udp,
        XDP_PASS,
        &udp.clone().with_dst(BACKEND_B, BACKEND_PORT).bytes(),
    );
    let fwd = dp
        .conntrack((CLIENT, CLIENT_PORT), (NODE_IP, NODE_PORT), proto::UDP)
        .unwrap();
    assert_eq!(fwd.backend_id, 12);
    // The reply of the moved flow is reverse-NATed from its new backend.
    let answer = Packet::udp((BACKEND_B, BACKEND_PORT), (CLIENT, CLIENT_PORT), b"a");
    expect(
        &mut dp,
        UPLINK_EGRESS,
        &answer,
        TC_ACT_OK,
        &answer.clone().with_src(NODE_IP, NODE_PORT).bytes(),
    );
    // A new TCP connection goes to the remaining backend.
    let other = Packet::tcp((CLIENT, CLIENT_PORT + 1), (NODE_IP, NODE_PORT), TCP_SYN);
    expect(
        &mut dp,
        XDP,
        &other,
        XDP_PASS,
        &other.clone().with_dst(BACKEND_B, BACKEND_PORT).bytes(),
    );
}

#[test]
#[ignore = "needs root and the eBPF object: cargo xtask test"]
fn tuples_the_filter_marks_free_of_frontends_pass_without_a_lookup() {
    let mut dp = nodeport_datapath(&ONE_BACKEND);
    let syn = Packet::tcp((CLIENT, CLIENT_PORT), (NODE_IP, NODE_PORT), TCP_SYN);
    let tuple = (
        addr::ipv4(NODE_IP.octets()),
        addr::port(NODE_PORT),
        proto::TCP,
    );
    dp.mark(tuple, true);
    expect_untouched(&mut dp, XDP, &syn.bytes(), XDP_PASS);
    dp.mark(tuple, false);
    let dnat = syn.clone().with_dst(BACKEND_A, BACKEND_PORT);
    expect(&mut dp, XDP, &syn, XDP_PASS, &dnat.bytes());
}

#[test]
#[ignore = "needs root and the eBPF object: cargo xtask test"]
fn a_frontend_that_goes_ends_its_flows_while_the_service_ports_others_keep_theirs() {
    // One service port (id 3) on an LB IP, for outside and for pods, and an externalIP.
    let mut dp = Datapath::load();
    let frontends = [
        (LB_IP, scope::EXTERNAL, kind::LOAD_BALANCER),
        (LB_IP, scope::INTERNAL, kind::LOAD_BALANCER),
        (EXTERNAL_IP, scope::EXTERNAL, kind::EXTERNAL_IP),
    ];
    for (ip, scope_nr, kind_nr) in frontends {
        dp.service(3, (ip, 80), proto::TCP, scope_nr, kind_nr, 0, &ONE_BACKEND);
    }
    for ip in [LB_IP, EXTERNAL_IP] {
        let syn = Packet::tcp((CLIENT, CLIENT_PORT), (ip, 80), TCP_SYN);
        let dnat = syn.clone().with_dst(BACKEND_A, BACKEND_PORT);
        expect(&mut dp, XDP, &syn, XDP_PASS, &dnat.bytes());
    }

    // The LB IP stops serving outside (pods still reach it, so its tuple stays in the
    // filter): the flow made through it is not the service's any more.
    dp.remove_frontend((LB_IP, 80), proto::TCP, scope::EXTERNAL);
    let ack = Packet::tcp((CLIENT, CLIENT_PORT), (LB_IP, 80), TCP_ACK);
    expect_untouched(&mut dp, XDP, &ack.bytes(), XDP_PASS);

    let ack = Packet::tcp((CLIENT, CLIENT_PORT), (EXTERNAL_IP, 80), TCP_ACK);
    let dnat = ack.clone().with_dst(BACKEND_A, BACKEND_PORT);
    expect(&mut dp, XDP, &ack, XDP_PASS, &dnat.bytes());
    let fwd = dp
        .conntrack((CLIENT, CLIENT_PORT), (EXTERNAL_IP, 80), proto::TCP)
        .unwrap();
    assert_eq!(
        fwd.generation, 1,
        "confirmed under the service port's next generation"
    );
}

#[test]
#[ignore = "needs root and the eBPF object: cargo xtask test"]
fn tcp_fin_moves_the_flow_to_closing() {
    let mut dp = nodeport_datapath(&ONE_BACKEND);
    dp.run(
        XDP,
        &Packet::tcp((CLIENT, CLIENT_PORT), (NODE_IP, NODE_PORT), TCP_SYN).bytes(),
    );
    dp.run(
        UPLINK_EGRESS,
        &Packet::tcp(
            (BACKEND_A, BACKEND_PORT),
            (CLIENT, CLIENT_PORT),
            TCP_SYN | TCP_ACK,
        )
        .bytes(),
    );
    dp.run(
        XDP,
        &Packet::tcp(
            (CLIENT, CLIENT_PORT),
            (NODE_IP, NODE_PORT),
            TCP_FIN | TCP_ACK,
        )
        .bytes(),
    );
    let fwd = dp
        .conntrack((CLIENT, CLIENT_PORT), (NODE_IP, NODE_PORT), proto::TCP)
        .unwrap();
    assert_eq!(fwd.tcp_state, tcp_state::CLOSING);
    let rev = dp
        .conntrack((BACKEND_A, BACKEND_PORT), (CLIENT, CLIENT_PORT), proto::TCP)
        .unwrap();
    assert_eq!(rev.tcp_state, tcp_state::CLOSING);
}

// The service rules beyond plain translation: source ranges and session affinity.
#[path = "fixtures/rules.rs"]
mod rules;
// Host routing: a local backend's flows sent between interfaces past the node's stack.
#[path = "fixtures/host_routing.rs"]
mod host_routing;

#[test]
#[ignore = "needs root and the eBPF object: cargo xtask test"]
fn new_service_ids_start_from_zeroed_counters() {
    use aya::maps::PerCpuValues;
    use lb_userspace::sync::{open_pin, AyaMaps, MapStore};

    let mut dp = Datapath::load();
    let cpus = aya::util::nr_cpus().unwrap();
    let counted = Counter {
        packets: 5,
        bytes: 500,
    };
    for id in [3, 4, 5] {
        let mut stats =
            PerCpuArray::<_, Counter>::try_from(dp.ebpf.map_mut(maps::SERVICE_STATS).unwrap())
                .unwrap();
        let values = PerCpuValues::try_from(vec![counted; cpus]).unwrap();
        stats.set(id, values, 0).unwrap();
        let mut drops =
            PerCpuArray::<_, u64>::try_from(dp.ebpf.map_mut(maps::SERVICE_DROPS).unwrap()).unwrap();
        drops
            .set(id, PerCpuValues::try_from(vec![7u64; cpus]).unwrap(), 0)
            .unwrap();
    }
    let mut store = AyaMaps::from_ebpf(&mut dp.ebpf).unwrap();
    store.reset_service_counters(&[3, 5]).unwrap();
    let stats =
        PerCpuArray::<_, Counter>::try_from(open_pin(&dp.pins.0, maps::SERVICE_STATS).unwrap())
            .unwrap();
    let drops = PerCpuArray::<_, u64>::try_from(open_pin(&dp.pins.0, maps::SERVICE_DROPS).unwrap())
        .unwrap();
    let packets = |id: u32| -> u64 { stats.get(&id, 0).unwrap().iter().map(|c| c.packets).sum() };
    let dropped = |id: u32| -> u64 { drops.get(&id, 0).unwrap().iter().sum() };
    assert_eq!(
        (packets(3), packets(4), packets(5)),
        (0, 5 * cpus as u64, 0)
    );
    assert_eq!(
        (dropped(3), dropped(4), dropped(5)),
        (0, 7 * cpus as u64, 0)
    );
}

/// Batched writes land in order and stop where the map is full, which reads as a full map,
/// as with one update per entry.
#[test]
#[ignore = "needs root and the eBPF object: cargo xtask test"]
fn batched_writes_stop_at_a_full_map() {
    use lb_userspace::sync::{open_pin, AyaMaps, BatchError, MapError, MapStore};

    let mut dp = Datapath::load();
    let mut store = AyaMaps::from_ebpf(&mut dp.ebpf).unwrap();
    let value = |n: u32| {
        BackendValue::new(
            addr::ipv4([10, 0, 0, 1]),
            addr::port(8080),
            proto::TCP,
            backend_state::ACTIVE,
            n,
            0,
        )
    };
    let fill: Vec<(u32, BackendValue)> =
        (1..=capacity::BACKENDS).map(|id| (id, value(id))).collect();
    store.put_backends(&fill).unwrap();
    let more = [
        (1, value(7)),
        (capacity::BACKENDS + 1, value(8)),
        (2, value(9)),
    ];
    assert_eq!(
        store.put_backends(&more),
        Err(BatchError {
            index: 1,
            error: MapError::Full(maps::BACKENDS)
        })
    );
    let backends =
        HashMap::<_, u32, BackendValue>::try_from(open_pin(&dp.pins.0, maps::BACKENDS).unwrap())
            .unwrap();
    assert_eq!(backends.get(&1, 0).unwrap(), value(7), "written before it");
    assert_eq!(
        backends.get(&2, 0).unwrap(),
        value(2),
        "not written after it"
    );
    assert_eq!(
        backends.get(&capacity::BACKENDS, 0).unwrap(),
        value(capacity::BACKENDS)
    );
}
