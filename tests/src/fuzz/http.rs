//! Random and mutated HTTP/1.1 requests for the admin API's fuzz test
//! (`tests/tests/admin_fuzz.rs`, issue 12).
//!
//! [`RequestGenerator::complete`] makes requests whose header ends (the
//! server must answer or close at once, whatever is wrong with them):
//! a real request of the admin or control API (`GET /status`, `/metrics`,
//! `POST /backend` with JSON, `POST /reload`), then mutations of its
//! method, target, version, header fields and body, or raw random bytes.
//! A body is always as long as its `Content-Length` says, or a chunked body
//! ends, so that no request leaves the server waiting on the client.
//!
//! [`RequestGenerator::partial`] makes the requests that do leave it
//! waiting (a header cut short, a body shorter than announced, a header
//! trickled a byte at a time): the server's timeouts must close them.

use super::Rng;

/// What a partial request leaves the server waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waiting {
    /// The rest of the header: closed after the header timeout, counted
    /// from the connection's start, however slowly bytes trickle in.
    Header,
    /// The rest of the body: closed after the idle timeout.
    Body,
}

/// One request to send.
#[derive(Debug, Clone)]
pub struct Request {
    /// The bytes, in the pieces they are sent in.
    pub pieces: Vec<Vec<u8>>,
    /// Pause between pieces (slowloris), in milliseconds.
    pub pause_ms: u64,
    /// For a partial request: what the server is left waiting for.
    pub waiting: Option<Waiting>,
    /// How it was made, e.g. `POST /backend | method PUT | header x 3`.
    pub what: String,
}

impl Request {
    /// All the bytes at once.
    #[must_use]
    pub fn bytes(&self) -> Vec<u8> {
        self.pieces.concat()
    }
}

const METHODS: &[&str] = &[
    "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "CONNECT", "TRACE", "get", "G ET", "", "GETT", "PRI",
    "\u{e9}",
];

const TARGETS: &[&str] = &[
    "/",
    "/status",
    "/metrics",
    "/backend",
    "/reload",
    "/status?x=1",
    "/status#frag",
    "//status",
    "/status/",
    "/STATUS",
    "/../etc/passwd",
    "/%2e%2e/status",
    "/%00",
    "/%zz",
    "*",
    "http://lb/status",
    "http://[::1]:9100/metrics",
    "lb:9100",
    "",
    "/\u{e9}",
    "/ status",
    "/status\t",
];

const VERSIONS: &[&str] = &["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/0.9", "HTTP/9.9", "HTTP/1.1x", "http/1.1", ""];

const FIELDS: &[&str] = &[
    "Host: lb",
    "Host:",
    "Host: a\r\nHost: b",
    "Connection: close",
    "Connection: keep-alive",
    "Connection: Upgrade\r\nUpgrade: websocket",
    "Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__",
    "Expect: 100-continue",
    "Expect: something",
    "Content-Type: application/json",
    "Content-Type: text/plain",
    "Content-Length: 0",
    "Content-Length: -1",
    "Content-Length: 1, 2",
    "Content-Length: 18446744073709551616",
    "Content-Length: abc",
    "Transfer-Encoding: gzip",
    "Transfer-Encoding: chunked, identity",
    "Accept: */*",
    "Accept-Encoding: gzip, br",
    "Authorization: Bearer x",
    "Authorization: Basic Zm9vOmJhcg==",
    "Range: bytes=0-10",
    "X-Forwarded-For: 198.18.0.1",
    "NoColon",
    ": empty-name",
    "Bad Name: x",
    " leading-space: x",
    "Folded: a\r\n b",
    "X-Nul: a\0b",
    "X-Bare-CR: a\rb",
    "X-Utf8: \u{e9}\u{2603}",
    "Cookie: a=b",
];

/// JSON bodies for `POST /backend`: right, wrong types, unknown fields, huge numbers.
const BODIES: &[&str] = &[
    r#"{"vip":"web","address":"198.18.2.11:8080","action":"drain"}"#,
    r#"{"vip":"web","address":"198.18.2.11:8080","action":"enable"}"#,
    r#"{"vip":"web","address":"198.18.2.11:8080","action":"weight","weight":3}"#,
    r#"{"vip":"web","address":"198.18.2.11:8080","action":"weight","weight":null}"#,
    r#"{"vip":"web","address":"198.18.2.11:8080","action":"weight","weight":4294967296}"#,
    r#"{"vip":"web","address":"198.18.2.11:8080","action":"weight","weight":-1}"#,
    r#"{"vip":"web","address":"198.18.2.11:8080","action":"weight","weight":1e400}"#,
    r#"{"vip":"nope","address":"198.18.2.11:8080","action":"drain"}"#,
    r#"{"vip":"web","address":"198.18.9.9:1","action":"drain"}"#,
    r#"{"vip":"web","address":"not an address","action":"drain"}"#,
    r#"{"vip":"web","address":"198.18.2.11:8080","action":"explode"}"#,
    r#"{"vip":"web","address":"198.18.2.11:8080"}"#,
    r#"{"vip":1,"address":[],"action":{}}"#,
    r#"{"vip":"web","address":"198.18.2.11:8080","action":"drain","extra":true}"#,
    r#"{"vip":"web","vip":"web2","address":"198.18.2.11:8080","action":"drain"}"#,
    r#"{"vip":"\u0000","address":"198.18.2.11:8080","action":"drain"}"#,
    r#"[]"#,
    r#"null"#,
    r#""string""#,
    r#"{"#,
    r#"{}}"#,
    "",
    "\u{feff}{}",
];

/// A deep array (a parser recursing per level must not overflow its stack).
fn deep_json(levels: usize) -> String {
    format!("{}{}", "[".repeat(levels), "]".repeat(levels))
}

/// The reproducible sequence of requests from one seed.
#[derive(Debug, Clone)]
pub struct RequestGenerator {
    rng: Rng,
}

/// A request as parts, before it is written out.
struct Parts {
    method: String,
    target: String,
    version: String,
    fields: Vec<String>,
    body: Vec<u8>,
    chunked: bool,
}

impl Parts {
    fn base(rng: &mut Rng) -> (Parts, &'static str) {
        let (method, target, body): (&str, &str, Vec<u8>) = match rng.below(5) {
            0 => ("GET", "/status", Vec::new()),
            1 => ("GET", "/metrics", Vec::new()),
            2 => ("GET", "/", Vec::new()),
            3 => ("POST", "/backend", rng.pick(BODIES).as_bytes().to_vec()),
            _ => ("POST", "/reload", Vec::new()),
        };
        let mut fields = vec!["Host: lb".to_owned()];
        if !body.is_empty() {
            fields.push("Content-Type: application/json".to_owned());
        }
        let parts = Parts {
            method: method.to_owned(),
            target: target.to_owned(),
            version: "HTTP/1.1".to_owned(),
            fields,
            body,
            chunked: false,
        };
        (parts, if method == "GET" { "get" } else { "post" })
    }

    /// The header, ending in the blank line, with a `Content-Length` or
    /// chunked framing that matches the body.
    fn header(&self) -> Vec<u8> {
        let mut head = format!("{} {} {}\r\n", self.method, self.target, self.version);
        for field in &self.fields {
            head.push_str(field);
            head.push_str("\r\n");
        }
        if self.chunked {
            head.push_str("Transfer-Encoding: chunked\r\n");
        } else if !self.body.is_empty() {
            head.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
        }
        head.push_str("\r\n");
        head.into_bytes()
    }

    fn body_bytes(&self) -> Vec<u8> {
        if !self.chunked {
            return self.body.clone();
        }
        let mut out = Vec::new();
        for chunk in self.body.chunks(7) {
            out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            out.extend_from_slice(chunk);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n\r\n");
        out
    }
}

impl RequestGenerator {
    /// Requests from `seed`.
    #[must_use]
    pub fn new(seed: u64) -> Self {
        RequestGenerator { rng: Rng::new(seed) }
    }

    /// A request whose header and body are complete: 1 in 10 raw random
    /// bytes, else a real request with 0 to 4 mutations.
    pub fn complete(&mut self) -> Request {
        if self.rng.chance(10) {
            return self.random_bytes();
        }
        let (mut parts, kind) = Parts::base(&mut self.rng);
        let mut what = format!("{kind} {}", parts.target);
        for _ in 0..self.rng.below(5) {
            what.push_str(" | ");
            what.push_str(&self.mutate(&mut parts));
        }
        let mut bytes = parts.header();
        bytes.extend(parts.body_bytes());
        if self.rng.chance(5) {
            // Pipelined: a second, plain request right behind.
            bytes.extend_from_slice(b"GET /status HTTP/1.1\r\nHost: lb\r\n\r\n");
            what.push_str(" | pipelined GET /status");
        }
        Request { pieces: vec![bytes], pause_ms: 0, waiting: None, what }
    }

    fn random_bytes(&mut self) -> Request {
        let len = 1 + self.rng.below(300);
        let mut bytes: Vec<u8> = (0..len).map(|_| self.rng.byte()).collect();
        // The header must end, or this would be a partial request.
        bytes.extend_from_slice(b"\r\n\r\n");
        Request { pieces: vec![bytes], pause_ms: 0, waiting: None, what: format!("{len} random bytes") }
    }

    /// One mutation of `parts`, described.
    fn mutate(&mut self, parts: &mut Parts) -> String {
        match self.rng.below(11) {
            0 => {
                parts.method = (*self.rng.pick(METHODS)).to_owned();
                format!("method {:?}", parts.method)
            }
            1 => {
                parts.target = (*self.rng.pick(TARGETS)).to_owned();
                format!("target {:?}", parts.target)
            }
            2 => {
                let len = *self.rng.pick(&[1_000, 8_000, 20_000, 70_000]);
                parts.target = format!("/{}", "a".repeat(len));
                format!("target of {len} bytes")
            }
            3 => {
                parts.version = (*self.rng.pick(VERSIONS)).to_owned();
                format!("version {:?}", parts.version)
            }
            4 | 5 => {
                let field = *self.rng.pick(FIELDS);
                let at = self.rng.below(parts.fields.len() + 1);
                parts.fields.insert(at, field.to_owned());
                format!("field {field:?}")
            }
            6 => {
                // Past the 16 KiB header limit, or past 64 fields.
                if self.rng.chance(50) {
                    parts.fields.push(format!("X-Big: {}", "b".repeat(20_000)));
                    "a 20,000-byte field".to_owned()
                } else {
                    parts.fields.extend((0..100).map(|i| format!("X-Many-{i}: {i}")));
                    "100 fields".to_owned()
                }
            }
            7 => {
                parts.fields.clear();
                "no fields".to_owned()
            }
            8 => {
                let len = *self.rng.pick(&[4_096, 4_097, 100_000, 2_000_000]);
                parts.body = vec![b'{'; len];
                format!("body of {len} bytes")
            }
            9 => {
                if self.rng.chance(50) {
                    parts.body = deep_json(self.rng.below(3000) + 1).into_bytes();
                    "deeply nested JSON".to_owned()
                } else {
                    parts.body = self.rng.pick(BODIES).as_bytes().to_vec();
                    format!("body {:?}", String::from_utf8_lossy(&parts.body))
                }
            }
            _ => {
                parts.chunked = !parts.chunked;
                format!("chunked {}", parts.chunked)
            }
        }
    }

    /// A request the server must give up on by its timeouts.
    pub fn partial(&mut self) -> Request {
        let (parts, _) = Parts::base(&mut self.rng);
        let header = parts.header();
        match self.rng.below(3) {
            0 => {
                // Cut inside the header (never at its end).
                let cut = 1 + self.rng.below(header.len() - 4);
                Request {
                    pieces: vec![header[..cut].to_vec()],
                    pause_ms: 0,
                    waiting: Some(Waiting::Header),
                    what: format!("header cut at byte {cut}"),
                }
            }
            1 => {
                // Slowloris: the header a byte at a time, every 500 ms, never finished.
                let pieces = header[..header.len() - 2].iter().map(|&b| vec![b]).collect();
                Request {
                    pieces,
                    pause_ms: 500,
                    waiting: Some(Waiting::Header),
                    what: "header trickled a byte every 500 ms".to_owned(),
                }
            }
            _ => {
                // A body shorter than announced, to the handler that reads it.
                let body = BODIES[0].as_bytes();
                let cut = self.rng.below(body.len());
                let mut bytes = format!(
                    "POST /backend HTTP/1.1\r\nHost: lb\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                )
                .into_bytes();
                bytes.extend_from_slice(&body[..cut]);
                Request {
                    pieces: vec![bytes],
                    pause_ms: 0,
                    waiting: Some(Waiting::Body),
                    what: format!("body cut at byte {cut} of {}", body.len()),
                }
            }
        }
    }
}

/// What came back for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// A status line and a complete header: its status code.
    Response(u16),
    /// The server closed (or reset) the connection before a whole header.
    Closed,
}

/// Reads `got` (all bytes so far): `Some` once a response header is
/// complete, with its status, else `None`.
#[must_use]
pub fn response_status(got: &[u8]) -> Option<u16> {
    let end = got.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&got[..end]).ok()?;
    let status_line = head.lines().next()?;
    let mut words = status_line.split(' ');
    let version = words.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    words.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complete_requests_end_their_header_and_partial_ones_do_not() {
        let mut g = RequestGenerator::new(3);
        for _ in 0..500 {
            let r = g.complete();
            assert!(r.bytes().windows(4).any(|w| w == b"\r\n\r\n"), "{}", r.what);
            let p = g.partial();
            let bytes = p.bytes();
            let ended = bytes.windows(4).any(|w| w == b"\r\n\r\n");
            assert_eq!(ended, p.waiting == Some(Waiting::Body), "{}", p.what);
        }
    }

    #[test]
    fn statuses_are_read_from_whole_headers_only() {
        assert_eq!(response_status(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"), Some(200));
        assert_eq!(response_status(b"HTTP/1.1 400 Bad Request\r\n"), None);
        assert_eq!(response_status(b"garbage\r\n\r\n"), None);
    }
}
