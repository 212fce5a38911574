//! `lb services`, `lb conntrack`, `lb stats`: readable views of the pinned maps.

use std::{collections::BTreeMap, net::Ipv4Addr, path::Path};

use anyhow::bail;
use aya::maps::{HashMap, MapData, PerCpuArray};
use lb_common::{
    addr, backend_flags, backend_state, ct_flags, ct_kind, kind, maps, proto, scope, service_flags,
    stats, tcp_state, Counter, CtKey, CtValue,
};
use serde::Serialize;

use crate::{
    cli::Output,
    sync::{open_pin, AyaMaps, MapStore},
};

fn ensure(dir: &Path) -> anyhow::Result<()> {
    if !dir.join(maps::SERVICES).exists() {
        bail!(
            "no data path pinned at {} (is the agent running?)",
            dir.display()
        );
    }
    Ok(())
}

fn ip(a: u32) -> Ipv4Addr {
    Ipv4Addr::from(addr::ipv4_octets(a))
}

fn proto_name(p: u8) -> &'static str {
    match p {
        proto::TCP => "TCP",
        proto::UDP => "UDP",
        proto::ICMP => "ICMP",
        _ => "?",
    }
}

#[derive(Serialize)]
struct BackendRow {
    id: u32,
    address: String,
    state: &'static str,
    local: bool,
    /// Receives new flows (it is in the frontend's Maglev table).
    selected: bool,
}

#[derive(Serialize)]
struct FrontendRow {
    service_id: u32,
    kind: &'static str,
    frontend: String,
    protocol: &'static str,
    scope: &'static str,
    flags: Vec<&'static str>,
    affinity_timeout: Option<u32>,
    /// loadBalancerSourceRanges, when this frontend filters sources.
    source_ranges: Vec<String>,
    maglev_len: u32,
    backends: Vec<BackendRow>,
}

pub fn services(dir: &Path, output: Output) -> anyhow::Result<()> {
    ensure(dir)?;
    let store = AyaMaps::open_pinned(dir)?;
    let backends = store.backends()?;
    let ranges = store.source_ranges()?;
    let mut rows = Vec::new();
    for (k, v) in store.services()? {
        if v.flags & service_flags::ADDRESS_ONLY != 0 {
            continue;
        }
        let table: std::collections::BTreeSet<u32> = if v.maglev_len > 0 {
            store
                .maglev(v.maglev_offset, v.maglev_len)?
                .into_iter()
                .collect()
        } else {
            Default::default()
        };
        let mut flags = Vec::new();
        if v.flags & service_flags::LOCAL_POLICY != 0 {
            flags.push("local");
        }
        if v.flags & service_flags::AFFINITY != 0 {
            flags.push("affinity");
        }
        if v.flags & service_flags::TERMINATING_FALLBACK != 0 {
            flags.push("terminating-fallback");
        }
        let mut source_ranges = Vec::new();
        if v.flags & service_flags::SOURCE_RANGES != 0 {
            flags.push("source-ranges");
            source_ranges = ranges
                .iter()
                .filter(|r| r.service_id == v.id)
                .map(|r| format!("{}/{}", ip(r.addr), r.prefix_len))
                .collect();
        }
        let mut bs: Vec<BackendRow> = backends
            .iter()
            .filter(|(_, b)| b.service_id == v.id)
            .map(|(id, b)| BackendRow {
                id: *id,
                address: format!("{}:{}", ip(b.addr), addr::port_host(b.port)),
                state: match b.state {
                    backend_state::ACTIVE => "active",
                    backend_state::TERMINATING => "terminating",
                    _ => "inactive",
                },
                local: b.flags & backend_flags::LOCAL != 0,
                selected: table.contains(id),
            })
            .collect();
        bs.sort_by(|a, b| a.address.cmp(&b.address));
        let frontend = if k.addr == 0 {
            format!("*:{}", addr::port_host(k.port))
        } else {
            format!("{}:{}", ip(k.addr), addr::port_host(k.port))
        };
        rows.push(FrontendRow {
            service_id: v.id,
            kind: match v.kind {
                kind::CLUSTER_IP => "ClusterIP",
                kind::NODE_PORT => "NodePort",
                kind::LOAD_BALANCER => "LoadBalancer",
                _ => "ExternalIP",
            },
            frontend,
            protocol: proto_name(k.proto),
            scope: if k.scope == scope::EXTERNAL {
                "external"
            } else {
                "internal"
            },
            flags,
            affinity_timeout: (v.flags & service_flags::AFFINITY != 0)
                .then_some(v.affinity_timeout),
            source_ranges,
            maglev_len: v.maglev_len,
            backends: bs,
        });
    }
    rows.sort_by(|a, b| {
        (a.service_id, &a.frontend, a.scope).cmp(&(b.service_id, &b.frontend, b.scope))
    });
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<5} {:<12} {:<22} {:<5} {:<9} {:<16} BACKENDS",
        "ID", "KIND", "FRONTEND", "PROTO", "SCOPE", "FLAGS"
    );
    for r in rows {
        let backends: Vec<String> = r
            .backends
            .iter()
            .map(|b| {
                let mut s = format!("{} ({}", b.address, b.state);
                if b.local {
                    s.push_str(", local");
                }
                if !b.selected {
                    s.push_str(", no new flows");
                }
                s + ")"
            })
            .collect();
        let mut flags = if r.flags.is_empty() {
            "-".to_string()
        } else {
            r.flags.join(",")
        };
        if let Some(t) = r.affinity_timeout {
            flags = flags.replace("affinity", &format!("affinity={t}s"));
        }
        if !r.source_ranges.is_empty() {
            flags = flags.replace(
                "source-ranges",
                &format!("source-ranges={}", r.source_ranges.join("+")),
            );
        }
        let backends = if backends.is_empty() {
            "(none)".to_string()
        } else {
            backends.join(" ")
        };
        println!(
            "{:<5} {:<12} {:<22} {:<5} {:<9} {:<16} {}",
            r.service_id, r.kind, r.frontend, r.protocol, r.scope, flags, backends
        );
    }
    Ok(())
}

#[derive(Serialize)]
struct FlowRow {
    protocol: &'static str,
    client: String,
    frontend: String,
    backend: String,
    service_id: u32,
    state: &'static str,
    /// How the flow crosses the node: `stack`, `direct` (host routing), `snat`, `dsr` or
    /// `hairpin`.
    route: &'static str,
    idle_seconds: u64,
}

/// The way a flow's entry says its packets go.
fn route_name(flags: u8) -> &'static str {
    if flags & ct_flags::HAIRPIN != 0 {
        "hairpin"
    } else if flags & ct_flags::SNAT != 0 {
        "snat"
    } else if flags & ct_flags::DSR != 0 {
        "dsr"
    } else if flags & ct_flags::DIRECT != 0 {
        "direct"
    } else {
        "stack"
    }
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer; bpf_ktime_get_ns uses CLOCK_MONOTONIC.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub fn conntrack(dir: &Path, output: Output) -> anyhow::Result<()> {
    ensure(dir)?;
    let ct: HashMap<MapData, CtKey, CtValue> = open_pin(dir, maps::CONNTRACK)?.try_into()?;
    let now = monotonic_ns();
    let mut rows = Vec::new();
    for entry in ct.iter() {
        let (k, v) = entry?;
        if v.kind != ct_kind::FORWARD {
            continue;
        }
        rows.push(FlowRow {
            protocol: proto_name(k.proto),
            client: format!("{}:{}", ip(k.src_addr), addr::port_host(k.src_port)),
            frontend: format!("{}:{}", ip(k.dst_addr), addr::port_host(k.dst_port)),
            backend: format!("{}:{}", ip(v.nat_addr), addr::port_host(v.nat_port)),
            service_id: v.service_id,
            state: match (k.proto, v.tcp_state) {
                (proto::TCP, tcp_state::ESTABLISHED) => "established",
                (proto::TCP, tcp_state::CLOSING) => "closing",
                (proto::TCP, _) => "opening",
                _ => "-",
            },
            route: route_name(v.flags),
            idle_seconds: now.saturating_sub(v.last_seen_ns) / 1_000_000_000,
        });
    }
    rows.sort_by(|a, b| (&a.frontend, &a.client).cmp(&(&b.frontend, &b.client)));
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<5} {:<22} {:<22} {:<22} {:<12} {:<8} IDLE",
        "PROTO", "CLIENT", "FRONTEND", "BACKEND", "STATE", "ROUTE"
    );
    for r in rows {
        println!(
            "{:<5} {:<22} {:<22} {:<22} {:<12} {:<8} {}s",
            r.protocol, r.client, r.frontend, r.backend, r.state, r.route, r.idle_seconds
        );
    }
    Ok(())
}

#[derive(Serialize, Default)]
struct Totals {
    packets: u64,
    bytes: u64,
}

#[derive(Serialize, Default)]
struct ServiceTotals {
    packets: u64,
    bytes: u64,
    /// Packets of the service the programs dropped (the reasons are under `drops`).
    drops: u64,
}

#[derive(Serialize, Default)]
struct StatsOut {
    verdicts: BTreeMap<&'static str, Totals>,
    drops: BTreeMap<&'static str, u64>,
    services: BTreeMap<u32, ServiceTotals>,
}

/// Sums one counter over all CPUs.
fn sum(values: &[Counter]) -> Totals {
    values.iter().fold(Totals::default(), |a, c| Totals {
        packets: a.packets + c.packets,
        bytes: a.bytes + c.bytes,
    })
}

pub fn stats(dir: &Path, output: Output) -> anyhow::Result<()> {
    ensure(dir)?;
    let verdicts: PerCpuArray<MapData, Counter> = open_pin(dir, maps::VERDICT_STATS)?.try_into()?;
    let drops: PerCpuArray<MapData, u64> = open_pin(dir, maps::DROP_STATS)?.try_into()?;
    let svcs: PerCpuArray<MapData, Counter> = open_pin(dir, maps::SERVICE_STATS)?.try_into()?;
    // Pins of an agent older than the map have no per-service drops.
    let svc_drops: Option<PerCpuArray<MapData, u64>> = if dir.join(maps::SERVICE_DROPS).exists() {
        Some(open_pin(dir, maps::SERVICE_DROPS)?.try_into()?)
    } else {
        None
    };
    let mut out = StatsOut::default();
    for (i, name) in stats::verdict::NAMES.iter().enumerate() {
        out.verdicts
            .insert(name, sum(&verdicts.get(&(i as u32), 0)?));
    }
    for (i, name) in stats::drop_reason::NAMES.iter().enumerate() {
        out.drops
            .insert(name, drops.get(&(i as u32), 0)?.iter().sum());
    }
    let store = AyaMaps::open_pinned(dir)?;
    let ids: std::collections::BTreeSet<u32> = store
        .services()?
        .into_iter()
        .map(|(_, v)| v.id)
        .filter(|id| *id != 0)
        .collect();
    for id in ids {
        let Totals { packets, bytes } = sum(&svcs.get(&id, 0)?);
        let drops = match &svc_drops {
            Some(d) => d.get(&id, 0)?.iter().sum(),
            None => 0,
        };
        out.services.insert(
            id,
            ServiceTotals {
                packets,
                bytes,
                drops,
            },
        );
    }
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("{:<16} {:>12} {:>14}", "VERDICT", "PACKETS", "BYTES");
    for (name, c) in out.verdicts.iter().filter(|(n, _)| **n != "unused") {
        println!("{:<16} {:>12} {:>14}", name, c.packets, c.bytes);
    }
    println!("\n{:<20} {:>12}", "DROP REASON", "PACKETS");
    for (name, n) in out.drops.iter().filter(|(n, _)| **n != "unused") {
        println!("{:<20} {:>12}", name, n);
    }
    println!(
        "\n{:<10} {:>12} {:>14} {:>12}",
        "SERVICE", "PACKETS", "BYTES", "DROPS"
    );
    for (id, c) in &out.services {
        println!(
            "{:<10} {:>12} {:>14} {:>12}",
            id, c.packets, c.bytes, c.drops
        );
    }
    Ok(())
}
