//! Watchers of Services, EndpointSlices and this node. kube's watcher lists, then watches
//! from the list's resourceVersion with bookmarks, relists on 410 Gone and resumes after a
//! dropped connection; a failure is logged and retried with backoff, never fatal, so the
//! data path keeps the last programmed state while the API server is unreachable.

use futures::{Stream, StreamExt};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    runtime::{watcher, WatchStreamExt},
    Api, Client, Resource,
};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use super::Update;

/// Starts the three watchers; their events arrive on the returned channel in order per kind.
pub fn spawn(client: Client, node_name: &str) -> mpsc::Receiver<Update> {
    let (tx, rx) = mpsc::channel(1024);
    forward(
        watch(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
        ),
        tx.clone(),
        Update::Service,
    );
    forward(
        watch(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default(),
        ),
        tx.clone(),
        Update::Slice,
    );
    forward(
        watch(
            Api::<Node>::all(client),
            watcher::Config::default().fields(&format!("metadata.name={node_name}")),
        ),
        tx,
        Update::Node,
    );
    rx
}

fn watch<K>(api: Api<K>, config: watcher::Config) -> impl Stream<Item = watcher::Event<K>> + Send
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
    K::DynamicType: Default,
{
    let kind = K::kind(&Default::default()).to_string();
    watcher(api, config).default_backoff().filter_map(move |r| {
        let kind = kind.clone();
        async move {
            match r {
                Ok(e) => Some(e),
                Err(e) => {
                    tracing::warn!(kind, error = %e, "watch failed; retrying");
                    None
                }
            }
        }
    })
}

fn forward<K, S>(stream: S, tx: mpsc::Sender<Update>, tag: fn(watcher::Event<K>) -> Update)
where
    S: Stream<Item = watcher::Event<K>> + Send + 'static,
    K: Send + 'static,
{
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(e) = stream.next().await {
            if tx.send(tag(e)).await.is_err() {
                break;
            }
        }
    });
}
