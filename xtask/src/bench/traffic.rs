//! Traffic through the kernel, the same for every arm: a client namespace, a node and the
//! measured service's two backend pods plus a client pod, wired as the integration tests
//! wire them; the node runs either the real agent on the benchmark's manifest or a
//! kube-proxy-style ruleset. Two paths: the client to the measured NodePort, and the client
//! pod to the measured ClusterIP. On each, new connections per second (connect, request,
//! response, close) and the latency of requests on one kept-alive connection.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::Path,
    sync::{mpsc, Arc},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use lb_userspace::testbed::{Cluster, Netns, Pod, NODE_IP};

use super::workload::{self, SERVICE_PORT, TARGET_PORT};

/// Inside the cluster CIDR (so no rule masquerades it) and clear of every endpoint address.
const CLIENT_POD_IP: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 10);
const REQUEST: &[u8; 16] = b"GET / bench    \n";
const RESPONSE: &[u8; 16] = b"200 OK bench   \n";
/// Threads answering connections in each backend pod.
const SERVER_THREADS: usize = 4;
/// How long each connection-rate sample runs.
const RATE_WINDOW: Duration = Duration::from_secs(2);
/// Requests timed on the kept-alive connection, after as many untimed ones.
const LATENCY_REQUESTS: usize = 5_000;
const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// One path's figures in one trial.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PathFigures {
    pub connections_per_sec: f64,
    /// Connections that failed during the rate window (a refused or timed-out connect, a
    /// short answer); none is expected.
    pub failed: u64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// One arm's figures in one trial.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Traffic {
    pub node_port: PathFigures,
    pub cluster_ip: PathFigures,
}

/// The namespaces of one arm, removed when dropped.
pub struct Topology {
    pub cluster: Cluster,
    node_port: SocketAddr,
    cluster_ip: SocketAddr,
}

impl Topology {
    /// The topology for N services, with the measured (last) service's backends listening.
    pub fn new(lb: &Path, n: usize) -> Result<Self> {
        let services = workload::services(n);
        let measured = services.last().context("no services")?;
        let [ep0, ep1] = measured.endpoints;
        let cluster = Cluster::with_pods_at(
            lb,
            &[
                ("backend-0", ep0),
                ("backend-1", ep1),
                ("client-pod", CLIENT_POD_IP),
            ],
        )?;
        for pod in &cluster.pods[..2] {
            serve(pod)?;
        }
        // Many short connections: the clients reuse ports whose TIME_WAIT is older than a
        // second, from the whole port range.
        for client in [&cluster.client, &cluster.pods[2].ns] {
            client.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
            client.sysctl("net.ipv4.ip_local_port_range", "1024 65000")?;
        }
        Ok(Self {
            node_port: SocketAddr::from((NODE_IP, workload::measured_node_port(n))),
            cluster_ip: SocketAddr::from((measured.cluster_ip, SERVICE_PORT)),
            cluster,
        })
    }

    /// The node's namespace, where a ruleset is loaded or the agent runs.
    pub fn node(&self) -> &Netns {
        &self.cluster.node
    }

    /// Starts the real agent on a manifest file, with `flags`, and waits for its first
    /// sync; its resident memory then, in bytes.
    pub fn start_agent(&mut self, manifest: &Path, flags: &[&str]) -> Result<u64> {
        self.cluster.start_agent_with(manifest, flags)?;
        let pid = self
            .cluster
            .agent_pid()
            .context("the agent is not running")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .context("VmRSS of the agent")?;
        Ok(kib * 1024)
    }

    pub fn measure(&self) -> Result<Traffic> {
        Ok(Traffic {
            node_port: measure_path(&self.cluster.client, self.node_port)
                .context("client to NodePort")?,
            cluster_ip: measure_path(&self.cluster.pods[2].ns, self.cluster_ip)
                .context("pod to ClusterIP")?,
        })
    }
}

/// A listener in `pod` whose threads answer every request with `RESPONSE` until the peer
/// closes.
fn serve(pod: &Pod) -> Result<()> {
    let (tx, rx) = mpsc::channel();
    pod.ns.spawn(move || {
        let listener = match TcpListener::bind(("0.0.0.0", TARGET_PORT)) {
            Ok(l) => Arc::new(l),
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        let _ = tx.send(Ok(()));
        // Threads started here are in the pod's namespace too.
        for _ in 1..SERVER_THREADS {
            let l = listener.clone();
            thread::spawn(move || answer_all(&l));
        }
        answer_all(&listener);
    })?;
    rx.recv_timeout(Duration::from_secs(5))
        .context("the backend did not start")?
        .with_context(|| format!("listen in {}", pod.name))
}

fn answer_all(listener: &TcpListener) {
    for conn in listener.incoming().flatten() {
        let _ = answer(conn);
    }
}

fn answer(mut conn: TcpStream) -> std::io::Result<()> {
    conn.set_nodelay(true)?;
    let mut buf = [0u8; REQUEST.len()];
    loop {
        if !read_full(&mut conn, &mut buf)? {
            return Ok(());
        }
        conn.write_all(RESPONSE)?;
    }
}

/// Fills `buf`; false on a clean end of stream before the first byte.
fn read_full(conn: &mut TcpStream, buf: &mut [u8]) -> std::io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match conn.read(&mut buf[got..])? {
            0 if got == 0 => return Ok(false),
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => got += n,
        }
    }
    Ok(true)
}

/// One request and its answer on `conn`.
fn exchange(conn: &mut TcpStream) -> std::io::Result<()> {
    conn.write_all(REQUEST)?;
    let mut buf = [0u8; RESPONSE.len()];
    if !read_full(conn, &mut buf)? {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// A new connection, one exchange, and the close.
fn one_connection(to: SocketAddr) -> std::io::Result<()> {
    let mut conn = TcpStream::connect_timeout(&to, IO_TIMEOUT)?;
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    conn.set_nodelay(true)?;
    exchange(&mut conn)
}

/// Both figures of one path, from inside `from`.
fn measure_path(from: &Netns, to: SocketAddr) -> Result<PathFigures> {
    from.run(move || -> Result<PathFigures> {
        // Warm-up: neighbours resolved, caches filled, every server thread awake.
        for _ in 0..50 {
            one_connection(to).with_context(|| format!("connect to {to}"))?;
        }
        let (connections_per_sec, failed) = connection_rate(to);
        let (p50_us, p99_us) = latency(to)?;
        Ok(PathFigures {
            connections_per_sec,
            failed,
            p50_us,
            p99_us,
        })
    })?
}

/// Connections per second over `RATE_WINDOW`, from as many client threads as CPUs, and the
/// number of failed ones.
fn connection_rate(to: SocketAddr) -> (f64, u64) {
    let threads = thread::available_parallelism().map_or(2, |n| n.get());
    let start = Instant::now();
    let deadline = start + RATE_WINDOW;
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            thread::spawn(move || {
                let (mut ok, mut failed) = (0u64, 0u64);
                while Instant::now() < deadline {
                    match one_connection(to) {
                        Ok(()) => ok += 1,
                        Err(_) => failed += 1,
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    let (ok, failed) = handles
        .into_iter()
        .filter_map(|h| h.join().ok())
        .fold((0, 0), |(a, b), (c, d)| (a + c, b + d));
    (ok as f64 / start.elapsed().as_secs_f64(), failed)
}

/// Median and 99th percentile of request latency on one kept-alive connection, in µs.
fn latency(to: SocketAddr) -> Result<(f64, f64)> {
    let mut conn = TcpStream::connect_timeout(&to, IO_TIMEOUT)?;
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    conn.set_nodelay(true)?;
    for _ in 0..LATENCY_REQUESTS {
        exchange(&mut conn)?;
    }
    let mut samples = Vec::with_capacity(LATENCY_REQUESTS);
    for _ in 0..LATENCY_REQUESTS {
        let t = Instant::now();
        exchange(&mut conn)?;
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    Ok((at(0.5), at(0.99)))
}
