//! Turns the cluster state into map writes and records what that did, whatever the source
//! (manifest files or the API server) and whatever the maps (pinned or in memory).

use std::{collections::BTreeSet, sync::Arc, time::Instant};

use crate::{
    health::Health,
    metrics::DatapathMetrics,
    plan::Planner,
    service_health::ServiceHealth,
    state::{ClusterState, NodeContext, ObjectRef},
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
    /// The plan of the last sync, kept up to date service by service.
    planner: Option<Planner>,
}

impl<M: MapStore> Controller<M> {
    pub fn new(node: NodeContext, syncer: Syncer<M>, health: Arc<Health>) -> Self {
        Self {
            node,
            syncer,
            health,
            service_health: None,
            metrics: None,
            planner: None,
        }
    }

    /// Between syncs: frees Maglev ranges whose grace period has passed.
    pub fn tick(&mut self) {
        self.syncer.tick();
        if let Some(m) = &self.metrics {
            m.publish_fill(self.syncer.fill_levels());
        }
    }

    /// Plans all of `state` for this node and writes the difference.
    pub fn sync(&mut self, state: &ClusterState) -> SyncReport {
        let started = Instant::now();
        let (planner, warnings) = Planner::new(state, &self.node);
        log_warnings(&warnings);
        let report = self.syncer.apply(planner.desired());
        if let Some(m) = &self.metrics {
            m.publish(self.syncer.service_ids(), self.syncer.fill_levels());
        }
        let planner = self.planner.insert(planner);
        if let Some(h) = &mut self.service_health {
            h.sync(&planner.desired().health_checks);
        }
        self.record(&report, started);
        report
    }

    /// Plans again only `services` (changed, added or deleted in `state`) and writes what
    /// that changed; the whole state when there is no plan for this node yet.
    pub fn sync_services(
        &mut self,
        state: &ClusterState,
        services: &BTreeSet<ObjectRef>,
    ) -> SyncReport {
        let started = Instant::now();
        let Some(planner) = self.planner.as_mut().filter(|p| *p.node() == self.node) else {
            return self.sync(state);
        };
        let replanned = planner.replan(state, services);
        log_warnings(&replanned.warnings);
        let report =
            self.syncer
                .apply_changes(planner.desired(), &replanned.ports, &replanned.cluster_ips);
        if let Some(m) = &self.metrics {
            m.publish_changes(
                &report.ids_released,
                &report.ids_assigned,
                self.syncer.fill_levels(),
            );
        }
        if let (true, Some(h)) = (replanned.health_checks, &mut self.service_health) {
            h.sync(&planner.desired().health_checks);
        }
        self.record(&report, started);
        report
    }

    fn record(&self, report: &SyncReport, started: std::time::Instant) {
        for e in &report.errors {
            tracing::error!("map write failed: {e}");
        }
        let (services, endpoints) = self
            .planner
            .as_ref()
            .map_or((0, 0), |p| (p.desired().services.len(), p.endpoints()));
        self.health
            .record_sync(report, services, endpoints, started.elapsed());
        tracing::info!(
            services,
            writes = report.writes,
            deletes = report.deletes,
            errors = report.errors.len(),
            "synced"
        );
    }
}

fn log_warnings(warnings: &[String]) {
    for w in warnings {
        tracing::warn!("{w}");
    }
}
#[cfg(test)]
mod tests;
