//! Network-namespace topologies for the integration tests and the demo: a client, a node
//! running the real agent, and pods, joined by veth pairs, with real TCP/UDP servers.
//! Everything lives in namespaces created here and removed on drop; nothing touches the
//! root namespace's interfaces or routes.

use std::{
    fs::File,
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call, short enough for interface names.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}x{}",
        std::process::id() % 100_000,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

fn sh(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network namespace, deleted (with every process in it) when dropped.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Result<Self> {
        let name = unique(prefix);
        sh(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip` inside the namespace.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        sh(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// A command run inside the namespace through nsenter (which, unlike `ip netns exec`,
    /// keeps the host's /sys and so its bpffs).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        c
    }

    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        sh(self.command(program).args(args))
    }

    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.exec("sysctl", &["-qw", &format!("{key}={value}")])
            .map(|_| ())
    }

    /// Runs `f` on a thread that has entered this namespace.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let file = File::open(self.path())?;
        thread::spawn(move || {
            // SAFETY: a valid namespace fd; setns affects only this thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(anyhow::anyhow!(
                    "setns: {}",
                    std::io::Error::last_os_error()
                ));
            }
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in namespace panicked"))?
    }

    /// Starts `f` on a thread inside this namespace and returns at once.
    pub fn spawn(&self, f: impl FnOnce() + Send + 'static) -> Result<()> {
        let file = File::open(self.path())?;
        thread::spawn(move || {
            // SAFETY: as in `run`.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } == 0 {
                f();
            }
        });
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Ok(pids) = sh(Command::new("ip").args(["netns", "pids", &self.name])) {
            for pid in pids.split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Connects two namespaces with a veth pair.
pub fn veth(a: &Netns, a_name: &str, b: &Netns, b_name: &str) -> Result<()> {
    let tmp = unique("lbt");
    sh(Command::new("ip").args([
        "link", "add", &tmp, "netns", &a.name, "type", "veth", "peer", "name", b_name, "netns",
        &b.name,
    ]))?;
    a.ip(&["link", "set", &tmp, "name", a_name])?;
    a.ip(&["link", "set", a_name, "up"])?;
    b.ip(&["link", "set", b_name, "up"])?;
    Ok(())
}

/// A pod: its namespace, address and the host-side interface name on the node.
pub struct Pod {
    pub name: String,
    pub ns: Netns,
    pub ip: Ipv4Addr,
    pub host_iface: String,
}

/// The name the node's agent runs under.
pub const NODE_NAME: &str = "node1";
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
/// Port every pod's servers listen on (TCP and UDP).
pub const POD_PORT: u16 = 8080;

/// Client <-> node <-> pods, as a host-gateway network would wire them: pods have a /32
/// and a default route via a link-local gateway address on the node's pod interfaces; the node
/// has a /32 route to each pod over its veth. The node also has the common
/// `FORWARD -m conntrack --ctstate INVALID -j DROP` rule. With peers, the client's side is
/// a bridge: one L2 segment for the client and every node, and each node routes the other
/// nodes' pod ranges to them.
pub struct Cluster {
    pub client: Netns,
    pub node: Netns,
    pub pods: Vec<Pod>,
    pub bpffs: PathBuf,
    /// Further nodes on the client's segment, each with its own pods and agent.
    pub peers: Vec<PeerNode>,
    agent: AgentRun,
    lb: PathBuf,
}

/// Another node: 192.0.2.(3 + i), pods in 10.244.(1 + i).0/24, named node(2 + i).
pub struct PeerNode {
    pub name: String,
    pub ns: Netns,
    pub ip: Ipv4Addr,
    pub pods: Vec<Pod>,
    agent: AgentRun,
}

/// The pod's veth pair, its address and routes on both sides.
fn wire_pod(node: &Netns, pod: &Pod) -> Result<()> {
    let (ns, ip, host_iface) = (&pod.ns, pod.ip, pod.host_iface.as_str());
    veth(node, host_iface, ns, "eth0")?;
    ns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
    ns.ip(&["route", "add", "169.254.1.1", "dev", "eth0"])?;
    ns.ip(&["route", "add", "default", "via", "169.254.1.1"])?;
    // The pods' gateway is a link-local address every pod interface of the node has.
    node.ip(&[
        "addr",
        "add",
        "169.254.1.1/32",
        "dev",
        host_iface,
        "scope",
        "link",
    ])?;
    node.ip(&["route", "add", &format!("{ip}/32"), "dev", host_iface])?;
    Ok(())
}

/// Forwarding, no reverse-path filter, and the INVALID drop rule real nodes often have.
fn node_settings(node: &Netns) -> Result<()> {
    node.sysctl("net.ipv4.ip_forward", "1")?;
    node.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
    node.exec(
        "iptables",
        &[
            "-A",
            "FORWARD",
            "-m",
            "conntrack",
            "--ctstate",
            "INVALID",
            "-j",
            "DROP",
        ],
    )?;
    Ok(())
}

/// Pods `names` on `node`, in 10.244.`subnet`.0/24.
fn make_pods(node: &Netns, names: &[&str], subnet: u8) -> Result<Vec<Pod>> {
    let at: Vec<(&str, Ipv4Addr)> = names
        .iter()
        .enumerate()
        .map(|(i, name)| (*name, Ipv4Addr::new(10, 244, subnet, 10 + i as u8)))
        .collect();
    make_pods_at(node, &at)
}

/// Pods on `node` with the given names and addresses.
fn make_pods_at(node: &Netns, pods_at: &[(&str, Ipv4Addr)]) -> Result<Vec<Pod>> {
    let mut pods = Vec::new();
    for (i, (name, ip)) in pods_at.iter().enumerate() {
        let pod = Pod {
            name: name.to_string(),
            ns: Netns::new("lbp")?,
            ip: *ip,
            host_iface: format!("lbp{i}"),
        };
        wire_pod(node, &pod)?;
        pods.push(pod);
    }
    Ok(pods)
}

impl Cluster {
    pub fn new(lb: &Path, pod_names: &[&str]) -> Result<Self> {
        Self::with_peers(lb, pod_names, &[])
    }

    /// A single node whose pods have the given names and addresses (anywhere but
    /// 192.0.2.0/24 and 169.254.1.1).
    pub fn with_pods_at(lb: &Path, pods: &[(&str, Ipv4Addr)]) -> Result<Self> {
        let mut cluster = Self::with_peers(lb, &[], &[])?;
        cluster.pods = make_pods_at(&cluster.node, pods)?;
        Ok(cluster)
    }

    /// A cluster whose node has `pod_names`, and one more node per entry of `peers`.
    pub fn with_peers(lb: &Path, pod_names: &[&str], peers: &[&[&str]]) -> Result<Self> {
        let client = Netns::new("lbc")?;
        let node = Netns::new("lbn")?;
        veth(&node, "up0", &client, "eth0")?;
        node.ip(&["addr", "add", &format!("{NODE_IP}/24"), "dev", "up0"])?;
        // The client side behaves like a NIC's peer: it takes XDP_TX frames (GRO) and sends
        // complete checksums (no tx offload).
        client.exec("ethtool", &["-K", "eth0", "gro", "on", "tx", "off"])?;
        let client_dev = if peers.is_empty() {
            "eth0"
        } else {
            client.ip(&["link", "add", "br0", "type", "bridge"])?;
            client.ip(&["link", "set", "eth0", "master", "br0"])?;
            client.ip(&["link", "set", "br0", "up"])?;
            client.exec("ethtool", &["-K", "br0", "tx", "off"])?;
            "br0"
        };
        client.ip(&["addr", "add", &format!("{CLIENT_IP}/24"), "dev", client_dev])?;
        client.ip(&["route", "add", "default", "via", &NODE_IP.to_string()])?;
        node_settings(&node)?;
        let pods = make_pods(&node, pod_names, 0)?;
        let mut cluster = Self {
            client,
            node,
            pods,
            bpffs: PathBuf::new(),
            peers: Vec::new(),
            agent: AgentRun::new(),
            lb: lb.to_path_buf(),
        };
        cluster.bpffs = cluster.agent.bpffs.clone();
        for (i, names) in peers.iter().enumerate() {
            cluster.add_peer(i as u8, names)?;
        }
        Ok(cluster)
    }

    fn add_peer(&mut self, i: u8, names: &[&str]) -> Result<()> {
        let ns = Netns::new("lbn")?;
        let ip = Ipv4Addr::new(192, 0, 2, 3 + i);
        let port = format!("eth{}", i + 1);
        veth(&ns, "up0", &self.client, &port)?;
        self.client
            .exec("ethtool", &["-K", &port, "gro", "on", "tx", "off"])?;
        self.client.ip(&["link", "set", &port, "master", "br0"])?;
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "up0"])?;
        node_settings(&ns)?;
        let pods = make_pods(&ns, names, 1 + i)?;
        // Host-gateway routes: every node reaches every other node's pods through it.
        let all: Vec<(&Netns, Ipv4Addr, u8)> = std::iter::once((&self.node, NODE_IP, 0))
            .chain(
                self.peers
                    .iter()
                    .enumerate()
                    .map(|(j, p)| (&p.ns, p.ip, 1 + j as u8)),
            )
            .collect();
        for (other, other_ip, subnet) in all {
            let theirs = format!("10.244.{subnet}.0/24");
            ns.ip(&["route", "add", &theirs, "via", &other_ip.to_string()])?;
            let ours = format!("10.244.{}.0/24", 1 + i);
            other.ip(&["route", "add", &ours, "via", &ip.to_string()])?;
        }
        self.peers.push(PeerNode {
            name: format!("node{}", 2 + i),
            ns,
            ip,
            pods,
            agent: AgentRun::new(),
        });
        Ok(())
    }

    /// Starts TCP and UDP servers in every pod of every node that answer with the pod's
    /// name: TCP once per line received (so a connection can be kept open and probed), UDP
    /// per datagram. A TCP line `from?` is answered with the name and the peer address the
    /// pod sees.
    pub fn start_servers(&self) -> Result<()> {
        let peer_pods = self.peers.iter().flat_map(|p| &p.pods);
        for pod in self.pods.iter().chain(peer_pods) {
            let name = pod.name.clone();
            let (tx, rx) = std::sync::mpsc::channel();
            pod.ns.spawn(move || {
                let tcp = TcpListener::bind(("0.0.0.0", POD_PORT));
                let udp = UdpSocket::bind(("0.0.0.0", POD_PORT));
                let ok = tcp.is_ok() && udp.is_ok();
                let _ = tx.send(ok);
                let (Ok(tcp), Ok(udp)) = (tcp, udp) else {
                    return;
                };
                let uname = name.clone();
                thread::spawn(move || {
                    let mut buf = [0u8; 1500];
                    while let Ok((_, from)) = udp.recv_from(&mut buf) {
                        let _ = udp.send_to(uname.as_bytes(), from);
                    }
                });
                for conn in tcp.incoming().flatten() {
                    let name = name.clone();
                    thread::spawn(move || {
                        let peer = conn.peer_addr().map(|a| a.ip().to_string());
                        let mut w = conn.try_clone().expect("clone stream");
                        for line in BufReader::new(conn).lines() {
                            let answer = match (line.as_deref(), &peer) {
                                (Ok("from?"), Ok(peer)) => format!("{name} {peer}"),
                                (Ok(_), _) => name.clone(),
                                (Err(_), _) => break,
                            };
                            if writeln!(w, "{answer}").is_err() {
                                break;
                            }
                        }
                    });
                }
            })?;
            if !rx.recv_timeout(Duration::from_secs(5)).unwrap_or(false) {
                bail!("servers in pod {} did not start", pod.name);
            }
        }
        Ok(())
    }

    /// Starts the real agent in the node namespace on a manifest path and waits for its
    /// first sync.
    pub fn start_agent(&mut self, manifests: &Path) -> Result<()> {
        self.start_agent_with(manifests, &[])
    }

    /// Starts the agent with more flags after the usual ones.
    pub fn start_agent_with(&mut self, manifests: &Path, extra: &[&str]) -> Result<()> {
        let last = self.pods.last().map(|p| p.host_iface.as_str());
        self.agent
            .start(&self.lb, &self.node, NODE_NAME, manifests, last, extra)
    }

    /// Starts every peer's agent on the same manifests.
    pub fn start_peer_agents(&mut self, manifests: &Path) -> Result<()> {
        for p in &mut self.peers {
            let last = p.pods.last().map(|p| p.host_iface.as_str());
            p.agent
                .start(&self.lb, &p.ns, &p.name, manifests, last, &[])?;
        }
        Ok(())
    }

    /// Deletes a pod's interfaces and creates them again under the same names, as a CNI does
    /// when a pod is recreated, then waits for the agent to attach the new interface.
    pub fn recreate_pod_interface(&self, pod: usize) -> Result<()> {
        let p = &self.pods[pod];
        let attached = format!("attached pod interface iface={}", p.host_iface);
        let before = self.agent.log_count(&attached);
        self.node.ip(&["link", "del", &p.host_iface])?;
        wire_pod(&self.node, p)?;
        self.agent.wait_log(&attached, before + 1)
    }

    /// The node agent's process id, while it runs.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.child.as_ref().map(Child::id)
    }

    /// Kills the agent without giving it a chance to clean up.
    pub fn kill_agent(&mut self) {
        self.agent.kill();
    }

    pub fn log(&self) -> String {
        self.agent.log()
    }

    /// How many times the agent has said "synced" so far.
    pub fn synced_count(&self) -> usize {
        self.agent.synced_count()
    }

    pub fn wait_synced(&self, count: usize) -> Result<()> {
        self.agent.wait_synced(count)
    }

    /// How many times each peer's agent has synced so far.
    pub fn peers_synced(&self) -> Vec<usize> {
        self.peers.iter().map(|p| p.agent.synced_count()).collect()
    }

    /// Waits until each peer's agent has synced once more than `before` counted.
    pub fn wait_peers_synced(&self, before: &[usize]) -> Result<()> {
        for (p, n) in self.peers.iter().zip(before) {
            p.agent.wait_synced(n + 1)?;
        }
        Ok(())
    }

    /// `lb <sub> --bpffs <ours>` in the node namespace.
    pub fn lb(&self, sub: &str, extra: &[&str]) -> Result<String> {
        self.agent.lb(&self.lb, &self.node, sub, extra)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let lb = self.lb.clone();
        self.agent.stop(&lb, &self.node);
        for p in &mut self.peers {
            p.agent.stop(&lb, &p.ns);
        }
    }
}

/// One node's agent process, its pin directory and its log.
struct AgentRun {
    bpffs: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl AgentRun {
    fn new() -> Self {
        Self {
            bpffs: PathBuf::from("/sys/fs/bpf").join(unique("lbt")),
            log: std::env::temp_dir().join(format!("{}.log", unique("lb-agent"))),
            child: None,
        }
    }

    fn start(
        &mut self,
        lb: &Path,
        ns: &Netns,
        node_name: &str,
        manifests: &Path,
        last_pod_iface: Option<&str>,
        extra: &[&str],
    ) -> Result<()> {
        let log = File::options().create(true).append(true).open(&self.log)?;
        let child = ns
            .command(lb)
            .args(["agent", "--source"])
            .arg(format!("file:{}", manifests.display()))
            .args([
                "--node-name",
                node_name,
                "--external-iface",
                "up0",
                "--pod-iface",
                "lbp*",
            ])
            .arg("--bpffs")
            .arg(&self.bpffs)
            .args([
                "--healthz-addr",
                "127.0.0.1:10256",
                "--metrics-addr",
                "127.0.0.1:10249",
            ])
            .args(extra)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        let synced_before = self.synced_count();
        // The pod interfaces are attached right after the first sync.
        let attached = format!(
            "attached pod interface iface={}",
            last_pod_iface.unwrap_or("")
        );
        let attached_before = self.log_count(&attached);
        self.child = Some(child);
        self.wait_synced(synced_before + 1)?;
        self.wait_log(&attached, attached_before + 1)
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills the agent and removes everything it left in place.
    fn stop(&mut self, lb: &Path, ns: &Netns) {
        self.kill();
        let _ = self.lb(lb, ns, "reset", &[]);
        let _ = std::fs::remove_dir_all(&self.bpffs);
        let _ = std::fs::remove_file(&self.log);
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn synced_count(&self) -> usize {
        self.log_count(" synced")
    }

    fn log_count(&self, needle: &str) -> usize {
        self.log().lines().filter(|l| l.contains(needle)).count()
    }

    fn wait_synced(&self, count: usize) -> Result<()> {
        self.wait_until(|| self.synced_count() >= count)
            .with_context(|| format!("agent did not sync; log:\n{}", self.log()))
    }

    /// Waits until the agent's log has `count` lines with `needle`.
    fn wait_log(&self, needle: &str, count: usize) -> Result<()> {
        self.wait_until(|| self.log_count(needle) >= count)
            .with_context(|| format!("agent did not log {needle:?}; log:\n{}", self.log()))
    }

    fn wait_until(&self, mut f: impl FnMut() -> bool) -> Result<()> {
        // Long enough for a first sync of tens of thousands of services on a busy machine.
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if f() {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(50));
        }
        bail!("timed out")
    }

    /// `lb <sub> --bpffs <ours>` in the node's namespace.
    fn lb(&self, lb: &Path, ns: &Netns, sub: &str, extra: &[&str]) -> Result<String> {
        sh(ns
            .command(lb)
            .arg(sub)
            .arg("--bpffs")
            .arg(&self.bpffs)
            .args(extra))
    }
}

impl PeerNode {
    /// `lb <sub>` against this node's agent.
    pub fn lb(&self, lb: &Path, sub: &str, extra: &[&str]) -> Result<String> {
        self.agent.lb(lb, &self.ns, sub, extra)
    }
}

/// One request over a new TCP connection; the answering pod's name.
pub fn tcp_request(to: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.write_all(b"hello\n")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    Ok(line.trim().to_string())
}

/// A kept-open TCP connection that answers one line per request.
pub struct Session {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Session {
    pub fn open(to: SocketAddr) -> std::io::Result<Self> {
        let s = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        Ok(Self {
            writer: s.try_clone()?,
            reader: BufReader::new(s),
        })
    }

    pub fn ask(&mut self) -> std::io::Result<String> {
        self.writer.write_all(b"again\n")?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(line.trim().to_string())
    }
}

/// A UDP socket with a fixed source port, connected to a service.
pub fn udp_socket(to: SocketAddr) -> std::io::Result<UdpSocket> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.connect(to)?;
    Ok(s)
}

pub fn udp_ask(s: &UdpSocket) -> std::io::Result<String> {
    s.send(b"ping")?;
    let mut buf = [0u8; 256];
    let n = s.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}
