//! Requests to the agent's control socket (Unix), shared by `lb backend`
//! and `lb reload`.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};

use super::http;
use crate::api::control::ControlAnswer;

/// Where to find the agent's control socket.
#[derive(Debug, Clone, clap::Args)]
pub struct SocketArgs {
    /// The agent's control socket (agent.control_socket).
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// Take the control socket from this config file instead.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
}

impl SocketArgs {
    /// The socket path: `--socket`, else `--config`'s, else the default.
    ///
    /// # Errors
    ///
    /// When the config cannot be read.
    pub fn path(&self) -> anyhow::Result<PathBuf> {
        crate::api::control::socket_path(self.socket.clone(), self.config.as_deref())
    }
}

/// How long a command waits for the agent's answer (a reload may take a while).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// Sends `method path` with a JSON `body` (none if empty) and returns the
/// status code and body.
///
/// # Errors
///
/// When the socket cannot be reached or the answer is not HTTP.
pub fn request(socket: &Path, method: &str, path: &str, body: &str) -> anyhow::Result<(u16, String)> {
    let ask = http::Ask { method, path, json: (!body.is_empty()).then_some(body), timeout: ANSWER_TIMEOUT };
    let answer = http::over_unix(socket, &ask)?;
    Ok((answer.status, answer.body))
}

/// Prints a [`ControlAnswer`] (each message on its own line) and fails if
/// it was a refusal.
///
/// # Errors
///
/// When the agent refused, or answered something else.
pub fn print_answer(code: u16, body: &str) -> anyhow::Result<()> {
    let answer: ControlAnswer =
        serde_json::from_str(body).with_context(|| format!("the agent answered {code}: {}", body.trim()))?;
    if answer.ok {
        for message in &answer.messages {
            println!("{message}");
        }
        Ok(())
    } else {
        bail!("{}", answer.messages.join("\n"))
    }
}
