//! The agent's HTTP port (default 7402): `/metrics` in the Prometheus text format, `/healthz`
//! (the process is alive and its event loop answers) and `/readyz` (a member of a cluster that
//! has a leader). The page and its state are read-only views; nothing here mutates the node.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

/// What the health endpoints report; updated by the agent's event loop.
#[derive(Debug, Default)]
pub struct Health {
    ready: AtomicBool,
    reason: std::sync::Mutex<String>,
}

impl Health {
    /// Records whether this node is ready and, if not, why (shown by `/readyz`).
    pub fn set_ready(&self, ready: bool, reason: impl Into<String>) {
        self.ready.store(ready, Ordering::Release);
        *self.reason.lock().unwrap_or_else(|e| e.into_inner()) = reason.into();
    }

    /// Whether this node is ready.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}

#[derive(Clone)]
struct AppState {
    health: Arc<Health>,
    metrics: PrometheusHandle,
}

/// Binds the HTTP listener (so a bad address fails start-up, not later) and returns the server
/// future; `extra` routes are served beside the health and metrics pages (the agent's chaos
/// controls, when enabled; otherwise empty).
pub async fn bind(
    addr: SocketAddr,
    health: Arc<Health>,
    metrics: PrometheusHandle,
    extra: Router,
) -> std::io::Result<(SocketAddr, impl Future<Output = std::io::Result<()>>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(AppState { health, metrics })
        .merge(extra);
    Ok((local, async move { axum::serve(listener, app).await }))
}

async fn render_metrics(State(s): State<AppState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.metrics.render())
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    if s.health.is_ready() {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        let reason = s.health.reason.lock().unwrap_or_else(|e| e.into_inner()).clone();
        (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n"))
    }
}
