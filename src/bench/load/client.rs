//! A tiny HTTP/1.1 client over a tokio `TcpStream` for the load benchmark: one keep-alive
//! connection per tenant, `Content-Length` or chunked bodies, every read bounded in size
//! and time. It speaks only to the loopback server the benchmark started; it is not a
//! general client (no TLS, no redirects, no proxies).

use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Largest response body read; the server's answers here are a few KB.
const MAX_BODY: usize = 16 << 20;
/// Largest response head (status line and headers).
const MAX_HEAD: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("malformed response: {0}")]
    Protocol(String),
}

/// One request. `claimed_len` sends that `Content-Length` instead of the body's (to test
/// the server's body limit without sending the bytes).
pub struct Request<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub key: Option<&'a str>,
    pub content_type: &'a str,
    pub accept: &'a str,
    pub body: &'a [u8],
    pub claimed_len: Option<u64>,
}

impl<'a> Request<'a> {
    pub fn json(path: &'a str, key: &'a str, body: &'a [u8]) -> Self {
        Request {
            method: "POST",
            path,
            key: Some(key),
            content_type: "application/json",
            accept: "application/json",
            body,
            claimed_len: None,
        }
    }

    pub fn get(path: &'a str, key: &'a str) -> Self {
        Request {
            method: "GET",
            path,
            key: Some(key),
            content_type: "",
            accept: "application/json",
            body: &[],
            claimed_len: None,
        }
    }

    pub fn protobuf(path: &'a str, key: &'a str, body: &'a [u8]) -> Self {
        Request {
            method: "POST",
            path,
            key: Some(key),
            content_type: "application/x-protobuf",
            accept: "application/json",
            body,
            claimed_len: None,
        }
    }
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn is_protobuf(&self) -> bool {
        self.header("content-type")
            .is_some_and(|v| v.starts_with("application/x-protobuf"))
    }

    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// The body as text, cut to `n` bytes, for failure reports.
    pub fn snippet(&self, n: usize) -> String {
        let s = String::from_utf8_lossy(&self.body[..self.body.len().min(n)]).to_string();
        s.replace('\n', " ")
    }

    /// The server's suggested wait: `Retry-After-Ms`, else `Retry-After` (seconds).
    pub fn retry_after(&self) -> Option<Duration> {
        if let Some(ms) = self.header("retry-after-ms").and_then(|v| v.parse().ok()) {
            return Some(Duration::from_millis(ms));
        }
        self.header("retry-after")
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_secs)
    }
}

/// A keep-alive connection, reopened when the server closed it.
pub struct Conn {
    addr: SocketAddr,
    stream: Option<BufReader<TcpStream>>,
    timeout: Duration,
}

impl Conn {
    pub fn new(addr: SocketAddr, timeout: Duration) -> Self {
        Conn {
            addr,
            stream: None,
            timeout,
        }
    }

    /// Send one request and read its answer. A reused connection that turns out closed
    /// before any answer is reopened and the request sent once more (the server closes
    /// idle or refused connections; every request here may be repeated).
    pub async fn send(&mut self, req: &Request<'_>) -> Result<Response, ClientError> {
        let reused = self.stream.is_some();
        match tokio::time::timeout(self.timeout, self.exchange(req)).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(Stale)) if reused => {
                self.stream = None;
                match tokio::time::timeout(self.timeout, self.exchange(req)).await {
                    Ok(r) => r.map_err(ExchangeError::into_client),
                    Err(_) => {
                        self.stream = None;
                        Err(ClientError::Timeout(self.timeout))
                    }
                }
            }
            Ok(Err(e)) => {
                self.stream = None;
                Err(e.into_client())
            }
            Err(_) => {
                self.stream = None;
                Err(ClientError::Timeout(self.timeout))
            }
        }
    }

    async fn exchange(&mut self, req: &Request<'_>) -> Result<Response, ExchangeError> {
        if self.stream.is_none() {
            let s = TcpStream::connect(self.addr)
                .await
                .map_err(ExchangeError::Io)?;
            s.set_nodelay(true).map_err(ExchangeError::Io)?;
            self.stream = Some(BufReader::new(s));
        }
        let Some(stream) = self.stream.as_mut() else {
            return Err(ExchangeError::Stale);
        };
        let mut head = format!(
            "{} {} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: loraplex-bench-load\r\nAccept: {}\r\nContent-Length: {}\r\n",
            req.method,
            req.path,
            req.accept,
            req.claimed_len.unwrap_or(req.body.len() as u64)
        );
        if let Some(k) = req.key {
            head.push_str(&format!("X-API-Key: {k}\r\n"));
        }
        if !req.content_type.is_empty() {
            head.push_str(&format!("Content-Type: {}\r\n", req.content_type));
        }
        head.push_str("\r\n");
        let mut msg = head.into_bytes();
        msg.extend_from_slice(req.body);
        // The server may answer and close before reading a whole (refused) body, so a
        // failed write still looks for an answer. No answer at all on a reused connection
        // means the server had closed it: `Stale`, retried once on a fresh one.
        let _ = stream.get_mut().write_all(&msg).await;
        let mut line = Vec::new();
        let n = stream.read_until(b'\n', &mut line).await.unwrap_or(0);
        if n == 0 {
            return Err(ExchangeError::Stale);
        }
        let status_line = String::from_utf8_lossy(&line).to_string();
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| ExchangeError::Protocol(format!("status line {status_line:?}")))?;
        let mut headers = Vec::new();
        let mut head_len = line.len();
        loop {
            line.clear();
            let n = stream
                .read_until(b'\n', &mut line)
                .await
                .map_err(ExchangeError::Io)?;
            head_len += n;
            if n == 0 {
                return Err(ExchangeError::Protocol(
                    "connection closed in the head".into(),
                ));
            }
            if head_len > MAX_HEAD {
                return Err(ExchangeError::Protocol("response head too large".into()));
            }
            let l = String::from_utf8_lossy(&line);
            let l = l.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
            }
        }
        let get = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.to_ascii_lowercase())
        };
        let close = get("connection").is_some_and(|v| v.contains("close"));
        let chunked = get("transfer-encoding").is_some_and(|v| v.contains("chunked"));
        let length = get("content-length").and_then(|v| v.parse::<usize>().ok());
        let mut body = Vec::new();
        let mut read_to_end = false;
        if chunked {
            read_chunked(stream, &mut body).await?;
        } else if let Some(n) = length {
            if n > MAX_BODY {
                return Err(ExchangeError::Protocol(format!("body of {n} bytes")));
            }
            body.resize(n, 0);
            stream
                .read_exact(&mut body)
                .await
                .map_err(ExchangeError::Io)?;
        } else if !(status == 204 || status == 304 || (100..200).contains(&status)) {
            // No length: the body runs to the end of the connection.
            (&mut *stream)
                .take(MAX_BODY as u64 + 1)
                .read_to_end(&mut body)
                .await
                .map_err(ExchangeError::Io)?;
            if body.len() > MAX_BODY {
                return Err(ExchangeError::Protocol("body too large".into()));
            }
            read_to_end = true;
        }
        if close || read_to_end {
            self.stream = None;
        }
        Ok(Response {
            status,
            headers,
            body,
        })
    }
}

enum ExchangeError {
    /// The connection was closed before any answer.
    Stale,
    Io(std::io::Error),
    Protocol(String),
}
use ExchangeError::Stale;

impl ExchangeError {
    fn into_client(self) -> ClientError {
        match self {
            Stale => ClientError::Io(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "closed before any answer",
            )),
            ExchangeError::Io(e) => ClientError::Io(e),
            ExchangeError::Protocol(m) => ClientError::Protocol(m),
        }
    }
}

async fn read_chunked(
    stream: &mut BufReader<TcpStream>,
    body: &mut Vec<u8>,
) -> Result<(), ExchangeError> {
    let mut line = Vec::new();
    loop {
        line.clear();
        stream
            .read_until(b'\n', &mut line)
            .await
            .map_err(ExchangeError::Io)?;
        let text = String::from_utf8_lossy(&line);
        let size_hex = text.trim().split(';').next().unwrap_or("");
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| ExchangeError::Protocol(format!("chunk size {size_hex:?}")))?;
        if size == 0 {
            // Trailers, then the empty line.
            loop {
                line.clear();
                let n = stream
                    .read_until(b'\n', &mut line)
                    .await
                    .map_err(ExchangeError::Io)?;
                if n == 0 || line == b"\r\n" || line == b"\n" {
                    return Ok(());
                }
            }
        }
        if body.len().saturating_add(size) > MAX_BODY {
            return Err(ExchangeError::Protocol("chunked body too large".into()));
        }
        let start = body.len();
        body.resize(start + size + 2, 0);
        stream
            .read_exact(&mut body[start..])
            .await
            .map_err(ExchangeError::Io)?;
        body.truncate(start + size);
    }
}
