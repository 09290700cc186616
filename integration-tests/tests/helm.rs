//! The Helm chart (`deploy/helm/pledge`), rendered by the real `helm template` and read back:
//! every flag and `PLEDGE_*` variable a container is given is one its binary accepts (asked of
//! the built binaries' `--help`, so a renamed flag fails here, not in someone's cluster); the
//! Kafka adapter is a StatefulSet whose pods each have their own claim and transactional-id
//! prefix; TLS and auth Secrets are mounted read-only where the flags point; every container
//! runs as non-root; the ServiceMonitor exists only when enabled; cluster values give N
//! coordinators on the store; the probes ask the real processes' health service for names they
//! serve; and bad values are refused with what to set.
//!
//! Needs `PLEDGE_HELM` (`eval "$(bash integration-tests/scripts/helm.sh env)"` installs a pinned
//! helm and exports it) and the binaries (`cargo build --workspace --bins`). The probe test also
//! starts the PostgreSQL and Kafka adapters against the services the scripts start.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use pledge_integration_tests::*;
use serde::Deserialize;
use serde_json::Value;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// The release name and namespace every rendering uses.
const RELEASE: &str = "pledge";
const NAMESPACE: &str = "pledge";
/// The rendered objects' base name (release "pledge" + chart "pledge").
const FULL: &str = "pledge";
/// How long one `helm template` or `<binary> --help` may take (both take well under a second).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `cmd` to its end, within [`COMMAND_TIMEOUT`] (killed and a panic past it).
fn run_bounded(mut cmd: Command) -> Output {
    let what = format!("{cmd:?}");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let pid = child.id() as libc::pid_t;
    // The exit, with both pipes read to their end, arrives on the channel.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    match rx.recv_timeout(COMMAND_TIMEOUT) {
        Ok(output) => output.unwrap_or_else(|e| panic!("waiting for {what}: {e}")),
        Err(_) => {
            // SAFETY: kill(2) on our own child's pid, not yet reaped (its waiter has not returned).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("{what} did not finish within {COMMAND_TIMEOUT:?}");
        }
    }
}

fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/helm/pledge")
}

fn helm() -> PathBuf {
    let helm = std::env::var_os("PLEDGE_HELM").unwrap_or_else(|| {
        panic!(
            "PLEDGE_HELM is not set: these tests render the chart with the real helm. Install the pinned one and \
             export its path with: eval \"$(bash integration-tests/scripts/helm.sh env)\" (integration-tests/run.sh \
             does it)"
        )
    });
    let helm = PathBuf::from(helm);
    assert!(helm.is_file(), "PLEDGE_HELM={} is not a file", helm.display());
    helm
}

/// A chart configuration: values files (relative to the chart) and `--set` overrides.
#[derive(Clone, Copy, Debug)]
struct Values {
    files: &'static [&'static str],
    sets: &'static [&'static str],
}

const DEFAULT: Values = Values { files: &[], sets: &[] };
const FULL_VALUES: Values = Values { files: &["ci/full-values.yaml"], sets: &[] };
const SINGLE: Values = Values { files: &["ci/single-values.yaml"], sets: &[] };

/// Every configuration the flag check renders: the ci/ files (found, not listed, so a new one
/// is checked too) and variants reaching the templates' other branches.
fn all_configurations() -> Vec<Values> {
    let mut all = vec![DEFAULT];
    let mut files: Vec<String> = std::fs::read_dir(chart_dir().join("ci"))
        .expect("the chart's ci/ folder")
        .map(|e| format!("ci/{}", e.expect("ci/ entry").file_name().to_string_lossy()))
        .filter(|f| f.ends_with(".yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 2, "the chart's ci/ folder lost its values files: {files:?}");
    for f in files {
        all.push(Values { files: Vec::leak(vec![&*String::leak(f)]), sets: &[] });
    }
    all.extend([
        // The store URL as a flag instead of from a Secret.
        Values {
            files: &["ci/full-values.yaml"],
            sets: &[
                "coordinator.cluster.store.existingSecret=",
                "coordinator.cluster.store.url=postgres://pledge@db-rw:5432/pledge",
            ],
        },
        // TLS without client certificates.
        Values { files: &["ci/full-values.yaml"], sets: &["tls.mutual=false"] },
        // No metrics, no probes, no persistence.
        Values {
            files: &["ci/single-values.yaml"],
            sets: &[
                "metrics.enabled=false",
                "probes.enabled=false",
                "coordinator.persistence.enabled=false",
                "kafkaAdapter.persistence.enabled=false",
                "postgresAdapter.persistence.enabled=false",
            ],
        },
        Values {
            files: &[],
            sets: &[
                "mysqlAdapter.enabled=true",
                "mysqlAdapter.databases[0].id=stock",
                "mysqlAdapter.databases[0].url=mysql://pledge:secret@mariadb:3306/stock",
                "coordinator.coordinatorId=eu-1",
            ],
        },
    ]);
    all
}

/// Runs `helm template` (lint-clean charts only render; a failure is returned as its stderr).
fn helm_template(values: Values) -> Result<String, String> {
    let chart = chart_dir();
    let mut cmd = Command::new(helm());
    cmd.args(["template", RELEASE]).arg(&chart).args(["--namespace", NAMESPACE]);
    for f in values.files {
        cmd.arg("--values").arg(chart.join(f));
    }
    for s in values.sets {
        cmd.arg("--set").arg(s);
    }
    let out = run_bounded(cmd);
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).expect("helm prints UTF-8"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The objects `helm template` renders with `values`.
struct Rendered {
    values: Values,
    objects: Vec<Value>,
}

fn render(values: Values) -> Rendered {
    let yaml = helm_template(values).unwrap_or_else(|e| panic!("helm template failed with {values:?}:\n{e}"));
    let mut objects = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(&yaml) {
        let value = Value::deserialize(doc).unwrap_or_else(|e| panic!("rendered YAML with {values:?}: {e}\n{yaml}"));
        if !value.is_null() {
            objects.push(value);
        }
    }
    assert!(!objects.is_empty(), "helm rendered nothing with {values:?}");
    Rendered { values, objects }
}

/// `helm template` must refuse `values`; its message is returned.
fn refused(values: Values) -> String {
    match helm_template(values) {
        Ok(yaml) => panic!("helm template accepted {values:?}, expected a refusal:\n{yaml}"),
        Err(e) => e,
    }
}

fn str_of<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or_else(|| panic!("no string at {pointer} in {v:#}"))
}

fn list<'a>(v: &'a Value, pointer: &str) -> &'a [Value] {
    v.pointer(pointer).and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[])
}

impl Rendered {
    fn of_kind<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.objects.iter().filter(move |o| o["kind"] == kind)
    }

    fn find(&self, kind: &str, name: &str) -> Option<&Value> {
        self.objects.iter().find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
    }

    fn get(&self, kind: &str, name: &str) -> &Value {
        self.find(kind, name).unwrap_or_else(|| {
            let have: Vec<String> =
                self.objects.iter().map(|o| format!("{} {}", o["kind"], o["metadata"]["name"])).collect();
            panic!("no {kind} {name} rendered with {:?}; rendered: {have:?}", self.values)
        })
    }

    /// Deployments and StatefulSets.
    fn workloads(&self) -> impl Iterator<Item = &Value> {
        self.objects.iter().filter(|o| o["kind"] == "Deployment" || o["kind"] == "StatefulSet")
    }

    /// The args of the only container of workload `name` (either kind).
    fn args_of(&self, name: &str) -> Vec<String> {
        let w =
            self.workloads().find(|w| w["metadata"]["name"] == name).unwrap_or_else(|| panic!("no workload {name}"));
        let containers = list(w, "/spec/template/spec/containers");
        assert_eq!(containers.len(), 1, "{name}: one container");
        args(&containers[0])
    }
}

fn args(container: &Value) -> Vec<String> {
    list(container, "/args").iter().map(|a| a.as_str().expect("args are strings").to_string()).collect()
}

/// The value of `--flag=value` in `args` (every flag the chart writes has this form).
fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let prefix = format!("{name}=");
    args.iter().find_map(|a| a.strip_prefix(&prefix))
}

fn flags<'a>(args: &'a [String], name: &str) -> Vec<&'a str> {
    let prefix = format!("{name}=");
    args.iter().filter_map(|a| a.strip_prefix(&prefix)).collect()
}

/// A container's env var by name.
fn env_var<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    list(container, "/env").iter().find(|e| e["name"] == name)
}

/// What a binary accepts, read from its `--help`: each flag (and whether it takes a value) and
/// each environment variable it reads.
#[derive(Debug)]
struct Accepted {
    flags: HashMap<String, bool>,
    env: BTreeSet<String>,
}

/// `<binary> [subcommands] --help` of the built binaries, parsed (once per binary).
fn accepted(binary: &str, subcommands: &[String]) -> &'static Accepted {
    static CACHE: OnceLock<Mutex<HashMap<String, &'static Accepted>>> = OnceLock::new();
    let key = format!("{binary} {}", subcommands.join(" "));
    let mut cache = CACHE.get_or_init(Default::default).lock().unwrap();
    if let Some(a) = cache.get(&key) {
        return a;
    }
    let mut cmd = Command::new(bin(binary));
    cmd.args(subcommands).arg("--help");
    let out = run_bounded(cmd);
    assert!(out.status.success(), "{key} --help failed: {}", String::from_utf8_lossy(&out.stderr));
    let help = String::from_utf8(out.stdout).expect("help is UTF-8");
    let mut flags = HashMap::new();
    let mut env = BTreeSet::new();
    for line in help.lines() {
        let line = line.trim_start();
        if line.starts_with('-') {
            // "-h, --help" or "--listen <LISTEN>"
            let mut words = line.split_whitespace().map(|w| w.trim_end_matches(','));
            while let Some(word) = words.next() {
                if let Some(name) = word.strip_prefix("--") {
                    let takes_value = words.next().is_some_and(|w| w.starts_with('<'));
                    flags.insert(format!("--{name}"), takes_value);
                    break;
                }
            }
        }
        let mut rest = line;
        while let Some(at) = rest.find("[env: ") {
            rest = &rest[at + "[env: ".len()..];
            let end = rest.find(['=', ']']).expect("[env: NAME=...]");
            env.insert(rest[..end].to_string());
        }
    }
    assert!(flags.len() > 3, "{key} --help listed no flags:\n{help}");
    let a: &'static Accepted = Box::leak(Box::new(Accepted { flags, env }));
    cache.insert(key, a);
    a
}

/// `$(NAME)` references Kubernetes expands in args and env values.
fn references(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(at) = rest.find("$(") {
        rest = &rest[at + 2..];
        let end = rest.find(')').unwrap_or_else(|| panic!("unclosed $( in {s:?}"));
        out.push(&rest[..end]);
        rest = &rest[end + 1..];
    }
    out
}

/// The drift check: every flag a container is given is one its binary lists in `--help`, in the
/// form it takes (`--flag=value` for a flag with a value, bare `--flag` for a switch); every
/// `PLEDGE_*` variable it is given is one the binary reads; every `$(VAR)` is defined for
/// Kubernetes to expand.
#[test]
fn every_flag_and_variable_is_one_the_binary_accepts() {
    let mut checked_flags = BTreeSet::new();
    for values in all_configurations() {
        let r = render(values);
        let mut containers = 0;
        for w in r.workloads() {
            let name = str_of(w, "/metadata/name");
            for c in
                list(w, "/spec/template/spec/containers").iter().chain(list(w, "/spec/template/spec/initContainers"))
            {
                containers += 1;
                let command = list(c, "/command");
                assert_eq!(command.len(), 1, "{name}: the command is the binary alone: {command:?}");
                let binary = command[0].as_str().unwrap();
                let args = args(c);
                // Leading words are subcommands (`pledge serve`); everything after is a flag.
                let subcommands: Vec<String> = args.iter().take_while(|a| !a.starts_with('-')).cloned().collect();
                let accepted = accepted(binary, &subcommands);
                let env_names: Vec<&str> = list(c, "/env").iter().map(|e| e["name"].as_str().unwrap()).collect();
                for arg in &args[subcommands.len()..] {
                    assert!(arg.starts_with("--"), "{name} ({values:?}): {arg:?} is not a --flag");
                    let (flag, value) = match arg.split_once('=') {
                        Some((f, v)) => (f, Some(v)),
                        None => (arg.as_str(), None),
                    };
                    let takes_value = *accepted.flags.get(flag).unwrap_or_else(|| {
                        let mut known: Vec<_> = accepted.flags.keys().collect();
                        known.sort();
                        panic!(
                            "{name} ({values:?}) passes {flag}, which `{binary} {} --help` does not list; it accepts {known:?}",
                            subcommands.join(" ")
                        )
                    });
                    match (takes_value, value) {
                        (true, None) => panic!("{name}: {flag} takes a value, given none"),
                        (false, Some(v)) => panic!("{name}: {flag} is a switch, given {v:?}"),
                        (true, Some(v)) => assert!(!v.is_empty(), "{name}: {flag} given an empty value"),
                        (false, None) => {}
                    }
                    for var in references(arg) {
                        assert!(
                            env_names.contains(&var),
                            "{name}: {arg:?} refers to $({var}), not in its env {env_names:?}"
                        );
                    }
                    checked_flags.insert(format!("{binary} {flag}"));
                }
                for (i, e) in list(c, "/env").iter().enumerate() {
                    let var = e["name"].as_str().unwrap();
                    if var.starts_with("PLEDGE_") {
                        assert!(
                            accepted.env.contains(var),
                            "{name} ({values:?}) sets {var}, which {binary} does not read; it reads {:?}",
                            accepted.env
                        );
                    }
                    // An env value sees only the variables defined above it.
                    for r in e["value"].as_str().map(references).unwrap_or_default() {
                        assert!(env_names[..i].contains(&r), "{name}: {var} refers to $({r}), not defined above it");
                    }
                }
            }
        }
        assert!(containers >= 1, "{values:?} rendered no container");
    }
    // The check saw the flags that matter (a chart that stopped passing them would pass vacuously).
    for expected in [
        "pledge --store",
        "pledge --advertise",
        "pledge --participant",
        "pledge --client-tls-cert",
        "pledge --config",
        "pledge-kafka-adapter --transactional-id-prefix",
        "pledge-kafka-adapter --producers",
        "pledge-postgres-adapter --dedup",
        "pledge-mysql-adapter --coordinator-id",
        "pledge-mysql-adapter --auth-file",
    ] {
        assert!(checked_flags.contains(expected), "no configuration passed {expected}; checked: {checked_flags:?}");
    }
}

/// The Kafka adapter is a StatefulSet: each pod has its own journal claim and a transactional-id
/// prefix of its own, stable across its restarts; the coordinator reaches each pod by its name.
#[test]
fn kafka_adapter_is_a_statefulset_with_a_claim_and_a_prefix_per_pod() {
    for (values, replicas) in [(FULL_VALUES, 2), (SINGLE, 1)] {
        let r = render(values);
        let name = format!("{FULL}-kafka-adapter");
        assert!(r.find("Deployment", &name).is_none(), "the Kafka adapter must not be a Deployment");
        let sts = r.get("StatefulSet", &name);
        assert_eq!(sts["spec"]["replicas"], replicas);
        let service = str_of(sts, "/spec/serviceName");
        assert_eq!(r.get("Service", service)["spec"]["clusterIP"], "None", "per-pod DNS needs a headless Service");

        // The journal: on the claim template's volume.
        let claims = list(sts, "/spec/volumeClaimTemplates");
        assert_eq!(claims.len(), 1, "{claims:?}");
        let claim = str_of(&claims[0], "/metadata/name");
        let c = &list(sts, "/spec/template/spec/containers")[0];
        let args = args(c);
        let data_dir = flag(&args, "--data-dir").expect("--data-dir");
        let mount = list(c, "/volumeMounts")
            .iter()
            .find(|m| m["name"] == claim)
            .unwrap_or_else(|| panic!("the claim {claim} is not mounted"));
        assert!(data_dir.starts_with(str_of(mount, "/mountPath")), "--data-dir {data_dir} is not on the claim {mount}");
        assert!(
            !list(sts, "/spec/template/spec/volumes").iter().any(|v| v["name"] == claim),
            "a pod volume named {claim} would shadow the claim template"
        );

        // The prefix, as Kubernetes expands it in each pod: distinct per pod, and the same for
        // a pod's every restart (it depends on nothing but the pod's name and namespace).
        let prefix = flag(&args, "--transactional-id-prefix").expect("--transactional-id-prefix");
        assert!(prefix.contains("$(POD_NAME)"), "the prefix {prefix:?} is not derived from the pod's name");
        for (var, field) in [("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace")] {
            let e = env_var(c, var).unwrap_or_else(|| panic!("{var} is not set"));
            assert_eq!(str_of(e, "/valueFrom/fieldRef/fieldPath"), field);
        }
        let resource_id = flag(&args, "--resource-id").expect("--resource-id");
        let expand = |s: &str, ordinal: usize| {
            s.replace("$(POD_NAME)", &format!("{name}-{ordinal}"))
                .replace("$(POD_NAMESPACE)", NAMESPACE)
                .replace("$(POD_INDEX)", &ordinal.to_string())
        };
        let prefixes: BTreeSet<String> = (0..replicas).map(|i| expand(prefix, i)).collect();
        assert_eq!(prefixes.len(), replicas, "transactional-id prefixes are not unique per pod: {prefixes:?}");
        let ids: Vec<String> = (0..replicas).map(|i| expand(resource_id, i)).collect();
        assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), replicas, "resource ids not unique per pod: {ids:?}");
        if resource_id.contains("$(POD_INDEX)") {
            let e = env_var(c, "POD_INDEX").expect("POD_INDEX is set");
            assert_eq!(str_of(e, "/valueFrom/fieldRef/fieldPath"), "metadata.labels['apps.kubernetes.io/pod-index']");
        }

        // The coordinator names each pod's resource at that pod.
        let coordinator = r.args_of(&format!("{FULL}-coordinator"));
        let participants = flags(&coordinator, "--participant");
        for (i, id) in ids.iter().enumerate() {
            let host = format!("{name}-{i}.{service}.{NAMESPACE}.svc.cluster.local:7901");
            assert!(
                participants.iter().any(|p| p.starts_with(&format!("{id}=")) && p.ends_with(&host)),
                "the coordinator does not reach {id} at {host}: {participants:?}"
            );
        }
    }
    let e = refused(Values { files: &["ci/single-values.yaml"], sets: &["kafkaAdapter.replicas=2"] });
    assert!(e.contains("resourceIdPerPod"), "{e}");
}

/// Every adapter with a data directory keeps it on a volume that outlives the pod, and a
/// Deployment holding a claim never runs two pods (strategy Recreate).
#[test]
fn data_directories_are_on_claims() {
    for values in [DEFAULT, FULL_VALUES, SINGLE] {
        let r = render(values);
        for w in r.workloads() {
            let name = str_of(w, "/metadata/name");
            let spec = &w["spec"]["template"]["spec"];
            let c = &list(spec, "/containers")[0];
            let args = args(c);
            let Some(data_dir) = flag(&args, "--data-dir") else { continue };
            let mount = list(c, "/volumeMounts")
                .iter()
                .filter(|m| data_dir.starts_with(str_of(m, "/mountPath")))
                .max_by_key(|m| str_of(m, "/mountPath").len())
                .unwrap_or_else(|| panic!("{name}: --data-dir {data_dir} is on no volume"));
            let volume = str_of(mount, "/name");
            let cluster_coordinator = w["kind"] == "StatefulSet" && name.ends_with("-coordinator");
            if cluster_coordinator {
                // Its decisions are in the store.
                assert!(r.find("PersistentVolumeClaim", name).is_none(), "{name}: a cluster keeps no log claim");
                continue;
            }
            if w["kind"] == "StatefulSet" {
                assert!(
                    list(w, "/spec/volumeClaimTemplates").iter().any(|t| t["metadata"]["name"] == volume),
                    "{name}: {volume} is not a volumeClaimTemplate"
                );
            } else {
                let v = list(spec, "/volumes").iter().find(|v| v["name"] == volume).expect("the mounted volume");
                let claim = str_of(v, "/persistentVolumeClaim/claimName");
                let pvc = r.get("PersistentVolumeClaim", claim);
                assert_eq!(pvc["metadata"]["annotations"]["helm.sh/resource-policy"], "keep", "{claim}");
                assert_eq!(w["spec"]["strategy"]["type"], "Recreate", "{name}: two pods must never share {claim}");
                assert_eq!(w["spec"]["replicas"], 1, "{name}");
            }
        }
    }
}

/// With TLS and auth on, every server mounts its certificate, the CA and the principals file
/// read-only from the Secrets named in the values, and its flags point at those files; the
/// coordinator calls participants over https with its client certificate.
#[test]
fn tls_and_auth_secrets_are_mounted_where_the_flags_point() {
    let r = render(FULL_VALUES);
    let servers = [
        ("coordinator", "pledge-coordinator-tls"),
        ("postgres-adapter", "pledge-postgres-adapter-tls"),
        ("mysql-adapter", "pledge-mysql-adapter-tls"),
        ("kafka-adapter", "pledge-kafka-adapter-tls"),
    ];
    for (component, server_secret) in servers {
        let name = format!("{FULL}-{component}");
        let w = r.workloads().find(|w| w["metadata"]["name"] == *name).unwrap_or_else(|| panic!("no {name}"));
        let spec = &w["spec"]["template"]["spec"];
        let c = &list(spec, "/containers")[0];
        let args = args(c);
        let mut expected = vec![
            ("--tls-cert", server_secret, "tls.crt"),
            ("--tls-key", server_secret, "tls.key"),
            ("--tls-client-ca", "pledge-ca", "ca.crt"),
            ("--auth-file", "pledge-principals", "principals.toml"),
        ];
        if component == "coordinator" {
            expected.extend([
                ("--client-tls-ca", "pledge-ca", "ca.crt"),
                ("--client-tls-cert", "pledge-coordinator-client-tls", "tls.crt"),
                ("--client-tls-key", "pledge-coordinator-client-tls", "tls.key"),
            ]);
        }
        for (flag_name, secret, key) in expected {
            let path = Path::new(flag(&args, flag_name).unwrap_or_else(|| panic!("{name}: no {flag_name}")));
            let mount = list(c, "/volumeMounts")
                .iter()
                .find(|m| path.parent() == Some(Path::new(str_of(m, "/mountPath"))))
                .unwrap_or_else(|| panic!("{name}: {flag_name} {} is in no mounted directory", path.display()));
            assert_eq!(mount["readOnly"], true, "{name}: {mount}");
            assert!(mount.get("subPath").is_none(), "{name}: a subPath mount never sees a renewed Secret");
            let volume = list(spec, "/volumes").iter().find(|v| v["name"] == mount["name"]).expect("its volume");
            assert_eq!(str_of(volume, "/secret/secretName"), secret, "{name}: {flag_name}");
            assert_eq!(path.file_name().unwrap(), key, "{name}: {flag_name} is not the Secret's key {key}");
        }
    }
    // Every participant endpoint is https: a coordinator with TLS refuses anything else.
    let coordinator = r.args_of(&format!("{FULL}-coordinator"));
    for p in flags(&coordinator, "--participant") {
        assert!(p.split_once('=').unwrap().1.starts_with("https://"), "{p}");
    }
    assert!(flag(&coordinator, "--advertise").unwrap().starts_with("https://"));

    // Without TLS: no TLS flag, no Secret mounted.
    let plain = render(SINGLE);
    for w in plain.workloads() {
        let args = args(&list(w, "/spec/template/spec/containers")[0]);
        assert!(!args.iter().any(|a| a.contains("tls")), "{args:?}");
        assert!(!list(w, "/spec/template/spec/volumes").iter().any(|v| v.get("secret").is_some()));
    }
    let e = refused(Values { files: &[], sets: &["tls.enabled=true"] });
    assert!(e.contains("coordinator.tls.secretName"), "{e}");
    let e = refused(Values { files: &["ci/full-values.yaml"], sets: &["metrics.enabled=false"] });
    assert!(e.contains("kubelet gRPC probes cannot speak TLS"), "{e}");
}

/// Every pod runs as a non-root user, without privilege escalation or capabilities, on a
/// read-only root file system.
#[test]
fn containers_run_as_non_root() {
    for values in all_configurations() {
        let r = render(values);
        for w in r.workloads() {
            let name = str_of(w, "/metadata/name");
            let pod = &w["spec"]["template"]["spec"]["securityContext"];
            assert_eq!(pod["runAsNonRoot"], true, "{name}");
            assert!(pod["runAsUser"].as_u64().is_some_and(|u| u > 0), "{name}: runAsUser {}", pod["runAsUser"]);
            assert_eq!(w["spec"]["template"]["spec"]["automountServiceAccountToken"], false, "{name}");
            for c in list(w, "/spec/template/spec/containers") {
                let sc = &c["securityContext"];
                assert_ne!(sc["runAsNonRoot"], false, "{name}");
                assert_ne!(sc["runAsUser"], 0, "{name}");
                assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}");
                assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}");
                assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]), "{name}");
                assert!(c["resources"]["requests"].is_object(), "{name}: no resource requests");
            }
        }
    }
}

/// The ServiceMonitor exists only when enabled, and then selects one Service per component,
/// each exposing the port its pods' --metrics-listen serves.
#[test]
fn service_monitor_only_when_enabled() {
    for values in [DEFAULT, SINGLE] {
        assert_eq!(render(values).of_kind("ServiceMonitor").count(), 0, "{values:?}");
    }
    let r = render(FULL_VALUES);
    let monitors: Vec<&Value> = r.of_kind("ServiceMonitor").collect();
    assert_eq!(monitors.len(), 1);
    let m = monitors[0];
    assert_eq!(m["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(m["metadata"]["labels"]["release"], "kube-prometheus-stack", "serviceMonitor.labels");
    let endpoints = list(m, "/spec/endpoints");
    assert_eq!(endpoints.len(), 1);
    assert_eq!(endpoints[0]["port"], "metrics");
    assert_eq!(endpoints[0]["path"], "/metrics");
    let selector = m["spec"]["selector"]["matchLabels"].as_object().expect("matchLabels");
    let selected: Vec<&Value> =
        r.of_kind("Service").filter(|s| selector.iter().all(|(k, v)| s["metadata"]["labels"][k] == *v)).collect();
    let components: BTreeSet<&str> =
        selected.iter().map(|s| str_of(s, "/metadata/labels/app.kubernetes.io~1component")).collect();
    assert_eq!(
        components,
        BTreeSet::from(["coordinator", "kafka-adapter", "mysql-adapter", "postgres-adapter"]),
        "one scraped Service per component"
    );
    assert_eq!(selected.len(), components.len(), "a component selected twice is scraped twice");
    for s in selected {
        let port = list(s, "/spec/ports").iter().find(|p| p["name"] == "metrics").expect("a metrics port");
        let component = str_of(s, "/metadata/labels/app.kubernetes.io~1component");
        let w = r.workloads().find(|w| w["metadata"]["labels"]["app.kubernetes.io/component"] == component).unwrap();
        let c = &list(w, "/spec/template/spec/containers")[0];
        let target = list(c, "/ports").iter().find(|p| p["name"] == port["targetPort"]).expect("the target port");
        let listen = flag(&args(c), "--metrics-listen").expect("--metrics-listen").to_string();
        assert!(listen.ends_with(&format!(":{}", target["containerPort"])), "{component}: {listen} vs {target}");
    }
    let e = refused(Values { files: &[], sets: &["serviceMonitor.enabled=true", "metrics.enabled=false"] });
    assert!(e.contains("serviceMonitor.enabled needs metrics.enabled"), "{e}");
}

/// One coordinator by default: a Deployment with its log on a claim and strategy Recreate.
/// Cluster values: N instances (a StatefulSet) on the store, each advertising its own name.
#[test]
fn cluster_values_give_n_coordinators_on_the_store() {
    let name = format!("{FULL}-coordinator");
    let single = render(DEFAULT);
    let d = single.get("Deployment", &name);
    assert_eq!(d["spec"]["replicas"], 1);
    assert_eq!(d["spec"]["strategy"]["type"], "Recreate");
    let single_args = single.args_of(&name);
    assert!(flag(&single_args, "--store").is_none() && flag(&single_args, "--advertise").is_none(), "{single_args:?}");
    single.get("PersistentVolumeClaim", &name);

    let r = render(FULL_VALUES);
    assert!(r.find("Deployment", &name).is_none());
    let sts = r.get("StatefulSet", &name);
    assert_eq!(sts["spec"]["replicas"], 3);
    let headless = str_of(sts, "/spec/serviceName");
    let service = r.get("Service", headless);
    assert_eq!(service["spec"]["clusterIP"], "None");
    assert_eq!(service["spec"]["publishNotReadyAddresses"], true, "instances find each other before they are ready");
    let c = &list(sts, "/spec/template/spec/containers")[0];
    let store = env_var(c, "PLEDGE_STORE").expect("the store from its Secret");
    assert_eq!(str_of(store, "/valueFrom/secretKeyRef/name"), "pledge-store");
    let args = args(c);
    assert!(flag(&args, "--store").is_none(), "the URL from a Secret stays off the command line: {args:?}");
    assert_eq!(
        flag(&args, "--advertise"),
        Some(&*format!("https://$(POD_NAME).{headless}.{NAMESPACE}.svc.cluster.local:7600"))
    );
    assert_eq!(str_of(env_var(c, "POD_NAME").unwrap(), "/valueFrom/fieldRef/fieldPath"), "metadata.name");
    assert!(r.find("PersistentVolumeClaim", &name).is_none(), "a cluster instance keeps its decisions in the store");
    assert_eq!(r.get("PodDisruptionBudget", &name)["spec"]["maxUnavailable"], 1);

    let r = render(Values {
        files: &["ci/full-values.yaml"],
        sets: &[
            "coordinator.cluster.replicas=5",
            "coordinator.cluster.store.existingSecret=",
            "coordinator.cluster.store.url=postgres://pledge@db-rw:5432/pledge",
        ],
    });
    assert_eq!(r.get("StatefulSet", &name)["spec"]["replicas"], 5);
    assert_eq!(flag(&r.args_of(&name), "--store"), Some("postgres://pledge@db-rw:5432/pledge"));

    let e = refused(Values { files: &[], sets: &["coordinator.cluster.enabled=true"] });
    assert!(e.contains("coordinator.cluster.store.url"), "{e}");
}

/// Bad values are refused with what to set, by the templates or values.schema.json.
#[test]
fn bad_values_are_refused_with_what_to_set() {
    let cases: &[(&[&str], &str)] = &[
        (&["coordinator.typo=1"], "additional properties 'typo' not allowed"),
        (&["kafkaAdapter.resourceId=a b"], "does not match pattern"),
        (&["kafkaAdapter.enabled=true"], "kafkaAdapter.bootstrap"),
        (&["postgresAdapter.enabled=true"], "postgresAdapter.databases"),
        (&["postgresAdapter.enabled=true", "postgresAdapter.databases[0].id=orders"], "set url"),
        (
            &[
                "mysqlAdapter.enabled=true",
                "mysqlAdapter.databases[0].id=a",
                "mysqlAdapter.databases[0].url=mysql://h/a",
            ],
            "coordinator.coordinatorId",
        ),
        (&["auth.enabled=true"], "auth.existingSecret"),
        (&["coordinator.extraArgs[0]=listen"], "does not match pattern"),
    ];
    for (sets, expected) in cases {
        let e = refused(Values { files: &[], sets });
        assert!(e.contains(expected), "{sets:?}: expected {expected:?} in:\n{e}");
    }
    let e = refused(Values { files: &["ci/full-values.yaml"], sets: &["coordinator.participants.x=http://a:1"] });
    assert!(e.contains("use https://"), "{e}");
}

/// The probes: without TLS, kubelet's gRPC probes on the gRPC port, readiness asking for a
/// service name, which the real processes serve (each is started here and asked, through the
/// standard health service, for the very name the chart renders); with TLS, GET /metrics on the
/// plaintext metrics port.
#[tokio::test]
async fn probes_ask_for_what_the_processes_serve() {
    let r = render(SINGLE);
    let mut wanted: BTreeMap<String, (String, String)> = BTreeMap::new(); // binary -> (liveness, readiness service)
    for w in r.workloads() {
        let c = &list(w, "/spec/template/spec/containers")[0];
        let grpc_port =
            list(c, "/ports").iter().find(|p| p["name"] == "grpc").expect("a grpc port")["containerPort"].clone();
        for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
            assert_eq!(c[probe]["grpc"]["port"], grpc_port, "{probe} of {}", w["metadata"]["name"]);
        }
        let service = |p: &str| c[p]["grpc"]["service"].as_str().unwrap_or("").to_string();
        wanted.insert(
            list(c, "/command")[0].as_str().unwrap().to_string(),
            (service("livenessProbe"), service("readinessProbe")),
        );
    }
    assert_eq!(wanted.len(), 3, "{wanted:?}");

    let dir = TestDir::new("helm-probes");
    let coordinator = dir.coordinator_for(&[], &[], &[]).await;
    let postgres = dir.postgres_adapter("postgres-adapter", 0, &[("orders", pg_url('a'))], &[], &[]).await;
    let prefix = format!("helm-probes-{}", uuid::Uuid::now_v7());
    let kafka = dir.kafka_adapter("kafka-adapter", 0, &prefix, &[], &[]).await;
    for (binary, process) in
        [("pledge", &coordinator), ("pledge-postgres-adapter", &postgres), ("pledge-kafka-adapter", &kafka)]
    {
        let (liveness, readiness) = &wanted[binary];
        assert!(!readiness.is_empty(), "{binary}: readiness asks for no service");
        let mut health = HealthClient::new(process.channel().await);
        for service in [liveness, readiness] {
            let status = health
                .check(HealthCheckRequest { service: service.clone() })
                .await
                .unwrap_or_else(|e| panic!("{binary}: health of {service:?}: {e}"))
                .into_inner()
                .status();
            assert_eq!(status, ServingStatus::Serving, "{binary}: {service:?}");
        }
    }

    // With TLS every probe reads the metrics port.
    let r = render(FULL_VALUES);
    for w in r.workloads() {
        let c = &list(w, "/spec/template/spec/containers")[0];
        for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
            assert_eq!(c[probe]["httpGet"]["port"], "metrics", "{probe} of {}", w["metadata"]["name"]);
            assert_eq!(c[probe]["httpGet"]["path"], "/metrics");
            assert!(c[probe].get("grpc").is_none());
        }
    }
}

/// What `kubectl apply` or the controllers would reject or silently get wrong: every mount has
/// its volume, every named port a probe or Service uses exists, every selector matches its pods.
#[test]
fn mounts_ports_and_selectors_fit_together() {
    for values in all_configurations() {
        let r = render(values);
        for w in r.workloads() {
            let name = str_of(w, "/metadata/name");
            let spec = &w["spec"]["template"]["spec"];
            let pod_labels = w["spec"]["template"]["metadata"]["labels"].as_object().expect("pod labels");
            let selector = w["spec"]["selector"]["matchLabels"].as_object().expect("matchLabels");
            assert!(selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)), "{name}: selector misses its pods");
            let volumes: BTreeSet<&str> = list(spec, "/volumes")
                .iter()
                .chain(list(w, "/spec/volumeClaimTemplates").iter().map(|t| &t["metadata"]))
                .map(|v| v["name"].as_str().expect("volume name"))
                .collect();
            for c in list(spec, "/containers") {
                for m in list(c, "/volumeMounts") {
                    assert!(
                        volumes.contains(str_of(m, "/name")),
                        "{name} ({values:?}): {m} has no volume in {volumes:?}"
                    );
                }
                let ports: BTreeSet<&str> = list(c, "/ports").iter().map(|p| str_of(p, "/name")).collect();
                for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
                    if let Some(port) = c[probe]["httpGet"]["port"].as_str() {
                        assert!(ports.contains(port), "{name}: {probe} uses port {port}, not in {ports:?}");
                    }
                }
            }
            if let Some(service) = w["spec"]["serviceName"].as_str() {
                r.get("Service", service);
            }
        }
        for s in r.of_kind("Service") {
            let name = str_of(s, "/metadata/name");
            let selector = s["spec"]["selector"].as_object().expect("a Service selector");
            let pods: Vec<&Value> = r
                .workloads()
                .filter(|w| {
                    let labels = &w["spec"]["template"]["metadata"]["labels"];
                    selector.iter().all(|(k, v)| labels[k] == *v)
                })
                .collect();
            assert_eq!(pods.len(), 1, "{name}: selects {} workloads", pods.len());
            let c = &list(pods[0], "/spec/template/spec/containers")[0];
            for p in list(s, "/spec/ports") {
                let target = str_of(p, "/targetPort");
                let port = list(c, "/ports").iter().find(|cp| cp["name"] == target);
                let port = port.unwrap_or_else(|| panic!("{name}: targetPort {target} is no container port"));
                let listen = if target == "grpc" { "--listen" } else { "--metrics-listen" };
                let bound = flag(&args(c), listen).unwrap_or_else(|| panic!("{name}: no {listen}")).to_string();
                assert!(bound.ends_with(&format!(":{}", port["containerPort"])), "{name}: {listen}={bound} vs {port}");
            }
        }
    }
}
