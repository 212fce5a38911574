//! healthCheckNodePorts: for each externalTrafficPolicy Local LoadBalancer service, an HTTP
//! server on its port that answers any path as kube-proxy does, 200 when this node has a
//! ready endpoint of the service and 503 otherwise, so that the cloud load balancer sends
//! only to nodes that can serve without a second hop.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, RwLock},
};

use axum::{
    extract::State,
    http::{header, HeaderName, StatusCode},
    response::IntoResponse,
    Router,
};
use serde::Serialize;
use tokio::task::JoinHandle;

use crate::desired::HealthCheck;

#[derive(Serialize)]
struct ServiceName<'a> {
    namespace: &'a str,
    name: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Body<'a> {
    service: ServiceName<'a>,
    local_endpoints: usize,
    service_proxy_healthy: bool,
}

/// The answer for one check: status code, kube-proxy's headers, JSON body.
fn answer(check: &HealthCheck) -> (StatusCode, [(HeaderName, String); 3], String) {
    let body = Body {
        service: ServiceName {
            namespace: &check.namespace,
            name: &check.name,
        },
        local_endpoints: check.local_endpoints,
        service_proxy_healthy: true,
    };
    let code = if check.local_endpoints > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let headers = [
        (header::CONTENT_TYPE, "application/json".to_string()),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_string()),
        (
            HeaderName::from_static("x-load-balancing-endpoint-weight"),
            check.local_endpoints.to_string(),
        ),
    ];
    let json = serde_json::to_string_pretty(&body).unwrap_or_default();
    (code, headers, json)
}

async fn handle(State(check): State<Arc<RwLock<HealthCheck>>>) -> impl IntoResponse {
    let check = check.read().unwrap_or_else(|e| e.into_inner()).clone();
    answer(&check)
}

struct Server {
    check: Arc<RwLock<HealthCheck>>,
    task: JoinHandle<()>,
}

/// The running health check servers, by port.
#[derive(Default)]
pub struct ServiceHealth {
    servers: BTreeMap<u16, Server>,
}

impl Drop for ServiceHealth {
    fn drop(&mut self) {
        for s in self.servers.values() {
            s.task.abort();
        }
    }
}

impl ServiceHealth {
    /// Starts, updates and stops servers to match `want`. Must run inside the agent's
    /// runtime. A port that cannot be bound is logged and tried again at the next sync.
    pub fn sync(&mut self, want: &BTreeMap<u16, HealthCheck>) {
        self.servers.retain(|port, s| {
            let keep = want.contains_key(port);
            if !keep {
                s.task.abort();
                tracing::info!(port, "stopped health check server");
            }
            keep
        });
        for (port, check) in want {
            if let Some(s) = self.servers.get(port) {
                *s.check.write().unwrap_or_else(|e| e.into_inner()) = check.clone();
                continue;
            }
            match start(*port, check.clone()) {
                Ok(server) => {
                    tracing::info!(port, service = %format!("{}/{}", check.namespace, check.name), "serving health check");
                    self.servers.insert(*port, server);
                }
                Err(e) => tracing::warn!(port, error = %e, "cannot serve health check"),
            }
        }
    }
}

fn start(port: u16, check: HealthCheck) -> std::io::Result<Server> {
    let listener = std::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let check = Arc::new(RwLock::new(check));
    let app = Router::new().fallback(handle).with_state(check.clone());
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(Server { check, task })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(n: usize) -> HealthCheck {
        HealthCheck {
            namespace: "demo".into(),
            name: "web".into(),
            local_endpoints: n,
        }
    }

    #[test]
    fn answers_like_kube_proxy() {
        let (code, headers, body) = answer(&check(2));
        assert_eq!(code, StatusCode::OK);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "service": {"namespace": "demo", "name": "web"},
                "localEndpoints": 2,
                "serviceProxyHealthy": true
            })
        );
        assert_eq!(headers[2].1, "2");
        let (code, _, body) = answer(&check(0));
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("\"localEndpoints\": 0"), "{body}");
    }
}
