//! `cargo xtask kind [--dry-run] [--keep]`: the DaemonSet in a real cluster. Builds the
//! image, creates a kind cluster without kube-proxy, deploys deploy/lb.yaml and a workload,
//! and checks ClusterIP from a pod, NodePort from a node's own network, source-address
//! preservation under `externalTrafficPolicy: Local` and the refusal of a service without
//! endpoints; then deletes the cluster, also after a failure.
//!
//! Every step is a command line, so `--dry-run` prints exactly what a run executes, after
//! validating the inputs, without running docker, kind or kubectl.

pub mod manifests;

use std::{
    collections::BTreeMap,
    fmt, fs,
    path::Path,
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use anyhow::{bail, ensure, Context, Result};
use k8s_openapi::api::core::v1::Service;
use serde_json::Value;

use manifests::{Document, Object, AGENT, API_SERVER_KEY, NAMESPACE};

const KUBECONFIG: &str = "target/kind/kubeconfig";
const RENDERED: &str = "target/kind/lb.json";
const WORKLOAD: &str = "deploy/kind/workload.yaml";
const DOCKERFILE: &str = "deploy/Dockerfile";
const KIND_CONFIG: &str = "deploy/kind/cluster.yaml";
const TOOLS: [&str; 3] = ["docker", "kind", "kubectl"];
/// The workload's names (deploy/kind/workload.yaml).
const CHECK_NS: &str = "lb-check";
const ECHO: &str = "echo";
const ECHO_NODEPORT: &str = "echo-nodeport";
const ECHO_LOCAL: &str = "echo-local";
const EMPTY: &str = "empty";
const CLIENT: &str = "client";
/// curl's exit code for a refused connection (28 is a timeout).
const CURL_REFUSED: i32 = 7;
/// A check right after the workload is Ready may precede the agents' sync.
const ATTEMPTS: u32 = 10;
const PAUSE: Duration = Duration::from_secs(3);

pub struct Options {
    pub dry_run: bool,
    /// Leave the cluster up for inspection.
    pub keep: bool,
}

/// What a step's command must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Expect {
    Success,
    /// Exit non-zero (something that must not exist).
    Failure,
    /// Succeed; its trimmed output becomes `{name}` in later steps.
    Capture(&'static str),
    /// Succeed and print one of the whitespace-separated words of this template.
    OneOf(String),
    /// Succeed and print something that starts with this template.
    StartsWith(String),
    /// Exit with this code.
    Exit(i32),
}

#[derive(Debug, Clone)]
pub struct Step {
    pub title: String,
    /// `{name}` is replaced by a value captured by an earlier step.
    pub argv: Vec<String>,
    pub expect: Expect,
    /// Checks are retried: the agents sync a moment after pods turn Ready.
    pub retry: bool,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.title)?;
        write!(f, "    $ {}", shell_words(&self.argv))?;
        match &self.expect {
            Expect::Success => Ok(()),
            Expect::Failure => write!(f, "\n    expect: a non-zero exit"),
            Expect::Capture(n) => write!(f, "\n    capture: {{{n}}}"),
            Expect::OneOf(t) => write!(f, "\n    expect: output is one of {t}"),
            Expect::StartsWith(t) => write!(f, "\n    expect: output starts with {t}"),
            Expect::Exit(c) => write!(f, "\n    expect: exit code {c}"),
        }
    }
}

fn shell_words(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@{}%+".contains(c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Everything a run needs, read from the repository and validated.
pub struct Inputs {
    pub cluster: String,
    pub image: String,
    pub api_server: String,
    /// deploy/lb.yaml with the API server set for kind, as a v1 List.
    pub rendered: Value,
    pub agent_argv: Vec<String>,
    /// The agent's pin directory on each node.
    pub bpffs: String,
    /// The node containers, as kind names them.
    pub nodes: Vec<String>,
    nodeport: i32,
    local_nodeport: i32,
}

fn kind_config(path: &Path) -> Result<(String, usize)> {
    let text = fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let config: Value =
        serde_saphyr::from_str(&text).with_context(|| format!("{}", path.display()))?;
    let at = |p: &str| config.pointer(p).and_then(Value::as_str);
    ensure!(
        at("/kind") == Some("Cluster") && at("/apiVersion") == Some("kind.x-k8s.io/v1alpha4"),
        "{}: not a kind v1alpha4 Cluster",
        path.display()
    );
    ensure!(
        at("/networking/kubeProxyMode") == Some("none"),
        "{}: networking.kubeProxyMode must be none (lb replaces kube-proxy)",
        path.display()
    );
    ensure!(
        config.pointer("/networking/disableDefaultCNI") != Some(&Value::Bool(true)),
        "{}: the check relies on kind's CNI (kindnet) for pod routing",
        path.display()
    );
    let nodes = config
        .get("nodes")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let role = |r: &str| {
        nodes
            .iter()
            .filter(|n| n.get("role").and_then(Value::as_str) == Some(r))
            .count()
    };
    ensure!(
        role("control-plane") == 1,
        "{}: one control-plane node (its address is the API server's)",
        path.display()
    );
    ensure!(
        role("worker") >= 1,
        "{}: at least one worker (traffic between nodes)",
        path.display()
    );
    let name = at("/name").unwrap_or("kind").to_string();
    Ok((name, role("worker")))
}

fn service<'a>(docs: &'a [Document], name: &str) -> Result<&'a Service> {
    docs.iter()
        .find_map(|d| match &d.object {
            Object::Service(s)
                if s.metadata.name.as_deref() == Some(name)
                    && s.metadata.namespace.as_deref() == Some(CHECK_NS) =>
            {
                Some(s)
            }
            _ => None,
        })
        .with_context(|| format!("{WORKLOAD}: no Service {CHECK_NS}/{name}"))
}

fn node_port(s: &Service) -> Result<i32> {
    s.spec
        .as_ref()
        .and_then(|sp| sp.ports.as_ref()?.first()?.node_port)
        .with_context(|| {
            format!(
                "Service {}: a fixed nodePort is needed",
                s.metadata.name.as_deref().unwrap_or("?")
            )
        })
}

/// The labels of every pod the workload creates.
fn pod_labels(docs: &[Document]) -> Vec<BTreeMap<String, String>> {
    docs.iter()
        .filter_map(|d| match &d.object {
            Object::Deployment(dep) => dep
                .spec
                .as_ref()?
                .template
                .metadata
                .as_ref()?
                .labels
                .clone(),
            Object::Pod(p) => p.metadata.labels.clone(),
            _ => None,
        })
        .collect()
}

fn check_workload(docs: &[Document]) -> Result<(i32, i32)> {
    let labels = pod_labels(docs);
    let selects = |s: &Service| {
        let sel = s
            .spec
            .as_ref()
            .and_then(|sp| sp.selector.clone())
            .unwrap_or_default();
        labels
            .iter()
            .any(|l| sel.iter().all(|(k, v)| l.get(k) == Some(v)))
    };
    for name in [ECHO, ECHO_NODEPORT, ECHO_LOCAL] {
        ensure!(
            selects(service(docs, name)?),
            "Service {name} selects no pod of {WORKLOAD}"
        );
    }
    ensure!(
        !selects(service(docs, EMPTY)?),
        "Service {EMPTY} must select no pod (the no-endpoint check)"
    );
    let local = service(docs, ECHO_LOCAL)?;
    ensure!(
        local
            .spec
            .as_ref()
            .and_then(|s| s.external_traffic_policy.as_deref())
            == Some("Local"),
        "Service {ECHO_LOCAL} must have externalTrafficPolicy: Local"
    );
    let has_client = docs
        .iter()
        .any(|d| matches!(&d.object, Object::Pod(p) if p.metadata.name.as_deref() == Some(CLIENT)));
    ensure!(has_client, "{WORKLOAD}: no Pod {CLIENT}");
    Ok((node_port(service(docs, ECHO_NODEPORT)?)?, node_port(local)?))
}

impl Inputs {
    /// Reads and validates the Dockerfile, the kind config, the agent's manifests and the
    /// workload under `root`.
    pub fn load(root: &Path) -> Result<Self> {
        let dockerfile = fs::read_to_string(root.join(DOCKERFILE))
            .with_context(|| format!("read {DOCKERFILE}"))?;
        let stages = dockerfile
            .lines()
            .filter(|l| l.trim_start().to_ascii_uppercase().starts_with("FROM "))
            .count();
        ensure!(
            stages >= 2 && dockerfile.contains("COPY --from="),
            "{DOCKERFILE}: expected a builder stage and a runtime stage copying from it"
        );
        let (cluster, workers) = kind_config(&root.join(KIND_CONFIG))?;
        let mut nodes = vec![
            format!("{cluster}-control-plane"),
            format!("{cluster}-worker"),
        ];
        nodes.extend((2..=workers).map(|n| format!("{cluster}-worker{n}")));

        let deploy = root.join("deploy");
        let files = manifests::parse_dir(&deploy)?;
        let file = |f: &str| {
            files
                .get(&deploy.join(f))
                .cloned()
                .with_context(|| format!("deploy/{f} is missing"))
        };
        let agent_docs = file(manifests::AGENT_MANIFEST)?;
        let mut daemonsets = agent_docs.clone();
        daemonsets.extend(file(manifests::CLEANUP_MANIFEST)?);
        let agent = manifests::check_agent(&agent_docs)?;
        manifests::check_cleanup(&daemonsets, &agent)?;
        manifests::check_rbac(&agent_docs)?;
        let image = manifests::image(&daemonsets)?;
        let (nodeport, local_nodeport) = check_workload(&file("kind/workload.yaml")?)?;

        // Without kube-proxy the agent dials the control-plane container by its name on
        // kind's docker network, as kindnet does; the API server's certificate names it.
        let api_server = format!("{cluster}-control-plane:6443");
        let mut items = Vec::new();
        for d in &agent_docs {
            let mut json = d.json.clone();
            if matches!(&d.object, Object::ConfigMap(cm) if cm.metadata.name.as_deref() == Some(AGENT))
            {
                json["data"][API_SERVER_KEY] = Value::String(api_server.clone());
            }
            items.push(json);
        }
        let rendered = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items});
        let mut with_kind = agent_docs.clone();
        for (d, json) in with_kind
            .iter_mut()
            .zip(rendered["items"].as_array().unwrap())
        {
            *d = manifests::parse_value(json.clone())?;
        }
        let agent_argv = manifests::argv(manifests::agent_container(&with_kind)?, &with_kind)?;
        manifests::check_agent(&with_kind).context("deploy/lb.yaml as rendered for kind")?;
        Ok(Inputs {
            cluster,
            image,
            api_server,
            rendered,
            agent_argv,
            nodes,
            bpffs: agent.pins.bpffs.display().to_string(),
            nodeport,
            local_nodeport,
        })
    }
}

fn words(s: &[&str]) -> Vec<String> {
    s.iter().map(|w| w.to_string()).collect()
}

/// The run, step by step. The cluster's deletion comes last and always runs.
pub fn plan(i: &Inputs) -> (Vec<Step>, Step) {
    let c = i.cluster.as_str();
    let step = |title: &str, argv: Vec<String>, expect: Expect| Step {
        title: title.to_string(),
        argv,
        expect,
        retry: false,
    };
    let kubectl = |rest: &[&str]| {
        let mut v = words(&["kubectl", "--kubeconfig", KUBECONFIG]);
        v.extend(words(rest));
        v
    };
    let node_ip = |node: &str| {
        kubectl(&[
            "get",
            "node",
            node,
            "-o",
            r#"jsonpath={.status.addresses[?(@.type=="InternalIP")].address}"#,
        ])
    };
    let cp = format!("{c}-control-plane");
    let worker = format!("{c}-worker");
    let ns = ["-n", CHECK_NS];
    let curl = ["curl", "-sS", "--max-time", "5"];
    let in_client = |url: &str| {
        let mut v = kubectl(&ns);
        v.extend(words(&["exec", CLIENT, "--"]));
        v.extend(words(&curl));
        v.push(url.to_string());
        v
    };
    let in_node = |node: &str, url: String| {
        let mut v = words(&["docker", "exec", node]);
        v.extend(words(&curl));
        v.push(url);
        v
    };
    let check = |title: &str, argv: Vec<String>, expect: Expect| Step {
        title: title.to_string(),
        argv,
        expect,
        retry: true,
    };
    let svc_url =
        |svc: &str, path: &str| format!("http://{svc}.{CHECK_NS}.svc.cluster.local{path}");
    let steps = vec![
        step(
            "build the image (the agent with its eBPF object)",
            words(&["docker", "build", "-f", DOCKERFILE, "-t", &i.image, "."]),
            Expect::Success,
        ),
        step(
            "create the cluster without kube-proxy (kindnet stays as the CNI)",
            words(&[
                "kind",
                "create",
                "cluster",
                "--name",
                c,
                "--config",
                KIND_CONFIG,
                "--kubeconfig",
                KUBECONFIG,
            ]),
            Expect::Success,
        ),
        step(
            "load the image into the nodes",
            words(&["kind", "load", "docker-image", &i.image, "--name", c]),
            Expect::Success,
        ),
        step(
            "kube-proxy is not deployed",
            kubectl(&["-n", "kube-system", "get", "daemonset", "kube-proxy"]),
            Expect::Failure,
        ),
        step(
            &format!(
                "deploy the agent (deploy/lb.yaml with api-server {})",
                i.api_server
            ),
            kubectl(&["apply", "-f", RENDERED]),
            Expect::Success,
        ),
        step(
            "every node's agent is ready (/healthz)",
            kubectl(&[
                "-n",
                NAMESPACE,
                "rollout",
                "status",
                &format!("daemonset/{AGENT}"),
                "--timeout=300s",
            ]),
            Expect::Success,
        ),
        step(
            "CoreDNS is ready: it reaches the API server through the kubernetes ClusterIP",
            kubectl(&[
                "-n",
                "kube-system",
                "rollout",
                "status",
                "deployment/coredns",
                "--timeout=300s",
            ]),
            Expect::Success,
        ),
        step(
            "deploy the workload",
            kubectl(&["apply", "-f", WORKLOAD]),
            Expect::Success,
        ),
        step(
            "the echo pods are ready",
            kubectl(&[
                "-n",
                CHECK_NS,
                "rollout",
                "status",
                &format!("deployment/{ECHO}"),
                "--timeout=300s",
            ]),
            Expect::Success,
        ),
        step(
            "the echo-local pod is ready",
            kubectl(&[
                "-n",
                CHECK_NS,
                "rollout",
                "status",
                &format!("deployment/{ECHO_LOCAL}"),
                "--timeout=300s",
            ]),
            Expect::Success,
        ),
        step(
            "the client pod is ready",
            kubectl(&[
                "-n",
                CHECK_NS,
                "wait",
                "--for=condition=Ready",
                &format!("pod/{CLIENT}"),
                "--timeout=300s",
            ]),
            Expect::Success,
        ),
        step(
            "names of the echo pods",
            kubectl(&[
                "-n",
                CHECK_NS,
                "get",
                "pods",
                "-l",
                &format!("app={ECHO}"),
                "-o",
                "jsonpath={.items[*].metadata.name}",
            ]),
            Expect::Capture("echo_pods"),
        ),
        step(
            "the control-plane node's address",
            node_ip(&cp),
            Expect::Capture("cp_ip"),
        ),
        step(
            "a worker's address",
            node_ip(&worker),
            Expect::Capture("worker_ip"),
        ),
        step(
            "the node that runs echo-local",
            kubectl(&[
                "-n",
                CHECK_NS,
                "get",
                "pods",
                "-l",
                &format!("app={ECHO_LOCAL}"),
                "-o",
                "jsonpath={.items[0].spec.nodeName}",
            ]),
            Expect::Capture("local_node"),
        ),
        step(
            "its address",
            node_ip("{local_node}"),
            Expect::Capture("local_ip"),
        ),
        check(
            "ClusterIP from a pod (by DNS name, so CoreDNS's ClusterIP is crossed too)",
            in_client(&svc_url(ECHO, "/hostname")),
            Expect::OneOf("{echo_pods}".into()),
        ),
        check(
            "NodePort from the host network of another node (XDP on the worker's uplink)",
            in_node(&cp, format!("http://{{worker_ip}}:{}/hostname", i.nodeport)),
            Expect::OneOf("{echo_pods}".into()),
        ),
        check(
            "NodePort on a node's own loopback (socket hooks)",
            in_node(&worker, format!("http://127.0.0.1:{}/hostname", i.nodeport)),
            Expect::OneOf("{echo_pods}".into()),
        ),
        check(
            "externalTrafficPolicy Local keeps the client's address",
            in_node(
                &cp,
                format!("http://{{local_ip}}:{}/clientip", i.local_nodeport),
            ),
            Expect::StartsWith("{cp_ip}:".into()),
        ),
        check(
            "a service without endpoints refuses the connection (no timeout)",
            in_client(&svc_url(EMPTY, "/")),
            Expect::Exit(CURL_REFUSED),
        ),
        step(
            "uninstall: delete the agents (their data path stays)",
            kubectl(&[
                "-n",
                NAMESPACE,
                "delete",
                &format!("daemonset/{AGENT}"),
                "--wait=true",
            ]),
            Expect::Success,
        ),
        step(
            "uninstall: lb reset on every node",
            kubectl(&["apply", "-f", manifests::CLEANUP_PATH]),
            Expect::Success,
        ),
        step(
            "uninstall: every node is clean",
            kubectl(&[
                "-n",
                NAMESPACE,
                "rollout",
                "status",
                &format!("daemonset/{}", manifests::CLEANUP),
                "--timeout=300s",
            ]),
            Expect::Success,
        ),
    ];
    let mut steps = steps;
    for node in &i.nodes {
        steps.push(step(
            &format!("uninstall: no pins left on {node}"),
            words(&["docker", "exec", node, "test", "!", "-e", &i.bpffs]),
            Expect::Success,
        ));
    }
    let teardown = step(
        "delete the cluster (always, also after a failure)",
        words(&[
            "kind",
            "delete",
            "cluster",
            "--name",
            c,
            "--kubeconfig",
            KUBECONFIG,
        ]),
        Expect::Success,
    );
    (steps, teardown)
}

fn substitute(template: &str, vars: &BTreeMap<&'static str, String>) -> String {
    vars.iter().fold(template.to_string(), |s, (k, v)| {
        s.replace(&format!("{{{k}}}"), v)
    })
}

/// Runs one attempt of a step: `Ok(Err(what happened))` when its expectation is not met,
/// `Err` when the command could not run at all.
fn attempt(
    root: &Path,
    s: &Step,
    vars: &mut BTreeMap<&'static str, String>,
) -> Result<std::result::Result<(), String>> {
    let argv: Vec<String> = s.argv.iter().map(|a| substitute(a, vars)).collect();
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]).current_dir(root);
    if s.expect == Expect::Success {
        let status = cmd.status().with_context(|| format!("run {}", argv[0]))?;
        return Ok(if status.success() {
            Ok(())
        } else {
            Err(format!("{status}"))
        });
    }
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {}", argv[0]))?;
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    let said = || format!("{}; stdout {stdout:?}; stderr {stderr:?}", out.status);
    Ok(match &s.expect {
        Expect::Success => unreachable!("handled above"),
        Expect::Failure if !out.status.success() => Ok(()),
        Expect::Exit(code) if out.status.code() == Some(*code) => Ok(()),
        Expect::Capture(name) if out.status.success() && !stdout.is_empty() => {
            vars.insert(name, stdout);
            Ok(())
        }
        Expect::OneOf(t)
            if out.status.success()
                && substitute(t, vars).split_whitespace().any(|w| w == stdout) =>
        {
            Ok(())
        }
        Expect::StartsWith(t)
            if out.status.success() && stdout.starts_with(&substitute(t, vars)) =>
        {
            Ok(())
        }
        _ => Err(said()),
    })
}

fn execute(root: &Path, steps: &[Step]) -> Result<()> {
    let mut vars = BTreeMap::new();
    for (n, s) in steps.iter().enumerate() {
        println!("\n[{}/{}] {}", n + 1, steps.len(), s.title);
        let tries = if s.retry { ATTEMPTS } else { 1 };
        let mut last = String::new();
        let mut passed = false;
        for t in 1..=tries {
            match attempt(root, s, &mut vars)? {
                Ok(()) => {
                    passed = true;
                    break;
                }
                Err(e) => {
                    println!("    attempt {t}/{tries}: {e}");
                    last = e;
                    if t < tries {
                        thread::sleep(PAUSE);
                    }
                }
            }
        }
        if !passed {
            bail!("step {} ({}) failed: {last}", n + 1, s.title);
        }
        println!("    ok");
    }
    Ok(())
}

/// On failure: what the agents and pods say, before the cluster goes.
fn diagnostics(root: &Path) {
    for argv in [
        vec![
            "kubectl",
            "--kubeconfig",
            KUBECONFIG,
            "get",
            "pods",
            "-A",
            "-o",
            "wide",
        ],
        vec![
            "kubectl",
            "--kubeconfig",
            KUBECONFIG,
            "-n",
            NAMESPACE,
            "logs",
            "-l",
            "app.kubernetes.io/name=lb-agent",
            "--all-containers",
            "--prefix",
            "--tail=100",
        ],
    ] {
        let _ = Command::new(argv[0])
            .args(&argv[1..])
            .current_dir(root)
            .status();
    }
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

pub fn run(root: &Path, opts: Options) -> Result<()> {
    let inputs = Inputs::load(root)?;
    let rendered = root.join(RENDERED);
    fs::create_dir_all(rendered.parent().unwrap())?;
    fs::write(&rendered, serde_json::to_string_pretty(&inputs.rendered)?)
        .with_context(|| format!("write {RENDERED}"))?;
    let (steps, teardown) = plan(&inputs);
    println!(
        "kind check: cluster {} ({KIND_CONFIG}), image {}, API server {}",
        inputs.cluster, inputs.image, inputs.api_server
    );
    println!(
        "validated: {DOCKERFILE}, {KIND_CONFIG}, deploy/*.yaml (k8s-openapi types), {WORKLOAD}"
    );
    println!(
        "agent, as lb parses it (node name sampled): {}",
        shell_words(&inputs.agent_argv)
    );
    println!("rendered: {RENDERED}");
    println!("tools: {}", TOOLS.join(", "));
    if opts.dry_run {
        println!("dry run: nothing is executed\n");
        for (n, s) in steps.iter().chain([&teardown]).enumerate() {
            println!("{:2}. {s}", n + 1);
        }
        return Ok(());
    }
    let missing: Vec<&str> = TOOLS.into_iter().filter(|t| !on_path(t)).collect();
    ensure!(missing.is_empty(), "not on PATH: {}", missing.join(", "));
    let _ = fs::remove_file(root.join(KUBECONFIG));
    let result = execute(root, &steps);
    if result.is_err() {
        diagnostics(root);
    }
    if opts.keep {
        println!(
            "\ncluster {} kept (--keep): KUBECONFIG={KUBECONFIG}; delete it with:\n    {}",
            inputs.cluster,
            shell_words(&teardown.argv)
        );
    } else {
        println!("\n{}", teardown.title);
        if let Err(e) = execute(root, std::slice::from_ref(&teardown)) {
            // A failed check is the news; a failed deletion comes second.
            if result.is_ok() {
                return Err(e);
            }
            eprintln!("xtask: {e:#}");
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use manifests::tests::Scratch;

    fn position(text: &str, needle: &str) -> usize {
        text.find(needle)
            .unwrap_or_else(|| panic!("the plan lacks {needle:?}:\n{text}"))
    }

    #[test]
    fn the_plan_runs_its_steps_in_order_and_deletes_the_cluster_last() {
        let inputs = Inputs::load(&crate::root()).unwrap();
        assert_eq!(inputs.api_server, "lb-kind-control-plane:6443");
        assert_eq!(inputs.image, "lb:0.1.0");
        assert!(inputs
            .agent_argv
            .contains(&"--api-server=lb-kind-control-plane:6443".to_string()));
        let (steps, teardown) = plan(&inputs);
        let text: String = steps
            .iter()
            .chain([&teardown])
            .map(|s| format!("{s}\n"))
            .collect();
        let order = [
            "docker build -f deploy/Dockerfile -t lb:0.1.0 .",
            "kind create cluster --name lb-kind --config deploy/kind/cluster.yaml",
            "kind load docker-image lb:0.1.0 --name lb-kind",
            "get daemonset kube-proxy",
            "apply -f target/kind/lb.json",
            "rollout status daemonset/lb-agent",
            "rollout status deployment/coredns",
            "apply -f deploy/kind/workload.yaml",
            "exec client -- curl -sS --max-time 5 http://echo.lb-check.svc.cluster.local/hostname",
            "docker exec lb-kind-control-plane curl -sS --max-time 5 http://{worker_ip}:30080/hostname",
            "docker exec lb-kind-worker curl -sS --max-time 5 http://127.0.0.1:30080/hostname",
            "http://{local_ip}:30081/clientip\n    expect: output starts with {cp_ip}:",
            "http://empty.lb-check.svc.cluster.local/\n    expect: exit code 7",
            "delete daemonset/lb-agent",
            "apply -f deploy/cleanup.yaml",
            "rollout status daemonset/lb-cleanup",
            "docker exec lb-kind-control-plane test '!' -e /sys/fs/bpf/lb",
            "docker exec lb-kind-worker test '!' -e /sys/fs/bpf/lb",
            "docker exec lb-kind-worker2 test '!' -e /sys/fs/bpf/lb",
            "kind delete cluster --name lb-kind",
        ];
        let at: Vec<usize> = order.iter().map(|s| position(&text, s)).collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "out of order:\n{text}");
        // Every value a step uses was captured by an earlier one.
        let mut known = Vec::new();
        for s in &steps {
            let used = s.argv.join(" ") + &format!("{:?}", s.expect);
            for var in ["echo_pods", "cp_ip", "worker_ip", "local_node", "local_ip"] {
                if used.contains(&format!("{{{var}}}")) {
                    assert!(
                        known.contains(&var),
                        "{{{var}}} used before capture in {}",
                        s.title
                    );
                }
            }
            if let Expect::Capture(n) = s.expect {
                known.push(n);
            }
        }
    }

    #[test]
    fn bad_inputs_are_refused_before_anything_runs() {
        let cases: [(&str, &str, &str, &str); 4] = [
            (
                "kind/cluster.yaml",
                "kubeProxyMode: none",
                "kubeProxyMode: iptables",
                "kubeProxyMode",
            ),
            (
                "lb.yaml",
                "--healthz-addr=0.0.0.0:10256",
                "--healthz-address=0.0.0.0:10256",
                "--healthz-address",
            ),
            (
                "kind/workload.yaml",
                "externalTrafficPolicy: Local",
                "externalTrafficPolicy: Cluster",
                "Local",
            ),
            (
                "cleanup.yaml",
                "image: lb:0.1.0",
                "image: lb:0.0.9",
                "several images",
            ),
        ];
        for (file, from, to, reason) in cases {
            let s = Scratch::copy_of_deploy("bad");
            Inputs::load(&s.0).expect("the copy is valid");
            s.edit(file, from, to);
            let e = match Inputs::load(&s.0) {
                Ok(_) => panic!("{file}: {to:?} was accepted"),
                Err(e) => format!("{e:#}"),
            };
            assert!(e.contains(reason), "{file}: {e}");
        }
        let s = Scratch::copy_of_deploy("missing");
        fs::remove_file(s.deploy().join("Dockerfile")).unwrap();
        let e = Inputs::load(&s.0).err().map(|e| format!("{e:#}"));
        assert!(e.is_some_and(|e| e.contains("Dockerfile")));
    }

    #[test]
    fn commands_print_as_shell_words() {
        assert_eq!(
            shell_words(&words(&["a", "jsonpath={.x[?(@.t==\"I\")]}", "it's"])),
            r#"a 'jsonpath={.x[?(@.t=="I")]}' 'it'\''s'"#
        );
    }
}
