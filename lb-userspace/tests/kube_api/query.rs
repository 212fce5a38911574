//! Query strings of list and watch requests, and field selectors.

use serde_json::Value;

/// The decoded `name=value` pairs of a query string.
pub struct Query(Vec<(String, String)>);

impl Query {
    pub fn parse(query: &str) -> Self {
        Self(
            query
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    (decode(k), decode(v))
                })
                .collect(),
        )
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `application/x-www-form-urlencoded` decoding: `+` is a space, `%XX` a byte.
fn decode(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hex: String = bytes.by_ref().take(2).map(char::from).collect();
                match u8::from_str_radix(&hex, 16) {
                    Ok(v) if hex.len() == 2 => out.push(v),
                    _ => out.extend(format!("%{hex}").bytes()),
                }
            }
            b => out.push(b),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A field selector of `metadata.name` and `metadata.namespace` equalities, the fields every
/// resource supports.
#[derive(Clone, Debug, Default)]
pub struct FieldSelector(Vec<(String, String)>);

impl FieldSelector {
    pub fn parse(selector: Option<&str>) -> Result<Self, String> {
        let mut terms = Vec::new();
        for term in selector
            .unwrap_or_default()
            .split(',')
            .filter(|t| !t.is_empty())
        {
            let (field, value) = term
                .split_once("==")
                .or_else(|| term.split_once('='))
                .ok_or_else(|| format!("field selector term {term:?} is not FIELD=VALUE"))?;
            if !matches!(field, "metadata.name" | "metadata.namespace") {
                return Err(format!("field label not supported: {field}"));
            }
            terms.push((field.to_string(), value.to_string()));
        }
        Ok(Self(terms))
    }

    pub fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|(field, value)| {
            let meta = &object["metadata"];
            let actual = match field.as_str() {
                "metadata.name" => meta["name"].as_str(),
                _ => meta["namespace"].as_str(),
            };
            actual.unwrap_or_default() == value
        })
    }
}

#[test]
fn queries_decode() {
    let q = Query::parse("watch=true&fieldSelector=metadata.name%3Dnode1&x=a+b&bad=%zz");
    assert_eq!(q.get("watch"), Some("true"));
    assert_eq!(q.get("fieldSelector"), Some("metadata.name=node1"));
    assert_eq!(q.get("x"), Some("a b"));
    assert_eq!(q.get("bad"), Some("%zz"));
    assert_eq!(q.get("limit"), None);
}
