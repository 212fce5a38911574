//! The Kubernetes manifests under deploy/: every document parses into its k8s-openapi type
//! (strictly: a field the type does not know is an error, not silently dropped), and the
//! DaemonSets' command lines parse with the agent's own CLI, so a renamed flag or a typo
//! fails here rather than in a cluster.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment},
        core::v1::{
            ConfigMap, Container, Endpoints, Namespace, Pod, PodSpec, Service, ServiceAccount,
        },
        discovery::v1::EndpointSlice,
        rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use lb_userspace::cli::{AgentArgs, Cli, Command};
use serde_json::Value;

/// The kind cluster config is kind's own type, not a Kubernetes object.
pub const KIND_CONFIG: &str = "kind/cluster.yaml";
pub const AGENT_MANIFEST: &str = "lb.yaml";
pub const CLEANUP_MANIFEST: &str = "cleanup.yaml";
pub const CLEANUP_PATH: &str = "deploy/cleanup.yaml";
pub const NAMESPACE: &str = "lb-system";
pub const AGENT: &str = "lb-agent";
pub const CLEANUP: &str = "lb-cleanup";
/// The ConfigMap key that holds the API server's address.
pub const API_SERVER_KEY: &str = "api-server";

/// What the agent needs beyond an unprivileged container (README.md, "Capabilities").
pub const AGENT_CAPABILITIES: [&str; 4] = ["BPF", "NET_ADMIN", "PERFMON", "SYS_RESOURCE"];

#[derive(Debug, Clone)]
pub enum Object {
    /// Parsed and checked against its type, looked at no further (the kind).
    Other,
    ConfigMap(ConfigMap),
    ClusterRole(ClusterRole),
    ClusterRoleBinding(ClusterRoleBinding),
    DaemonSet(DaemonSet),
    Deployment(Deployment),
    Pod(Pod),
    Service(Service),
}

/// One document: its typed form and the JSON it was read as.
#[derive(Debug, Clone)]
pub struct Document {
    pub object: Object,
    pub json: Value,
}

fn typed<T>(doc: &Value) -> Result<T>
where
    T: serde::de::DeserializeOwned + serde::Serialize,
{
    let object: T = serde_json::from_value(doc.clone())?;
    // k8s-openapi ignores fields it does not know; written back, they are missing.
    let back = serde_json::to_value(&object)?;
    if let Some(path) = first_difference(doc, &back, String::new()) {
        bail!("field {path} is not part of the type (misspelt or misplaced?)");
    }
    Ok(object)
}

/// The path of the first value in `read` that `written` lacks or holds differently.
fn first_difference(read: &Value, written: &Value, path: String) -> Option<String> {
    match (read, written) {
        (Value::Object(r), Value::Object(w)) => r.iter().find_map(|(k, v)| match w.get(k) {
            Some(wv) => first_difference(v, wv, format!("{path}.{k}")),
            None if v.is_null() => None,
            None => Some(format!("{path}.{k}")),
        }),
        (Value::Array(r), Value::Array(w)) if r.len() == w.len() => r
            .iter()
            .zip(w)
            .enumerate()
            .find_map(|(i, (a, b))| first_difference(a, b, format!("{path}[{i}]"))),
        (r, w) if r == w => None,
        _ => Some(if path.is_empty() { ".".into() } else { path }),
    }
}

/// One document, typed by its apiVersion and kind.
pub fn parse_value(doc: Value) -> Result<Document> {
    let field = |name: &str| doc.get(name).and_then(Value::as_str).unwrap_or("");
    let (api_version, kind) = (field("apiVersion"), field("kind"));
    let name = doc
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("?");
    let object = match (api_version, kind) {
        ("v1", "Namespace") => typed::<Namespace>(&doc).map(|_| Object::Other),
        ("v1", "ConfigMap") => typed(&doc).map(Object::ConfigMap),
        ("v1", "ServiceAccount") => typed::<ServiceAccount>(&doc).map(|_| Object::Other),
        ("v1", "Pod") => typed(&doc).map(Object::Pod),
        ("v1", "Service") => typed(&doc).map(Object::Service),
        ("v1", "Endpoints") => typed::<Endpoints>(&doc).map(|_| Object::Other),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => typed(&doc).map(Object::ClusterRole),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            typed(&doc).map(Object::ClusterRoleBinding)
        }
        ("apps/v1", "DaemonSet") => typed(&doc).map(Object::DaemonSet),
        ("apps/v1", "Deployment") => typed(&doc).map(Object::Deployment),
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            typed::<EndpointSlice>(&doc).map(|_| Object::Other)
        }
        _ => bail!("unknown kind {kind:?} (apiVersion {api_version:?}) named {name:?}"),
    }
    .with_context(|| format!("{kind} {name:?}"))?;
    Ok(Document { object, json: doc })
}

/// Every document of one file (YAML, several documents allowed, or JSON).
pub fn parse_file(path: &Path) -> Result<Vec<Document>> {
    let text = fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let docs: Vec<Value> = if path.extension().is_some_and(|e| e == "json") {
        vec![serde_json::from_str(&text).with_context(|| format!("{}", path.display()))?]
    } else {
        serde_saphyr::from_multiple(&text).with_context(|| format!("{}", path.display()))?
    };
    let docs: Vec<Document> = docs
        .into_iter()
        .filter(|d| !d.is_null())
        .map(parse_value)
        .collect::<Result<_>>()
        .with_context(|| format!("{}", path.display()))?;
    ensure!(!docs.is_empty(), "{}: no Kubernetes object", path.display());
    Ok(docs)
}

/// Every manifest under `deploy` (.yaml, .yml, .json), the kind config excepted.
pub fn parse_dir(deploy: &Path) -> Result<BTreeMap<PathBuf, Vec<Document>>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        for entry in fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                walk(&path, out)?;
            } else if path
                .extension()
                .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
            {
                out.push(path);
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    walk(deploy, &mut files)?;
    let kind_config = deploy.join(KIND_CONFIG);
    files
        .into_iter()
        .filter(|p| *p != kind_config)
        .map(|p| parse_file(&p).map(|docs| (p, docs)))
        .collect()
}

fn daemonset<'a>(docs: &'a [Document], name: &str) -> Result<&'a DaemonSet> {
    docs.iter()
        .find_map(|d| match &d.object {
            Object::DaemonSet(ds) if ds.metadata.name.as_deref() == Some(name) => Some(ds),
            _ => None,
        })
        .with_context(|| format!("no DaemonSet {name}"))
}

/// The agent's container in the agent's DaemonSet.
pub fn agent_container(docs: &[Document]) -> Result<&Container> {
    container(pod_spec(daemonset(docs, AGENT)?)?, "agent")
}

fn pod_spec(ds: &DaemonSet) -> Result<&PodSpec> {
    ds.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .context("DaemonSet without a pod template spec")
}

fn container<'a>(spec: &'a PodSpec, name: &str) -> Result<&'a Container> {
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| c.name == name)
        .with_context(|| format!("no container {name}"))
}

/// Kubernetes' `$(VAR)` expansion of command and args (`$$` escapes a `$`). A reference to
/// an undefined variable is kept literally by Kubernetes; here it is an error, since it is
/// almost always a typo.
pub fn expand(s: &str, env: &BTreeMap<String, String>) -> Result<String> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some((name, tail)) = after.strip_prefix('(').and_then(|a| a.split_once(')')) {
            let value = env.get(name).with_context(|| {
                format!("$({name}) in {s:?} names no variable of the container")
            })?;
            out.push_str(value);
            rest = tail;
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// The container's environment with sample values for the downward API and the values
/// of ConfigMaps found among `docs`.
fn environment(c: &Container, docs: &[Document]) -> Result<BTreeMap<String, String>> {
    let mut env = BTreeMap::new();
    for var in c.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (Some(v), _) => v.clone(),
            (None, Some(from)) => {
                if let Some(f) = &from.field_ref {
                    match f.field_path.as_str() {
                        "spec.nodeName" => "node-1".into(),
                        "metadata.name" => "pod-1".into(),
                        "metadata.namespace" => NAMESPACE.into(),
                        "status.podIP" | "status.hostIP" => "192.0.2.10".into(),
                        other => bail!("{}: unexpected fieldRef {other}", var.name),
                    }
                } else if let Some(k) = &from.config_map_key_ref {
                    config_map_value(docs, &k.name, &k.key)
                        .with_context(|| format!("env {}", var.name))?
                } else {
                    bail!(
                        "{}: only fieldRef and configMapKeyRef are expected",
                        var.name
                    )
                }
            }
            (None, None) => String::new(),
        };
        env.insert(var.name.clone(), value);
    }
    Ok(env)
}

pub fn config_map_value(docs: &[Document], name: &str, key: &str) -> Result<String> {
    docs.iter()
        .find_map(|d| match &d.object {
            Object::ConfigMap(cm) if cm.metadata.name.as_deref() == Some(name) => {
                cm.data.as_ref().and_then(|data| data.get(key)).cloned()
            }
            _ => None,
        })
        .with_context(|| format!("no key {key} in a ConfigMap {name} beside the DaemonSet"))
}

/// The argv the container runs, with `$(VAR)` resolved. `sh -c SCRIPT ARGV0 ARGS...`
/// counts as ARGV0 ARGS...: the script only decides whether that command runs.
pub fn argv(c: &Container, docs: &[Document]) -> Result<Vec<String>> {
    let env = environment(c, docs)?;
    let all: Vec<String> = c
        .command
        .iter()
        .flatten()
        .chain(c.args.iter().flatten())
        .map(|a| expand(a, &env))
        .collect::<Result<_>>()
        .with_context(|| format!("container {}", c.name))?;
    let shell = matches!(all.first().map(String::as_str), Some("sh" | "/bin/sh"));
    match all.get(1) {
        Some(flag) if shell && flag.starts_with('-') && flag.contains('c') => {
            Ok(all.get(3..).unwrap_or_default().to_vec())
        }
        _ => Ok(all),
    }
}

fn parse_lb(argv: &[String]) -> Result<Command> {
    ensure!(
        argv.first().map(String::as_str) == Some("lb"),
        "runs {argv:?}, not lb"
    );
    Cli::try_parse_from(argv)
        .map(|cli| cli.command)
        .map_err(|e| anyhow::anyhow!("`{}` is refused by lb:\n{e}", argv.join(" ")))
}

/// The host paths mounted into a container, by mount path, with their propagation.
fn host_mounts(spec: &PodSpec, c: &Container) -> Vec<(PathBuf, String, Option<String>)> {
    c.volume_mounts
        .iter()
        .flatten()
        .filter_map(|m| {
            let volume = spec.volumes.iter().flatten().find(|v| v.name == m.name)?;
            let host = volume.host_path.as_ref()?.path.clone();
            Some((
                PathBuf::from(&m.mount_path),
                host,
                m.mount_propagation.clone(),
            ))
        })
        .collect()
}

fn probe_target(p: Option<&k8s_openapi::api::core::v1::Probe>) -> Option<(String, i32)> {
    let get = p?.http_get.as_ref()?;
    let port = match &get.port {
        IntOrString::Int(n) => *n,
        IntOrString::String(_) => return None,
    };
    Some((get.path.clone().unwrap_or_default(), port))
}

/// What the agent DaemonSet promises, checked against its own manifest: the agent's
/// arguments as the agent parses them, the mounts they point into, probes on its health
/// port, and a pod that runs on every node with the capabilities it needs and no more.
pub fn check_agent(docs: &[Document]) -> Result<AgentArgs> {
    let spec = pod_spec(daemonset(docs, AGENT)?)?;
    let c = agent_container(docs)?;
    let argv = argv(c, docs)?;
    let Command::Agent(args) = parse_lb(&argv)? else {
        bail!("the agent container does not run `lb agent`: {argv:?}");
    };
    ensure!(
        args.source.as_deref() == Some("kubernetes"),
        "the agent must read the API server (--source=kubernetes)"
    );
    ensure!(
        args.api_server.as_deref().is_some_and(|s| !s.is_empty()),
        "the agent needs --api-server: nothing translates the kubernetes ClusterIP for it"
    );
    ensure!(
        c.command
            .iter()
            .chain(c.args.iter())
            .flatten()
            .any(|a| a.contains("$(NODE_NAME)"))
            && c.env.iter().flatten().any(|e| e.name == "NODE_NAME"
                && e.value_from
                    .as_ref()
                    .and_then(|f| f.field_ref.as_ref())
                    .is_some_and(|f| f.field_path == "spec.nodeName")),
        "--node-name must come from the downward API (spec.nodeName)"
    );
    ensure!(
        spec.host_network == Some(true),
        "the agent needs hostNetwork"
    );
    ensure!(
        spec.priority_class_name.as_deref() == Some("system-node-critical"),
        "priorityClassName must be system-node-critical"
    );
    ensure!(
        spec.tolerations
            .iter()
            .flatten()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "the agent must tolerate every taint (operator: Exists), control-plane nodes included"
    );

    let mounts = host_mounts(spec, c);
    let bpffs_root = args.pins.bpffs.parent().unwrap_or(Path::new("/"));
    ensure!(
        mounts.iter().any(|(at, host, propagation)| at == bpffs_root
            && host == "/sys/fs/bpf"
            && matches!(
                propagation.as_deref(),
                Some("HostToContainer" | "Bidirectional")
            )),
        "--bpffs {} must lie in the host's /sys/fs/bpf, mounted with HostToContainer propagation",
        args.pins.bpffs.display()
    );
    let cgroup = args
        .cgroup
        .clone()
        .context("the agent needs --cgroup: the pod's own cgroup root hides the host's")?;
    ensure!(
        mounts
            .iter()
            .any(|(at, host, _)| *at == cgroup && host.starts_with("/sys/fs/cgroup")),
        "--cgroup {} must be a mount of the host's cgroup v2 hierarchy",
        cgroup.display()
    );

    let port = i32::from(args.healthz_addr.port());
    ensure!(
        probe_target(c.liveness_probe.as_ref()) == Some(("/livez".into(), port)),
        "livenessProbe must GET /livez on port {port}"
    );
    ensure!(
        probe_target(c.readiness_probe.as_ref()) == Some(("/healthz".into(), port)),
        "readinessProbe must GET /healthz on port {port}"
    );

    let sc = c
        .security_context
        .as_ref()
        .context("agent without securityContext")?;
    ensure!(
        sc.privileged != Some(true),
        "the agent must not be privileged"
    );
    let caps = sc
        .capabilities
        .as_ref()
        .context("agent without capabilities")?;
    ensure!(
        caps.drop.as_deref() == Some(&["ALL".to_string()][..]),
        "the agent must drop ALL capabilities before adding its own"
    );
    let mut added = caps.add.clone().unwrap_or_default();
    added.sort();
    ensure!(
        added == AGENT_CAPABILITIES,
        "the agent's capabilities are {added:?}, expected {AGENT_CAPABILITIES:?}"
    );
    Ok(*args)
}

/// The cleanup DaemonSet runs `lb reset` on the agent's pin directory, on every node.
pub fn check_cleanup(docs: &[Document], agent: &AgentArgs) -> Result<()> {
    let ds = daemonset(docs, CLEANUP)?;
    let spec = pod_spec(ds)?;
    ensure!(
        spec.host_network == Some(true),
        "lb reset must run in the node's network namespace"
    );
    ensure!(
        spec.tolerations
            .iter()
            .flatten()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()),
        "the cleanup must tolerate every taint"
    );
    let c = container(spec, "reset")?;
    let argv = argv(c, docs)?;
    let Command::Reset(pins) = parse_lb(&argv)? else {
        bail!("the reset container does not run `lb reset`: {argv:?}");
    };
    ensure!(
        pins.bpffs == agent.pins.bpffs,
        "lb reset --bpffs {} is not the agent's {}",
        pins.bpffs.display(),
        agent.pins.bpffs.display()
    );
    let mounts = host_mounts(spec, c);
    ensure!(
        mounts.iter().any(|(at, host, _)| Some(at.as_path()) == pins.bpffs.parent() && host == "/sys/fs/bpf"),
        "the reset container must mount the host's /sys/fs/bpf"
    );
    Ok(())
}

/// The agent reads Services, EndpointSlices and Nodes, and nothing else.
pub fn check_rbac(docs: &[Document]) -> Result<()> {
    let role = docs
        .iter()
        .find_map(|d| match &d.object {
            Object::ClusterRole(r) if r.metadata.name.as_deref() == Some(AGENT) => Some(r),
            _ => None,
        })
        .context("no ClusterRole lb-agent")?;
    let mut granted: Vec<(String, String, String)> = Vec::new();
    for PolicyRule {
        api_groups,
        resources,
        verbs,
        resource_names,
        non_resource_urls,
    } in role.rules.iter().flatten()
    {
        ensure!(
            resource_names.is_none() && non_resource_urls.is_none(),
            "unexpected resourceNames/nonResourceURLs"
        );
        for g in api_groups.iter().flatten() {
            for r in resources.iter().flatten() {
                for v in verbs {
                    granted.push((g.clone(), r.clone(), v.clone()));
                }
            }
        }
    }
    granted.sort();
    let mut wanted = Vec::new();
    for (g, r) in [
        ("", "nodes"),
        ("", "services"),
        ("discovery.k8s.io", "endpointslices"),
    ] {
        for v in ["get", "list", "watch"] {
            wanted.push((g.to_string(), r.to_string(), v.to_string()));
        }
    }
    wanted.sort();
    ensure!(
        granted == wanted,
        "ClusterRole lb-agent grants {granted:?}; only get/list/watch on services, nodes and endpointslices is needed"
    );
    let bound = docs.iter().any(|d| match &d.object {
        Object::ClusterRoleBinding(b) => {
            b.role_ref.name == AGENT
                && b.subjects.iter().flatten().any(|s| {
                    s.kind == "ServiceAccount"
                        && s.name == AGENT
                        && s.namespace.as_deref() == Some(NAMESPACE)
                })
        }
        _ => false,
    });
    ensure!(
        bound,
        "no ClusterRoleBinding of lb-agent to its ServiceAccount"
    );
    let uses_account = daemonset(docs, AGENT)
        .and_then(pod_spec)
        .map(|s| s.service_account_name.as_deref() == Some(AGENT))?;
    ensure!(
        uses_account,
        "the DaemonSet must run as ServiceAccount lb-agent"
    );
    Ok(())
}

/// The image both DaemonSets run (the one the kind check builds).
pub fn image(docs: &[Document]) -> Result<String> {
    let mut images = Vec::new();
    for name in [AGENT, CLEANUP] {
        let spec = pod_spec(daemonset(docs, name)?)?;
        for c in spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
        {
            images.push(
                c.image
                    .clone()
                    .with_context(|| format!("{name}/{}: no image", c.name))?,
            );
        }
    }
    images.dedup();
    match images.as_slice() {
        [one] => Ok(one.clone()),
        more => bail!("the DaemonSets name several images: {more:?}"),
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// A scratch repository holding a copy of deploy/ that a test may break; removed on
    /// drop.
    pub struct Scratch(pub PathBuf);

    impl Scratch {
        pub fn copy_of_deploy(tag: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("lb-xtask-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            copy_dir(&crate::root().join("deploy"), &dir.join("deploy"));
            Scratch(dir)
        }

        pub fn deploy(&self) -> PathBuf {
            self.0.join("deploy")
        }

        /// Replaces the first `from` in deploy/`file`.
        pub fn edit(&self, file: &str, from: &str, to: &str) {
            let path = self.deploy().join(file);
            let text = fs::read_to_string(&path).unwrap();
            assert!(text.contains(from), "{file} has no {from:?}");
            fs::write(&path, text.replacen(from, to, 1)).unwrap();
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn copy_dir(from: &Path, to: &Path) {
        fs::create_dir_all(to).unwrap();
        for e in fs::read_dir(from).unwrap() {
            let p = e.unwrap().path();
            let target = to.join(p.file_name().unwrap());
            if p.is_dir() {
                copy_dir(&p, &target);
            } else {
                fs::copy(&p, &target).unwrap();
            }
        }
    }

    fn all_docs(dir: &Path) -> Result<Vec<Document>> {
        Ok(parse_dir(dir)?.into_values().flatten().collect())
    }

    #[test]
    fn every_manifest_in_deploy_parses_and_the_daemonsets_fit_the_cli() {
        let deploy = crate::root().join("deploy");
        let files = parse_dir(&deploy).unwrap();
        for f in [
            AGENT_MANIFEST,
            CLEANUP_MANIFEST,
            "kind/workload.yaml",
            "examples/echo.yaml",
        ] {
            assert!(files.contains_key(&deploy.join(f)), "{f} not read");
        }
        assert!(!files.contains_key(&deploy.join(KIND_CONFIG)));
        let docs: Vec<Document> = files.into_values().flatten().collect();
        let agent = check_agent(&docs).unwrap();
        assert_eq!(agent.cgroup, Some(PathBuf::from("/run/lb/host-cgroup")));
        assert_eq!(
            agent.node_name.as_deref(),
            Some("node-1"),
            "from the downward API"
        );
        assert_eq!(
            agent.api_server,
            Some(config_map_value(&docs, AGENT, API_SERVER_KEY).unwrap()),
            "the API server comes from the ConfigMap"
        );
        check_cleanup(&docs, &agent).unwrap();
        check_rbac(&docs).unwrap();
        assert_eq!(image(&docs).unwrap(), "lb:0.1.0");
    }

    #[test]
    fn a_renamed_flag_or_unset_variable_breaks_the_check() {
        let s = Scratch::copy_of_deploy("flag");
        s.edit(AGENT_MANIFEST, "--cgroup=", "--cgroup-root=");
        let e = check_agent(&all_docs(&s.deploy()).unwrap()).unwrap_err();
        assert!(format!("{e:#}").contains("--cgroup-root"), "{e:#}");

        let s = Scratch::copy_of_deploy("var");
        s.edit(AGENT_MANIFEST, "$(NODE_NAME)", "$(NODE)");
        let e = check_agent(&all_docs(&s.deploy()).unwrap()).unwrap_err();
        assert!(format!("{e:#}").contains("$(NODE)"), "{e:#}");

        let s = Scratch::copy_of_deploy("reset");
        s.edit(CLEANUP_MANIFEST, "args: [reset,", "args: [rest,");
        let docs = all_docs(&s.deploy()).unwrap();
        let agent = check_agent(&docs).unwrap();
        assert!(check_cleanup(&docs, &agent).is_err());
    }

    #[test]
    fn unknown_kinds_and_unknown_fields_are_refused() {
        let s = Scratch::copy_of_deploy("kinds");
        fs::write(
            s.deploy().join("extra.yaml"),
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n---\napiVersion: example.com/v1\nkind: Frobnicator\nmetadata: {name: f}\n",
        )
        .unwrap();
        let e = parse_dir(&s.deploy()).unwrap_err();
        assert!(format!("{e:#}").contains("Frobnicator"), "{e:#}");

        let s = Scratch::copy_of_deploy("fields");
        s.edit(AGENT_MANIFEST, "hostNetwork: true", "hostNetworking: true");
        let e = parse_dir(&s.deploy()).unwrap_err();
        assert!(format!("{e:#}").contains("hostNetworking"), "{e:#}");
    }

    #[test]
    fn the_pod_stays_unprivileged_with_the_capabilities_it_needs() {
        let s = Scratch::copy_of_deploy("caps");
        s.edit(
            AGENT_MANIFEST,
            "add: [BPF, NET_ADMIN, PERFMON, SYS_RESOURCE]",
            "add: [BPF, NET_ADMIN, PERFMON, SYS_RESOURCE, SYS_ADMIN]",
        );
        assert!(check_agent(&all_docs(&s.deploy()).unwrap()).is_err());

        let s = Scratch::copy_of_deploy("rbac");
        s.edit(
            AGENT_MANIFEST,
            "verbs: [get, list, watch]",
            "verbs: [get, list, watch, update]",
        );
        assert!(check_rbac(&all_docs(&s.deploy()).unwrap()).is_err());

        let s = Scratch::copy_of_deploy("probe");
        s.edit(AGENT_MANIFEST, "path: /livez", "path: /healthz");
        assert!(check_agent(&all_docs(&s.deploy()).unwrap()).is_err());
    }

    #[test]
    fn variables_expand_like_kubernetes() {
        let env = BTreeMap::from([("A".to_string(), "x".to_string())]);
        assert_eq!(expand("--a=$(A)", &env).unwrap(), "--a=x");
        assert_eq!(expand("$$(A) $5", &env).unwrap(), "$(A) $5");
        assert!(expand("$(B)", &env).is_err());
    }
}
