//! The operator surface, served by the process that owns the queue (feature `admin`, on by
//! default): a JSON API under `/api/v1`, Prometheus metrics at `/metrics` and a server-rendered
//! dashboard at `/`.
//!
//! sled locks a queue directory to one process, so nothing else can read it while the program
//! that owns it runs. [`Queue::admin`] starts a small synchronous HTTP server (tiny_http, on its
//! own threads: no async runtime) inside that program:
//!
//! - by default on a UNIX socket inside the data directory (`DIR/admin/api.sock`, the socket
//!   0600 in a 0700 directory), so whoever can read the data can operate the queue, and nobody
//!   else; the `omniq` CLI finds it and goes through it transparently;
//! - optionally on TCP ([`AdminBuilder::tcp`]; loopback unless a bearer token is set, see
//!   [`AdminBuilder::token`]).
//!
//! It reads through the public [`Queue`] API only: counts are O(queues), pages are bounded, and
//! it never takes a lock the workers need. Every POST needs the server's CSRF token
//! (`GET /api/v1/csrf`) in an `X-CSRF-Token` header; bodies and query strings are size-limited
//! and validated, and a refused request changes nothing. [`Client`] is a small blocking client
//! for the API (the CLI uses it).

mod api;
mod client;
mod dashboard;
mod metrics;
mod server;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub use client::{Client, Endpoint, Response};
pub use server::AdminServer;

use crate::error::{Error, Result};
use crate::queue::Queue;

/// Where a queue's admin server listens by default: `DIR/admin/api.sock`.
pub fn default_socket_path(dir: &Path) -> PathBuf {
    dir.join("admin").join("api.sock")
}

/// Configures the admin server of a queue. Start from [`Queue::admin`].
pub struct AdminBuilder {
    pub(crate) queue: Queue,
    pub(crate) unix: Option<PathBuf>,
    pub(crate) tcp: Option<SocketAddr>,
    pub(crate) token: Option<String>,
    pub(crate) read_only: bool,
    pub(crate) threads: usize,
}

impl AdminBuilder {
    /// Listen on this UNIX socket path instead of `DIR/admin/api.sock`.
    pub fn unix_socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.unix = Some(path.into());
        self
    }

    /// Do not listen on a UNIX socket (TCP only).
    pub fn no_unix_socket(mut self) -> Self {
        self.unix = None;
        self
    }

    /// Also listen on TCP. A loopback address (`127.0.0.1:PORT`, port 0 picks a free one) is
    /// reachable by every local user: prefer the UNIX socket where you can. Any other address
    /// requires a [`token`](AdminBuilder::token); [`serve`](AdminBuilder::serve) refuses to start
    /// without one.
    pub fn tcp(mut self, addr: SocketAddr) -> Self {
        self.tcp = Some(addr);
        self
    }

    /// Require `Authorization: Bearer TOKEN` on TCP (browsers: open `/login?token=TOKEN` once;
    /// it sets a same-site cookie). The UNIX socket is protected by file permissions instead.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Read-only mode, for sharing the dashboard: every action (POST) is refused with 403 and
    /// the dashboard shows no action buttons.
    pub fn read_only(mut self, yes: bool) -> Self {
        self.read_only = yes;
        self
    }

    /// Request-handling threads per listener (default 2).
    pub fn threads(mut self, n: usize) -> Self {
        self.threads = n.clamp(1, 64);
        self
    }

    /// Starts listening. Fails if nothing is to be listened on, if a non-loopback TCP address
    /// has no token, or if a socket cannot be bound.
    pub fn serve(self) -> Result<AdminServer> {
        if self.unix.is_none() && self.tcp.is_none() {
            return Err(Error::Invalid {
                what: "admin server",
                reason: "neither a UNIX socket nor a TCP address to listen on".into(),
            });
        }
        if let Some(addr) = self.tcp {
            if !addr.ip().is_loopback() && self.token.as_deref().is_none_or(str::is_empty) {
                return Err(Error::Invalid {
                    what: "admin server",
                    reason: format!(
                        "{addr} is not a loopback address: serving the queue there requires a bearer token (AdminBuilder::token / --token)"
                    ),
                });
            }
        }
        if let Some(t) = &self.token {
            if t.len() < 16 || !t.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(Error::Invalid {
                    what: "admin token",
                    reason: "must be at least 16 printable ASCII characters without spaces".into(),
                });
            }
        }
        server::start(self)
    }
}

impl Queue {
    /// Configures the admin server (JSON API, Prometheus metrics, web dashboard) served by this
    /// process; see the [`admin`](crate::admin) module. The server runs until the returned
    /// [`AdminServer`] is stopped or dropped. It does not keep the queue open: once every
    /// [`Queue`] handle is closed, it answers 503.
    ///
    /// ```
    /// # fn main() -> omniq::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// use omniq::admin::Client;
    /// let queue = omniq::Queue::open(dir.path().join("jobs"))?;
    /// // A UNIX socket at jobs/admin/api.sock, and TCP on a free loopback port.
    /// let admin = queue.admin().tcp("127.0.0.1:0".parse().unwrap()).serve()?;
    ///
    /// let client = Client::new(admin.endpoints()[0].clone());
    /// assert_eq!(client.stats()?.total, 0);
    /// let health = client.get_json("/api/v1/health")?;
    /// assert_eq!(health["status"], "ok");
    /// admin.stop();
    /// # Ok(()) }
    /// ```
    pub fn admin(&self) -> AdminBuilder {
        AdminBuilder {
            queue: self.clone(),
            unix: Some(default_socket_path(self.path())),
            tcp: None,
            token: None,
            read_only: false,
            threads: 2,
        }
    }
}
