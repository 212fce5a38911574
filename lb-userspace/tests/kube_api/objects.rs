//! The objects the tests write, as an API client would send them.

use serde_json::{json, Value};

pub const NS: &str = "default";
/// The node the agent runs on.
pub const NODE: &str = "node1";

/// A ClusterIP Service with one TCP port named `http` that targets port 8080.
pub fn service(name: &str, cluster_ip: &str, port: u16) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": name, "namespace": NS },
        "spec": {
            "type": "ClusterIP",
            "clusterIP": cluster_ip,
            "clusterIPs": [cluster_ip],
            "ports": [{ "name": "http", "port": port, "protocol": "TCP", "targetPort": 8080 }],
        },
    })
}

/// The one EndpointSlice of `service`, with ready endpoints at `addresses`, port 8080.
pub fn slice(service: &str, addresses: &[&str]) -> Value {
    let endpoints: Vec<Value> = addresses
        .iter()
        .map(|a| {
            json!({
                "addresses": [a],
                "conditions": { "ready": true, "serving": true, "terminating": false },
                "nodeName": NODE,
            })
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{service}-x7k2p"),
            "namespace": NS,
            "labels": { "kubernetes.io/service-name": service },
        },
        "addressType": "IPv4",
        "ports": [{ "name": "http", "port": 8080, "protocol": "TCP" }],
        "endpoints": endpoints,
    })
}

pub fn slice_name(service: &str) -> String {
    format!("{service}-x7k2p")
}

/// `slice` as the EndpointSlice controller writes it after a change at `time` (RFC 3339).
pub fn with_trigger_time(mut slice: Value, time: &str) -> Value {
    slice["metadata"]["annotations"] =
        json!({ "endpoints.kubernetes.io/last-change-trigger-time": time });
    slice
}

pub fn node(name: &str, internal_ip: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": { "name": name, "labels": { "kubernetes.io/hostname": name } },
        "status": {
            "addresses": [
                { "type": "InternalIP", "address": internal_ip },
                { "type": "Hostname", "address": name },
            ],
        },
    })
}
