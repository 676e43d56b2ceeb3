//! A blocking HTTP/1.1 client for JSON requests on loopback.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::Value;

/// An HTTP answer.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Headers, names lowercased.
    pub headers: Vec<(String, String)>,
    /// Raw body.
    pub body: String,
}

impl Response {
    /// The body as JSON (panics with the body text if it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    /// A header value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The Calls API of one app on one server.
#[derive(Debug, Clone)]
pub struct Api {
    /// Server address.
    pub addr: SocketAddr,
    /// App id.
    pub app: String,
    /// App secret.
    pub secret: String,
}

impl Api {
    /// `POST /v1/apps/{app}/sessions/new` → session id.
    pub fn new_session(&self) -> String {
        let r = self.send("POST", "sessions/new", None);
        assert_eq!(r.status, 201, "sessions/new: {}", r.body);
        r.json()["sessionId"]
            .as_str()
            .expect("sessionId")
            .to_string()
    }

    /// A request under `/v1/apps/{app}/` with this app's secret.
    pub fn send(&self, method: &str, path: &str, body: Option<&Value>) -> Response {
        let path = format!("/v1/apps/{}/{}", self.app, path);
        let auth = format!("Bearer {}", self.secret);
        let body = body.map(|b| b.to_string());
        raw_request(
            self.addr,
            method,
            &path,
            &[
                ("Authorization", auth.as_str()),
                ("Content-Type", "text/plain;charset=UTF-8"),
            ],
            body.as_deref(),
        )
    }
}

/// Sends one request and reads the whole answer (`Connection: close`); panics on I/O
/// errors (tests want the failure where it happened).
pub fn raw_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Response {
    try_request(addr, method, path, headers, body, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// [`raw_request`] that returns I/O and parse errors, with the caller's read timeout (a
/// long poll waits longer than a test request should).
pub fn try_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
    read_timeout: Duration,
) -> std::io::Result<Response> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(read_timeout))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    let body = body.unwrap_or("");
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("no HTTP head"))?;
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let header = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v);
    let body = if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        dechunk(rest)
    } else {
        match header("content-length").and_then(|v| v.parse::<usize>().ok()) {
            Some(n) => rest.get(..n).unwrap_or(rest).to_string(),
            None => rest.to_string(),
        }
    };
    Ok(Response {
        status,
        headers,
        body,
    })
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}
