//! The HTTP side: listeners (UNIX socket, TCP), request threads, and the checks every request
//! passes before it reaches a route (size limits, authentication, host, CSRF, read-only).

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use serde_json::{json, Value};

use super::client::Endpoint;
use super::metrics::Metrics;
use super::{api, dashboard, AdminBuilder};
use crate::error::{Error, Result};
use crate::queue::{Queue, WeakQueue};

/// Largest request body accepted (bulk actions carry at most 1,000 ids).
pub(crate) const MAX_BODY: usize = 64 << 10;
/// Longest request target (path and query) accepted.
pub(crate) const MAX_URL: usize = 4096;
/// Most query parameters accepted, and the longest value.
const MAX_PARAMS: usize = 16;
const MAX_PARAM_LEN: usize = 512;

/// Headers every response carries.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// What the server keeps. The queue is held weakly: a running admin server does not keep the
/// directory open (`Queue::close` works while it runs; it then answers 503).
pub(crate) struct Shared {
    pub queue: WeakQueue,
    pub csrf: String,
    pub token: Option<String>,
    pub read_only: bool,
    pub metrics: Arc<Metrics>,
}

/// What every request handler can reach (the queue upgraded for the request).
pub(crate) struct App<'a> {
    pub queue: Queue,
    pub csrf: &'a str,
    pub read_only: bool,
    pub metrics: &'a Metrics,
}

/// Which listener a request came through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Via {
    Unix,
    Tcp { loopback: bool },
}

/// A request that passed the generic checks.
pub(crate) struct Req {
    pub method: Method,
    pub path: String,
    pub query: Vec<(String, String)>,
    pub body: Vec<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Method {
    Get,
    Post,
}

impl Req {
    /// The value of query parameter `name`, if given (the last one wins).
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A response before it is written.
pub(crate) struct Resp {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    pub headers: Vec<(&'static str, String)>,
}

impl Resp {
    pub fn json(status: u16, v: &Value) -> Resp {
        Resp {
            status,
            content_type: "application/json",
            body: serde_json::to_vec_pretty(v).unwrap_or_else(|_| b"{}".to_vec()),
            headers: Vec::new(),
        }
    }

    /// A JSON error document: `{"error": {"status", "code", "message"}}`.
    pub fn error(status: u16, code: &str, message: impl Into<String>) -> Resp {
        Resp::json(
            status,
            &json!({"error": {"status": status, "code": code, "message": message.into()}}),
        )
    }

    pub fn html(status: u16, body: String) -> Resp {
        Resp {
            status,
            content_type: "text/html; charset=utf-8",
            body: body.into_bytes(),
            headers: Vec::new(),
        }
    }

    pub fn text(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Resp {
        Resp {
            status,
            content_type,
            body: body.into(),
            headers: Vec::new(),
        }
    }

    pub fn redirect(to: &str) -> Resp {
        let mut r = Resp::text(303, "text/plain; charset=utf-8", "see other");
        r.headers.push(("Location", to.to_string()));
        r
    }

    /// The response for an engine error (status by kind, the error's own message).
    pub fn from_error(e: &Error) -> Resp {
        let (status, code) = match e {
            Error::NotFound(_) => (404, "not_found"),
            Error::InvalidState { .. } => (409, "invalid_state"),
            Error::Invalid { .. } => (400, "bad_request"),
            Error::Closed => (503, "closed"),
            _ => (500, "internal"),
        };
        Resp::error(status, code, e.to_string())
    }
}

/// A running admin server. Dropping it stops it (like [`stop`](AdminServer::stop)).
pub struct AdminServer {
    endpoints: Vec<Endpoint>,
    servers: Vec<Arc<tiny_http::Server>>,
    threads: Vec<JoinHandle<()>>,
    /// Each request thread sends one message here as it exits (so `stop` can bound its wait).
    exited: crossbeam_channel::Receiver<()>,
    stop: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    unix_path: Option<PathBuf>,
}

/// How long `stop` waits for requests being handled (a client that stalls mid-request must not
/// hold up the application's shutdown: its thread is left to finish on its own).
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

impl AdminServer {
    /// Where it listens: the UNIX socket first (if any), then TCP (with the actual port).
    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    /// The UNIX socket's path, if it listens on one.
    pub fn unix_socket_path(&self) -> Option<&Path> {
        self.unix_path.as_deref()
    }

    /// The TCP address (with the actual port), if it listens on TCP.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.endpoints.iter().find_map(|e| match e {
            Endpoint::Tcp(a) => Some(*a),
            Endpoint::Unix(_) => None,
        })
    }

    /// Stops listening, waits (up to 5 s) for requests being handled, and removes the socket
    /// file.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Release);
        for s in &self.servers {
            for _ in 0..self.threads.len() {
                s.unblock();
            }
        }
        let deadline = std::time::Instant::now() + STOP_GRACE;
        let mut left = self.threads.len();
        while left > 0 {
            let wait = deadline.saturating_duration_since(std::time::Instant::now());
            if self.exited.recv_timeout(wait).is_err() {
                tracing::warn!(
                    threads = left,
                    "admin server: requests still being handled after {STOP_GRACE:?}; leaving them to finish"
                );
                break;
            }
            left -= 1;
        }
        for t in self.threads.drain(..) {
            if t.is_finished() {
                let _ = t.join();
            }
        }
        self.metrics.stop();
        // Dropping the servers closes the listeners (tiny_http removes its socket file).
        self.servers.clear();
        if let Some(p) = &self.unix_path {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn storage(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Storage(format!("admin server: {what}: {e}"))
}

fn random_hex() -> String {
    let bytes: [u8; 16] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Binds the UNIX socket so that nobody else can connect even for an instant: it is created in
/// a directory only we can enter (0700), then made 0600.
fn bind_unix(path: &Path, default_dir: bool) -> Result<tiny_http::Server> {
    use std::os::unix::fs::PermissionsExt;
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if default_dir {
        std::fs::create_dir_all(parent)
            .map_err(|e| storage("cannot create the socket directory", e))?;
        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| storage("cannot restrict the socket directory", e))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(storage(
                "cannot listen",
                format!("{} is already served by another server", path.display()),
            ));
        }
        // Left behind by a process that died; we hold the queue's lock, so it is ours.
        std::fs::remove_file(path).map_err(|e| storage("cannot remove a stale socket", e))?;
    }
    let server = tiny_http::Server::http_unix(path)
        .map_err(|e| storage(&format!("cannot listen on {}", path.display()), e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| storage("cannot restrict the socket", e))?;
    Ok(server)
}

pub(crate) fn start(b: AdminBuilder) -> Result<AdminServer> {
    let metrics = Metrics::start(&b.queue)?;
    let app = Arc::new(Shared {
        queue: b.queue.downgrade(),
        csrf: random_hex(),
        token: b.token.clone(),
        read_only: b.read_only,
        metrics: metrics.clone(),
    });
    let mut listeners: Vec<(Arc<tiny_http::Server>, Via)> = Vec::new();
    let mut endpoints = Vec::new();
    if let Some(path) = &b.unix {
        let default_dir = *path == super::default_socket_path(b.queue.path());
        let s = bind_unix(path, default_dir)?;
        listeners.push((Arc::new(s), Via::Unix));
        endpoints.push(Endpoint::Unix(path.clone()));
    }
    if let Some(addr) = b.tcp {
        let s = tiny_http::Server::http(addr)
            .map_err(|e| storage(&format!("cannot listen on {addr}"), e))?;
        let actual = s.server_addr().to_ip().unwrap_or(addr);
        listeners.push((
            Arc::new(s),
            Via::Tcp {
                loopback: actual.ip().is_loopback(),
            },
        ));
        endpoints.push(Endpoint::Tcp(actual));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (exited_tx, exited) = crossbeam_channel::unbounded::<()>();
    let mut threads = Vec::new();
    for (server, via) in &listeners {
        for _ in 0..b.threads {
            let server = server.clone();
            let app = app.clone();
            let stop = stop.clone();
            let via = *via;
            let exited = exited_tx.clone();
            let t = std::thread::Builder::new()
                .name("omniq-admin".into())
                .spawn(move || {
                    serve_loop(&server, &app, via, &stop);
                    let _ = exited.send(());
                })
                .map_err(|e| storage("cannot start a thread", e))?;
            threads.push(t);
        }
    }
    Ok(AdminServer {
        endpoints,
        servers: listeners.into_iter().map(|(s, _)| s).collect(),
        threads,
        exited,
        stop,
        metrics,
        unix_path: b.unix,
    })
}

fn serve_loop(server: &tiny_http::Server, app: &Shared, via: Via, stop: &AtomicBool) {
    // Blocks until a request arrives (an idle server uses no CPU); `AdminServer::stop` sets
    // `stop` and then queues one `unblock` per thread, which makes `recv` return an error.
    while !stop.load(Ordering::Acquire) {
        match server.recv() {
            Ok(rq) => handle(app, via, rq),
            Err(_) if stop.load(Ordering::Acquire) => return,
            Err(e) => {
                tracing::debug!(error = %e, "admin server: receiving a request failed");
            }
        }
    }
}

fn handle(app: &Shared, via: Via, mut rq: tiny_http::Request) {
    let resp = match process(app, via, &mut rq) {
        Ok(r) | Err(r) => r,
    };
    let mut out = tiny_http::Response::from_data(resp.body).with_status_code(resp.status);
    let mut headers: Vec<(&str, String)> = vec![
        ("Content-Type", resp.content_type.to_string()),
        ("Cache-Control", "no-store".into()),
        ("Content-Security-Policy", CSP.into()),
        ("X-Content-Type-Options", "nosniff".into()),
        ("X-Frame-Options", "DENY".into()),
        ("Referrer-Policy", "no-referrer".into()),
    ];
    headers.extend(resp.headers);
    for (k, v) in headers {
        if let Ok(h) = tiny_http::Header::from_bytes(k.as_bytes(), v.as_bytes()) {
            out.add_header(h);
        }
    }
    if let Err(e) = rq.respond(out) {
        tracing::debug!(error = %e, "admin server: writing a response failed");
    }
}

fn header<'a>(rq: &'a tiny_http::Request, name: &str) -> Option<&'a str> {
    rq.headers()
        .iter()
        .find(|h| h.field.as_str().as_str().eq_ignore_ascii_case(name))
        .map(|h| h.value.as_str())
}

/// Constant-time comparison of secrets.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn cookie<'a>(rq: &'a tiny_http::Request, name: &str) -> Option<&'a str> {
    header(rq, "Cookie")?.split(';').find_map(|c| {
        let (k, v) = c.trim().split_once('=')?;
        (k == name).then_some(v)
    })
}

/// Runs the generic checks, then the route. `Err` carries an early refusal.
fn process(app: &Shared, via: Via, rq: &mut tiny_http::Request) -> Result<Resp, Resp> {
    let url = rq.url().to_string();
    if url.len() > MAX_URL {
        return Err(Resp::error(
            414,
            "uri_too_long",
            format!("the request target is over {MAX_URL} bytes"),
        ));
    }
    let method = match rq.method() {
        tiny_http::Method::Get | tiny_http::Method::Head => Method::Get,
        tiny_http::Method::Post => Method::Post,
        other => {
            return Err(Resp::error(
                405,
                "method_not_allowed",
                format!("{other} is not supported; use GET or POST"),
            ))
        }
    };
    let (path, query) = match url.split_once('?') {
        Some((p, q)) => (p.to_string(), parse_query(q)?),
        None => (url.clone(), Vec::new()),
    };

    if let Via::Tcp { loopback } = via {
        match &app.token {
            Some(token) => {
                if path == "/login" && method == Method::Get {
                    return Err(login(&query, token));
                }
                let bearer = header(rq, "Authorization").and_then(|h| h.strip_prefix("Bearer "));
                let given = bearer.or_else(|| cookie(rq, "omniq_token"));
                match given {
                    Some(t) if same_secret(t.trim(), token) => {}
                    Some(_) => return Err(Resp::error(401, "unauthorized", "wrong token")),
                    None => {
                        return Err(Resp::error(
                            401,
                            "unauthorized",
                            "this server requires a token: send `Authorization: Bearer TOKEN` (browsers: open /login?token=TOKEN)",
                        ))
                    }
                }
            }
            None if loopback => {
                // Without a token, only a loopback Host is accepted, so a web page on another
                // name that resolves here (DNS rebinding) cannot read the API.
                let host = header(rq, "Host").unwrap_or("");
                let name = host
                    .rsplit_once(':')
                    .map(|(h, _)| h)
                    .unwrap_or(host)
                    .trim_start_matches('[')
                    .trim_end_matches(']');
                let ok = name == "localhost"
                    || name
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback());
                if !ok {
                    return Err(Resp::error(
                        403,
                        "bad_host",
                        format!("Host {host:?} is not a loopback name"),
                    ));
                }
            }
            None => {}
        }
    }

    let mut body = Vec::new();
    if rq.body_length().is_some_and(|n| n > MAX_BODY) {
        return Err(Resp::error(
            413,
            "body_too_large",
            format!("request bodies are limited to {MAX_BODY} bytes"),
        ));
    }
    rq.as_reader()
        .take(MAX_BODY as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|e| Resp::error(400, "bad_request", format!("cannot read the body: {e}")))?;
    if body.len() > MAX_BODY {
        return Err(Resp::error(
            413,
            "body_too_large",
            format!("request bodies are limited to {MAX_BODY} bytes"),
        ));
    }

    if method == Method::Post {
        if app.read_only {
            return Err(Resp::error(
                403,
                "read_only",
                "this admin server is read-only: actions are disabled",
            ));
        }
        match header(rq, "X-CSRF-Token") {
            None => {
                return Err(Resp::error(
                    403,
                    "csrf_missing",
                    "POST requests need the X-CSRF-Token header (GET /api/v1/csrf)",
                ))
            }
            Some(t) if !same_secret(t.trim(), &app.csrf) => {
                return Err(Resp::error(403, "csrf_invalid", "wrong CSRF token"))
            }
            Some(_) => {}
        }
    }

    let req = Req {
        method,
        path,
        query,
        body,
    };
    let Some(queue) = app.queue.upgrade() else {
        return Err(Resp::error(
            503,
            "closed",
            "the queue was closed; this admin server has nothing left to serve",
        ));
    };
    let app = App {
        queue,
        csrf: &app.csrf,
        read_only: app.read_only,
        metrics: &app.metrics,
    };
    Ok(route(&app, &req))
}

fn login(query: &[(String, String)], token: &str) -> Resp {
    let given = query
        .iter()
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.as_str());
    match given {
        Some(t) if same_secret(t, token) => {
            let mut r = Resp::redirect("/");
            r.headers.push((
                "Set-Cookie",
                format!("omniq_token={token}; HttpOnly; SameSite=Strict; Path=/"),
            ));
            r
        }
        _ => Resp::error(401, "unauthorized", "wrong or missing token"),
    }
}

fn route(app: &App<'_>, req: &Req) -> Resp {
    let path = req.path.as_str();
    if path == "/api/v1" || path.starts_with("/api/v1/") {
        return api::handle(app, req);
    }
    if path == "/metrics" {
        if req.method != Method::Get {
            return Resp::error(405, "method_not_allowed", "use GET");
        }
        return Resp::text(
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            app.metrics.render(&app.queue),
        );
    }
    dashboard::handle(app, req)
}

/// Splits and percent-decodes a query string, with limits.
fn parse_query(q: &str) -> Result<Vec<(String, String)>, Resp> {
    let mut out = Vec::new();
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        if out.len() >= MAX_PARAMS {
            return Err(Resp::error(
                400,
                "bad_query",
                format!("at most {MAX_PARAMS} query parameters"),
            ));
        }
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (Some(k), Some(v)) = (percent_decode(k), percent_decode(v)) else {
            return Err(Resp::error(
                400,
                "bad_query",
                "the query string is not valid percent-encoded UTF-8",
            ));
        };
        if v.len() > MAX_PARAM_LEN {
            return Err(Resp::error(
                400,
                "bad_query",
                format!("query parameter {k:?} is over {MAX_PARAM_LEN} bytes"),
            ));
        }
        out.push((k, v));
    }
    Ok(out)
}

/// Percent-decodes (and turns `+` into a space); `None` if malformed or not UTF-8.
pub(crate) fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = b.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding_rejects_malformed_input() {
        assert_eq!(percent_decode("a%20b+c").as_deref(), Some("a b c"));
        assert_eq!(percent_decode("%3Cscript%3E").as_deref(), Some("<script>"));
        assert_eq!(percent_decode("%"), None);
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%ff"), None, "not UTF-8");
    }

    #[test]
    fn secrets_compare_exactly() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "abcd"));
    }
}
