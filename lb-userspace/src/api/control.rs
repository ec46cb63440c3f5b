//! The admin API's state-changing half, on a Unix socket (`agent.control_socket`,
//! mode 0660, group `agent.control_group`): who may change the gateway is
//! whoever may open the socket, which the file system decides. `/status` and
//! `/metrics` are served there too, and stay read-only on TCP.
//!
//! - `POST /backend` with `{"vip": NAME, "address": ADDR, "action": "drain" | "disable" | "enable" | "weight", "weight": N | null}`;
//! - `POST /reload`: the same reload as SIGHUP, answered with what changed or why it was refused.
//!
//! Handlers only queue the request for the agent's event loop (which owns
//! the health checkers and the running config) and wait for its answer, at
//! most [`ANSWER_TIMEOUT`]. Bodies are at most [`MAX_BODY`] bytes (else 413);
//! headers and idle connections are bounded as on TCP (`server::Limits`).

use std::{
    net::SocketAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};
use axum::{
    Json, Router,
    extract::{DefaultBodyLimit, State},
    http::StatusCode,
    routing::{get, post},
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::{Limits, Shared, server, status};

/// Largest request body accepted on the control socket.
pub const MAX_BODY: usize = 4096;
/// How long a request waits for the agent's answer before 504.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// What `POST /backend` asks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendRequest {
    /// The VIP's name.
    pub vip: String,
    pub address: SocketAddr,
    pub action: BackendAction,
    /// For `weight`: the new weight, or `null` to go back to the config's.
    #[serde(default)]
    pub weight: Option<u32>,
}

/// A runtime change to one backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendAction {
    /// No new flows; existing flows continue.
    Drain,
    /// Maintenance: down at once, its flows move.
    Disable,
    /// Undoes drain and disable.
    Enable,
    /// Sets or clears the runtime weight.
    Weight,
}

/// A request for the agent's event loop.
#[derive(Debug)]
pub enum ControlRequest {
    Backend(BackendRequest),
    Reload,
}

/// The agent's answer: what happened, for a person and for scripts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlAnswer {
    /// Whether it was applied.
    pub ok: bool,
    /// One line per change applied, or the refusal (`FILE: KEY: REASON`).
    pub messages: Vec<String>,
}

/// A queued request and where its answer goes.
#[derive(Debug)]
pub struct Pending {
    pub request: ControlRequest,
    pub answer: oneshot::Sender<ControlAnswer>,
}

#[derive(Clone)]
struct ControlState {
    source: Shared,
    requests: mpsc::Sender<Pending>,
}

/// Where and how the control API is served.
#[derive(Clone, Debug)]
pub struct ControlListen<'a> {
    /// The Unix socket (mode 0660).
    pub socket: &'a Path,
    /// The group given the socket, if any.
    pub group: Option<&'a str>,
    /// An optional TCP address, where every request needs `token`.
    pub tcp: Option<(SocketAddr, String)>,
}

/// Binds the control socket (mode 0660, its group if set; a stale socket no
/// one answers on is replaced) and, if configured, the TCP control address,
/// and serves both. Over TCP every request must carry `Authorization:
/// Bearer <token>`, else 401.
///
/// # Errors
///
/// When another process answers on the socket, the group does not exist, or
/// a listener cannot be bound.
pub async fn serve(
    listen: ControlListen<'_>,
    limits: Limits,
    source: Shared,
    requests: mpsc::Sender<Pending>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let path = listen.socket;
    let listener = bind(path, listen.group).with_context(|| format!("agent.control_socket: {}", path.display()))?;
    let app = Router::new()
        .route("/status", get(status_json))
        .route("/metrics", get(metrics_text))
        .route("/backend", post(backend))
        .route("/reload", post(reload))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(ControlState { source, requests });
    let mut servers = vec![tokio::spawn(server::accept_loop_unix(listener, app.clone(), limits))];
    if let Some((address, token)) = listen.tcp {
        let tcp = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("binding the control API to {address} (agent.control_listen)"))?;
        let token = std::sync::Arc::new(token);
        let app = app.layer(axum::middleware::from_fn(move |request, next| {
            let token = token.clone();
            async move { require_token(&token, request, next).await }
        }));
        servers.push(tokio::spawn(server::accept_loop(tcp, app, limits)));
    }
    Ok(servers)
}

/// Passes the request on only if it carries the bearer token; 401 otherwise.
async fn require_token(
    token: &str,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let given = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given.is_some_and(|given| same_secret(given.trim().as_bytes(), token.as_bytes())) {
        return next.run(request).await;
    }
    let answer =
        ControlAnswer { ok: false, messages: vec!["a bearer token is required (agent.control_token_file)".into()] };
    (StatusCode::UNAUTHORIZED, [(axum::http::header::WWW_AUTHENTICATE, "Bearer")], Json(answer)).into_response()
}

/// Compares two secrets in time that depends only on their lengths.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Reads the bearer token from `path`: its first line, trimmed, not empty.
///
/// # Errors
///
/// When the file cannot be read or holds no token.
pub fn read_token(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("agent.control_token_file: reading {}", path.display()))?;
    let token = text.lines().next().unwrap_or_default().trim().to_owned();
    if token.is_empty() {
        bail!("agent.control_token_file: {} holds no token", path.display());
    }
    Ok(token)
}

fn bind(path: &Path, group: Option<&str>) -> anyhow::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("another process answers on it (another lb agent?)");
        }
        std::fs::remove_file(path).with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(path).context("binding")?;
    if let Some(group) = group {
        chown_group(path, group)?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).context("setting mode 0660")?;
    Ok(listener)
}

/// Gives `path` to `group` (by name).
fn chown_group(path: &Path, group: &str) -> anyhow::Result<()> {
    let name = std::ffi::CString::new(group).context("agent.control_group: a group name has no NUL")?;
    // SAFETY: getgrnam reads a valid C string; the result is read at once.
    let entry = unsafe { libc::getgrnam(name.as_ptr()) };
    if entry.is_null() {
        bail!("agent.control_group: no group {group:?}");
    }
    // SAFETY: a non-null pointer getgrnam returned.
    let gid = unsafe { (*entry).gr_gid };
    std::os::unix::fs::chown(path, None, Some(gid)).with_context(|| format!("giving it to group {group}"))
}

async fn status_json(State(state): State<ControlState>) -> Result<Json<status::Status>, StatusCode> {
    super::snapshot(&state.source).map(Json)
}

async fn metrics_text(
    State(state): State<ControlState>,
    headers: axum::http::HeaderMap,
) -> Result<impl axum::response::IntoResponse, StatusCode> {
    super::metrics_response(&state.source, &headers)
}

async fn backend(
    State(state): State<ControlState>,
    Json(request): Json<BackendRequest>,
) -> (StatusCode, Json<ControlAnswer>) {
    ask(&state, ControlRequest::Backend(request)).await
}

async fn reload(State(state): State<ControlState>) -> (StatusCode, Json<ControlAnswer>) {
    ask(&state, ControlRequest::Reload).await
}

/// Queues `request` for the event loop and waits (bounded) for its answer:
/// 200 when applied, 409 when refused, 503/504 when the agent cannot answer.
async fn ask(state: &ControlState, request: ControlRequest) -> (StatusCode, Json<ControlAnswer>) {
    let (answer, answered) = oneshot::channel();
    let refused = |code, message: &str| (code, Json(ControlAnswer { ok: false, messages: vec![message.to_owned()] }));
    if state.requests.send(Pending { request, answer }).await.is_err() {
        return refused(StatusCode::SERVICE_UNAVAILABLE, "the agent is stopping");
    }
    match tokio::time::timeout(ANSWER_TIMEOUT, answered).await {
        Ok(Ok(answer)) => (if answer.ok { StatusCode::OK } else { StatusCode::CONFLICT }, Json(answer)),
        Ok(Err(_)) => refused(StatusCode::SERVICE_UNAVAILABLE, "the agent is stopping"),
        Err(_) => refused(StatusCode::GATEWAY_TIMEOUT, "the agent did not answer in time"),
    }
}

/// The control socket a CLI command talks to: `--socket`, else the one in
/// `--config`'s file, else the default.
///
/// # Errors
///
/// When the config cannot be read.
pub fn socket_path(socket: Option<PathBuf>, config: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(socket) = socket {
        return Ok(socket);
    }
    match config {
        Some(path) => Ok(crate::config::Config::load(path)?.agent.control_socket),
        None => Ok(PathBuf::from(crate::config::DEFAULT_CONTROL_SOCKET)),
    }
}
