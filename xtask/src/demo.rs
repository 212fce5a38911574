//! `cargo xtask demo`: a client, a node and three pods as network namespaces, the real
//! agent on deploy/examples/, and real requests through the services.

use std::{net::SocketAddr, path::Path, process::Command};

use anyhow::{Context, Result};
use lb_userspace::testbed::{tcp_request, Cluster, NODE_IP};

pub fn run(lb: &Path) -> Result<()> {
    let manifests = crate::root().join("deploy/examples");
    // Pods get 10.244.0.10, .11 and .12: the addresses the example EndpointSlice lists.
    let mut cluster = Cluster::new(lb, &["pod-a", "pod-b", "pod-c", "client-pod"])?;
    cluster.start_servers()?;
    cluster.start_agent(&manifests).context("start the agent")?;
    println!(
        "agent running in namespace {} on {}\n",
        cluster.node.name,
        manifests.display()
    );

    let cluster_ip = SocketAddr::from(([10, 96, 0, 10], 80));
    println!("from client-pod to ClusterIP {cluster_ip}:");
    for _ in 0..6 {
        let answer = cluster.pods[3].ns.run(move || tcp_request(cluster_ip))?;
        println!(
            "  answered by {}",
            answer.unwrap_or_else(|e| format!("error: {e}"))
        );
    }
    for to in [
        SocketAddr::from((NODE_IP, 30080)),
        SocketAddr::from(([203, 0, 113, 10], 80)),
    ] {
        println!("from the client to {to}:");
        for _ in 0..6 {
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
