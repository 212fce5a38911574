//! Turns the cluster state into map writes and records what that did, whatever the source
//! (manifest files or the API server) and whatever the maps (pinned or in memory).

use std::{sync::Arc, time::Instant};

use crate::{
    health::Health,
    metrics::DatapathMetrics,
    plan::plan,
    service_health::ServiceHealth,
    state::{ClusterState, NodeContext},
    sync::{MapStore, SyncReport, Syncer},
};

pub struct Controller<M: MapStore> {
    pub node: NodeContext,
    pub syncer: Syncer<M>,
    pub health: Arc<Health>,
    /// healthCheckNodePort listeners; none where the agent does not serve them (tests).
    pub service_health: Option<ServiceHealth>,
    /// Told the service ids and map fill levels after every sync, for the scrape.
    pub metrics: Option<Arc<DatapathMetrics>>,
}

impl<M: MapStore> Controller<M> {
    pub fn new(node: NodeContext, syncer: Syncer<M>, health: Arc<Health>) -> Self {
        Self {
            node,
            syncer,
            health,
            service_health: None,
            metrics: None,
        }
    }

    /// Between syncs: frees Maglev ranges whose grace period has passed.
    pub fn tick(&mut self) {
        self.syncer.tick();
        if let Some(m) = &self.metrics {
            m.publish_fill(self.syncer.fill_levels());
        }
    }

    /// Plans `state` for this node and writes the difference.
    pub fn sync(&mut self, state: &ClusterState) -> SyncReport {
        let started = Instant::now();
        let plan = plan(state, &self.node);
        for w in &plan.warnings {
            tracing::warn!("{w}");
        }
        let report = self.syncer.apply(&plan.desired);
        if let Some(h) = &mut self.service_health {
            h.sync(&plan.desired.health_checks);
        }
        for e in &report.errors {
            tracing::error!("map write failed: {e}");
        }
        self.health
            .record_sync(&report, &plan.desired, started.elapsed());
        if let Some(m) = &self.metrics {
            m.publish(self.syncer.service_ids(), self.syncer.fill_levels());
        }
        tracing::info!(
            services = plan.desired.services.len(),
            writes = report.writes,
            deletes = report.deletes,
            errors = report.errors.len(),
            "synced"
        );
        report
    }
}
