//! The API client. Without kube-proxy nothing translates the `kubernetes` ClusterIP for the
//! agent itself, so `--api-server` (or KUBERNETES_SERVICE_HOST/PORT, which in-cluster
//! configuration reads) gives the API server's real address.

use std::path::Path;

use anyhow::Context;
use kube::config::{KubeConfigOptions, Kubeconfig};

/// The name every API server certificate of a cluster carries (kubeadm, kind, managed
/// clusters): used to verify it when the agent dials the server by another address.
const IN_CLUSTER_SERVER_NAME: &str = "kubernetes.default.svc";

/// `HOST:PORT` or a URL, as a URL (https when no scheme is given).
pub fn server_url(server: &str) -> anyhow::Result<http::Uri> {
    let url = if server.contains("://") {
        server.to_string()
    } else {
        format!("https://{server}")
    };
    let uri: http::Uri = url
        .parse()
        .with_context(|| format!("--api-server {server:?} is not HOST:PORT or a URL"))?;
    if uri.host().is_none() {
        anyhow::bail!("--api-server {server:?} has no host");
    }
    Ok(uri)
}

/// The configuration: `kubeconfig` when given, else in-cluster, else `~/.kube/config`;
/// `api_server` replaces the server address of whichever it is.
pub async fn config(
    kubeconfig: Option<&Path>,
    api_server: Option<&str>,
) -> anyhow::Result<kube::Config> {
    let opts = KubeConfigOptions::default();
    let (mut config, in_cluster) = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            let c = kube::Config::from_custom_kubeconfig(kc, &opts)
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))?;
            (c, false)
        }
        None => match kube::Config::incluster() {
            Ok(c) => (c, true),
            Err(in_cluster) => {
                let c = kube::Config::from_kubeconfig(&opts)
                    .await
                    .with_context(|| {
                        format!("no in-cluster configuration ({in_cluster}) and no kubeconfig")
                    })?;
                (c, false)
            }
        },
    };
    if let Some(server) = api_server {
        config.cluster_url = server_url(server)?;
        if in_cluster && config.tls_server_name.is_none() {
            config.tls_server_name = Some(IN_CLUSTER_SERVER_NAME.into());
        }
    }
    Ok(config)
}

pub fn client(config: kube::Config) -> anyhow::Result<kube::Client> {
    kube::Client::try_from(config).context("building the Kubernetes client")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_server_takes_host_port_or_url() {
        assert_eq!(
            server_url("10.0.0.1:6443").unwrap().to_string(),
            "https://10.0.0.1:6443/"
        );
        assert_eq!(
            server_url("http://127.0.0.1:8080").unwrap().to_string(),
            "http://127.0.0.1:8080/"
        );
        assert!(server_url("https://").is_err());
        assert!(server_url("a b").is_err());
    }
}
