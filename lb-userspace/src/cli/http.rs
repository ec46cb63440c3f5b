//! The CLI's HTTP client for the agent's admin server (TCP) and control
//! socket (Unix): hyper's HTTP/1 client, so any status line, chunked
//! bodies and whatever else HTTP/1.1 allows are read right.

use std::{net::SocketAddr, path::Path, time::Duration};

use anyhow::Context as _;
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, body::Bytes};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

/// An answer: its status code and body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

/// A request to send.
pub struct Ask<'a> {
    pub method: &'a str,
    pub path: &'a str,
    /// JSON, sent with its content type; `None` sends no body.
    pub json: Option<&'a str>,
    /// How long the whole exchange may take.
    pub timeout: Duration,
}

/// `ask` over TCP to `addr`.
///
/// # Errors
/// When the agent cannot be reached, or does not answer HTTP in time.
pub fn over_tcp(addr: SocketAddr, ask: &Ask<'_>) -> anyhow::Result<Answer> {
    block_on(async {
        let stream = tokio::net::TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
        exchange(stream, &addr.to_string(), ask).await
    })
}

/// `ask` over the Unix socket at `path`.
///
/// # Errors
/// When the socket cannot be reached, or the agent does not answer HTTP in time.
pub fn over_unix(path: &Path, ask: &Ask<'_>) -> anyhow::Result<Answer> {
    block_on(async {
        let stream = tokio::net::UnixStream::connect(path).await.with_context(|| {
            format!(
                "connecting to the agent's control socket {} (is `lb run` running, and may you open it?)",
                path.display()
            )
        })?;
        exchange(stream, "lb", ask).await
    })
}

fn block_on<T>(work: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the CLI's I/O runtime")?
        .block_on(work)
}

/// One request on a fresh connection, answer read whole, within `ask.timeout`.
async fn exchange<S>(stream: S, host: &str, ask: &Ask<'_>) -> anyhow::Result<Answer>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let work = async {
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.context("HTTP handshake")?;
        // Drives the connection until the answer is read; ends with it.
        let driver = tokio::spawn(connection);
        let mut request = Request::builder().method(ask.method).uri(ask.path).header(hyper::header::HOST, host);
        if ask.json.is_some() {
            request = request.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let body = Full::new(Bytes::from(ask.json.unwrap_or_default().to_owned()));
        let request = request.body(body).context("building the request")?;
        let response = sender.send_request(request).await.context("sending the request")?;
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await.context("reading the answer")?.to_bytes();
        driver.abort();
        let body = String::from_utf8(bytes.to_vec()).context("the answer is not UTF-8")?;
        Ok(Answer { status, body })
    };
    tokio::time::timeout(ask.timeout, work)
        .await
        .with_context(|| format!("no answer within {}", humantime::format_duration(ask.timeout)))?
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};

    use super::*;

    /// A one-shot server that answers the first request with `raw`.
    fn serve_once(raw: &'static str) -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        std::thread::spawn(move || {
            if let Ok((mut stream, _)) = listener.accept() {
                let mut buf = [0; 1024];
                let _ = stream.read(&mut buf);
                let _ = stream.write_all(raw.as_bytes());
            }
        });
        addr
    }

    fn get(addr: SocketAddr) -> Answer {
        let ask = Ask { method: "GET", path: "/status", json: None, timeout: Duration::from_secs(5) };
        over_tcp(addr, &ask).expect("answer")
    }

    #[test]
    fn reads_a_chunked_answer_whatever_its_reason_phrase() {
        let addr =
            serve_once("HTTP/1.1 200 Fine\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\n\r\n");
        let answer = get(addr);
        assert_eq!((answer.status, answer.body.as_str()), (200, "{\"a\":1}"));
    }

    #[test]
    fn reads_an_http_1_0_answer_and_its_status() {
        let addr = serve_once("HTTP/1.0 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy");
        let answer = get(addr);
        assert_eq!((answer.status, answer.body.as_str()), (503, "busy"));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let addr = serve_once("SMTP ready\r\n\r\n");
        let ask = Ask { method: "GET", path: "/", json: None, timeout: Duration::from_secs(5) };
        assert!(over_tcp(addr, &ask).is_err());
    }
}
