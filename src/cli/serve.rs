//! `omniq serve`: open a queue with no workers and serve its admin API, metrics and dashboard:
//! a directory (to inspect a stopped application's queue), or a PostgreSQL queue (next to the
//! processes that run it, on TCP only); and the admin socket `omniq demo` serves while it runs.

use std::process::ExitCode;

use omniq::admin::{AdminServer, Endpoint};
use omniq::Queue;
use serde_json::json;

use super::args::ServeArgs;
use super::output::{emit, emit_json};
use super::{CliError, Location};

/// Serves `queue`'s admin socket for `omniq demo`; a failure is a warning, not fatal.
pub fn for_demo(queue: &Queue) -> Option<AdminServer> {
    match queue.admin().serve() {
        Ok(s) => Some(s),
        Err(e) => {
            eprintln!("warning: the admin socket is not served ({e}); `omniq stats` and friends cannot reach this demo while it runs");
            None
        }
    }
}

/// `omniq serve`.
pub fn run(location: &Location, json: bool, a: &ServeArgs) -> Result<ExitCode, CliError> {
    let listen = a
        .listen
        .as_deref()
        .map(|s| {
            s.parse::<std::net::SocketAddr>().map_err(|_| {
                CliError::Usage(format!(
                    "{s:?} is not a listen address (expected IP:PORT, such as 127.0.0.1:8080)"
                ))
            })
        })
        .transpose()?;
    let dir = location.shown();
    let queue = match location {
        Location::Dir(dir) => {
            if super::remote::connect(dir).is_some() {
                return Err(CliError::Runtime(format!(
                    "{} is already served by a running process (its admin socket answers); use that process's server",
                    dir.display()
                )));
            }
            super::open_local(dir, json)?
        }
        #[cfg(feature = "postgres")]
        Location::Pg { url, schema, label } => super::open_pg(url, schema, label, json, false)?,
    };
    let mut b = queue.admin().read_only(a.read_only);
    match location {
        Location::Dir(_) => {
            if let Some(addr) = listen {
                b = b.tcp(addr);
            }
        }
        // Several processes may open a PostgreSQL queue, so there is no socket to find it by:
        // this one serves it on TCP only.
        #[cfg(feature = "postgres")]
        Location::Pg { .. } => {
            b = b
                .no_unix_socket()
                .tcp(listen.unwrap_or(std::net::SocketAddr::from(([127, 0, 0, 1], 8080))));
        }
    }
    let token = a.token.clone().or_else(|| {
        std::env::var("OMNIQ_ADMIN_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
    });
    if let Some(t) = token {
        b = b.token(t);
    }
    let server = b.serve()?;
    let endpoints: Vec<String> = server
        .endpoints()
        .iter()
        .map(|e| match e {
            Endpoint::Unix(p) => format!("unix:{}", p.display()),
            Endpoint::Tcp(a) => format!("http://{a}/"),
        })
        .collect();
    if json {
        emit_json(&json!({
            "directory": dir.display().to_string(),
            "endpoints": endpoints,
            "read_only": a.read_only,
        }))?;
    } else {
        emit(&format!(
            "serving {} (no workers{}): {}\nstop with Ctrl-C\n",
            dir.display(),
            if a.read_only { ", read-only" } else { "" },
            endpoints.join("  ")
        ))?;
    }
    // Serves until the process is stopped; the queue has no workers, so nothing is interrupted.
    loop {
        std::thread::park();
    }
}
