//! The file source: Services, EndpointSlices and v1 Endpoints read from YAML or JSON files,
//! as `kubectl apply -f` takes them (multi-document, `kind: List`).
//!
//! Each object is checked on its own, so one bad object is reported and skipped while the
//! rest of its file loads; a file that cannot be read or parsed at all keeps the objects it
//! last held, so a half-written file never deletes anything.

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
};

use k8s_openapi::api::{
    core::v1::{Endpoints, Service},
    discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::Value;

use crate::state::{labelled_service, ClusterState, ObjectRef};

pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A problem with one file or object, reported and skipped.
#[derive(Debug, Clone, PartialEq)]
pub struct ManifestError {
    pub file: PathBuf,
    /// "Kind ns/name" when the object could be identified.
    pub object: Option<String>,
    pub reason: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.object {
            Some(o) => write!(f, "{}: {}: {}", self.file.display(), o, self.reason),
            None => write!(f, "{}: {}", self.file.display(), self.reason),
        }
    }
}

/// The objects one file holds.
#[derive(Clone, Debug, Default)]
struct FileObjects {
    services: Vec<Service>,
    slices: Vec<EndpointSlice>,
    /// Converted from v1 Endpoints; used only for services without real slices.
    mirrored: Vec<EndpointSlice>,
}

/// A manifest file or a directory of them (not recursive).
pub struct ManifestSource {
    path: PathBuf,
    files: BTreeMap<PathBuf, FileObjects>,
}

fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

impl ManifestSource {
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            files: BTreeMap::new(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The files the source covers now.
    pub fn list_files(&self) -> Result<Vec<PathBuf>, std::io::Error> {
        if !self.path.is_dir() {
            return Ok(vec![self.path.clone()]);
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.path)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && is_manifest(p))
            .collect();
        files.sort();
        Ok(files)
    }

    /// Reads every file again. Returns the problems found; the state keeps the last good
    /// objects of files that could not be read.
    pub fn reload(&mut self) -> Vec<ManifestError> {
        let mut errors = Vec::new();
        let files = match self.list_files() {
            Ok(f) => f,
            Err(e) => {
                errors.push(ManifestError {
                    file: self.path.clone(),
                    object: None,
                    reason: format!("cannot list: {e}"),
                });
                return errors;
            }
        };
        // Files that disappeared are gone for good: their objects are deleted.
        self.files.retain(|p, _| files.contains(p));
        for file in files {
            match std::fs::read_to_string(&file) {
                // An unparsable file keeps its last good objects.
                Ok(text) => {
                    if let Some(objects) = parse_file(&file, &text, &mut errors) {
                        self.files.insert(file, objects);
                    }
                }
                Err(e) => errors.push(ManifestError {
                    file: file.clone(),
                    object: None,
                    reason: format!("cannot read: {e}"),
                }),
            }
        }
        errors
    }

    pub fn state(&self) -> ClusterState {
        let mut state = ClusterState::default();
        let mut mirrored = Vec::new();
        for objects in self.files.values() {
            for svc in &objects.services {
                state
                    .services
                    .insert(object_ref(&svc.metadata), svc.clone());
            }
            for slice in &objects.slices {
                state.insert_slice(slice.clone());
            }
            mirrored.extend(objects.mirrored.iter().cloned());
        }
        // As in a cluster, where Endpoints are mirrored into slices: real slices win.
        let with_slices: std::collections::BTreeSet<ObjectRef> = mirrored
            .iter()
            .filter_map(|s| labelled_service(&object_ref(&s.metadata), s))
            .filter(|svc| state.has_slices(svc))
            .collect();
        for slice in mirrored {
            let svc = labelled_service(&object_ref(&slice.metadata), &slice);
            if !svc.is_some_and(|svc| with_slices.contains(&svc)) {
                state.insert_slice(slice);
            }
        }
        state
    }
}

fn namespace(meta: &ObjectMeta) -> String {
    meta.namespace.clone().unwrap_or_else(|| "default".into())
}

pub fn object_ref(meta: &ObjectMeta) -> ObjectRef {
    ObjectRef {
        namespace: namespace(meta),
        name: meta.name.clone().unwrap_or_default(),
    }
}

/// The service an EndpointSlice belongs to.
pub fn service_of(slice: &EndpointSlice) -> Option<String> {
    slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .cloned()
}

/// Parses a whole file; `None` when it is not valid YAML/JSON at all.
fn parse_file(file: &Path, text: &str, errors: &mut Vec<ManifestError>) -> Option<FileObjects> {
    let docs: Vec<Value> = if file.extension().and_then(|e| e.to_str()) == Some("json") {
        match serde_json::from_str(text) {
            Ok(v) => vec![v],
            Err(e) => {
                errors.push(ManifestError {
                    file: file.into(),
                    object: None,
                    reason: e.to_string(),
                });
                return None;
            }
        }
    } else {
        match serde_saphyr::from_multiple::<Value>(text) {
            Ok(v) => v,
            Err(e) => {
                errors.push(ManifestError {
                    file: file.into(),
                    object: None,
                    reason: e.to_string(),
                });
                return None;
            }
        }
    };
    let mut objects = FileObjects::default();
    for doc in docs {
        add_document(file, doc, &mut objects, errors);
    }
    Some(objects)
}

fn add_document(
    file: &Path,
    mut doc: Value,
    out: &mut FileObjects,
    errors: &mut Vec<ManifestError>,
) {
    if doc.is_null() {
        return;
    }
    let kind = doc
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if kind == "List" || kind.ends_with("List") {
        // Taken, not copied: a large list is the biggest thing the agent ever holds.
        if let Some(Value::Array(items)) = doc.get_mut("items").map(Value::take) {
            for item in items {
                add_document(file, item, out, errors);
            }
        }
        return;
    }
    let name = doc
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    let ns = doc
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("default");
    let label = format!("{kind} {ns}/{name}");
    let err = |reason: String| ManifestError {
        file: file.into(),
        object: Some(label.clone()),
        reason,
    };
    if name.is_empty() && matches!(kind.as_str(), "Service" | "EndpointSlice" | "Endpoints") {
        errors.push(err("metadata.name is missing".into()));
        return;
    }
    let api = doc.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    match (kind.as_str(), api) {
        ("Service", "v1") => match serde_json::from_value::<Service>(doc) {
            Ok(s) => out.services.push(s),
            Err(e) => errors.push(err(e.to_string())),
        },
        ("EndpointSlice", "discovery.k8s.io/v1") => {
            match serde_json::from_value::<EndpointSlice>(doc) {
                Ok(s) if service_of(&s).is_none() => {
                    errors.push(err(format!("label {SERVICE_NAME_LABEL} is missing")))
                }
                Ok(s) => out.slices.push(s),
                Err(e) => errors.push(err(e.to_string())),
            }
        }
        ("Endpoints", "v1") => match serde_json::from_value::<Endpoints>(doc) {
            Ok(e) => out.mirrored.push(mirror(&e)),
            Err(e) => errors.push(err(e.to_string())),
        },
        ("Service" | "EndpointSlice" | "Endpoints", _) => {
            errors.push(err(format!("unsupported apiVersion {api:?}")))
        }
        _ => tracing::debug!(file = %file.display(), object = %label, "ignoring kind"),
    }
}

/// The EndpointSlice the mirroring controller would make of a v1 Endpoints object.
fn mirror(ep: &Endpoints) -> EndpointSlice {
    let name = ep.metadata.name.clone().unwrap_or_default();
    let mut endpoints = Vec::new();
    let mut ports: Vec<EndpointPort> = Vec::new();
    for subset in ep.subsets.iter().flatten() {
        for p in subset.ports.iter().flatten() {
            let port = EndpointPort {
                name: p.name.clone(),
                port: Some(p.port),
                protocol: p.protocol.clone(),
                app_protocol: p.app_protocol.clone(),
            };
            if !ports.contains(&port) {
                ports.push(port);
            }
        }
        let groups = [
            (&subset.addresses, true),
            (&subset.not_ready_addresses, false),
        ];
        for (addrs, ready) in groups {
            for a in addrs.iter().flatten() {
                endpoints.push(Endpoint {
                    addresses: vec![a.ip.clone()],
                    conditions: Some(EndpointConditions {
                        ready: Some(ready),
                        serving: Some(ready),
                        terminating: Some(false),
                    }),
                    node_name: a.node_name.clone(),
                    ..Default::default()
                });
            }
        }
    }
    let mut labels = BTreeMap::new();
    labels.insert(SERVICE_NAME_LABEL.to_string(), name.clone());
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("{name}-endpoints")),
            namespace: ep.metadata.namespace.clone(),
            labels: Some(labels),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints,
        ports: Some(ports),
    }
}

#[cfg(test)]
mod tests;
