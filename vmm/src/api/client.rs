//! The client side of the API, for `hvprobe probe|trace|stats|detach|stop`: one HTTP/1.1
//! request per connection over the Unix socket, and the chunked event stream read line by
//! line.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// Errors of talking to a running hvprobe.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens at the socket.
    #[error("--api-socket {path}: no hvprobe is listening there ({source})")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The exchange failed half-way.
    #[error("talking to hvprobe: {0}")]
    Io(#[from] io::Error),
    /// The answer was not HTTP as hvprobe speaks it.
    #[error("hvprobe answered something that is not an HTTP response: {0}")]
    Protocol(String),
}

/// A response: status and body.
#[derive(Debug)]
pub struct Response {
    /// The HTTP status.
    pub status: u16,
    /// The body (JSON).
    pub body: String,
}

impl Response {
    /// The `error` field of an error body, or the body itself.
    pub fn error_message(&self) -> String {
        serde_json::from_str::<super::ErrorReply>(&self.body)
            .map(|e| e.error)
            .unwrap_or_else(|_| self.body.trim().to_string())
    }
}

fn connect(path: &Path) -> Result<UnixStream, ClientError> {
    UnixStream::connect(path).map_err(|source| ClientError::Connect {
        path: path.to_path_buf(),
        source,
    })
}

fn send_request(
    conn: &mut UnixStream,
    method: &str,
    target: &str,
    body: Option<&str>,
) -> io::Result<()> {
    let body = body.unwrap_or("");
    write!(
        conn,
        "{method} {target} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    conn.flush()
}

/// Reads the status line and headers; returns the status and whether the body is chunked.
fn read_head(r: &mut impl BufRead) -> Result<(u16, Option<usize>, bool), ClientError> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ClientError::Protocol(line.trim().to_string()))?;
    let (mut length, mut chunked) = (None, false);
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Err(ClientError::Protocol("the headers did not end".into()));
        }
        let l = line.trim_end();
        if l.is_empty() {
            return Ok((status, length, chunked));
        }
        if let Some((k, v)) = l.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().ok();
            } else if k.eq_ignore_ascii_case("transfer-encoding") && v.trim() == "chunked" {
                chunked = true;
            }
        }
    }
}

/// Sends one request to the hvprobe at `socket` and returns its response.
pub fn request(
    socket: &Path,
    method: &str,
    target: &str,
    body: Option<&str>,
) -> Result<Response, ClientError> {
    let mut conn = connect(socket)?;
    send_request(&mut conn, method, target, body)?;
    let mut r = BufReader::new(conn);
    let (status, length, _) = read_head(&mut r)?;
    let mut body = String::new();
    match length {
        Some(n) => {
            let mut buf = vec![0u8; n];
            r.read_exact(&mut buf)?;
            body = String::from_utf8_lossy(&buf).into_owned();
        }
        None => {
            r.read_to_string(&mut body)?;
        }
    }
    Ok(Response { status, body })
}

/// Streams `GET target` from the hvprobe at `socket`, calling `line` with each line of the
/// chunked body until it returns false, the stream ends, or the connection closes. Returns
/// the status; a non-200 answer's body goes to `line` once.
pub fn stream(
    socket: &Path,
    target: &str,
    mut line: impl FnMut(&str) -> bool,
) -> Result<u16, ClientError> {
    let mut conn = connect(socket)?;
    send_request(&mut conn, "GET", target, None)?;
    let mut r = BufReader::new(conn);
    let (status, length, chunked) = read_head(&mut r)?;
    if !chunked {
        let mut body = vec![0u8; length.unwrap_or(0)];
        r.read_exact(&mut body)?;
        line(&String::from_utf8_lossy(&body));
        return Ok(status);
    }
    let mut pending = String::new();
    let mut size_line = String::new();
    loop {
        size_line.clear();
        if r.read_line(&mut size_line)? == 0 {
            return Ok(status);
        }
        let size = usize::from_str_radix(size_line.trim(), 16)
            .map_err(|_| ClientError::Protocol(format!("chunk size {size_line:?}")))?;
        if size == 0 {
            return Ok(status);
        }
        let mut data = vec![0u8; size + 2];
        r.read_exact(&mut data)?;
        pending.push_str(&String::from_utf8_lossy(&data[..size]));
        while let Some(at) = pending.find('\n') {
            let l: String = pending.drain(..=at).collect();
            if !line(l.trim_end_matches('\n')) {
                return Ok(status);
            }
        }
    }
}
