use super::*;

fn dir_with(files: &[(&str, &str)]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "lb-manifest-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, text) in files {
        std::fs::write(dir.join(name), text).unwrap();
    }
    dir
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  clusterIP: 10.96.0.1\n  ports: [{port: 80}]\n";
const SLICE: &str = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  labels: {kubernetes.io/service-name: web}\naddressType: IPv4\nendpoints: [{addresses: [10.0.0.1]}]\nports: [{port: 8080}]\n";

#[test]
fn reads_multi_document_yaml_lists_and_json() {
    let list = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {name: a, namespace: x}\n  spec: {clusterIP: 10.96.0.2, ports: [{port: 1}]}\n";
    let json = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"j"},"spec":{"clusterIP":"10.96.0.3","ports":[{"port":2}]}}"#;
    let dir = dir_with(&[
        ("a.yaml", &format!("{SVC}---\n{SLICE}")),
        ("b.yml", list),
        ("c.json", json),
        ("ignored.txt", SVC),
    ]);
    let mut src = ManifestSource::new(&dir);
    assert!(src.reload().is_empty());
    let st = src.state();
    let names: Vec<String> = st.services.keys().map(|r| r.to_string()).collect();
    assert_eq!(names, ["default/j", "default/web", "x/a"]);
    assert_eq!(st.slices().len(), 1);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn an_invalid_object_is_reported_and_the_rest_kept() {
    let bad = "apiVersion: v1\nkind: Service\nmetadata: {name: bad}\nspec: {ports: notalist}\n";
    let dir = dir_with(&[("a.yaml", &format!("{bad}---\n{SVC}"))]);
    let mut src = ManifestSource::new(&dir);
    let errors = src.reload();
    assert_eq!(errors.len(), 1);
    let msg = errors[0].to_string();
    assert!(
        msg.contains("a.yaml") && msg.contains("Service default/bad"),
        "{msg}"
    );
    assert_eq!(src.state().services.len(), 1);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn an_unparsable_file_keeps_its_last_good_objects() {
    let dir = dir_with(&[("a.yaml", SVC)]);
    let mut src = ManifestSource::new(&dir);
    assert!(src.reload().is_empty());
    std::fs::write(dir.join("a.yaml"), "kind: [unclosed").unwrap();
    assert_eq!(src.reload().len(), 1);
    assert_eq!(
        src.state().services.len(),
        1,
        "a broken file must not delete its objects"
    );
    std::fs::remove_file(dir.join("a.yaml")).unwrap();
    src.reload();
    assert!(
        src.state().services.is_empty(),
        "a removed file deletes its objects"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn endpoints_are_mirrored_unless_slices_exist() {
    let ep = "apiVersion: v1\nkind: Endpoints\nmetadata: {name: web}\nsubsets:\n- addresses: [{ip: 10.0.0.9, nodeName: n1}]\n  notReadyAddresses: [{ip: 10.0.0.8}]\n  ports: [{port: 8080}]\n";
    let dir = dir_with(&[("a.yaml", &format!("{SVC}---\n{ep}"))]);
    let mut src = ManifestSource::new(&dir);
    assert!(src.reload().is_empty());
    let st = src.state();
    let slice = st.slices().values().next().expect("mirrored slice");
    assert_eq!(slice.endpoints.len(), 2);
    assert_eq!(
        slice.endpoints[1].conditions.as_ref().unwrap().ready,
        Some(false)
    );
    std::fs::write(dir.join("b.yaml"), SLICE).unwrap();
    src.reload();
    let st = src.state();
    assert_eq!(st.slices().len(), 1);
    assert_eq!(
        st.slices().keys().next().unwrap().name,
        "web-1",
        "slices win over Endpoints"
    );
    std::fs::remove_dir_all(dir).unwrap();
}
