//! The API's HTTP/1.1 server on a Unix socket: one thread accepts, one thread a connection;
//! each request is parsed (httparse), checked (sizes, JSON with no unknown fields), and sent
//! to the run loop as a [`Command::Api`](crate::machine::Command::Api), whose reply is written
//! back. `GET /events` streams from the [`EventHub`] with chunked encoding until the client
//! goes away or the run ends. One request per connection (`Connection: close`).

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use super::events::{EventHub, MAX_QUEUE_EVENTS, Next, QUEUE_EVENTS, StreamFormat};
use super::{AddProbes, ApiReply, ApiRequest, ProbeSelector, VersionReply};
use crate::machine::{Command, CommandSender};

/// Largest request head (request line and headers).
pub const MAX_HEAD: usize = 16 * 1024;
/// Largest request body.
pub const MAX_BODY: usize = 1024 * 1024;
/// About how many bytes of events a stream writes at once.
const STREAM_CHUNK: usize = 16 * 1024;
/// How long a stream gathers events before it writes them.
const STREAM_BATCH: Duration = Duration::from_millis(5);

/// Errors of setting up the API socket.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// Something that is not a socket is at the path.
    #[error("--api-socket {0}: the path exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// A live hvprobe (or anything else) answers at the path.
    #[error("--api-socket {0}: another process is listening there")]
    InUse(PathBuf),
    /// The socket could not be created.
    #[error("--api-socket {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// Binds the API socket at `path`, owner-only (0600). A stale socket (nothing listening) left
/// by a dead hvprobe is replaced; anything else at the path is refused.
pub fn bind(path: &Path) -> Result<UnixListener, HttpError> {
    let io_err = |source| HttpError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(HttpError::NotASocket(path.to_path_buf()));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(HttpError::InUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(io_err)?;
    }
    // SAFETY: umask(2) only changes this process's file-creation mask; the socket file is
    // created owner-only from the start, with no window in which others could connect.
    let old = unsafe { libc::umask(0o177) };
    let listener = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = listener.map_err(io_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io_err)?;
    Ok(listener)
}

/// What every connection needs.
pub struct ApiContext {
    /// The run loop.
    pub commands: CommandSender,
    /// Event streams.
    pub hub: Arc<EventHub>,
    /// hvprobe's version string.
    pub version: String,
    /// The guest's architecture.
    pub arch: String,
}

/// Serves `listener` on a thread of its own, a thread per connection.
pub fn serve(listener: UnixListener, ctx: Arc<ApiContext>) -> io::Result<()> {
    std::thread::Builder::new()
        .name("hvprobe-api".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let ctx = ctx.clone();
                let _ = std::thread::Builder::new()
                    .name("hvprobe-api-conn".into())
                    .spawn(move || handle_connection(conn, &ctx));
            }
        })
        .map(|_| ())
}

/// A parsed request.
#[derive(Debug, PartialEq, Eq)]
pub struct HttpRequest {
    /// `GET`, `PUT`, ...
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The query's `key=value` pairs, percent-decoded.
    pub query: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

/// Why a request could not be read; each is answered with its status.
#[derive(Debug, PartialEq, Eq)]
pub struct BadRequest {
    /// The HTTP status.
    pub status: u16,
    /// What was wrong.
    pub message: String,
}

fn bad(status: u16, message: impl Into<String>) -> BadRequest {
    BadRequest {
        status,
        message: message.into(),
    }
}

/// Reads one request from `r`: the head up to [`MAX_HEAD`], a body of `Content-Length` up to
/// [`MAX_BODY`].
pub fn read_request(r: &mut impl Read) -> Result<HttpRequest, BadRequest> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let head_len = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            if at + 4 > MAX_HEAD {
                return Err(bad(431, format!("request head over {MAX_HEAD} bytes")));
            }
            break at + 4;
        }
        if buf.len() > MAX_HEAD {
            return Err(bad(431, format!("request head over {MAX_HEAD} bytes")));
        }
        let n = r
            .read(&mut chunk)
            .map_err(|e| bad(400, format!("reading the request: {e}")))?;
        if n == 0 {
            return Err(bad(400, "the connection closed before the request ended"));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(&buf[..head_len]) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(bad(400, "incomplete request head")),
        Err(e) => return Err(bad(400, format!("malformed request: {e}"))),
    }
    let method = req.method.unwrap_or_default().to_string();
    let target = req.path.unwrap_or_default();
    let mut length = 0usize;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            length = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| bad(400, "bad Content-Length"))?;
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(bad(411, "send the body with a Content-Length"));
        }
    }
    if length > MAX_BODY {
        return Err(bad(413, format!("body over {MAX_BODY} bytes")));
    }
    let mut body = buf[head_len..].to_vec();
    while body.len() < length {
        let n = r
            .read(&mut chunk)
            .map_err(|e| bad(400, format!("reading the body: {e}")))?;
        if n == 0 {
            return Err(bad(400, "the connection closed before the body ended"));
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(length);
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    Ok(HttpRequest {
        method,
        path: path.to_string(),
        query: query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (percent_decode(k), percent_decode(v))
            })
            .collect(),
        body,
    })
}

/// `%XX` escapes and `+` decoded.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What a request asks for: a request for the run loop, a stream, or a reply at once.
#[derive(Debug, PartialEq)]
pub enum Route {
    /// For the run loop.
    Loop(ApiRequest),
    /// `GET /events`.
    Stream {
        /// Its format.
        format: StreamFormat,
        /// The events asked for (empty: all).
        events: Vec<String>,
        /// Events its queue holds before it loses some.
        queue: usize,
    },
    /// Answered here.
    Reply(ApiReply),
}

/// The route of `req`.
pub fn route(req: &HttpRequest, ctx_version: &VersionReply) -> Route {
    let query = |key: &str| {
        req.query
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .collect::<Vec<_>>()
    };
    let unknown_query = req
        .query
        .iter()
        .find(|(k, _)| !matches!(k.as_str(), "event" | "format" | "pattern" | "queue"));
    if let Some((k, _)) = unknown_query {
        return Route::Reply(ApiReply::error(400, format!("unknown query parameter {k}")));
    }
    let segments: Vec<&str> = req.path.trim_matches('/').split('/').collect();
    let method = req.method.as_str();
    let no_body = |r: ApiRequest| {
        if req.body.is_empty() {
            Route::Loop(r)
        } else {
            Route::Reply(ApiReply::error(
                400,
                format!("{method} {} takes no body", req.path),
            ))
        }
    };
    match (method, segments.as_slice()) {
        ("GET", [""]) => Route::Reply(ApiReply::ok(ctx_version)),
        ("GET", ["probes"]) => no_body(ApiRequest::ListProbes),
        ("PUT" | "POST", ["probes"]) => match serde_json::from_slice::<AddProbes>(&req.body) {
            Ok(add) if add.probes.is_empty() => {
                Route::Reply(ApiReply::error(400, "no probes given"))
            }
            Ok(add) => Route::Loop(ApiRequest::AddProbes(add.probes)),
            Err(e) => Route::Reply(ApiReply::error(400, format!("bad JSON body: {e}"))),
        },
        ("DELETE", ["probes"]) => match query("event").as_slice() {
            [] => no_body(ApiRequest::RemoveProbes(ProbeSelector::All)),
            [event] => no_body(ApiRequest::RemoveProbes(ProbeSelector::Event(
                event.clone(),
            ))),
            _ => Route::Reply(ApiReply::error(400, "one event at a time")),
        },
        ("DELETE", ["probes", id]) => match id.parse() {
            Ok(id) => no_body(ApiRequest::RemoveProbes(ProbeSelector::Id(id))),
            Err(_) => Route::Reply(ApiReply::error(400, format!("bad probe id {id}"))),
        },
        ("GET", ["events"]) => {
            let format = match query("format").first().map(String::as_str) {
                None | Some("text") => StreamFormat::Text,
                Some("json") => StreamFormat::Json,
                Some(other) => {
                    return Route::Reply(ApiReply::error(
                        400,
                        format!("unknown format {other} (text or json)"),
                    ));
                }
            };
            let events = query("event")
                .iter()
                .flat_map(|e| e.split(','))
                .filter(|e| !e.is_empty())
                .map(String::from)
                .collect();
            let queue = match query("queue").first() {
                None => QUEUE_EVENTS,
                Some(q) => match q.parse() {
                    Ok(n @ 1..=MAX_QUEUE_EVENTS) => n,
                    _ => {
                        return Route::Reply(ApiReply::error(
                            400,
                            format!("queue {q}: 1 to {MAX_QUEUE_EVENTS} events"),
                        ));
                    }
                },
            };
            Route::Stream {
                format,
                events,
                queue,
            }
        }
        ("GET", ["stats"]) => no_body(ApiRequest::Stats),
        ("GET", ["integrity"]) => no_body(ApiRequest::Integrity),
        ("GET", ["functions"]) => match query("pattern").as_slice() {
            [] => no_body(ApiRequest::Functions("*".into())),
            [p] => no_body(ApiRequest::Functions(p.clone())),
            _ => Route::Reply(ApiReply::error(400, "one pattern at a time")),
        },
        ("PUT" | "POST", ["detach"]) => no_body(ApiRequest::Detach),
        ("PUT" | "POST", ["stop"]) => no_body(ApiRequest::Stop),
        (
            _,
            ["" | "probes" | "events" | "stats" | "detach" | "stop" | "functions" | "integrity"],
        )
        | (_, ["probes", _]) => Route::Reply(ApiReply::error(
            405,
            format!("{method} is not allowed on {}", req.path),
        )),
        _ => Route::Reply(ApiReply::error(404, format!("no endpoint {}", req.path))),
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        422 => "Unprocessable Entity",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// Writes `reply` as a complete response.
pub fn write_reply(w: &mut impl Write, reply: &ApiReply) -> io::Result<()> {
    let body = format!("{}\n", reply.body);
    write!(
        w,
        "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        reply.status,
        reason(reply.status),
        body.len()
    )?;
    w.flush()
}

fn handle_connection(mut conn: UnixStream, ctx: &ApiContext) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let req = match read_request(&mut conn) {
        Ok(r) => r,
        Err(e) => {
            let _ = write_reply(&mut conn, &ApiReply::error(e.status, e.message));
            return;
        }
    };
    let version = VersionReply {
        version: ctx.version.clone(),
        arch: ctx.arch.clone(),
    };
    let reply = match route(&req, &version) {
        Route::Reply(r) => r,
        Route::Loop(request) => {
            let (tx, rx) = mpsc::channel();
            if ctx.commands.send(Command::Api { request, reply: tx }) {
                rx.recv()
                    .unwrap_or_else(|_| ApiReply::error(503, "the VM has stopped"))
            } else {
                ApiReply::error(503, "the VM has stopped")
            }
        }
        Route::Stream {
            format,
            events,
            queue,
        } => {
            let _ = stream(&mut conn, &ctx.hub, format, events, queue);
            return;
        }
    };
    let _ = write_reply(&mut conn, &reply);
}

/// Whether the peer of `conn` has closed its end.
fn peer_gone(conn: &UnixStream) -> bool {
    let mut pfd = libc::pollfd {
        fd: conn.as_raw_fd(),
        events: libc::POLLIN | libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: poll(2) on one valid pollfd that lives on this stack frame, without waiting.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n > 0 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

fn chunk(w: &mut impl Write, data: &str) -> io::Result<()> {
    write!(w, "{:x}\r\n{data}\r\n", data.len())?;
    w.flush()
}

/// Streams events to `conn` until it goes away or the run ends.
fn stream(
    conn: &mut UnixStream,
    hub: &EventHub,
    format: StreamFormat,
    events: Vec<String>,
    queue: usize,
) -> io::Result<()> {
    let sub = hub.subscribe_with_capacity(format, events, queue);
    let content_type = match format {
        StreamFormat::Text => "text/plain; charset=utf-8",
        StreamFormat::Json => "application/x-ndjson",
    };
    let result = (|| {
        write!(
            conn,
            "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )?;
        conn.flush()?;
        loop {
            match sub.next(Duration::from_millis(500)) {
                Next::Event(mut lines) => {
                    // What else comes within a few milliseconds goes in the same chunk: a
                    // write per event would cost the host (and, in the emulated runner, L1's
                    // one CPU, which the vCPUs share) more than the events.
                    std::thread::sleep(STREAM_BATCH);
                    lines.push_str(&sub.drain(STREAM_CHUNK));
                    chunk(conn, &lines)?
                }
                Next::Lost(n) => chunk(
                    conn,
                    &match format {
                        StreamFormat::Text => format!("lost={n}\n"),
                        StreamFormat::Json => format!("{{\"lost\":{n}}}\n"),
                    },
                )?,
                Next::Idle if peer_gone(conn) => return Ok(()),
                Next::Idle => {}
                Next::Closed => {
                    conn.write_all(b"0\r\n\r\n")?;
                    return conn.flush();
                }
            }
        }
    })();
    hub.unsubscribe(&sub);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(raw: &str) -> Result<HttpRequest, BadRequest> {
        read_request(&mut raw.as_bytes())
    }

    fn routed(raw: &str) -> Route {
        let v = VersionReply {
            version: "v".into(),
            arch: "x86_64".into(),
        };
        match req(raw) {
            Ok(r) => route(&r, &v),
            Err(e) => Route::Reply(ApiReply::error(e.status, e.message)),
        }
    }

    fn status(raw: &str) -> u16 {
        match routed(raw) {
            Route::Reply(r) => r.status,
            Route::Loop(_) | Route::Stream { .. } => 200,
        }
    }

    #[test]
    fn requests_route_to_what_they_ask() {
        let body = r#"{"probes":["p:hv/open do_sys_openat2","vfs_read"]}"#;
        let put = format!(
            "PUT /probes HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        assert_eq!(
            routed(&put),
            Route::Loop(ApiRequest::AddProbes(vec![
                "p:hv/open do_sys_openat2".into(),
                "vfs_read".into()
            ]))
        );
        assert_eq!(
            routed("DELETE /probes/7 HTTP/1.1\r\n\r\n"),
            Route::Loop(ApiRequest::RemoveProbes(ProbeSelector::Id(7)))
        );
        assert_eq!(
            routed("DELETE /probes?event=hv%2Fopen HTTP/1.1\r\n\r\n"),
            Route::Loop(ApiRequest::RemoveProbes(ProbeSelector::Event(
                "hv/open".into()
            )))
        );
        assert_eq!(
            routed("GET /events?format=json&event=hv/a,hv/b HTTP/1.1\r\n\r\n"),
            Route::Stream {
                format: StreamFormat::Json,
                events: vec!["hv/a".into(), "hv/b".into()],
                queue: QUEUE_EVENTS,
            }
        );
        assert_eq!(
            routed("PUT /detach HTTP/1.1\r\n\r\n"),
            Route::Loop(ApiRequest::Detach)
        );
    }

    #[test]
    fn bad_requests_get_their_status() {
        // Malformed JSON, unknown fields, an empty list, a wrong method, an unknown path.
        for (raw, want) in [
            (
                "PUT /probes HTTP/1.1\r\nContent-Length: 5\r\n\r\n{\"pro",
                400,
            ),
            (
                "PUT /probes HTTP/1.1\r\nContent-Length: 28\r\n\r\n{\"probes\":[],\"other\":true}  ",
                400,
            ),
            (
                "PUT /probes HTTP/1.1\r\nContent-Length: 13\r\n\r\n{\"probes\":[]}",
                400,
            ),
            ("GET /detach HTTP/1.1\r\n\r\n", 405),
            ("GET /nothing HTTP/1.1\r\n\r\n", 404),
            ("DELETE /probes/x HTTP/1.1\r\n\r\n", 400),
            ("GET /events?format=xml HTTP/1.1\r\n\r\n", 400),
            ("GET /events?queue=0 HTTP/1.1\r\n\r\n", 400),
            ("GET /probes?color=red HTTP/1.1\r\n\r\n", 400),
            ("PUT /stop HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", 400),
            ("GARBAGE\r\n\r\n", 400),
        ] {
            assert_eq!(status(raw), want, "{raw}");
        }
        let huge = format!(
            "PUT /probes HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        assert_eq!(status(&huge), 413);
        let long_head = format!(
            "GET /probes HTTP/1.1\r\nX: {}\r\n\r\n",
            "a".repeat(MAX_HEAD)
        );
        assert_eq!(status(&long_head), 431);
        assert_eq!(
            status("PUT /probes HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            411
        );
    }

    #[test]
    fn the_socket_is_owner_only_and_refuses_what_it_must_not_replace() {
        let dir = std::env::temp_dir().join(format!("hvprobe-api-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let _ = std::fs::remove_file(&path);
        let listener = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // Live: refused.
        assert!(matches!(bind(&path), Err(HttpError::InUse(_))));
        // Stale (nothing listening): replaced.
        drop(listener);
        let again = bind(&path).unwrap();
        drop(again);
        // Not a socket: refused and left alone.
        let file = dir.join("file");
        std::fs::write(&file, "keep").unwrap();
        assert!(matches!(bind(&file), Err(HttpError::NotASocket(_))));
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
