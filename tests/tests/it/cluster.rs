//! Real `quiver agent` processes on 127.0.0.1, spoken to only through the CLI, gRPC and the
//! HTTP port: formation by seed and by `--bootstrap-expect`, forwarding, crash and restart from
//! disk, graceful stop, health and reflection for standard tools, errors.

use std::time::Duration;

use crate::grpc;
use quiver_proto::control::cluster_client::ClusterClient;
use quiver_proto::control::jobs_client::JobsClient;
use quiver_proto::control::{
    CancelJobRequest, GetJobRequest, JobSpec, Kernel, KernelParams, StatusRequest, SubmitRequest, submit_request,
};
use quiver_tests::agents::{LocalCluster, wait_for};
use serde_json::Value;
use tonic::Code;
use tonic::transport::Channel;

const READY: Duration = Duration::from_secs(20);
const CONVERGE: Duration = Duration::from_secs(15);

fn names(v: &Value) -> Vec<String> {
    let mut n: Vec<String> =
        v.as_array().into_iter().flatten().filter_map(|m| m["name"].as_str().map(str::to_string)).collect();
    n.sort();
    n
}

/// A small graph file in the cluster's directory.
fn graph(c: &LocalCluster) -> String {
    let p = c.dir.path().join("g.el");
    std::fs::write(&p, "0 1\n1 2\n2 0\n2 3\n").unwrap();
    p.display().to_string()
}

fn leader_of(c: &LocalCluster, i: usize) -> Result<String, String> {
    let r = c.cli(i, &["status"]);
    if !r.status.success() {
        return Err(r.stderr.clone());
    }
    let v = r.json();
    v["leader"].as_str().map(str::to_string).ok_or_else(|| format!("no leader: {v}"))
}

fn job_ids(c: &LocalCluster, i: usize) -> Result<Vec<u64>, String> {
    let r = c.cli(i, &["job", "list"]);
    if !r.status.success() {
        return Err(r.stderr.clone());
    }
    let mut ids: Vec<u64> = r.json().as_array().into_iter().flatten().filter_map(|j| j["id"].as_u64()).collect();
    ids.sort();
    Ok(ids)
}

fn submit(c: &LocalCluster, i: usize, g: &str) -> Result<u64, String> {
    let r = c.cli(i, &["submit", g, "--algo", "pagerank", "--iterations", "5"]);
    if !r.status.success() {
        return Err(r.stderr.clone());
    }
    r.json()["id"].as_u64().ok_or_else(|| format!("no id in {}", r.stdout))
}

#[test]
fn three_agents_form_by_seed_survive_crashes_and_stop_cleanly() {
    let mut c = LocalCluster::new(&["n1", "n2", "n3"]);
    let g = graph(&c);

    // Bootstrap, then two joins through n1's peer address.
    c.agents[0].start(&["--bootstrap"]);
    c.agents[0].wait_ready(READY);
    let seed = c.agents[0].peer_addr();
    c.agents[1].start(&["--join", &seed]);
    c.agents[2].start(&["--join", &seed]);
    c.agents[1].wait_ready(READY);
    c.agents[2].wait_ready(READY);
    for i in 0..3 {
        wait_for("every member listed on every node", CONVERGE, || {
            let r = c.cli(i, &["members"]);
            let got = if r.status.success() { names(&r.json()) } else { vec![r.stderr.clone()] };
            if got == ["n1", "n2", "n3"] { Ok(()) } else { Err(format!("node {i}: {got:?}")) }
        });
    }
    // The autopilot promotes the two learners, so the cluster survives losing any one node.
    wait_for("three voters", CONVERGE, || {
        let r = c.cli(0, &["members"]);
        let v = r.json();
        let voters = v.as_array().into_iter().flatten().filter(|m| m["role"] == "voter").count();
        if voters == 3 { Ok(()) } else { Err(v.to_string()) }
    });
    let (code, metrics) = c.agents[0].http_get("/metrics").unwrap();
    assert_eq!(code, 200);
    for name in ["quiver_raft_term", "quiver_cluster_members", "quiver_raft_commit_latency_seconds"] {
        assert!(metrics.contains(name), "{name} missing from /metrics:\n{metrics}");
    }

    // A non-leader takes a submit (forwarded to the leader); every node sees the job queued.
    let leader = leader_of(&c, 0).unwrap();
    let follower = (0..3).find(|&i| c.agents[i].name != leader).unwrap();
    let id = submit(&c, follower, &g).unwrap_or_else(|e| panic!("submit through a follower: {e}\n{}", c.logs()));
    for i in 0..3 {
        wait_for("the job replicated", CONVERGE, || {
            let r = c.cli(i, &["job", "get", &id.to_string()]);
            if r.status.success()
                && ["queued", "running", "succeeded"].contains(&r.json()["state"].as_str().unwrap_or(""))
            {
                Ok(())
            } else {
                Err(r.stdout.clone() + &r.stderr)
            }
        });
    }

    // Bad requests get clear errors, and the node keeps serving.
    let e = c.cli(follower, &["job", "get", "999999"]).err().to_string();
    assert!(e.contains("NotFound") && e.contains("job 999999 does not exist"), "{e}");
    let e = c.cli(follower, &["submit", &g, "--algo", "ppr"]).err().to_string();
    assert!(e.contains("InvalidArgument") && e.contains("params.seeds"), "{e}");
    let e = c.cli(follower, &["submit", "/nonexistent/graph.el", "--algo", "pagerank"]).err().to_string();
    assert!(e.contains("/nonexistent/graph.el"), "{e}");
    let e = c.cli(follower, &["submit", &g, "--algo", "nosuch"]).err().to_string();
    assert!(e.contains("nosuch"), "{e}");
    let e = c.cli(follower, &["submit", &g, "--algo", "pagerank", "--iterations", "-3"]).err().to_string();
    assert!(e.contains("-3"), "{e}");
    // A message above the server's 4 MiB limit is refused by tonic, not buffered.
    let big = c.dir.path().join("big.el");
    std::fs::write(&big, "0 1\n".repeat(5 << 18)).unwrap();
    let big = big.display().to_string();
    let e = c.cli(follower, &["submit", &big, "--algo", "pagerank", "--chunk-bytes", "8388608"]).err().to_string();
    assert!(e.to_lowercase().contains("message") && e.contains("too large"), "{e}");
    assert_eq!(leader_of(&c, follower).unwrap(), leader);

    // SIGKILL a follower: writes still succeed; it restarts from its data dir with no flags.
    let victim = (0..3).find(|&i| c.agents[i].name != leader).unwrap();
    c.agents[victim].kill9();
    let survivor = (0..3).find(|&i| i != victim).unwrap();
    let id2 = submit(&c, survivor, &g).unwrap_or_else(|e| panic!("submit with a follower down: {e}\n{}", c.logs()));
    c.agents[victim].start(&[]);
    c.agents[victim].wait_ready(READY);
    wait_for("the restarted follower caught up", CONVERGE, || {
        let ids = job_ids(&c, victim)?;
        if ids.contains(&id) && ids.contains(&id2) { Ok(()) } else { Err(format!("{ids:?}")) }
    });

    // SIGKILL the leader: a survivor elects a new one and takes writes; the old leader restarts
    // from disk with its state intact.
    let li = (0..3).find(|&i| c.agents[i].name == leader).unwrap();
    c.agents[li].kill9();
    let other = (0..3).find(|&i| i != li).unwrap();
    let new_leader = wait_for("a new leader", CONVERGE, || match leader_of(&c, other) {
        Ok(l) if l != leader => Ok(l),
        Ok(l) => Err(format!("still {l}")),
        Err(e) => Err(e),
    });
    let id3 = wait_for("a submit after leader failover", CONVERGE, || submit(&c, other, &g));
    c.agents[li].start(&[]);
    c.agents[li].wait_ready(READY);
    wait_for("the old leader has every job", CONVERGE, || {
        let ids = job_ids(&c, li)?;
        if [id, id2, id3].iter().all(|j| ids.contains(j)) { Ok(()) } else { Err(format!("{ids:?}")) }
    });
    assert_eq!(job_ids(&c, li).unwrap().len(), 3, "no job lost or duplicated");
    assert_ne!(new_leader, leader);

    // Leave: a follower is removed and every remaining node stops listing it.
    let current = leader_of(&c, li).unwrap_or_default();
    let leaving = (0..3).find(|&i| c.agents[i].name != current).unwrap();
    let gone = c.agents[leaving].name.clone();
    let stay = (0..3).find(|&i| i != leaving).unwrap();
    c.cli(stay, &["leave", &gone]).ok();
    for i in (0..3).filter(|&i| i != leaving) {
        wait_for("the member that left disappears", CONVERGE, || {
            let r = c.cli(i, &["members"]);
            let got = names(&r.json());
            if got.len() == 2 && !got.contains(&gone) { Ok(()) } else { Err(format!("{got:?}")) }
        });
    }
    let e = c.cli(stay, &["leave", &gone]).err().to_string();
    assert!(e.contains("not a member"), "{e}");

    // SIGTERM: graceful, exit 0.
    for i in 0..3 {
        let status = c.agents[i].sigterm(Duration::from_secs(10));
        assert!(
            status.success(),
            "{} exited with {status} after SIGTERM\n{}",
            c.agents[i].name,
            c.agents[i].log_tail()
        );
    }
}

#[test]
fn agent_refuses_a_certificate_for_another_name_and_an_empty_data_dir() {
    let mut c = LocalCluster::new(&["a1"]);
    // The certificate in a1's tls dir is for "a1"; calling the node "b1" must fail clearly.
    c.agents[0].name = "b1".into();
    c.agents[0].start(&["--bootstrap"]);
    wait_for("the agent to exit", Duration::from_secs(10), || {
        if c.agents[0].is_running() { Err("still running".into()) } else { Ok(()) }
    });
    let log = std::fs::read_to_string(&c.agents[0].log).unwrap();
    assert!(log.contains("--node-name b1"), "{log}");
    // Restarting with no flags and no cluster on disk names the way out.
    c.agents[0].name = "a1".into();
    c.agents[0].kill9();
    c.agents[0].start(&[]);
    wait_for("the agent to exit", Duration::from_secs(10), || {
        if c.agents[0].is_running() { Err("still running".into()) } else { Ok(()) }
    });
    let log = std::fs::read_to_string(&c.agents[0].log).unwrap();
    assert!(log.contains("holds no cluster"), "{log}");
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

fn spec(kernel: i32, iterations: u32) -> JobSpec {
    JobSpec {
        params: Some(KernelParams { kernel, alpha: 0.85, max_iterations: iterations, ..Default::default() }),
        ..Default::default()
    }
}

async fn submit_raw(ch: &Channel, msgs: Vec<SubmitRequest>) -> Result<u64, tonic::Status> {
    let r = JobsClient::new(ch.clone()).submit(tonic::codegen::tokio_stream::iter(msgs)).await?;
    Ok(r.into_inner().job_id)
}

fn spec_msg(s: JobSpec) -> SubmitRequest {
    SubmitRequest { body: Some(submit_request::Body::Spec(s)) }
}

fn chunk(b: Vec<u8>) -> SubmitRequest {
    SubmitRequest { body: Some(submit_request::Body::GraphChunk(b)) }
}

#[track_caller]
fn assert_status<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code, words: &[&str]) {
    let e = r.expect_err("the request should have been refused");
    assert_eq!(e.code(), code, "{e:?}");
    for w in words {
        assert!(e.message().contains(w), "{w:?} missing from {:?}", e.message());
    }
}

/// What grpcurl, grpc-health-probe and load balancers see: grpc.health.v1, reflection, and clear
/// status codes for requests the CLI would refuse before sending. The node keeps serving.
#[test]
fn standard_grpc_clients_get_health_reflection_and_clear_errors() {
    use tonic_health::ServingStatus;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let mut c = LocalCluster::new(&["h1"]);
    c.agents[0].start(&["--bootstrap"]);
    c.agents[0].wait_ready(READY);
    runtime().block_on(async {
        let ch = grpc(&c, 0).await;

        // grpc.health.v1: the server as a whole and each service by its full name.
        let mut health = HealthClient::new(ch.clone());
        for service in ["", "quiver.control.v1.Cluster", "quiver.control.v1.Jobs"] {
            let r = health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
            assert_eq!(r.status, ServingStatus::Serving as i32, "service {service:?}");
        }
        let r = health.check(HealthCheckRequest { service: "no.such.Service".into() }).await;
        assert_eq!(r.unwrap_err().code(), Code::NotFound);

        // Reflection lists our services and the health service.
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut answers = ServerReflectionClient::new(ch.clone())
            .server_reflection_info(tonic::codegen::tokio_stream::iter(vec![req]))
            .await
            .unwrap()
            .into_inner();
        let answer = answers.message().await.unwrap().expect("one reflection answer");
        let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
            panic!("not a service list: {answer:?}");
        };
        let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
        for want in ["grpc.health.v1.Health", "quiver.control.v1.Cluster", "quiver.control.v1.Jobs"] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }

        // Bad requests: each gets a status code and a message naming the field.
        let graph = || chunk(b"0 1\n1 2\n2 0\n".to_vec());
        let r = submit_raw(&ch, vec![spec_msg(spec(99, 5)), graph()]).await;
        assert_status(r, Code::InvalidArgument, &["params.kernel", "unknown algorithm 99"]);
        let r = submit_raw(&ch, vec![spec_msg(spec(Kernel::Pagerank as i32, 5))]).await;
        assert_status(r, Code::InvalidArgument, &["graph", "missing"]);
        let r = submit_raw(&ch, vec![graph()]).await;
        assert_status(r, Code::InvalidArgument, &["spec", "missing"]);
        // Iterations are unsigned on the wire (the CLI refuses a negative count before sending);
        // zero is the bad value a client can send.
        let r = submit_raw(&ch, vec![spec_msg(spec(Kernel::Pagerank as i32, 0)), graph()]).await;
        assert_status(r, Code::InvalidArgument, &["params.max_iterations"]);
        let r = JobsClient::new(ch.clone()).get(GetJobRequest { job_id: 424_242 }).await;
        assert_status(r, Code::NotFound, &["job 424242 does not exist"]);
        let r = JobsClient::new(ch.clone()).cancel(CancelJobRequest { job_id: 424_242 }).await;
        assert_status(r, Code::NotFound, &["job 424242 does not exist"]);
        // One message above the 4 MiB limit is refused by the server, not buffered.
        let big = vec![spec_msg(spec(Kernel::Pagerank as i32, 5)), chunk(vec![b'0'; 5 << 20])];
        let e = submit_raw(&ch, big).await.expect_err("an oversized message must be refused");
        assert!(e.message().contains("too large"), "{e:?}");

        // Still serving: status answers and a good submit is recorded.
        let s = ClusterClient::new(ch.clone()).status(StatusRequest {}).await.unwrap().into_inner();
        assert_eq!(s.leader_name, "h1");
        let id = submit_raw(&ch, vec![spec_msg(spec(Kernel::Pagerank as i32, 5)), graph()]).await.unwrap();
        JobsClient::new(ch.clone()).get(GetJobRequest { job_id: id }).await.unwrap();
    });
    let status = c.agents[0].sigterm(Duration::from_secs(10));
    assert!(status.success(), "exit status {status} after SIGTERM\n{}", c.agents[0].log_tail());
}

/// `--bootstrap-expect 3`: three agents that only know each other's seeds wait until all three
/// are there, then form one cluster with three voters and one leader.
#[test]
fn bootstrap_expect_three_agents_form_one_cluster_with_one_leader() {
    let mut c = LocalCluster::new(&["e1", "e2", "e3"]);
    let seeds: Vec<String> = c.agents.iter().map(|a| a.peer_addr()).collect();
    let seeds = seeds.join(",");
    let flags = ["--bootstrap-expect", "3", "--join", &seeds];
    c.agents[0].start(&flags);
    c.agents[1].start(&flags);
    // Two of three find each other and wait for the third instead of bootstrapping without it.
    for i in 0..2 {
        wait_for("a node waiting for the third", READY, || match c.agents[i].http_get("/readyz") {
            Ok((503, body)) if body.contains("--bootstrap-expect") => Ok(()),
            other => Err(format!("{other:?}")),
        });
    }
    assert!(c.agents[0].is_running() && c.agents[1].is_running(), "{}", c.logs());
    c.agents[2].start(&flags);
    for i in 0..3 {
        c.agents[i].wait_ready(READY);
    }
    for i in 0..3 {
        wait_for("one cluster of three voters on every node", CONVERGE, || {
            let r = c.cli(i, &["members"]);
            if !r.status.success() {
                return Err(r.stderr.clone());
            }
            let v = r.json();
            let voters = v.as_array().into_iter().flatten().filter(|m| m["role"] == "voter").count();
            let leaders = v.as_array().into_iter().flatten().filter(|m| m["leader"] == true).count();
            if names(&v) == ["e1", "e2", "e3"] && voters == 3 && leaders == 1 {
                Ok(())
            } else {
                Err(format!("node {i}: {v}"))
            }
        });
    }
    // Every node names the same leader: one cluster, not three single-node ones.
    let leader = wait_for("a leader", CONVERGE, || leader_of(&c, 0));
    for i in 1..3 {
        wait_for("agreement on the leader", CONVERGE, || match leader_of(&c, i) {
            Ok(now) if now == leader => Ok(()),
            other => Err(format!("node {i} says {other:?}, node 0 says {leader}")),
        });
    }
    // A write through any node reaches all.
    let g = graph(&c);
    let id = submit(&c, 2, &g).unwrap_or_else(|e| panic!("submit: {e}\n{}", c.logs()));
    for i in 0..3 {
        wait_for("the job replicated", CONVERGE, || {
            let ids = job_ids(&c, i)?;
            if ids == [id] { Ok(()) } else { Err(format!("{ids:?}")) }
        });
    }
    // A restart with the same flags resumes the cluster from disk.
    c.agents[0].kill9();
    c.agents[0].start(&flags);
    c.agents[0].wait_ready(READY);
    wait_for("the restarted node has the job", CONVERGE, || {
        let ids = job_ids(&c, 0)?;
        if ids == [id] { Ok(()) } else { Err(format!("{ids:?}")) }
    });
    for i in 0..3 {
        let status = c.agents[i].sigterm(Duration::from_secs(10));
        assert!(status.success(), "{} exited with {status}\n{}", c.agents[i].name, c.agents[i].log_tail());
    }
}
