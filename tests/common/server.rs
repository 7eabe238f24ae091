//! A real `loraplex serve` process for end-to-end tests, and a tiny HTTP/1.1 client.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Server(pub Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// GET a path; the response's status line and body (tiny HTTP/1.1 client, no deps).
pub fn get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

pub fn sdk_python() -> PathBuf {
    if let Some(p) = std::env::var_os("LORAPLEX_SDK_PYTHON") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    home.join(".cache/loraplex/venv-sdk/bin/python")
}

pub fn start_server(data_dir: &Path) -> (Server, u16) {
    start_server_with(data_dir, &[])
}

/// The same, with extra environment variables (settings) for the server.
pub fn start_server_with(data_dir: &Path, env: &[(&str, &str)]) -> (Server, u16) {
    start_server_cmd(data_dir, &[], env)
}

/// The same, with extra arguments to `loraplex serve` (e.g. `--model NAME=PATH`).
pub fn start_server_cmd(data_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> (Server, u16) {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_loraplex"))
        .arg("serve")
        .args(args)
        .env("LORAPLEX_ADDR", format!("127.0.0.1:{port}"))
        .env("LORAPLEX_DATA_DIR", data_dir)
        .env("LORAPLEX_MODEL_PATH", super::model_path())
        .env("RUST_LOG", "warn,loraplex=info")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start loraplex serve");
    let mut server = Server(child);
    // Forward the server's log to ours (visible with --nocapture).
    if let Some(err) = server.0.stderr.take() {
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("[server] {line}");
            }
        });
    }
    let t = Instant::now();
    loop {
        if let Some(r) = get(port, "/healthz") {
            if r.contains("\"model_loaded\":true") {
                break;
            }
        }
        if let Ok(Some(status)) = server.0.try_wait() {
            panic!("loraplex serve exited early: {status}");
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "server not ready in 120 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    (server, port)
}

/// One request on a fresh connection: status, headers (lower-case names) and body.
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    key: &str,
    content_type: &str,
    body: &[u8],
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(120)))
        .expect("timeout");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nX-API-Key: {key}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).expect("write");
    s.write_all(body).expect("write");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete response");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, raw[split + 4..].to_vec())
}
