//! The admin HTTP server: `/status` (JSON) and `/metrics` (Prometheus text),
//! served within [`Limits`] (see [`server`]).

pub mod control;
pub mod server;
pub mod status;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use anyhow::Context as _;
use axum::{
    Json, Router,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::IntoResponse,
    routing::get,
};

pub use server::Limits;
pub use status::Status;

/// Produces a fresh snapshot for each request.
pub trait StatusSource: Send + 'static {
    /// The current status; reads the kernel's counters.
    fn status(&self) -> Status;
}

/// The agent's state, as the handlers see it.
pub type Shared = Arc<Mutex<dyn StatusSource>>;

/// Serves the admin API on `listen`, within `limits`, until the task is dropped.
///
/// # Errors
/// When `listen` cannot be bound (in use, or not a local address).
pub async fn serve(listen: SocketAddr, limits: Limits, source: Shared) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the admin server to {listen} (agent.admin_listen)"))?;
    let app = Router::new()
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/", get(status_page))
        .with_state(source);
    Ok(tokio::spawn(server::accept_loop(listener, app, limits)))
}

fn snapshot(source: &Shared) -> Result<Status, StatusCode> {
    let guard = source.lock().map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
    Ok(guard.status())
}

/// The live status page: HTML that refreshes itself from `/status`, with
/// its script and style inline (nothing loaded from the network).
const STATUS_PAGE: &str = include_str!("status.html");

async fn status_page() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], STATUS_PAGE)
}

async fn status(State(source): State<Shared>) -> Result<Json<Status>, StatusCode> {
    snapshot(&source).map(Json)
}

async fn metrics(State(source): State<Shared>, headers: HeaderMap) -> Result<impl IntoResponse, StatusCode> {
    metrics_response(&source, &headers)
}

/// OpenMetrics when the client asks for it (Prometheus does), else the
/// Prometheus text format (`curl`, `promtool check metrics`).
pub(crate) fn metrics_response(source: &Shared, headers: &HeaderMap) -> Result<impl IntoResponse + use<>, StatusCode> {
    let status = snapshot(source)?;
    let process = crate::process::read().ok();
    let body = crate::metrics::render(&status, process.as_ref()).map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    Ok(if openmetrics {
        ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body)
    } else {
        ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], crate::metrics::to_text_format(&body))
    })
}
