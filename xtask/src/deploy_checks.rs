//! Tidy checks for `deploy/` that need no Docker engine or cluster (`cargo test -p xtask`):
//! the Kubernetes manifests parse and agree with each other and with the agent's flags, the two
//! Dockerfiles describe the same image, compose.yaml wires three agents through a seed, the
//! systemd unit carries its hardening (and passes `systemd-analyze verify` where that exists),
//! and the example `quiver.toml` files use only keys the agent reads.
//!
//! The live checks are elsewhere: the Compose cluster test in `docker.rs`, the Prometheus rules
//! and Grafana queries against a running agent in `tests/tests/it/deploy.rs`.

#![cfg(test)]

use std::collections::BTreeSet;

use serde_yaml::Value;

use crate::root;

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

/// Every document of every manifest in deploy/k8s (kustomization.yaml aside).
fn k8s_documents() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let dir = root().join("deploy/k8s");
    let mut files: Vec<_> =
        std::fs::read_dir(&dir).expect("deploy/k8s").map(|e| e.expect("dir entry").path()).collect();
    files.sort();
    for path in files {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if !name.ends_with(".yaml") || name == "kustomization.yaml" {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        // Documents are separated by `---` lines (serde_yaml reads one document per call).
        for doc in text.split("\n---\n") {
            let v: Value = serde_yaml::from_str(doc).unwrap_or_else(|e| panic!("{name}: {e}"));
            if !v.is_null() {
                out.push((name.clone(), v));
            }
        }
    }
    out
}

fn of_kind<'a>(docs: &'a [(String, Value)], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|(_, d)| d["kind"].as_str() == Some(kind)).map(|(_, d)| d).collect()
}

fn str_map(v: &Value) -> BTreeSet<(String, String)> {
    v.as_mapping()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.as_str().unwrap_or("").to_string(), v.as_str().unwrap_or("").to_string()))
                .collect()
        })
        .unwrap_or_default()
}

/// Keys of the agent's `quiver.toml`: the fields of `FileConfig` in daemon/src/config.rs.
fn agent_file_keys() -> BTreeSet<String> {
    let text = read("daemon/src/config.rs");
    let start = text.find("struct FileConfig {").expect("FileConfig in config.rs");
    let body = &text[start..start + text[start..].find("\n}").expect("end of FileConfig")];
    body.lines().filter_map(|l| l.trim().split_once(": Option<").map(|(k, _)| k.trim().to_string())).collect()
}

fn assert_agent_toml(what: &str, text: &str) -> toml::Table {
    let table: toml::Table = text.parse().unwrap_or_else(|e| panic!("{what}: {e}"));
    let known = agent_file_keys();
    assert!(known.len() > 10, "FileConfig parsing found only {known:?}");
    for key in table.keys() {
        assert!(known.contains(key), "{what}: `{key}` is not a quiver.toml option (known: {known:?})");
    }
    table
}

#[test]
fn kubernetes_manifests_fit_together() {
    let docs = k8s_documents();
    for kind in ["StatefulSet", "Service", "PodDisruptionBudget", "ConfigMap"] {
        assert!(!of_kind(&docs, kind).is_empty(), "deploy/k8s has no {kind}");
    }
    for (file, d) in &docs {
        assert!(d["apiVersion"].as_str().is_some() && d["metadata"]["name"].as_str().is_some(), "{file}: {d:?}");
    }
    let sts = of_kind(&docs, "StatefulSet")[0];
    let spec = &sts["spec"];
    let pod_labels = str_map(&spec["template"]["metadata"]["labels"]);
    let selector = str_map(&spec["selector"]["matchLabels"]);
    assert!(
        !selector.is_empty() && selector.is_subset(&pod_labels),
        "StatefulSet selector {selector:?} ⊄ {pod_labels:?}"
    );
    assert!(spec["replicas"].as_u64().unwrap_or(0) >= 3, "three voters at least");

    // serviceName names a headless Service that selects the pods and publishes not-ready
    // addresses (the seeds must resolve before any pod is ready).
    let service_name = spec["serviceName"].as_str().expect("serviceName");
    let services = of_kind(&docs, "Service");
    let headless = services
        .iter()
        .find(|s| s["metadata"]["name"].as_str() == Some(service_name))
        .unwrap_or_else(|| panic!("no Service named {service_name}"));
    assert_eq!(headless["spec"]["clusterIP"].as_str(), Some("None"), "{service_name} must be headless");
    assert_eq!(headless["spec"]["publishNotReadyAddresses"].as_bool(), Some(true));
    for s in &services {
        let sel = str_map(&s["spec"]["selector"]);
        assert!(!sel.is_empty() && sel.is_subset(&pod_labels), "Service selector {sel:?} ⊄ {pod_labels:?}");
    }
    let svc_ports: BTreeSet<(u64, String)> = headless["spec"]["ports"]
        .as_sequence()
        .expect("service ports")
        .iter()
        .map(|p| (p["port"].as_u64().unwrap(), p["protocol"].as_str().unwrap_or("TCP").to_string()))
        .collect();
    let want: BTreeSet<(u64, String)> =
        [(7400, "UDP"), (7401, "TCP"), (7402, "TCP")].map(|(p, s)| (p, s.to_string())).into();
    assert_eq!(svc_ports, want, "headless Service ports");

    let pdb = of_kind(&docs, "PodDisruptionBudget")[0];
    let pdb_sel = str_map(&pdb["spec"]["selector"]["matchLabels"]);
    assert!(pdb_sel.is_subset(&pod_labels), "PDB selector {pdb_sel:?} ⊄ {pod_labels:?}");
    assert_eq!(pdb["spec"]["maxUnavailable"].as_u64(), Some(1), "a 3-voter Raft group survives one disruption");

    let pod = &spec["template"]["spec"];
    let sc = &pod["securityContext"];
    assert_eq!(sc["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(sc["runAsUser"].as_u64(), Some(65532), "the images' user");
    let anti = &pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0];
    assert_eq!(anti["topologyKey"].as_str(), Some("kubernetes.io/hostname"));
    assert!(str_map(&anti["labelSelector"]["matchLabels"]).is_subset(&pod_labels));

    let agent = pod["containers"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|c| c["args"][0].as_str() == Some("agent"))
        .expect("a container running `quiver agent`");
    let ports: Vec<(String, u64, String)> = agent["ports"]
        .as_sequence()
        .expect("container ports")
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["containerPort"].as_u64().unwrap(),
                p["protocol"].as_str().unwrap_or("TCP").to_string(),
            )
        })
        .collect();
    let port_named = |name: &str| ports.iter().find(|p| p.0 == name).map(|p| p.1);
    assert_eq!(ports.len(), 3, "{ports:?}");
    assert!(ports.contains(&("peer".into(), 7400, "UDP".into())), "{ports:?}");
    assert!(ports.contains(&("grpc".into(), 7401, "TCP".into())), "{ports:?}");
    assert!(ports.contains(&("http".into(), 7402, "TCP".into())), "{ports:?}");
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &agent[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{probe}");
        let port = get["port"].as_str().map_or_else(|| get["port"].as_u64(), port_named);
        assert_eq!(port, Some(7402), "{probe} must hit the HTTP port");
    }
    for r in ["requests", "limits"] {
        let res = &agent["resources"][r];
        assert!(res["cpu"].as_str().is_some() && res["memory"].as_str().is_some(), "resources.{r}");
    }
    assert_eq!(agent["securityContext"]["allowPrivilegeEscalation"].as_bool(), Some(false));

    // The agent's listen addresses (ConfigMap) match the ports; the seeds are the pods' stable names.
    let cm = of_kind(&docs, "ConfigMap")[0];
    let toml_text = cm["data"]["quiver.toml"].as_str().expect("ConfigMap data quiver.toml");
    let cfg = assert_agent_toml("ConfigMap quiver.toml", toml_text);
    for (key, port) in [("peer_addr", 7400), ("grpc_addr", 7401), ("http_addr", 7402)] {
        let addr = cfg[key].as_str().unwrap_or_else(|| panic!("{key} in the ConfigMap"));
        assert!(addr.ends_with(&format!(":{port}")), "{key} = {addr}");
    }
    let data_dir = cfg["data_dir"].as_str().expect("data_dir");
    let args: Vec<&str> = agent["args"].as_sequence().unwrap().iter().filter_map(Value::as_str).collect();
    let config_arg = args.iter().position(|a| *a == "--config").map(|i| args[i + 1]).expect("--config");
    let mounts = agent["volumeMounts"].as_sequence().expect("volumeMounts");
    assert!(
        mounts.iter().any(|m| m["mountPath"].as_str() == Some(config_arg)),
        "the ConfigMap is mounted at {config_arg}"
    );
    assert!(mounts.iter().any(|m| m["mountPath"].as_str() == Some(data_dir)), "a volume is mounted at {data_dir}");
    let claims = spec["volumeClaimTemplates"].as_sequence().expect("volumeClaimTemplates");
    let data_mount = mounts.iter().find(|m| m["mountPath"].as_str() == Some(data_dir)).unwrap();
    assert!(claims.iter().any(|c| c["metadata"]["name"] == data_mount["name"]), "the data dir is a per-pod volume");
    let join = args.iter().position(|a| *a == "--join").map(|i| args[i + 1]).expect("--join");
    let sts_name = sts["metadata"]["name"].as_str().unwrap();
    for i in 0..3 {
        let seed = format!("{sts_name}-{i}.{service_name}.$(POD_NAMESPACE).svc:7400");
        assert!(join.split(',').any(|s| s == seed), "--join {join} lacks {seed}");
    }
}

/// The `KEY VALUE…` instructions of a Dockerfile from USER on (the runtime stage's tail),
/// with line continuations joined.
fn runtime_instructions(text: &str) -> Vec<String> {
    let joined = text.replace("\\\n", " ");
    let lines: Vec<String> = joined
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let user = lines.iter().position(|l| l.starts_with("USER ")).expect("a USER instruction");
    lines[user..].to_vec()
}

#[test]
fn the_two_dockerfiles_build_the_same_image() {
    let registry = read("deploy/docker/Dockerfile");
    let local = read("deploy/docker/Dockerfile.local");
    let tail = runtime_instructions(&registry);
    assert_eq!(tail, runtime_instructions(&local), "Dockerfile and Dockerfile.local differ after USER");
    for want in [
        "USER 65532:65532",
        "VOLUME [\"/var/lib/quiver\"]",
        "EXPOSE 7400/udp 7401/tcp 7402/tcp",
        "ENTRYPOINT [\"/usr/local/bin/quiver\"]",
    ] {
        assert!(tail.iter().any(|l| l == want), "missing `{want}` in {tail:#?}");
    }
    let health = tail.iter().find(|l| l.starts_with("HEALTHCHECK ")).expect("HEALTHCHECK");
    assert!(health.contains("\"health\""), "the health check runs `quiver health`: {health}");
    // Multi-stage: a builder stage and a runtime stage that copies the binary from it.
    assert!(registry.matches("\nFROM ").count() >= 2, "multi-stage");
    assert!(registry.contains("COPY --from=build"), "the runtime copies from the build stage");
    assert!(local.contains("FROM scratch"), "the local image needs no pull");
}

#[test]
fn compose_runs_three_agents_through_one_seed() {
    let mut v: Value = serde_yaml::from_str(&read("deploy/compose.yaml")).expect("compose.yaml");
    // The services share settings through YAML merge keys (`<<: *agent`), as Compose resolves them.
    v.apply_merge().expect("compose.yaml merge keys");
    let services = v["services"].as_mapping().expect("services");
    let agents: Vec<(&str, &Value)> = services
        .iter()
        .filter(|(_, s)| s["command"][0].as_str() == Some("agent"))
        .map(|(k, s)| (k.as_str().unwrap(), s))
        .collect();
    assert_eq!(agents.len(), 3, "three agents");
    let bootstraps: Vec<&str> = agents
        .iter()
        .filter(|(_, s)| s["command"].as_sequence().unwrap().iter().any(|a| a.as_str() == Some("--bootstrap")))
        .map(|(k, _)| *k)
        .collect();
    assert_eq!(bootstraps, ["agent1"], "exactly the first agent bootstraps");
    for (name, s) in &agents {
        assert!(s["image"].as_str().is_some_and(|i| i.contains("quiver:local")), "{name} image");
        let vols: Vec<&str> = s["volumes"].as_sequence().unwrap().iter().filter_map(Value::as_str).collect();
        assert!(vols.iter().any(|m| m.ends_with(":/var/lib/quiver")), "{name} has a data volume: {vols:?}");
        if *name != "agent1" {
            let cmd: Vec<&str> = s["command"].as_sequence().unwrap().iter().filter_map(Value::as_str).collect();
            assert_eq!(cmd, ["agent", "--join", "agent1:7400"], "{name} joins through the seed");
        }
    }
    let ports: Vec<&str> = services
        .get("agent1")
        .and_then(|a| a["ports"].as_sequence())
        .expect("agent1 ports")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        ports.contains(&"127.0.0.1:${QUIVER_GRPC_PORT:-7401}:7401")
            && ports.contains(&"127.0.0.1:${QUIVER_HTTP_PORT:-7402}:7402"),
        "{ports:?}"
    );
    for (_, s) in services {
        for p in s["ports"].as_sequence().into_iter().flatten() {
            assert!(p.as_str().is_some_and(|p| p.starts_with("127.0.0.1:")), "published on loopback only: {p:?}");
        }
    }
}

#[test]
fn systemd_unit_is_hardened_and_verifies() {
    let unit = read("deploy/systemd/quiver.service");
    let directives: BTreeSet<String> =
        unit.lines().map(str::trim).filter(|l| !l.starts_with('#') && l.contains('=')).map(String::from).collect();
    for want in [
        "DynamicUser=yes",
        "StateDirectory=quiver",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "ReadWritePaths=/var/lib/quiver",
        "CapabilityBoundingSet=",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "Restart=on-failure",
        "KillSignal=SIGTERM",
    ] {
        assert!(directives.contains(want), "quiver.service lacks `{want}`");
    }
    assert!(directives.iter().any(|d| d.starts_with("TimeoutStopSec=")), "TimeoutStopSec");
    let exec = directives.iter().find(|d| d.starts_with("ExecStart=")).expect("ExecStart");
    assert!(exec.contains(" agent --config /etc/quiver/quiver.toml"), "{exec}");
    let example = assert_agent_toml("deploy/systemd/quiver.toml", &read("deploy/systemd/quiver.toml"));
    assert_eq!(example["data_dir"].as_str(), Some("/var/lib/quiver"), "the unit's StateDirectory");
    // Without capabilities the agent can widen its UDP receive buffer for job supersteps (4 MiB by
    // default) only up to net.core.rmem_max: the sysctl drop-in must allow at least that.
    let sysctl = read("deploy/systemd/90-quiver.conf");
    let rmem_max: u64 = sysctl
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .find_map(|l| l.split_once('=').filter(|(k, _)| k.trim() == "net.core.rmem_max"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .expect("90-quiver.conf sets net.core.rmem_max");
    assert!(rmem_max >= 4 << 20, "net.core.rmem_max {rmem_max} is below the default --job-udp-buffer of 4 MiB");

    // `systemd-analyze verify` where systemd exists: it checks every directive against this
    // systemd and that ExecStart's program exists (pointed at a stand-in executable here).
    let Ok(out) = std::process::Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("systemd-analyze not found: structural checks only");
        return;
    };
    assert!(out.status.success());
    let dir = std::env::temp_dir().join(format!("quiver-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let unit_path = dir.join("quiver.service");
    std::fs::write(&unit_path, unit.replace("/usr/local/bin/quiver", "/bin/true")).unwrap();
    let out = std::process::Command::new("systemd-analyze").arg("verify").arg(&unit_path).output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // Unknown or malformed directives are warnings with exit 0, so any output fails the check.
    assert!(out.status.success() && said.trim().is_empty(), "systemd-analyze verify: {said}");
}
