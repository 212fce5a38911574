//! One watch response: a chunked stream of newline-delimited JSON watch events, the backlog
//! after the requested resourceVersion first, then live events and bookmarks until the
//! timeout ends it cleanly or the test drops it (the body is aborted mid-stream).

use std::{
    sync::Arc,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
    time::Duration,
};

use axum::{
    body::{Body, Bytes},
    http::{header, StatusCode},
    response::Response,
};
use futures::{channel::mpsc, SinkExt};
use serde_json::{json, Value};
use tokio::sync::broadcast::{self, error::RecvError};

use super::{
    history::{Event, Kind},
    query::FieldSelector,
    server::Broadcast,
};

/// One watch request, as the tests inspect it.
pub struct Session {
    kind: Kind,
    from: u64,
    /// resourceVersion of the last event or bookmark sent.
    last_sent: AtomicU64,
    bookmarks: AtomicU64,
    ended: Mutex<Option<&'static str>>,
}

#[derive(Clone, Debug)]
pub struct SessionInfo {
    pub kind: Kind,
    /// The resourceVersion the client asked to watch from.
    pub from: u64,
    pub last_sent: u64,
    pub bookmarks: u64,
    /// Why the stream ended, `None` while it is open.
    pub ended: Option<&'static str>,
}

impl Session {
    pub fn new(kind: Kind, from: u64) -> Self {
        Self {
            kind,
            from,
            last_sent: AtomicU64::new(from),
            bookmarks: AtomicU64::new(0),
            ended: Mutex::new(None),
        }
    }

    pub fn info(&self) -> SessionInfo {
        SessionInfo {
            kind: self.kind,
            from: self.from,
            last_sent: self.last_sent.load(Ordering::Relaxed),
            bookmarks: self.bookmarks.load(Ordering::Relaxed),
            ended: *self.ended.lock().unwrap(),
        }
    }

    fn end(&self, why: &'static str) {
        *self.ended.lock().unwrap() = Some(why);
    }
}

pub struct Watch {
    pub session: Arc<Session>,
    pub backlog: Vec<Event>,
    pub live: broadcast::Receiver<Broadcast>,
    pub selector: FieldSelector,
    pub bookmarks: bool,
    pub timeout: Duration,
}

type Chunk = Result<Bytes, std::io::Error>;

fn line(value: &Value) -> Chunk {
    let mut bytes = serde_json::to_vec(value).unwrap();
    bytes.push(b'\n');
    Ok(Bytes::from(bytes))
}

fn event_line(e: &Event) -> Chunk {
    line(&json!({ "type": e.type_.name(), "object": e.object }))
}

fn streaming(body: mpsc::Receiver<Chunk>) -> Response {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(body))
        .unwrap()
}

/// A watch that fails once established: one `ERROR` event, then the end.
pub fn error(status: Value) -> Response {
    let (mut tx, rx) = mpsc::channel(1);
    tx.try_send(line(&json!({ "type": "ERROR", "object": status })))
        .unwrap();
    streaming(rx)
}

pub fn respond(watch: Watch) -> Response {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(run(watch, tx));
    streaming(rx)
}

async fn run(mut w: Watch, mut out: mpsc::Sender<Chunk>) {
    let s = w.session.clone();
    for e in &w.backlog {
        if out.send(event_line(e)).await.is_err() {
            return s.end("client gone");
        }
        s.last_sent.store(e.rv, Ordering::Relaxed);
    }
    let timeout = tokio::time::sleep(w.timeout);
    tokio::pin!(timeout);
    loop {
        let msg = tokio::select! {
            _ = &mut timeout => return s.end("timeout"),
            m = w.live.recv() => m,
        };
        let (chunk, rv) = match msg {
            Ok(Broadcast::Event(e)) if e.key.0 == s.kind && w.selector.matches(&e.object) => {
                (event_line(&e), e.rv)
            }
            Ok(Broadcast::Bookmark(rv)) if w.bookmarks => {
                s.bookmarks.fetch_add(1, Ordering::Relaxed);
                let object = json!({
                    "kind": s.kind.name(),
                    "apiVersion": s.kind.api_version(),
                    "metadata": { "resourceVersion": rv.to_string() },
                });
                (line(&json!({ "type": "BOOKMARK", "object": object })), rv)
            }
            Ok(Broadcast::Drop) => {
                // An error ends the body without its last chunk: the client sees the
                // connection break mid-stream.
                let _ = out
                    .send(Err(std::io::Error::other("dropped by the test")))
                    .await;
                return s.end("dropped");
            }
            Ok(Broadcast::End) => return s.end("timeout"),
            Ok(_) => continue,
            // A watcher that falls behind is cut off, as kube-apiserver does.
            Err(RecvError::Lagged(_)) => {
                let _ = out
                    .send(Err(std::io::Error::other("watcher too slow")))
                    .await;
                return s.end("lagged");
            }
            Err(RecvError::Closed) => return s.end("server gone"),
        };
        if out.send(chunk).await.is_err() {
            return s.end("client gone");
        }
        s.last_sent.store(rv, Ordering::Relaxed);
    }
}
