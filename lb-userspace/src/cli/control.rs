//! A minimal HTTP/1.1 client for the agent's control socket (Unix), shared
//! by `lb backend` and `lb reload`.

use std::{
    io::{Read as _, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};

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

/// Sends `method path` with a JSON `body` and returns the status code and body.
///
/// # Errors
///
/// When the socket cannot be reached or the answer is not HTTP.
pub fn request(socket: &Path, method: &str, path: &str, body: &str) -> anyhow::Result<(u16, String)> {
    let mut stream = UnixStream::connect(socket).with_context(|| {
        format!(
            "connecting to the agent's control socket {} (is `lb run` running, and may you open it?)",
            socket.display()
        )
    })?;
    stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: lb\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response).context("reading the agent's answer")?;
    let (head, body) = response.split_once("\r\n\r\n").context("malformed HTTP answer")?;
    let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).context("malformed status line")?;
    // The server may answer chunked; our answers are small JSON documents.
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { unchunk(body) } else { body.to_owned() };
    Ok((code, body))
}

/// The body of a chunked answer.
fn unchunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else { break };
        if size == 0 || after.len() < size {
            break;
        }
        out.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
    out
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
