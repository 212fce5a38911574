//! An API server for Services, EndpointSlices and Nodes that lists and watches as
//! kube-apiserver does: lists with a resourceVersion and `limit`/`continue` pages served from
//! one snapshot, watches that stream every event after a resourceVersion then the live ones,
//! bookmarks, and `410 Gone` (an `ERROR` watch event, or an HTTP 410 for an expired `continue`)
//! below the compaction point. The tests drive it: write objects, compact, send bookmarks,
//! end every open watch (as their timeout does) or drop it mid-stream, answer 503 for a
//! while, hold list pages back.

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use axum::{
    body::Body,
    extract::Request,
    http::{header, Method, StatusCode},
    response::Response,
    serve::ListenerExt,
    Router,
};
use serde_json::{json, Value};
use tokio::sync::{broadcast, watch};

use super::{
    history::{Event, EventType, History, Kind},
    query::{FieldSelector, Query},
    watch_stream::{self, Session, SessionInfo},
};

/// What open watch streams are told.
#[derive(Clone, Debug)]
pub enum Broadcast {
    Event(Event),
    Bookmark(u64),
    /// Abort the stream, as a broken connection would.
    Drop,
    /// End the stream cleanly, as `timeoutSeconds` does.
    End,
}

/// List requests the tests can hold back: the first page, or the pages after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Page {
    First,
    Continued,
}

/// A request as the server answered it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub kind: Kind,
    pub watch: bool,
    pub query: String,
    pub continued: bool,
    pub status: u16,
    /// A watch answered with an `ERROR` event carrying `410 Gone`.
    pub gone: bool,
}

/// Watches without `timeoutSeconds` end after this, like kube-apiserver's
/// `--min-request-timeout`.
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

#[derive(Clone)]
pub struct FakeApiServer {
    pub url: String,
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    events: broadcast::Sender<Broadcast>,
    holds: watch::Sender<BTreeSet<(Kind, Page)>>,
    /// Pages hold at most this many items, whatever `limit` asks for (servers may return
    /// fewer items than the limit; clients follow `continue`).
    max_page: usize,
}

#[derive(Default)]
struct State {
    history: History,
    unavailable: bool,
    requests: Vec<Seen>,
    sessions: Vec<Arc<Session>>,
}

impl FakeApiServer {
    pub async fn start(max_page: usize) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the fake API server");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let shared = Arc::new(Shared {
            state: Mutex::default(),
            events: broadcast::channel(1024).0,
            holds: watch::Sender::new(BTreeSet::new()),
            max_page,
        });
        let s = shared.clone();
        let app = Router::new().fallback(move |req: Request| {
            let s = s.clone();
            async move { s.handle(req).await }
        });
        // Go's net package, and so kube-apiserver, turns Nagle's algorithm off.
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { url, shared }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap()
    }

    /// Creates or replaces an object; returns its new resourceVersion.
    pub fn put(&self, object: Value) -> u64 {
        let mut st = self.state();
        let e = st.history.put(object);
        let rv = e.rv;
        let _ = self.shared.events.send(Broadcast::Event(e));
        rv
    }

    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) {
        let mut st = self.state();
        let e = st.history.delete(kind, namespace, name);
        let _ = self.shared.events.send(Broadcast::Event(e));
    }

    /// Writes elsewhere in the cluster (Leases, Events) move the global resourceVersion.
    pub fn advance(&self, writes: u64) {
        let mut st = self.state();
        for _ in 0..writes {
            st.history.advance();
        }
    }

    pub fn compact(&self) {
        self.state().history.compact();
    }

    /// A BOOKMARK at the current resourceVersion on every open watch that asked for them.
    pub fn bookmark(&self) -> u64 {
        let st = self.state();
        let rv = st.history.resource_version();
        let _ = self.shared.events.send(Broadcast::Bookmark(rv));
        rv
    }

    /// Aborts every open watch mid-stream.
    pub fn drop_watches(&self) {
        let _st = self.state();
        let _ = self.shared.events.send(Broadcast::Drop);
    }

    /// Ends every open watch cleanly, as their timeout would.
    pub fn end_watches(&self) {
        let _st = self.state();
        let _ = self.shared.events.send(Broadcast::End);
    }

    /// While unavailable every request is answered `503 Service Unavailable`.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.state().unavailable = unavailable;
    }

    pub fn hold(&self, kind: Kind, page: Page) {
        self.shared.holds.send_modify(|h| {
            h.insert((kind, page));
        });
    }

    pub fn release(&self, kind: Kind, page: Page) {
        self.shared.holds.send_modify(|h| {
            h.remove(&(kind, page));
        });
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.state().requests.clone()
    }

    pub fn sessions(&self) -> Vec<SessionInfo> {
        self.state().sessions.iter().map(|s| s.info()).collect()
    }
}

fn status_response(code: StatusCode, reason: &str, message: &str) -> Response {
    json_response(code, &status_object(code.as_u16(), reason, message))
}

fn status_object(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    })
}

fn json_response(code: StatusCode, body: &Value) -> Response {
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

/// `continue` tokens are opaque to clients; this one names the snapshot and the last key.
fn continue_token(rv: u64, namespace: &str, name: &str) -> String {
    format!("{rv}/{namespace}/{name}")
}

fn parse_continue(token: &str) -> Option<(u64, (String, String))> {
    let mut parts = token.splitn(3, '/');
    let rv = parts.next()?.parse().ok()?;
    let namespace = parts.next()?.to_string();
    let name = parts.next()?.to_string();
    Some((rv, (namespace, name)))
}

impl Shared {
    async fn handle(self: Arc<Self>, req: Request) -> Response {
        let Some(kind) = Kind::from_path(req.uri().path()) else {
            return status_response(
                StatusCode::NOT_FOUND,
                "NotFound",
                "the server could not find the requested resource",
            );
        };
        if req.method() != Method::GET {
            return status_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "only get, list and watch are served",
            );
        }
        let raw = req.uri().query().unwrap_or_default().to_string();
        let q = Query::parse(&raw);
        let watch = matches!(q.get("watch"), Some("true" | "1"));
        let mut seen = Seen {
            kind,
            watch,
            query: raw,
            continued: q.get("continue").is_some_and(|c| !c.is_empty()),
            status: 200,
            gone: false,
        };
        let response = self.answer(kind, watch, &q, &mut seen).await;
        seen.status = response.status().as_u16();
        self.state.lock().unwrap().requests.push(seen);
        response
    }

    async fn answer(&self, kind: Kind, watch: bool, q: &Query, seen: &mut Seen) -> Response {
        if self.state.lock().unwrap().unavailable {
            return status_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                "the server is currently unable to handle the request",
            );
        }
        if q.get("labelSelector").is_some_and(|s| !s.is_empty()) {
            return status_response(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "label selectors are not implemented here",
            );
        }
        let selector = match FieldSelector::parse(q.get("fieldSelector")) {
            Ok(s) => s,
            Err(e) => return status_response(StatusCode::BAD_REQUEST, "BadRequest", &e),
        };
        if watch {
            self.watch(kind, q, selector, seen)
        } else {
            self.list(kind, q, selector).await
        }
    }

    async fn list(&self, kind: Kind, q: &Query, selector: FieldSelector) -> Response {
        let token = q.get("continue").filter(|t| !t.is_empty());
        let page = if token.is_some() {
            Page::Continued
        } else {
            Page::First
        };
        let _ = self
            .holds
            .subscribe()
            .wait_for(|h| !h.contains(&(kind, page)))
            .await;
        let st = self.state.lock().unwrap();
        let current = st.history.resource_version();
        let (rv, after) = match token {
            Some(t) => match parse_continue(t) {
                Some((rv, after)) => (rv, Some(after)),
                None => {
                    return status_response(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        "invalid continue token",
                    )
                }
            },
            None => match (q.get("resourceVersion"), q.get("resourceVersionMatch")) {
                // Unset: the most recent state; "0": any state, the newest here.
                (None | Some("" | "0"), _) => (current, None),
                (Some(v), m) => {
                    let Ok(v) = v.parse::<u64>() else {
                        return status_response(
                            StatusCode::BAD_REQUEST,
                            "BadRequest",
                            "invalid resourceVersion",
                        );
                    };
                    if v > current {
                        return status_response(
                            StatusCode::GATEWAY_TIMEOUT,
                            "Timeout",
                            "Too large resource version",
                        );
                    }
                    (if m == Some("Exact") { v } else { current }, None)
                }
            },
        };
        let state = match st.history.state_at(rv) {
            Ok(s) => s,
            Err(gone) => {
                let message = format!(
                    "The provided continue parameter is too old to display a consistent list \
                     result (resourceVersion {}, oldest {}).",
                    gone.requested, gone.oldest
                );
                return status_response(StatusCode::GONE, "Expired", &message);
            }
        };
        let items: Vec<_> = state
            .into_iter()
            .filter(|((k, ns, name), o)| {
                *k == kind
                    && selector.matches(o)
                    && after.as_ref().is_none_or(|a| (ns, name) > (&a.0, &a.1))
            })
            .collect();
        let limit = q
            .get("limit")
            .and_then(|l| l.parse::<usize>().ok())
            .filter(|&l| l > 0);
        let take = limit.map_or(items.len(), |l| l.min(self.max_page).min(items.len()));
        let mut metadata = json!({ "resourceVersion": rv.to_string() });
        if take < items.len() {
            let ((_, ns, name), _) = &items[take - 1];
            metadata["continue"] = json!(continue_token(rv, ns, name));
            metadata["remainingItemCount"] = json!(items.len() - take);
        }
        // Items of a list carry no kind and apiVersion; the list does.
        let items: Vec<Value> = items[..take]
            .iter()
            .map(|(_, o)| {
                let mut o = o.clone();
                let m = o.as_object_mut().unwrap();
                m.remove("kind");
                m.remove("apiVersion");
                o
            })
            .collect();
        json_response(
            StatusCode::OK,
            &json!({
                "kind": format!("{}List", kind.name()),
                "apiVersion": kind.api_version(),
                "metadata": metadata,
                "items": items,
            }),
        )
    }

    fn watch(&self, kind: Kind, q: &Query, selector: FieldSelector, seen: &mut Seen) -> Response {
        if q.get("sendInitialEvents") == Some("true") {
            return status_response(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "streaming lists are not implemented here",
            );
        }
        let bookmarks = q.get("allowWatchBookmarks") == Some("true");
        let timeout = q
            .get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .map_or(DEFAULT_WATCH_TIMEOUT, Duration::from_secs);
        let mut st = self.state.lock().unwrap();
        let current = st.history.resource_version();
        let (from, backlog) = match q
            .get("resourceVersion")
            .filter(|v| !v.is_empty() && *v != "0")
        {
            // Unset or "0": synthetic ADDED events for what exists, then the changes.
            None => {
                let added = st
                    .history
                    .current()
                    .into_iter()
                    .map(|(key, object)| Event {
                        rv: object["metadata"]["resourceVersion"]
                            .as_str()
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(current),
                        key,
                        type_: EventType::Added,
                        object,
                    })
                    .collect();
                (current, added)
            }
            Some(v) => {
                let Ok(v) = v.parse::<u64>() else {
                    return status_response(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        "invalid resourceVersion",
                    );
                };
                match st.history.since(v) {
                    Ok(events) => (v, events),
                    Err(gone) => {
                        // The watch is established, then fails: an ERROR event, as the
                        // watch cache answers a resourceVersion it no longer has.
                        seen.gone = true;
                        let message = format!(
                            "too old resource version: {} ({})",
                            gone.requested, gone.oldest
                        );
                        return watch_stream::error(status_object(410, "Expired", &message));
                    }
                }
            }
        };
        let backlog = backlog
            .into_iter()
            .filter(|e| e.key.0 == kind && selector.matches(&e.object))
            .collect();
        // Subscribed under the lock: no write falls between the backlog and the live events.
        let live = self.events.subscribe();
        let session = Arc::new(Session::new(kind, from));
        st.sessions.push(session.clone());
        drop(st);
        watch_stream::respond(watch_stream::Watch {
            session,
            backlog,
            live,
            selector,
            bookmarks,
            timeout,
        })
    }
}
