//! The operator's web view on the HTTP port: `/ui` (one self-contained page, no build step, no
//! CDN) and `/ui/api/state` (the JSON it polls once a second).
//!
//! The state is this node's published [`View`] (members, leader, jobs and their replicated
//! assignment) plus what only this node knows: live progress of the jobs it masters and the
//! load reports of its peers. It is read-only: nothing here proposes, dials or blocks. Secrets
//! in the replicated state (token hashes) are never exposed. The page is served with the state
//! embedded, so it shows the cluster on first paint, before any poll.

use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use quiver_coordinator::state::{JobState, Liveness, Role};
use serde_json::{Value, json};

use super::Shared;
use super::names::decode_control_addr;

/// The page: HTML with inline CSS and JavaScript.
const PAGE: &str = include_str!("../ui/index.html");
/// Where the page's initial state goes.
const STATE_SLOT: &str = "/*QUIVER_STATE*/null";

type Source = Arc<OnceLock<Shared>>;

/// The web view's routes; `source` is set once the agent's shared state exists (until then the
/// routes answer 503).
pub fn routes(source: Source) -> Router {
    Router::new()
        .route("/ui", get(page))
        .route("/ui/", get(page))
        .route("/ui/api/state", get(api_state))
        .with_state(source)
}

async fn page(State(source): State<Source>) -> Response {
    let Some(shared) = source.get() else { return starting() };
    // `<` never appears in JSON outside strings; escaping it inside strings keeps a job name
    // like "</script>" from ending the script element.
    let state = state(shared).to_string().replace('<', "\\u003c");
    let html = PAGE.replacen(STATE_SLOT, &state, 1);
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:",
            ),
        ],
        html,
    )
        .into_response()
}

async fn api_state(State(source): State<Source>) -> Response {
    let Some(shared) = source.get() else { return starting() };
    ([(header::CACHE_CONTROL, "no-store")], axum::Json(state(shared))).into_response()
}

fn starting() -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, "the agent is starting\n").into_response()
}

fn name_of(shared: &Shared, id: u64) -> String {
    let v = shared.view.borrow();
    v.state.members.get(&id).map_or_else(|| format!("node-{id}"), |m| decode_control_addr(id, &m.info.control_addr).1)
}

/// The JSON the page renders.
pub fn state(shared: &Shared) -> Value {
    let v = shared.view.borrow().clone();
    let members: Vec<Value> = v
        .state
        .members
        .values()
        .map(|m| {
            let (rpc_addr, name) = decode_control_addr(m.info.id, &m.info.control_addr);
            let me = m.info.id == shared.node_id;
            let load = if me { Some(shared.serving.load()) } else { shared.serving.peer_live_load(m.info.id) };
            json!({
                "id": m.info.id,
                "name": name,
                "role": match m.role { Role::Voter => "voter", Role::Learner => "learner" },
                "liveness": match m.liveness { Liveness::Alive => "alive", Liveness::Down => "down" },
                "leader": m.info.id == v.status.leader,
                "self": me,
                "load": load,
                "cores": m.info.cores,
                "memory_bytes": m.info.memory_bytes,
                "peer_addr": m.info.peer_addr,
                "rpc_addr": rpc_addr,
            })
        })
        .collect();
    let mut jobs: Vec<Value> = v
        .state
        .jobs
        .values()
        .rev()
        .take(50)
        .map(|j| {
            let live = shared.jobs.progress(j.id).map(|p| *p.borrow()).filter(|p| p.epoch == j.epoch);
            let (state, error) = match &j.state {
                JobState::Pending => ("pending", String::new()),
                JobState::Running => ("running", String::new()),
                JobState::Completed => ("succeeded", String::new()),
                JobState::Failed(r) => ("failed", r.clone()),
                JobState::Cancelled => ("cancelled", String::new()),
            };
            let superstep = match (&j.state, live) {
                (_, Some(p)) => p.superstep,
                (JobState::Completed, None) => u64::from(j.spec.iterations),
                _ => j.last_checkpoint.map_or(0, |c| c.superstep),
            };
            let placement: Vec<Value> = j
                .spec
                .partitions
                .iter()
                .enumerate()
                .map(|(i, shape)| {
                    let node = j.assignment.get(&(i as u32)).copied();
                    json!({
                        "partition": i,
                        "node": node,
                        "node_name": node.map(|n| name_of(shared, n)),
                        "vertices": shape.vertices,
                        "edges": shape.edges,
                    })
                })
                .collect();
            json!({
                "id": j.id,
                "name": j.spec.name,
                "kernel": j.spec.kernel,
                "state": state,
                "error": error,
                "epoch": j.epoch,
                "superstep": superstep,
                "iterations": j.spec.iterations,
                "residual": live.map(|p| p.residual),
                "live": live.is_some(),
                "placement": placement,
            })
        })
        .collect();
    jobs.truncate(50);
    json!({
        "node": { "id": v.node_id, "name": v.node_name },
        "ready": v.ready,
        "term": v.status.term,
        "commit": v.status.commit,
        "leader": (v.status.leader != 0).then(|| json!({ "id": v.status.leader, "name": name_of(shared, v.status.leader) })),
        "members": members,
        "jobs": jobs,
        "version": env!("CARGO_PKG_VERSION"),
    })
}
