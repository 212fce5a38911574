//! `cargo xtask demo`: a client, two nodes and their pods as network namespaces, the real
//! agent on each node serving deploy/examples/, and real requests through the services.

use std::{net::SocketAddr, path::Path, process::Command};

use anyhow::{Context, Result};
use lb_userspace::testbed::{tcp_request, Cluster, NODE_IP};

pub fn run(lb: &Path) -> Result<()> {
    let manifests = crate::root().join("deploy/examples");
    // Node1's pods get 10.244.0.10, .11 and .12, node2's 10.244.1.10: pod-a, pod-b and
    // pod-c are the addresses the example EndpointSlice lists.
    let mut cluster = Cluster::with_peers(lb, &["pod-a", "pod-b", "client-pod"], &[&["pod-c"]])?;
    cluster.start_servers()?;
    cluster
        .start_agent(&manifests)
        .context("start node1's agent")?;
    cluster
        .start_peer_agents(&manifests)
        .context("start node2's agent")?;
    println!(
        "agents running in namespaces {} (node1) and {} (node2) on {}; pod-c runs on node2\n",
        cluster.node.name,
        cluster.peers[0].ns.name,
        manifests.display()
    );

    let cluster_ip = SocketAddr::from(([10, 96, 0, 10], 80));
    println!("from client-pod to ClusterIP {cluster_ip}:");
    for _ in 0..9 {
        let answer = cluster.pods[2].ns.run(move || tcp_request(cluster_ip))?;
        println!(
            "  answered by {}",
            answer.unwrap_or_else(|e| format!("error: {e}"))
        );
    }
    for to in [
        SocketAddr::from((NODE_IP, 30080)),
        SocketAddr::from(([203, 0, 113, 10], 80)),
    ] {
        println!("from the client to {to} (node1):");
        for _ in 0..9 {
            let answer = cluster.client.run(move || tcp_request(to))?;
            println!(
                "  answered by {}",
                answer.unwrap_or_else(|e| format!("error: {e}"))
            );
        }
    }
    let empty = SocketAddr::from((NODE_IP, 30081));
    let refused = cluster.client.run(move || tcp_request(empty))?;
    println!(
        "from the client to {empty} (no endpoints): {}",
        refused.err().map_or("answered?!".into(), |e| e.to_string())
    );

    for sub in ["services", "stats"] {
        println!("\n$ lb {sub}");
        let out = cluster
            .node
            .command(lb)
            .arg(sub)
            .arg("--bpffs")
            .arg(&cluster.bpffs)
            .output()?;
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
    drop(cluster);
    let left = Command::new("ip").args(["netns", "list"]).output()?;
    println!(
        "\ndemo cluster removed{}",
        if left.stdout.is_empty() {
            ""
        } else {
            " (other namespaces exist on this machine)"
        }
    );
    Ok(())
}
