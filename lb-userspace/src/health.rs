//! kube-proxy compatible health endpoints and Prometheus metrics.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};
use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::sync::SyncReport;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

pub struct Health {
    last_sync_ms: AtomicU64,
    registry: Mutex<Registry>,
    sync_duration: Histogram,
    last_sync: Gauge<f64, std::sync::atomic::AtomicU64>,
    map_errors: Family<ReasonLabel, Counter>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

impl Health {
    pub fn new() -> anyhow::Result<Self> {
        let mut registry = Registry::with_prefix("lb");
        // kube-proxy's buckets for sync_proxy_rules_duration_seconds.
        let buckets = prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 15);
        let sync_duration = Histogram::new(buckets);
        let last_sync = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        let map_errors = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "sync_proxy_rules_duration_seconds",
            "Time to turn the service state into map writes",
            sync_duration.clone(),
        );
        registry.register(
            "sync_proxy_rules_last_timestamp_seconds",
            "When the maps were last synced",
            last_sync.clone(),
        );
        registry.register("map_write_errors", "Failed map writes", map_errors.clone());
        Ok(Self {
            last_sync_ms: AtomicU64::new(0),
            registry: Mutex::new(registry),
            sync_duration,
            last_sync,
            map_errors,
        })
    }

    pub fn record_sync(&self, report: &SyncReport, took: Duration) {
        self.sync_duration.observe(took.as_secs_f64());
        let now = now_ms();
        self.last_sync.set(now as f64 / 1000.0);
        self.last_sync_ms.store(now, Ordering::Relaxed);
        let full = report.map_full as u64;
        let other = report.errors.len() as u64 - full;
        if full > 0 {
            self.map_errors
                .get_or_create(&ReasonLabel {
                    reason: "full".into(),
                })
                .inc_by(full);
        }
        if other > 0 {
            self.map_errors
                .get_or_create(&ReasonLabel {
                    reason: "other".into(),
                })
                .inc_by(other);
        }
    }

    fn body(&self) -> String {
        let last = self.last_sync_ms.load(Ordering::Relaxed);
        format!(
            r#"{{"lastUpdated": "{}", "currentTime": "{}"}}"#,
            last,
            now_ms()
        )
    }
}

async fn healthz(State(h): State<Arc<Health>>) -> impl IntoResponse {
    let code = if h.last_sync_ms.load(Ordering::Relaxed) == 0 {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (code, h.body())
}

async fn livez(State(h): State<Arc<Health>>) -> impl IntoResponse {
    (StatusCode::OK, h.body())
}

async fn metrics(State(h): State<Arc<Health>>) -> impl IntoResponse {
    let mut out = String::new();
    let registry = h.registry.lock().unwrap_or_else(|e| e.into_inner());
    if encode(&mut out, &registry).is_err() {
        return (StatusCode::INTERNAL_SERVER_ERROR, String::new());
    }
    (StatusCode::OK, out)
}

/// Serves both listeners until the process ends; a port that cannot be bound is logged,
/// not fatal (the data path matters more than its health page).
pub async fn serve(healthz_addr: SocketAddr, metrics_addr: SocketAddr, health: Arc<Health>) {
    let h = Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .with_state(health.clone());
    let m = Router::new()
        .route("/metrics", get(metrics))
        .with_state(health);
    let bind = |addr| async move {
        let l = tokio::net::TcpListener::bind(addr).await;
        if let Err(e) = &l {
            tracing::warn!(%addr, error = %e, "cannot listen");
        }
        l.ok()
    };
    let (hl, ml) = (bind(healthz_addr).await, bind(metrics_addr).await);
    let a = async {
        if let Some(l) = hl {
            let _ = axum::serve(l, h).await;
        }
    };
    let b = async {
        if let Some(l) = ml {
            let _ = axum::serve(l, m).await;
        }
    };
    tokio::join!(a, b);
}
