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
    /// When the oldest change not yet written arrived; 0 when nothing waits.
    pending_since_ms: AtomicU64,
    /// Changes may wait this long before `/healthz` reports not synced.
    timeout: Duration,
    registry: Mutex<Registry>,
    sync_duration: Histogram,
    programming_latency: Histogram,
    last_sync: Gauge<f64, std::sync::atomic::AtomicU64>,
    last_queued: Gauge<f64, std::sync::atomic::AtomicU64>,
    service_changes: Counter,
    endpoint_changes: Counter,
    services_programmed: Gauge,
    endpoints_programmed: Gauge,
    map_errors: Family<ReasonLabel, Counter>,
}

/// kube-proxy's buckets for network_programming_duration_seconds: 0.25 s steps to 0.5 s,
/// 1 s steps to 59 s, 5 s steps to 115 s, 30 s steps to 300 s.
fn programming_buckets() -> Vec<f64> {
    let mut b = vec![0.25, 0.5];
    b.extend((1..=59).map(f64::from));
    b.extend((0..12).map(|i| 60.0 + 5.0 * f64::from(i)));
    b.extend((0..7).map(|i| 120.0 + 30.0 * f64::from(i)));
    b
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

impl Health {
    pub fn new(timeout: Duration) -> anyhow::Result<Self> {
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
        let programming_latency = Histogram::new(programming_buckets());
        registry.register(
            "network_programming_duration_seconds",
            "From an endpoint change (the EndpointSlice's last-change-trigger-time) to the maps written",
            programming_latency.clone(),
        );
        let last_queued = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "sync_proxy_rules_last_queued_timestamp_seconds",
            "When a change last arrived to be written",
            last_queued.clone(),
        );
        let service_changes = Counter::default();
        registry.register(
            "sync_proxy_rules_service_changes",
            "Service changes received",
            service_changes.clone(),
        );
        let endpoint_changes = Counter::default();
        registry.register(
            "sync_proxy_rules_endpoint_changes",
            "EndpointSlice changes received",
            endpoint_changes.clone(),
        );
        let services_programmed = Gauge::default();
        registry.register(
            "services_programmed",
            "Service ports in the maps",
            services_programmed.clone(),
        );
        let endpoints_programmed = Gauge::default();
        registry.register(
            "endpoints_programmed",
            "Endpoints in the maps, summed over service ports",
            endpoints_programmed.clone(),
        );
        Ok(Self {
            last_sync_ms: AtomicU64::new(0),
            pending_since_ms: AtomicU64::new(0),
            timeout,
            registry: Mutex::new(registry),
            sync_duration,
            programming_latency,
            last_sync,
            last_queued,
            service_changes,
            endpoint_changes,
            services_programmed,
            endpoints_programmed,
            map_errors,
        })
    }

    /// Registers more metrics (map fill levels, per-service counters) under the same prefix.
    pub fn register(&self, f: impl FnOnce(&mut Registry)) {
        f(&mut self.registry.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Changes arrived that are not written yet.
    pub fn record_changes(&self, services: usize, endpoints: usize) {
        let now = now_ms();
        self.service_changes.inc_by(services as u64);
        self.endpoint_changes.inc_by(endpoints as u64);
        self.last_queued.set(now as f64 / 1000.0);
        let _ =
            self.pending_since_ms
                .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
    }

    pub fn record_programming_latency(&self, d: Duration) {
        self.programming_latency.observe(d.as_secs_f64());
    }

    /// After a sync: what it did, and how many service ports and endpoints the maps hold.
    pub fn record_sync(
        &self,
        report: &SyncReport,
        services: usize,
        endpoints: usize,
        took: Duration,
    ) {
        self.sync_duration.observe(took.as_secs_f64());
        let now = now_ms();
        self.last_sync.set(now as f64 / 1000.0);
        self.last_sync_ms.store(now, Ordering::Relaxed);
        self.pending_since_ms.store(0, Ordering::Relaxed);
        self.services_programmed.set(services as i64);
        self.endpoints_programmed.set(endpoints as i64);
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

impl Health {
    /// kube-proxy's rule: healthy once synced, unless a change has waited longer than the
    /// timeout to be written.
    pub fn healthy(&self) -> bool {
        if self.last_sync_ms.load(Ordering::Relaxed) == 0 {
            return false;
        }
        match self.pending_since_ms.load(Ordering::Relaxed) {
            0 => true,
            since => now_ms().saturating_sub(since) <= self.timeout.as_millis() as u64,
        }
    }
}

async fn healthz(State(h): State<Arc<Health>>) -> impl IntoResponse {
    let code = if h.healthy() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, h.body())
}

async fn livez(State(h): State<Arc<Health>>) -> impl IntoResponse {
    (StatusCode::OK, h.body())
}

impl Health {
    /// The metrics in Prometheus text format.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        encode(&mut out, &registry)?;
        Ok(out)
    }
}

async fn metrics(State(h): State<Arc<Health>>) -> impl IntoResponse {
    // Collectors read the maps (a walk of the conntrack map takes a syscall per entry): off
    // the async workers.
    match tokio::task::spawn_blocking(move || h.encode()).await {
        Ok(Ok(out)) => (StatusCode::OK, out),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, String::new()),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthz_follows_pending_changes() {
        let h = Health::new(Duration::from_millis(50)).unwrap();
        assert!(!h.healthy(), "not synced before the first sync");
        h.record_sync(&SyncReport::default(), 0, 0, Duration::ZERO);
        assert!(h.healthy());
        h.record_changes(1, 0);
        assert!(h.healthy(), "a change may wait up to the timeout");
        // Pretend the change arrived long ago.
        h.pending_since_ms
            .store(now_ms() - 1_000, Ordering::Relaxed);
        assert!(!h.healthy());
        h.record_changes(0, 1);
        assert!(!h.healthy(), "a newer change does not reset the oldest");
        h.record_sync(&SyncReport::default(), 0, 0, Duration::ZERO);
        assert!(h.healthy());
    }

    #[test]
    fn kube_proxy_metric_names_under_lb() {
        let h = Health::new(Duration::from_secs(60)).unwrap();
        h.record_programming_latency(Duration::from_millis(300));
        let text = h.encode().unwrap();
        for name in [
            "lb_sync_proxy_rules_duration_seconds_bucket",
            "lb_network_programming_duration_seconds_bucket{le=\"0.5\"} 1",
            "lb_sync_proxy_rules_last_timestamp_seconds",
            "lb_sync_proxy_rules_last_queued_timestamp_seconds",
            "lb_sync_proxy_rules_service_changes_total",
            "lb_sync_proxy_rules_endpoint_changes_total",
            "lb_services_programmed",
            "lb_endpoints_programmed",
        ] {
            assert!(text.contains(name), "{name} missing in\n{text}");
        }
        assert_eq!(programming_buckets().len(), 2 + 59 + 12 + 7);
        assert_eq!(programming_buckets().last(), Some(&300.0));
    }
}
