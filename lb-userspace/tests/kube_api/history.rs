//! The fake API server's storage, kept the way etcd keeps it: one resourceVersion counter for
//! every kind, each write an event stamped with the next value, and history that can be
//! compacted. A list is served from the state at a resourceVersion, a watch from the events
//! after one; both fail with `Gone` below the compaction point.

use std::collections::BTreeMap;

use serde_json::{json, Value};

/// The resources the fake server serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Service, Kind::EndpointSlice, Kind::Node];

    pub fn from_path(path: &str) -> Option<Kind> {
        match path.trim_end_matches('/') {
            "/api/v1/services" => Some(Kind::Service),
            "/apis/discovery.k8s.io/v1/endpointslices" => Some(Kind::EndpointSlice),
            "/api/v1/nodes" => Some(Kind::Node),
            _ => None,
        }
    }

    pub fn of(object: &Value) -> Kind {
        match object["kind"].as_str() {
            Some("Service") => Kind::Service,
            Some("EndpointSlice") => Kind::EndpointSlice,
            Some("Node") => Kind::Node,
            other => panic!("the fake API server does not store {other:?}"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }

    pub fn api_version(self) -> &'static str {
        match self {
            Kind::Service | Kind::Node => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
        }
    }
}

/// Kind, namespace ("" for nodes) and name: the order etcd lists keys in.
pub type Key = (Kind, String, String);

pub fn key_of(object: &Value) -> Key {
    let meta = &object["metadata"];
    (
        Kind::of(object),
        meta["namespace"].as_str().unwrap_or_default().to_string(),
        meta["name"]
            .as_str()
            .expect("objects have a metadata.name")
            .to_string(),
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn name(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One write. A deleted object carries the resourceVersion of its deletion.
#[derive(Clone, Debug)]
pub struct Event {
    pub rv: u64,
    pub key: Key,
    pub type_: EventType,
    pub object: Value,
}

/// The requested resourceVersion is older than the compaction point.
#[derive(Debug)]
pub struct Gone {
    pub requested: u64,
    pub oldest: u64,
}

#[derive(Default)]
pub struct History {
    /// The last resourceVersion handed out.
    rv: u64,
    /// History before this resourceVersion is gone.
    compacted: u64,
    /// The objects as of `compacted`.
    base: BTreeMap<Key, Value>,
    /// Every write after `compacted`, in order.
    events: Vec<Event>,
}

impl History {
    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    pub fn state_at(&self, rv: u64) -> Result<BTreeMap<Key, Value>, Gone> {
        self.check(rv)?;
        let mut state = self.base.clone();
        for e in self.events.iter().take_while(|e| e.rv <= rv) {
            match e.type_ {
                EventType::Deleted => state.remove(&e.key),
                _ => state.insert(e.key.clone(), e.object.clone()),
            };
        }
        Ok(state)
    }

    pub fn current(&self) -> BTreeMap<Key, Value> {
        self.state_at(self.rv)
            .expect("the current state is never compacted")
    }

    /// The writes after `rv`, as a watch from `rv` reports them.
    pub fn since(&self, rv: u64) -> Result<Vec<Event>, Gone> {
        self.check(rv)?;
        Ok(self.events.iter().filter(|e| e.rv > rv).cloned().collect())
    }

    fn check(&self, rv: u64) -> Result<(), Gone> {
        if rv < self.compacted {
            return Err(Gone {
                requested: rv,
                oldest: self.compacted,
            });
        }
        Ok(())
    }

    /// Creates or replaces an object; the server fills in uid, creationTimestamp and
    /// resourceVersion as the real one does.
    pub fn put(&mut self, mut object: Value) -> Event {
        let key = key_of(&object);
        let old = self.current().remove(&key);
        self.rv += 1;
        let meta = object["metadata"]
            .as_object_mut()
            .expect("objects have metadata");
        let (uid, created) = match &old {
            Some(o) => (
                o["metadata"]["uid"].clone(),
                o["metadata"]["creationTimestamp"].clone(),
            ),
            None => (
                json!(format!("00000000-0000-0000-0000-{:012}", self.rv)),
                json!("2025-01-01T00:00:00Z"),
            ),
        };
        meta.insert("uid".into(), uid);
        meta.insert("creationTimestamp".into(), created);
        meta.insert("resourceVersion".into(), json!(self.rv.to_string()));
        let type_ = if old.is_some() {
            EventType::Modified
        } else {
            EventType::Added
        };
        self.record(key, type_, object)
    }

    pub fn delete(&mut self, kind: Kind, namespace: &str, name: &str) -> Event {
        let key = (kind, namespace.to_string(), name.to_string());
        let mut object = self
            .current()
            .remove(&key)
            .unwrap_or_else(|| panic!("deleting {key:?}, which does not exist"));
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.record(key, EventType::Deleted, object)
    }

    fn record(&mut self, key: Key, type_: EventType, object: Value) -> Event {
        let e = Event {
            rv: self.rv,
            key,
            type_,
            object,
        };
        self.events.push(e.clone());
        e
    }

    /// A write to a resource nobody here watches (a Lease, an Event): only the counter moves.
    pub fn advance(&mut self) {
        self.rv += 1;
    }

    /// Forgets the history up to now, as etcd's compaction does.
    pub fn compact(&mut self) {
        self.base = self.current();
        self.events.clear();
        self.compacted = self.rv;
    }
}
