//! The agent's side of the chaos drills: run-time control of fault injection on the HTTP port.
//!
//! - With `--fault-injection`: `GET /chaos/net` (the rules in force and the socket's counters)
//!   and `POST /chaos/net` (a JSON [`FaultRules`] that replaces every rule; `{}` clears them).
//! - With the `failpoints` build feature: `GET /chaos/failpoints`, `PUT /chaos/failpoints/NAME`
//!   (body: a `fail` action such as `return`, `panic`, `sleep(200)`, `50%return`, `off`) and
//!   `DELETE /chaos/failpoints/NAME`; and the `FAILPOINTS` environment variable at start.
//!
//! Without either, no route exists: a production agent has nothing here to abuse.

use axum::Router;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use quiver_node_agent::transport::fault::{FaultRules, NetFaults};

/// The chaos routes this agent serves (none unless asked for).
pub fn routes(faults: Option<NetFaults>) -> Router {
    let mut r = Router::new();
    if let Some(f) = faults {
        let (get_f, post_f) = (f.clone(), f);
        r = r.route(
            "/chaos/net",
            get(move || async move { show(&get_f) }).post(move |body: String| async move { set(&post_f, &body) }),
        );
    }
    failpoint_routes(r)
}

fn show(f: &NetFaults) -> impl IntoResponse + use<> {
    let body = serde_json::json!({ "rules": f.rules(), "stats": f.stats() });
    (StatusCode::OK, format!("{body}\n"))
}

fn set(f: &NetFaults, body: &str) -> impl IntoResponse + use<> {
    let body = if body.trim().is_empty() { "{}" } else { body };
    let rules: FaultRules = match serde_json::from_str(body) {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("chaos/net: {e}\n")),
    };
    match f.set(rules.clone()) {
        Ok(()) => {
            tracing::warn!(?rules, "network fault rules changed");
            (StatusCode::OK, format!("{}\n", serde_json::json!({ "rules": rules })))
        }
        Err(e) => (StatusCode::BAD_REQUEST, format!("chaos/net: {e}\n")),
    }
}

#[cfg(feature = "failpoints")]
fn failpoint_routes(r: Router) -> Router {
    use axum::extract::Path;
    use axum::routing::put;
    use quiver_node_agent::failpoints::ALL;
    let known = |name: &str| -> Result<(), (StatusCode, String)> {
        if ALL.contains(&name) {
            Ok(())
        } else {
            Err((StatusCode::NOT_FOUND, format!("failpoint {name:?} does not exist (known: {})\n", ALL.join(", "))))
        }
    };
    r.route(
        "/chaos/failpoints",
        get(|| async {
            let list: serde_json::Map<String, serde_json::Value> =
                fail::list().into_iter().map(|(n, a)| (n, a.into())).collect();
            format!("{}\n", serde_json::Value::Object(list))
        }),
    )
    .route(
        "/chaos/failpoints/{name}",
        put(move |Path(name): Path<String>, body: String| async move {
            known(&name)?;
            fail::cfg(name.clone(), body.trim()).map_err(|e| (StatusCode::BAD_REQUEST, format!("{name}: {e}\n")))?;
            tracing::warn!(failpoint = %name, action = body.trim(), "failpoint configured");
            Ok::<_, (StatusCode, String)>(format!("{name}={}\n", body.trim()))
        })
        .delete(move |Path(name): Path<String>| async move {
            known(&name)?;
            fail::remove(&name);
            tracing::warn!(failpoint = %name, "failpoint removed");
            Ok::<_, (StatusCode, String)>(format!("{name} removed\n"))
        }),
    )
}

#[cfg(not(feature = "failpoints"))]
fn failpoint_routes(r: Router) -> Router {
    r
}

/// Configures the failpoints named in `FAILPOINTS` (`name=action;name=action`), refusing unknown
/// names and bad actions. A binary built without the `failpoints` feature refuses a non-empty
/// `FAILPOINTS` rather than silently ignore it.
pub fn init_failpoints() -> anyhow::Result<()> {
    let Ok(spec) = std::env::var("FAILPOINTS") else { return Ok(()) };
    if spec.trim().is_empty() {
        return Ok(());
    }
    if !cfg!(feature = "failpoints") {
        anyhow::bail!("FAILPOINTS is set but this quiver was built without the `failpoints` feature");
    }
    for item in spec.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        let Some((name, action)) = item.split_once('=') else {
            anyhow::bail!("FAILPOINTS: {item:?} is not name=action");
        };
        let name = name.trim();
        if !quiver_node_agent::failpoints::ALL.contains(&name) {
            anyhow::bail!(
                "FAILPOINTS: failpoint {name:?} does not exist (known: {})",
                quiver_node_agent::failpoints::ALL.join(", ")
            );
        }
        fail::cfg(name, action.trim()).map_err(|e| anyhow::anyhow!("FAILPOINTS: {name}: {e}"))?;
        tracing::warn!(failpoint = name, action = action.trim(), "failpoint configured from FAILPOINTS");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_coordinator_failpoints_are_in_the_shared_list() {
        assert!(quiver_node_agent::failpoints::ALL.contains(&quiver_coordinator::failpoints::RAFT_SNAPSHOT));
        assert_eq!(quiver_coordinator::failpoints::RAFT_SNAPSHOT, quiver_node_agent::failpoints::RAFT_SNAPSHOT);
    }
}
