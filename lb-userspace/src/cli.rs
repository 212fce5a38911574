//! The `lb` command line. Its flags are a contract that deployments and tests rely on.

use std::{net::Ipv4Addr, net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::datapath::XdpModeArg;

pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/lb";

#[derive(Parser, Debug)]
#[command(
    name = "lb",
    version,
    about = "eBPF service load balancer for Kubernetes"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the node agent: program the data path and keep it in step with the services.
    Agent(Box<AgentArgs>),
    /// Show frontends with their backends.
    Services(InspectArgs),
    /// Show tracked flows.
    Conntrack(InspectArgs),
    /// Show packet counters.
    Stats(InspectArgs),
    /// Detach every program of this data path and remove its pins.
    Reset(PinArgs),
}

#[derive(Args, Debug, Clone)]
pub struct PinArgs {
    /// bpffs directory of the data path's pins.
    #[arg(long, default_value = DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Args, Debug, Clone)]
pub struct InspectArgs {
    #[command(flatten)]
    pub pins: PinArgs,
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Args, Debug, Clone)]
pub struct AgentArgs {
    /// Where services come from: `kubernetes` (the API server) or `file:PATH` (a YAML/JSON
    /// file or a directory of them). Default: `kubernetes` inside a pod, else required.
    #[arg(long)]
    pub source: Option<String>,
    /// A kubeconfig for `--source kubernetes`. Default: `$KUBECONFIG`, then the in-cluster
    /// configuration (service account), then `~/.kube/config`.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// The API server's real address (HOST:PORT or https://HOST:PORT). Nothing translates the
    /// `kubernetes` ClusterIP for the agent itself, so inside a cluster it must reach the API
    /// server directly; this replaces the server of the in-cluster configuration or kubeconfig.
    #[arg(long)]
    pub api_server: Option<String>,
    /// `/healthz` reports not synced when changes have been waiting this long to be written.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    pub healthz_timeout: Duration,
    /// Endpoints with this nodeName are local. Default: the host name.
    #[arg(long)]
    pub node_name: Option<String>,
    /// Uplink interfaces (XDP and TC egress). Default: the interface of the default route.
    #[arg(long = "external-iface")]
    pub external_ifaces: Vec<String>,
    /// Node addresses for NodePorts. Default: the IPv4 addresses of the external interfaces.
    #[arg(long = "node-ip")]
    pub node_ips: Vec<Ipv4Addr>,
    /// Pod interfaces (host side), glob patterns; interfaces that appear later are attached too.
    #[arg(long = "pod-iface", default_values_t = vec!["veth*".to_string()])]
    pub pod_ifaces: Vec<String>,
    #[command(flatten)]
    pub pins: PinArgs,
    #[arg(long, value_enum, default_value_t = XdpModeArg::Auto)]
    pub xdp_mode: XdpModeArg,
    #[command(flatten)]
    pub lifetimes: Lifetimes,
    /// kube-proxy compatible `/healthz` and `/livez`.
    #[arg(long, default_value = "0.0.0.0:10256")]
    pub healthz_addr: SocketAddr,
    /// Prometheus metrics.
    #[arg(long, default_value = "127.0.0.1:10249")]
    pub metrics_addr: SocketAddr,
    /// Translate the node's own sockets (connect, sendmsg, recvmsg, getpeername) through
    /// cgroup hooks. `--socket-lb=false` leaves them on the packet path, which does not
    /// see them.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub socket_lb: bool,
    /// How traffic from outside reaches backends on other nodes: `snat` (answers come back
    /// through this node) or `dsr` (IPIP to the backend's node, which answers directly). The
    /// annotation `lb.dev/lb-mode` on a Service overrides it.
    #[arg(long, value_enum, default_value_t = crate::state::LbMode::Snat)]
    pub lb_mode: crate::state::LbMode,
    /// Source ports for flows from outside to backends on other nodes, which leave with this
    /// node's address (MIN-MAX). Must overlap neither the NodePort range nor the host's
    /// ephemeral ports (net.ipv4.ip_local_port_range).
    #[arg(long, value_parser = parse_port_range, default_value = "61000-65535")]
    pub snat_ports: (u16, u16),
    /// The source address a pod sees when it reaches its own service and is chosen as the
    /// backend (hairpin). Link-local, so that no pod or node owns it.
    #[arg(long, default_value = "169.254.42.1")]
    pub service_loopback_address: Ipv4Addr,
    /// How translated flows between a local backend and its client cross the node: `stack`
    /// (through the node's routing and netfilter, like kube-proxy) or `bpf` (the programs
    /// hand each packet straight to the pod's interface or the uplink, in both directions,
    /// as Cilium's BPF host routing does: faster, but the node's FORWARD chain, and
    /// iptables-based NetworkPolicy with it, no longer sees those flows). From outside, `bpf`
    /// applies where the uplink's XDP is generic (veth uplinks); native XDP uses the stack.
    #[arg(long, value_enum, default_value_t = HostRouting::Stack)]
    pub host_routing: HostRouting,
    /// The cgroup v2 directory the socket hooks attach to. Default: the root of the cgroup
    /// v2 hierarchy (mounted under /run/lb when the machine has none).
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostRouting {
    Stack,
    Bpf,
}

/// Conntrack lifetimes, refreshed by traffic. Defaults are Cilium's.
#[derive(Args, Debug, Clone, PartialEq)]
pub struct Lifetimes {
    /// Established TCP flows.
    #[arg(long = "ct-tcp-established", value_parser = humantime::parse_duration, default_value = "6h")]
    pub tcp_established: Duration,
    /// TCP flows whose handshake has not completed.
    #[arg(long = "ct-tcp-opening", value_parser = humantime::parse_duration, default_value = "60s")]
    pub tcp_opening: Duration,
    /// TCP flows that have seen a FIN or RST.
    #[arg(long = "ct-tcp-closing", value_parser = humantime::parse_duration, default_value = "10s")]
    pub tcp_closing: Duration,
    /// UDP flows.
    #[arg(long = "ct-udp", value_parser = humantime::parse_duration, default_value = "60s")]
    pub udp: Duration,
    /// Other protocols.
    #[arg(long = "ct-other", value_parser = humantime::parse_duration, default_value = "60s")]
    pub other: Duration,
}

impl Lifetimes {
    /// The CONFIG entry the programs read, in whole seconds.
    pub fn config(&self) -> anyhow::Result<lb_common::Config> {
        let secs = |name: &str, d: Duration| -> anyhow::Result<u32> {
            match u32::try_from(d.as_secs()) {
                Ok(s) if s > 0 => Ok(s),
                _ => anyhow::bail!(
                    "--ct-{name} must be between 1s and {}s, got {d:?}",
                    u32::MAX
                ),
            }
        };
        Ok(lb_common::Config::new(
            secs("tcp-established", self.tcp_established)?,
            secs("tcp-opening", self.tcp_opening)?,
            secs("tcp-closing", self.tcp_closing)?,
            secs("udp", self.udp)?,
            secs("other", self.other)?,
        ))
    }
}

fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?} is not MIN-MAX"))?;
    let (a, b): (u16, u16) = (
        a.trim().parse().map_err(|e| format!("{a:?}: {e}"))?,
        b.trim().parse().map_err(|e| format!("{b:?}: {e}"))?,
    );
    if a == 0 || a > b {
        return Err(format!("{s:?}: need 0 < MIN <= MAX"));
    }
    Ok((a, b))
}

/// kube-proxy's default NodePort range.
pub const NODE_PORT_RANGE: (u16, u16) = (30000, 32767);

/// Checks that the SNAT ports collide neither with NodePorts nor with `ephemeral`.
pub fn check_snat_ports(snat: (u16, u16), ephemeral: (u16, u16)) -> anyhow::Result<()> {
    let overlaps = |a: (u16, u16), b: (u16, u16)| a.0 <= b.1 && b.0 <= a.1;
    if overlaps(snat, NODE_PORT_RANGE) {
        anyhow::bail!(
            "--snat-ports {}-{} overlaps the NodePort range {}-{}",
            snat.0,
            snat.1,
            NODE_PORT_RANGE.0,
            NODE_PORT_RANGE.1
        );
    }
    if overlaps(snat, ephemeral) {
        anyhow::bail!(
            "--snat-ports {}-{} overlaps the host's ephemeral ports {}-{} (net.ipv4.ip_local_port_range)",
            snat.0,
            snat.1,
            ephemeral.0,
            ephemeral.1
        );
    }
    Ok(())
}

/// Where the agent reads Services and EndpointSlices from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Kubernetes,
    Files(PathBuf),
}

impl AgentArgs {
    /// The `--source`, or its default: `kubernetes` in a pod (the kubelet sets
    /// KUBERNETES_SERVICE_HOST in every container).
    pub fn source(&self) -> anyhow::Result<Source> {
        let in_pod = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
        match self.source.as_deref() {
            None if in_pod => Ok(Source::Kubernetes),
            None => anyhow::bail!("--source is required outside a pod: kubernetes or file:PATH"),
            Some("kubernetes") => Ok(Source::Kubernetes),
            Some(s) => match s.strip_prefix("file:") {
                Some(p) if !p.is_empty() => Ok(Source::Files(PathBuf::from(p))),
                _ => anyhow::bail!(
                    "unsupported --source {s:?}: expected kubernetes or file:PATH (a manifest file or directory)"
                ),
            },
        }
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let result = match cli.command {
        Command::Agent(args) => crate::agent::run(*args),
        Command::Services(a) => crate::inspect::services(&a.pins.bpffs, a.output),
        Command::Conntrack(a) => crate::inspect::conntrack(&a.pins.bpffs, a.output),
        Command::Stats(a) => crate::inspect::stats(&a.pins.bpffs, a.output),
        Command::Reset(p) => crate::datapath::reset(&p.bpffs),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_command_line_contract() {
        let cli = Cli::try_parse_from([
            "lb",
            "agent",
            "--source",
            "file:/m",
            "--node-name",
            "n1",
            "--external-iface",
            "e0",
            "--external-iface",
            "e1",
            "--node-ip",
            "192.0.2.1",
            "--pod-iface",
            "lbp*",
            "--bpffs",
            "/sys/fs/bpf/x",
            "--xdp-mode",
            "generic",
            "--healthz-addr",
            "127.0.0.1:1",
            "--metrics-addr",
            "127.0.0.1:2",
            "--socket-lb=false",
            "--cgroup",
            "/sys/fs/cgroup/lb",
            "--host-routing",
            "bpf",
        ])
        .unwrap();
        let Command::Agent(a) = cli.command else {
            panic!("not agent")
        };
        assert_eq!(a.source().unwrap(), Source::Files(PathBuf::from("/m")));
        assert_eq!(a.external_ifaces, ["e0", "e1"]);
        assert_eq!(a.pod_ifaces, ["lbp*"]);
        assert_eq!(a.xdp_mode, XdpModeArg::Generic);
        assert_eq!(a.pins.bpffs, PathBuf::from("/sys/fs/bpf/x"));
        assert!(!a.socket_lb);
        assert_eq!(a.cgroup, Some(PathBuf::from("/sys/fs/cgroup/lb")));
        assert_eq!(a.host_routing, HostRouting::Bpf);
    }

    #[test]
    fn defaults_match_kube_proxy() {
        let Command::Agent(a) = Cli::try_parse_from(["lb", "agent", "--source", "file:x"])
            .unwrap()
            .command
        else {
            panic!("not agent")
        };
        assert_eq!(a.pod_ifaces, ["veth*"]);
        assert_eq!(a.healthz_addr.port(), 10256);
        assert_eq!(a.metrics_addr.to_string(), "127.0.0.1:10249");
        assert_eq!(a.pins.bpffs, PathBuf::from(DEFAULT_BPFFS));
        assert_eq!(a.lifetimes.config().unwrap(), lb_common::Config::default());
        assert!(a.socket_lb, "host processes reach services by default");
        assert_eq!(
            lb_common::addr::ipv4(a.service_loopback_address.octets()),
            lb_common::DEFAULT_HAIRPIN_ADDR
        );
        assert_eq!(a.cgroup, None);
        assert_eq!(
            a.host_routing,
            HostRouting::Stack,
            "the node's netfilter sees every flow"
        );
    }

    #[test]
    fn conntrack_lifetimes_take_durations() {
        let args = |extra: &[&str]| {
            let mut argv = vec!["lb", "agent", "--source", "file:x"];
            argv.extend(extra);
            match Cli::try_parse_from(argv).map(|c| c.command) {
                Ok(Command::Agent(a)) => Ok(a),
                Ok(_) => panic!("not agent"),
                Err(e) => Err(e),
            }
        };
        let a = args(&["--ct-tcp-established", "2h 30m", "--ct-udp", "90s"]).unwrap();
        let c = a.lifetimes.config().unwrap();
        assert_eq!((c.tcp_established_s, c.udp_s), (9000, 90));
        assert_eq!(c.tcp_closing_s, lb_common::Config::default().tcp_closing_s);
        assert!(args(&["--ct-udp", "soon"]).is_err());
        let zero = args(&["--ct-other", "0s"]).unwrap().lifetimes.config();
        assert!(zero.unwrap_err().to_string().contains("--ct-other"));
    }

    #[test]
    fn snat_ports_are_a_range_clear_of_node_ports_and_ephemeral_ports() {
        assert_eq!(parse_port_range("61000-65535"), Ok((61000, 65535)));
        assert!(parse_port_range("9-3").is_err());
        assert!(parse_port_range("0-3").is_err());
        assert!(parse_port_range("100").is_err());
        let eph = (32768, 60999);
        check_snat_ports((61000, 65535), eph).unwrap();
        let e = check_snat_ports((30500, 30600), eph).unwrap_err();
        assert!(e.to_string().contains("NodePort"), "{e}");
        let e = check_snat_ports((60000, 61000), eph).unwrap_err();
        assert!(e.to_string().contains("ephemeral"), "{e}");
    }

    #[test]
    fn inspectors_take_bpffs_after_the_subcommand() {
        for sub in ["services", "conntrack", "stats", "reset"] {
            Cli::try_parse_from(["lb", sub, "--bpffs", "/sys/fs/bpf/t"]).unwrap();
        }
        let source = |s: &str| match Cli::try_parse_from(["lb", "agent", "--source", s])
            .unwrap()
            .command
        {
            Command::Agent(a) => a.source(),
            _ => panic!("not agent"),
        };
        assert!(source("k8s").is_err());
        assert!(source("file:").is_err());
        assert_eq!(source("kubernetes").unwrap(), Source::Kubernetes);
    }

    #[test]
    fn kubernetes_source_flags() {
        let Command::Agent(a) = Cli::try_parse_from([
            "lb",
            "agent",
            "--source",
            "kubernetes",
            "--kubeconfig",
            "/k",
            "--api-server",
            "10.0.0.1:6443",
            "--healthz-timeout",
            "2m",
        ])
        .unwrap()
        .command
        else {
            panic!("not agent")
        };
        assert_eq!(a.kubeconfig, Some(PathBuf::from("/k")));
        assert_eq!(a.api_server.as_deref(), Some("10.0.0.1:6443"));
        assert_eq!(a.healthz_timeout, Duration::from_secs(120));
    }
}
