//! The deployment holds what deploy/README.md says of it. Every overlay of deploy/k8s, as shipped
//! and with each optional piece turned on the way the README says (the batch Job, the
//! coordinators' autoscaler, an etcd of one's own, a pinned image digest), is rendered offline by
//! `kubectl kustomize` — Debian's kubectl (package kubernetes-client, kustomize 2.0.3), which
//! `scripts/prereqs.sh kube` installs, so a missing kubectl fails here rather than skips — and
//! every object is validated offline against the Kubernetes schemas, strictly (an unknown field is
//! an error), by kubernetes-validate from PyPI. cert-manager's Certificate and Issuer and the
//! Prometheus Operator's ServiceMonitor are custom resources, which it has no schemas for: those
//! are checked here field by field for what tome relies on, as is what tome needs of the built-in
//! objects (references that resolve, probes, security contexts, threads that follow the CPU
//! limit, who may reach the workers, and settings — `TOME_*` variables and flags, in the
//! manifests and the image — that the binary takes). And the Grafana dashboard asks only for
//! metrics that a running coordinator and worker export.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use tome_e2e::{http_get, minilm, repo, start_server, start_worker, tome_bin};

/// The Kubernetes release the objects are validated against: the oldest the manifests are for
/// (a Job's podFailurePolicy is GA from 1.31).
const KUBERNETES_VERSION: &str = "1.31.0";

/// The validator, from PyPI.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";

/// Kinds of custom resources: no schema in kubernetes-validate, checked by [`check_custom`].
const CUSTOM_KINDS: [&str; 3] = ["Certificate", "Issuer", "ServiceMonitor"];

/// Secrets the operator creates (deploy/README.md); every other Secret a pod mounts is a
/// cert-manager Certificate's.
const OPERATOR_SECRETS: [&str; 2] = ["tome-api-keys", "tome-batch-api-key"];

/// Reads the rendered objects (a YAML stream, argv[1]) and validates each built-in one strictly
/// against argv[2]'s schemas; prints the objects and what failed, as JSON.
const VALIDATE: &str = r#"
import json, sys
import yaml
import kubernetes_validate as kv

path, version, custom = sys.argv[1], sys.argv[2], set(sys.argv[3].split(","))
objects, problems, validated = [], [], []
with open(path) as f:
    docs = [d for d in yaml.safe_load_all(f) if d is not None]
for doc in docs:
    objects.append(doc)
    what = f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
    if doc.get("kind") in custom:
        continue
    try:
        kv.validate(doc, version, strict=True)
        validated.append(what)
    except kv.ValidationError as e:
        problems.append(f"{what}: {'.'.join(map(str, e.path))}: {e.message}")
    except Exception as e:
        problems.append(f"{what}: {type(e).__name__}: {getattr(e, 'message', e)}")
print(json.dumps({"objects": objects, "problems": problems, "validated": validated}))
"#;

/// kubernetes-validate, installed once into target/python-kube (once per process: the tests
/// that validate run in parallel and would otherwise install it over each other).
fn validator_python() -> PathBuf {
    static INSTALLED: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            let dir = repo().join("target/python-kube");
            if !dir.join("kubernetes_validate").is_dir() {
                let out = Command::new("python3")
                    .args(["-m", "pip", "install", "--quiet", "--target"])
                    .arg(&dir)
                    .arg(KUBERNETES_VALIDATE)
                    .output()
                    .expect("python3 (scripts/prereqs.sh python installs it)");
                assert!(out.status.success(), "pip install {KUBERNETES_VALIDATE}: {}", String::from_utf8_lossy(&out.stderr));
            }
            dir
        })
        .clone()
}

/// The objects of a YAML stream, what of them failed validation, and how many were validated.
fn validate(yaml: &str, label: &str) -> (Vec<Value>, Vec<String>, usize) {
    let file = std::env::temp_dir().join(format!("tome-deploy-{}-{label}.yaml", std::process::id()));
    std::fs::write(&file, yaml).unwrap();
    let out = Command::new("python3")
        .env("PYTHONPATH", validator_python())
        .args(["-c", VALIDATE])
        .arg(&file)
        .args([KUBERNETES_VERSION, &CUSTOM_KINDS.join(",")])
        .output()
        .expect("python3 (scripts/prereqs.sh python installs it)");
    std::fs::remove_file(&file).ok();
    assert!(out.status.success(), "the validator: {}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let strings = |key: &str| report[key].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect::<Vec<_>>();
    (report["objects"].as_array().unwrap().clone(), strings("problems"), strings("validated").len())
}

/// `kubectl kustomize DIR`'s objects, each validated.
fn render(dir: &Path, label: &str) -> Vec<Value> {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run kubectl ({e}): the test command installs it (scripts/prereqs.sh kube: Debian's kubernetes-client)"));
    assert!(out.status.success(), "kubectl kustomize {}: {}", dir.display(), String::from_utf8_lossy(&out.stderr));
    let (objects, problems, validated) = validate(&String::from_utf8(out.stdout).unwrap(), label);
    assert!(problems.is_empty(), "{label}: objects that do not validate against Kubernetes {KUBERNETES_VERSION}:\n{}", problems.join("\n"));
    let custom = objects.iter().filter(|o| CUSTOM_KINDS.contains(&kind(o))).count();
    assert_eq!(validated + custom, objects.len(), "{label}: every object is validated or a custom resource checked here");
    assert!(validated > 10, "{label}: only {validated} objects validated");
    objects
}

/// A copy of deploy/k8s (in a temporary folder) for an overlay's kustomization to be edited as
/// deploy/README.md says, the overlays' relative paths intact.
struct Edited(PathBuf);

impl Edited {
    fn new(label: &str) -> Edited {
        fn copy(from: &Path, to: &Path) {
            std::fs::create_dir_all(to).unwrap();
            for entry in std::fs::read_dir(from).unwrap() {
                let path = entry.unwrap().path();
                let target = to.join(path.file_name().unwrap());
                if path.is_dir() {
                    copy(&path, &target);
                } else {
                    std::fs::copy(&path, &target).unwrap();
                }
            }
        }
        let dir = std::env::temp_dir().join(format!("tome-deploy-{}-{label}", std::process::id()));
        std::fs::remove_dir_all(&dir).ok();
        copy(&repo().join("deploy/k8s"), &dir);
        Edited(dir)
    }

    /// Replaces `from` (which must be there) with `to` in `overlay`'s kustomization.yaml.
    fn edit(&self, overlay: &str, from: &str, to: &str) -> &Self {
        let path = self.0.join("overlays").join(overlay).join("kustomization.yaml");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(from), "overlays/{overlay}/kustomization.yaml has no line {from:?}, which deploy/README.md tells readers to edit");
        std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
        self
    }

    fn render(&self, overlay: &str, label: &str) -> Vec<Value> {
        render(&self.0.join("overlays").join(overlay), label)
    }
}

impl Drop for Edited {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

fn kind(o: &Value) -> &str {
    o["kind"].as_str().unwrap_or("")
}

fn name(o: &Value) -> &str {
    o["metadata"]["name"].as_str().unwrap_or("")
}

fn find<'a>(objects: &'a [Value], kind_: &str, name_: &str) -> Option<&'a Value> {
    objects.iter().find(|o| kind(o) == kind_ && name(o) == name_)
}

fn of_kind<'a>(objects: &'a [Value], kind_: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    objects.iter().filter(move |o| kind(o) == kind_)
}

fn array(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or(&[])
}

/// A ConfigMap by the name pods use (kustomize appends a hash of its contents).
fn config_map<'a>(objects: &'a [Value], base: &str) -> Option<&'a Value> {
    of_kind(objects, "ConfigMap").find(|o| name(o) == base || name(o).strip_prefix(base).is_some_and(|rest| rest.starts_with('-') && rest.len() == 11))
}

/// Whether `selector` (matchLabels and `In` expressions, or a Service's plain map) selects `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let plain = selector.get("matchLabels").is_none() && selector.get("matchExpressions").is_none();
    let match_labels = if plain { selector } else { &selector["matchLabels"] };
    let labels_ok = match_labels.as_object().is_none_or(|m| m.iter().all(|(k, v)| labels.get(k) == Some(v)));
    let expressions_ok = array(&selector["matchExpressions"]).iter().all(|e| {
        assert_eq!(e["operator"], "In", "only `In` expressions are understood here");
        labels.get(e["key"].as_str().unwrap()).is_some_and(|l| array(&e["values"]).contains(l))
    });
    labels_ok && expressions_ok && !selector.as_object().is_none_or(|m| m.is_empty())
}

/// The objects that run pods: (object, its pod template).
fn workloads(objects: &[Value]) -> Vec<(&Value, &Value)> {
    objects.iter().filter(|o| matches!(kind(o), "Deployment" | "StatefulSet" | "Job")).map(|o| (o, &o["spec"]["template"])).collect()
}

fn containers(pod: &Value) -> impl Iterator<Item = &Value> {
    array(&pod["spec"]["initContainers"]).iter().chain(array(&pod["spec"]["containers"]))
}

fn env<'a>(container: &'a Value, var: &str) -> Option<&'a Value> {
    array(&container["env"]).iter().find(|e| e["name"] == var)
}

/// The tome containers (`tome serve ...`, `tome batch ...`), by their first argument.
fn tome_command(container: &Value) -> Option<&str> {
    array(&container["args"]).first().and_then(Value::as_str).filter(|a| ["serve", "batch", "run"].contains(a))
}

/// `tome ARGS --help`: what that command takes, each flag with its `[env: TOME_...]` variable.
fn tome_help(args: &[&str]) -> String {
    let out = Command::new(tome_bin()).args(args).arg("--help").output().unwrap();
    assert!(out.status.success(), "tome {args:?} --help: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Every `TOME_*` variable and `--flag` a tome container (or the image) sets is one that its
/// command takes: a misspelt or removed setting would otherwise be silently ignored.
fn check_settings_exist(who: &str, command: &[&str], env_names: &[&str], flags: &[&str]) {
    let help = tome_help(command);
    for name in env_names.iter().filter(|n| n.starts_with("TOME_")) {
        // `[env: NAME=default]`, or `[env: NAME]` where the value is a secret.
        let named = help.contains(&format!("[env: {name}=")) || help.contains(&format!("[env: {name}]"));
        assert!(named, "{who}: `tome {}` takes no {name}", command.join(" "));
    }
    for flag in flags.iter().filter(|f| f.starts_with("--")) {
        let flag = flag.split('=').next().unwrap();
        assert!(help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")), "{who}: `tome {}` takes no {flag}", command.join(" "));
    }
}

/// Whether DNS name `host` is covered by certificate name `pattern` (one leading `*.` label).
fn covers(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(rest) => host.split_once('.').is_some_and(|(first, tail)| !first.is_empty() && tail == rest),
        None => pattern == host,
    }
}

/// cert-manager's and the Prometheus Operator's objects, field by field.
fn check_custom(objects: &[Value], label: &str) {
    let issuers: Vec<&str> = of_kind(objects, "Issuer").map(name).collect();
    let certificates: Vec<&Value> = of_kind(objects, "Certificate").collect();
    assert!(!issuers.is_empty() && !certificates.is_empty(), "{label}: the cluster CA and certificate (tls.yaml)");
    let secrets: Vec<&str> = certificates.iter().map(|c| c["spec"]["secretName"].as_str().unwrap()).collect();
    for issuer in of_kind(objects, "Issuer") {
        let spec = issuer["spec"].as_object().unwrap();
        assert_eq!(spec.len(), 1, "{label}: Issuer {} is one kind of issuer", name(issuer));
        if let Some(ca) = spec.get("ca") {
            let secret = ca["secretName"].as_str().unwrap();
            let cert = certificates.iter().find(|c| c["spec"]["secretName"] == secret).unwrap_or_else(|| panic!("{label}: no Certificate makes {secret}"));
            assert_eq!(cert["spec"]["isCA"], true, "{label}: {secret} is a CA");
        } else {
            assert!(spec.contains_key("selfSigned"), "{label}: Issuer {} is `ca` or `selfSigned`", name(issuer));
        }
    }
    for cert in &certificates {
        let spec = &cert["spec"];
        assert_eq!(spec["issuerRef"]["kind"], "Issuer");
        assert!(issuers.contains(&spec["issuerRef"]["name"].as_str().unwrap()), "{label}: Certificate {}'s issuer is rendered", name(cert));
        assert!(spec["dnsNames"].is_array() || spec["commonName"].is_string(), "{label}: Certificate {} names something", name(cert));
        for field in ["secretName", "duration"] {
            assert!(spec[field].is_string(), "{label}: Certificate {} has {field}", name(cert));
        }
    }
    for monitor in of_kind(objects, "ServiceMonitor") {
        let services: Vec<&Value> = of_kind(objects, "Service").filter(|s| selects(&monitor["spec"]["selector"], &s["metadata"]["labels"])).collect();
        let mut components: Vec<&str> = services.iter().map(|s| s["metadata"]["labels"]["app.kubernetes.io/component"].as_str().unwrap()).collect();
        components.sort();
        assert_eq!(components, ["coordinator", "worker"], "{label}: ServiceMonitor {} scrapes the coordinators and the workers", name(monitor));
        for endpoint in array(&monitor["spec"]["endpoints"]) {
            for service in &services {
                assert!(array(&service["spec"]["ports"]).iter().any(|p| p["name"] == endpoint["port"]), "{label}: Service {} has port {}", name(service), endpoint["port"]);
            }
            assert_eq!(endpoint["scheme"], "https", "{label}: metrics are HTTPS");
            let tls = &endpoint["tlsConfig"];
            for secret in [&tls["ca"]["secret"]["name"], &tls["cert"]["secret"]["name"], &tls["keySecret"]["name"]] {
                assert!(secrets.contains(&secret.as_str().unwrap()), "{label}: the scraper's TLS comes from a Certificate's Secret, not {secret}");
            }
            let server = tls["serverName"].as_str().unwrap();
            assert!(
                certificates.iter().any(|c| array(&c["spec"]["dnsNames"]).iter().any(|n| covers(n.as_str().unwrap(), server))),
                "{label}: serverName {server} is a name of the certificate"
            );
        }
    }
}

/// What tome needs of every rendering, whatever the overlay.
fn check_common(objects: &[Value], label: &str) {
    check_custom(objects, label);
    let pods = workloads(objects);
    let certificate_secrets: Vec<&str> = of_kind(objects, "Certificate").map(|c| c["spec"]["secretName"].as_str().unwrap()).collect();
    let dns_names: Vec<&str> = of_kind(objects, "Certificate").flat_map(|c| array(&c["spec"]["dnsNames"])).map(|n| n.as_str().unwrap()).collect();

    for (owner, pod) in &pods {
        let who = format!("{label}: {} {}", kind(owner), name(owner));
        let spec = &pod["spec"];
        // Restricted security: non-root, seccomp, read-only root, no capabilities.
        assert_eq!(spec["securityContext"]["runAsNonRoot"], true, "{who} runs as non-root");
        assert_eq!(spec["securityContext"]["seccompProfile"]["type"], "RuntimeDefault", "{who}'s seccomp profile");
        assert_eq!(spec["automountServiceAccountToken"], false, "{who} needs no API token");
        for c in containers(pod).filter(|c| tome_command(c).is_some()) {
            let args: Vec<&str> = array(&c["args"]).iter().filter_map(Value::as_str).collect();
            let command: Vec<&str> = args.iter().copied().take_while(|a| !a.starts_with('-')).collect();
            let env_names: Vec<&str> = array(&c["env"]).iter().filter_map(|e| e["name"].as_str()).collect();
            check_settings_exist(&format!("{who}/{}", c["name"]), &command, &env_names, &args);
        }
        for c in containers(pod) {
            let ctx = &c["securityContext"];
            assert_eq!(ctx["readOnlyRootFilesystem"], true, "{who}/{}: read-only root filesystem", c["name"]);
            assert_eq!(ctx["allowPrivilegeEscalation"], false, "{who}/{}", c["name"]);
            assert_eq!(ctx["capabilities"]["drop"], serde_json::json!(["ALL"]), "{who}/{}: every capability dropped", c["name"]);
            for bound in ["requests", "limits"] {
                for resource in ["cpu", "memory"] {
                    assert!(c["resources"][bound][resource].is_string(), "{who}/{}: resources.{bound}.{resource}", c["name"]);
                }
            }
            let image = c["image"].as_str().unwrap();
            let last = image.rsplit('/').next().unwrap();
            assert!(last.contains(':') || last.contains('@'), "{who}/{}: image {image} by tag or digest", c["name"]);
            assert!(!image.ends_with(":latest"), "{who}/{}: image {image}", c["name"]);
        }
        // Every volume and reference resolves: to an object rendered here, a Certificate's
        // Secret, or a Secret the operator creates (deploy/README.md).
        for volume in array(&spec["volumes"]) {
            if let Some(claim) = volume["persistentVolumeClaim"]["claimName"].as_str() {
                assert!(find(objects, "PersistentVolumeClaim", claim).is_some(), "{who}: volume claim {claim} is rendered");
            }
            if let Some(map) = volume["configMap"]["name"].as_str() {
                assert!(find(objects, "ConfigMap", map).is_some(), "{who}: ConfigMap {map}");
            }
            if let Some(secret) = volume["secret"]["secretName"].as_str() {
                assert!(certificate_secrets.contains(&secret) || OPERATOR_SECRETS.contains(&secret), "{who}: Secret {secret} comes from nowhere");
            }
        }
        for c in containers(pod) {
            for from in array(&c["envFrom"]) {
                let map = from["configMapRef"]["name"].as_str().unwrap();
                assert!(find(objects, "ConfigMap", map).is_some(), "{who}/{}: ConfigMap {map}", c["name"]);
            }
            for var in array(&c["env"]) {
                if let Some(map) = var["valueFrom"]["configMapKeyRef"]["name"].as_str() {
                    let key = &var["valueFrom"]["configMapKeyRef"]["key"];
                    let map = find(objects, "ConfigMap", map).unwrap_or_else(|| panic!("{who}: ConfigMap {map}"));
                    assert!(map["data"].get(key.as_str().unwrap()).is_some(), "{who}: ConfigMap {} has {key}", name(map));
                }
                if let Some(secret) = var["valueFrom"]["secretKeyRef"]["name"].as_str() {
                    assert!(OPERATOR_SECRETS.contains(&secret), "{who}: Secret {secret} comes from nowhere");
                }
            }
            // A StatefulSet's volume claim templates are volumes of its pods too.
            let volumes = array(&spec["volumes"]).iter().chain(array(&owner["spec"]["volumeClaimTemplates"]).iter().map(|t| &t["metadata"]));
            for mount in array(&c["volumeMounts"]) {
                assert!(volumes.clone().any(|v| v["name"] == mount["name"]), "{who}/{}: volume {}", c["name"], mount["name"]);
            }
        }
    }

    // The servers: threads follow the CPU limit, and the probes say what they should.
    let mut servers = 0;
    for (owner, pod) in &pods {
        for c in array(&pod["spec"]["containers"]).iter().filter(|c| tome_command(c) == Some("serve")) {
            servers += 1;
            let who = format!("{label}: {}/{}", name(owner), c["name"]);
            let threads = env(c, "TOME_THREADS").unwrap_or_else(|| panic!("{who} sets TOME_THREADS"));
            let field = &threads["valueFrom"]["resourceFieldRef"];
            assert_eq!((field["resource"].as_str(), field["containerName"].as_str()), (Some("limits.cpu"), c["name"].as_str()), "{who}: TOME_THREADS is its own CPU limit");
            assert!(field["divisor"] == "1" || field["divisor"] == 1, "{who}: in whole cores");
            for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
                assert!(c[probe].is_object(), "{who} has a {probe}");
            }
            let port_of = |p: &Value| -> u64 {
                p.as_u64().unwrap_or_else(|| array(&c["ports"]).iter().find(|q| q["name"] == *p).unwrap_or_else(|| panic!("{who}: port {p}"))["containerPort"].as_u64().unwrap())
            };
            let listen: u64 = env(c, "TOME_LISTEN").unwrap()["value"].as_str().unwrap().rsplit(':').next().unwrap().parse().unwrap();
            if array(&c["args"]) == ["serve", "coordinator"] {
                let ready = &c["readinessProbe"]["httpGet"];
                assert_eq!((ready["path"].as_str(), ready["scheme"].as_str()), (Some("/health"), Some("HTTPS")), "{who}: ready means /health says it can run jobs");
                assert_eq!(port_of(&ready["port"]), listen, "{who}: /health is on the API's port");
                assert!(c["livenessProbe"]["httpGet"].is_null(), "{who}: liveness is not /health, which fails while no worker lives");
            } else {
                for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
                    assert_eq!(port_of(&c[probe]["tcpSocket"]["port"]), listen, "{who}: {probe} connects to the worker's listener");
                }
                // Its advertised name is one the certificate covers, reached through its headless Service.
                let advertise = env(c, "TOME_ADVERTISE").unwrap()["value"].as_str().unwrap();
                let host = advertise.rsplit_once(':').unwrap().0.replace("$(POD_NAME)", &format!("{}-0", name(owner)));
                assert!(dns_names.iter().any(|n| covers(n, &host)), "{who}: the certificate covers {host}");
                assert_eq!(host.split_once('.').unwrap().1, owner["spec"]["serviceName"], "{who}: advertised under its Service");
            }
        }
    }
    assert!(servers >= 2, "{label}: coordinators and workers");

    // Services select pods and name their ports; StatefulSets name headless Services.
    for service in of_kind(objects, "Service") {
        let backing: Vec<&Value> = pods.iter().map(|(_, p)| *p).filter(|p| selects(&service["spec"]["selector"], &p["metadata"]["labels"])).collect();
        assert!(!backing.is_empty(), "{label}: Service {} selects pods", name(service));
        for port in array(&service["spec"]["ports"]) {
            let target = &port["targetPort"];
            assert!(backing.iter().all(|p| containers(p).any(|c| array(&c["ports"]).iter().any(|q| q["name"] == *target))), "{label}: Service {}'s port {target}", name(service));
        }
    }
    for set in of_kind(objects, "StatefulSet") {
        let service = find(objects, "Service", set["spec"]["serviceName"].as_str().unwrap()).unwrap_or_else(|| panic!("{label}: StatefulSet {}'s Service", name(set)));
        assert_eq!(service["spec"]["clusterIP"], "None", "{label}: StatefulSet {}'s Service is headless: a DNS name per pod", name(set));
        assert_eq!(service["spec"]["publishNotReadyAddresses"], true, "{label}: {}'s pods find each other before they are ready", name(service));
    }
    // Every long-running workload has a PodDisruptionBudget.
    for (owner, pod) in pods.iter().filter(|(o, _)| kind(o) != "Job") {
        let budgets = of_kind(objects, "PodDisruptionBudget").filter(|b| selects(&b["spec"]["selector"], &pod["metadata"]["labels"])).count();
        assert_eq!(budgets, 1, "{label}: {} {} has a PodDisruptionBudget", kind(owner), name(owner));
    }

    // Only coordinators and workers reach the workers' port (and etcd's client port).
    let component = |c: &str| serde_json::json!({"app.kubernetes.io/name": "tome", "app.kubernetes.io/component": c});
    for (target, port) in [("worker", "grpc"), ("etcd", "client")] {
        if target == "etcd" && find(objects, "StatefulSet", "tome-etcd").is_none() {
            continue;
        }
        let policies: Vec<&Value> = of_kind(objects, "NetworkPolicy").filter(|p| selects(&p["spec"]["podSelector"], &component(target))).collect();
        assert_eq!(policies.len(), 1, "{label}: a NetworkPolicy guards the {target}s");
        let policy = policies[0];
        assert_eq!(policy["spec"]["policyTypes"], serde_json::json!(["Ingress"]));
        let rules: Vec<&Value> = array(&policy["spec"]["ingress"]).iter().filter(|r| array(&r["ports"]).iter().any(|p| p["port"] == port)).collect();
        assert_eq!(rules.len(), 1, "{label}: one rule opens the {target}s' {port} port");
        let peers = array(&rules[0]["from"]);
        assert_eq!(peers.len(), 2, "{label}: the {target}s' {port} port is for two kinds of pod");
        for peer in peers {
            assert_eq!(peer.as_object().unwrap().len(), 1, "{label}: a pod selector alone (no namespaces, no addresses)");
            assert!(
                selects(&peer["podSelector"], &component("coordinator")) || selects(&peer["podSelector"], &component("worker")),
                "{label}: {peer} is a coordinator or a worker"
            );
        }
    }
}

/// The bundled etcd: three members behind their headless Service, and the endpoints tome is
/// given are those members, by names the certificate covers.
fn check_bundled_etcd(objects: &[Value], label: &str) {
    let set = find(objects, "StatefulSet", "tome-etcd").unwrap_or_else(|| panic!("{label}: the bundled etcd"));
    assert_eq!(set["spec"]["replicas"], 3, "{label}: three members");
    let endpoints = config_map(objects, "tome-etcd").unwrap()["data"]["TOME_ETCD"].as_str().unwrap();
    let hosts: Vec<String> = endpoints.split(',').map(|e| e.strip_prefix("https://").unwrap().rsplit_once(':').unwrap().0.to_string()).collect();
    assert_eq!(hosts, ["tome-etcd-0.tome-etcd", "tome-etcd-1.tome-etcd", "tome-etcd-2.tome-etcd"], "{label}: tome is given every member");
    let dns_names: Vec<&str> = of_kind(objects, "Certificate").flat_map(|c| array(&c["spec"]["dnsNames"])).map(|n| n.as_str().unwrap()).collect();
    for host in &hosts {
        assert!(dns_names.iter().any(|n| covers(n, host)), "{label}: the certificate covers {host}");
    }
}

fn coordinator(objects: &[Value]) -> &Value {
    find(objects, "Deployment", "tome-coordinator").unwrap()
}

fn worker_container(objects: &[Value]) -> &Value {
    array(&find(objects, "StatefulSet", "tome-worker").unwrap()["spec"]["template"]["spec"]["containers"]).iter().find(|c| c["name"] == "worker").unwrap()
}

#[test]
fn the_cpu_and_gpu_overlays_render_and_validate() {
    for overlay in ["cpu", "gpu"] {
        let objects = render(&repo().join("deploy/k8s/overlays").join(overlay), overlay);
        check_common(&objects, overlay);
        check_bundled_etcd(&objects, overlay);
        assert_eq!(coordinator(&objects)["spec"]["replicas"], 2, "{overlay}: two coordinators");
        assert!(of_kind(&objects, "Job").next().is_none(), "{overlay}: the batch Job is off by default");
        assert!(of_kind(&objects, "HorizontalPodAutoscaler").next().is_none(), "{overlay}: the HPA is off by default");
        let keys = env(&array(&coordinator(&objects)["spec"]["template"]["spec"]["containers"])[0], "TOME_API_KEYS_FILE");
        assert!(keys.is_some(), "{overlay}: API keys are on");
        let worker = worker_container(&objects);
        let gpus = &worker["resources"]["limits"]["nvidia.com/gpu"];
        let pod = &find(&objects, "StatefulSet", "tome-worker").unwrap()["spec"]["template"]["spec"];
        if overlay == "gpu" {
            assert_eq!((gpus, &worker["resources"]["requests"]["nvidia.com/gpu"]), (&Value::from("1"), &Value::from("1")), "a GPU per worker");
            assert!(array(&pod["tolerations"]).iter().any(|t| t["key"] == "nvidia.com/gpu"), "GPU nodes' taint tolerated");
            assert!(pod["nodeSelector"].as_object().is_some_and(|s| !s.is_empty()), "GPU nodes selected");
            assert!(worker["image"].as_str().unwrap().ends_with("-cuda"), "workers run the CUDA image");
        } else {
            assert!(gpus.is_null() && pod["tolerations"].is_null(), "cpu: no GPU");
        }
        let coordinator_image = array(&coordinator(&objects)["spec"]["template"]["spec"]["containers"])[0]["image"].as_str().unwrap();
        assert!(!coordinator_image.ends_with("-cuda"), "{overlay}: coordinators need no CUDA");
    }
}

#[test]
fn the_optional_pieces_render_and_validate_when_an_overlay_turns_them_on() {
    // The batch Job and the autoscaler, both on, in each pool.
    for overlay in ["cpu", "gpu"] {
        let label = format!("{overlay}-batch-hpa");
        let copy = Edited::new(&label);
        copy.edit(overlay, "  # - ../../batch\n", "  - ../../batch\n").edit(overlay, "  # - ../../hpa\n", "  - ../../hpa\n").edit(overlay, "  - coordinator-replicas.yaml\n", "");
        let objects = copy.render(overlay, &label);
        check_common(&objects, &label);

        let job = find(&objects, "Job", "tome-batch").unwrap_or_else(|| panic!("{label}: the batch Job"));
        let pod = &job["spec"]["template"]["spec"];
        assert_eq!(pod["restartPolicy"], "Never", "{label}: a failed pod is the Job's to count");
        let batch = &array(&pod["containers"])[0];
        assert_eq!(tome_command(batch), Some("batch"));
        // The report is the outcome: exit 2 (some documents failed) fails the Job at once.
        let rules = array(&job["spec"]["podFailurePolicy"]["rules"]);
        assert!(
            rules.iter().any(|r| r["action"] == "FailJob" && r["onExitCodes"]["operator"] == "In" && array(&r["onExitCodes"]["values"]).contains(&Value::from(2))),
            "{label}: tome batch's exit code 2 fails the Job"
        );
        assert!(
            rules.iter().any(|r| r["action"] == "Ignore" && array(&r["onPodConditions"]).iter().any(|c| c["type"] == "DisruptionTarget")),
            "{label}: an evicted pod is not a failure"
        );
        // Resumable: the journal (in --out) is on the shelf's volume.
        let args: Vec<&str> = array(&batch["args"]).iter().map(|a| a.as_str().unwrap()).collect();
        let out = args[args.iter().position(|a| *a == "--out").unwrap() + 1];
        let mount = array(&batch["volumeMounts"]).iter().find(|m| out.starts_with(m["mountPath"].as_str().unwrap())).unwrap_or_else(|| panic!("{label}: {out} is on a volume"));
        let volume = array(&pod["volumes"]).iter().find(|v| v["name"] == mount["name"]).unwrap();
        assert!(volume["persistentVolumeClaim"].is_object(), "{label}: the journal outlives the pod");
        assert!(
            env(batch, "TOME_COORDINATOR").is_some() && env(batch, "TOME_API_KEY").is_some() && env(batch, "TOME_TLS_CA").is_some(),
            "{label}: the batch calls the coordinators as a caller does"
        );

        let hpa = of_kind(&objects, "HorizontalPodAutoscaler").next().unwrap_or_else(|| panic!("{label}: the HPA"));
        assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], "tome-coordinator");
        assert!(coordinator(&objects)["spec"].get("replicas").is_none(), "{label}: no replica count fights the autoscaler");
    }

    // An etcd of one's own: the bundled one left out, the ConfigMap replaced by the README's.
    let readme = std::fs::read_to_string(repo().join("deploy/README.md")).unwrap();
    let start = readme.find("```yaml\n# An etcd of your own").expect("deploy/README.md shows how to use an etcd of one's own") + "```yaml\n".len();
    let snippet = &readme[start..start + readme[start..].find("```").unwrap()];
    let copy = Edited::new("cpu-own-etcd");
    copy.edit("cpu", "  - ../../etcd\n", "").edit("cpu", "\nimages:", &format!("\n{snippet}\nimages:"));
    let objects = copy.render("cpu", "cpu-own-etcd");
    check_common(&objects, "cpu-own-etcd");
    assert!(of_kind(&objects, "StatefulSet").all(|s| name(s) != "tome-etcd"), "no bundled etcd");
    assert!(find(&objects, "NetworkPolicy", "tome-etcd").is_none() && find(&objects, "Service", "tome-etcd").is_none());
    let endpoints = config_map(&objects, "tome-etcd").unwrap()["data"]["TOME_ETCD"].as_str().unwrap();
    assert!(!endpoints.contains("tome-etcd-0"), "tome is pointed at the other etcd: {endpoints}");

    // A pinned digest.
    let digest = format!("sha256:{}", "0123456789abcdef".repeat(4));
    let copy = Edited::new("gpu-digest");
    copy.edit("gpu", "    # digest: sha256:<64 hex digits>\n", &format!("    digest: {digest}\n")).edit(
        "gpu",
        "    # digest: sha256:<64 hex digits>\n",
        &format!("    digest: {digest}\n"),
    );
    let objects = copy.render("gpu", "gpu-digest");
    check_common(&objects, "gpu-digest");
    for (_, pod) in workloads(&objects) {
        for c in containers(pod).filter(|c| tome_command(c).is_some()) {
            assert!(c["image"].as_str().unwrap().ends_with(&format!("@{digest}")), "gpu-digest: {} is pinned", c["image"]);
        }
    }
}

/// The validation above is not vacuous: an object Kubernetes would refuse is refused.
#[test]
fn the_images_defaults_are_settings_tome_takes() {
    let dockerfile = std::fs::read_to_string(repo().join("deploy/Dockerfile")).unwrap();
    let mut env_names = Vec::new();
    let mut in_env = false;
    for line in dockerfile.lines() {
        let line = line.trim();
        let rest = match line.strip_prefix("ENV ") {
            Some(rest) => rest,
            None if in_env => line,
            None => continue,
        };
        in_env = rest.ends_with('\\');
        env_names.extend(rest.split_whitespace().filter_map(|w| w.split_once('=')).map(|(name, _)| name));
    }
    assert!(env_names.contains(&"TOME_LISTEN") && env_names.contains(&"TOME_MODEL"), "the image's defaults serve: {env_names:?}");
    let commands: Vec<&str> = dockerfile.lines().filter_map(|l| l.strip_prefix("CMD ")).collect();
    assert!(!commands.is_empty());
    for cmd in commands {
        let args: Vec<String> = serde_json::from_str(cmd).unwrap();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        check_settings_exist("deploy/Dockerfile", &args, &env_names, &[]);
    }
}

#[test]
fn the_schema_validation_refuses_what_kubernetes_would() {
    let deployment = |extra: &str| {
        format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: probe}}\nspec:\n  selector: {{matchLabels: {{a: b}}}}\n{extra}  template:\n    metadata: {{labels: {{a: b}}}}\n    spec: {{containers: [{{name: c, image: i}}]}}\n"
        )
    };
    let (_, problems, validated) = validate(&deployment(""), "valid");
    assert_eq!((problems.len(), validated), (0, 1), "{problems:?}");
    for (extra, why) in [("  replicaz: 2\n", "an unknown field"), ("  replicas: two\n", "a wrong type")] {
        let (_, problems, _) = validate(&deployment(extra), "invalid");
        assert_eq!(problems.len(), 1, "{why} is refused: {problems:?}");
    }
    let (_, problems, _) = validate("apiVersion: example.com/v1\nkind: Gadget\nmetadata: {name: probe}\n", "unknown");
    assert_eq!(problems.len(), 1, "a kind without a schema is not waved through: {problems:?}");
}

/// Every PromQL expression in the dashboard.
fn expressions(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", Value::String(e)) => out.push(e.clone()),
                    _ => expressions(v, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| expressions(v, out)),
        _ => {}
    }
}

/// The metric names in a PromQL expression: its identifiers that are tome's or the process's.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    for c in expr.chars().chain(std::iter::once(' ')) {
        if c == '"' {
            quoted = !quoted;
        }
        if !quoted && (c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            word.push(c);
            continue;
        }
        if word.starts_with("tome_") || word.starts_with("process_") {
            names.push(word.clone());
        }
        word.clear();
    }
    names
}

#[tokio::test(flavor = "multi_thread")]
async fn the_grafana_dashboard_asks_only_for_metrics_tome_exports() {
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(repo().join("deploy/grafana/tome.json")).unwrap()).unwrap();
    assert!(dashboard["uid"].is_string() && dashboard["title"].is_string());
    let variables: Vec<&str> = array(&dashboard["templating"]["list"]).iter().map(|v| v["name"].as_str().unwrap()).collect();
    let mut ids = Vec::new();
    for panel in array(&dashboard["panels"]).iter().filter(|p| p["type"] != "row") {
        let title = panel["title"].as_str().unwrap();
        ids.push(panel["id"].as_u64().unwrap());
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}: the data source picked on import");
        assert!(!array(&panel["targets"]).is_empty(), "{title} shows something");
        for target in array(&panel["targets"]) {
            let expr = target["expr"].as_str().unwrap();
            assert!(expr.contains("$namespace"), "{title}: {expr} follows the namespace variable");
            if expr.contains("histogram_quantile") {
                assert!(expr.contains("_bucket{") && expr.contains("by (le"), "{title}: {expr} takes quantiles over the buckets' rates, by le");
            }
        }
    }
    assert!(variables.contains(&"datasource") && variables.contains(&"namespace"), "{variables:?}");
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "panel ids are unique");

    let mut exprs = Vec::new();
    expressions(&dashboard, &mut exprs);
    let mut names: Vec<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
    names.sort();
    names.dedup();
    assert!(names.len() >= 10, "{names:?}");

    // Every series a coordinator and a worker export is on their pages from the start.
    let Some(model) = minilm() else { return };
    let coordinator = start_server(&model, &["--metrics-listen", "127.0.0.1:0"]).await;
    let log = std::env::temp_dir().join(format!("tome-dashboard-worker-{}", std::process::id()));
    let worker = start_worker(&model, &["--metrics-listen", "127.0.0.1:0"], log.clone()).await;
    let mut exported = std::collections::BTreeSet::new();
    for server in [&coordinator, &worker] {
        let page = http_get(server.metrics.as_deref().expect("metrics address"), "/metrics");
        let series = page.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty());
        exported.extend(series.filter_map(|l| l.split(['{', ' ']).next()).map(str::to_string));
    }
    for name in &names {
        assert!(exported.contains(name), "the dashboard asks for {name}, which neither a coordinator nor a worker exports: {exported:?}");
    }
    std::fs::remove_file(log).ok();
}
