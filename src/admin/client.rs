//! A small blocking client for the admin API, over a UNIX socket or TCP (one connection per
//! request, `Connection: close`). The `omniq` CLI uses it to operate a live queue.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::inspect::{
    CompactReport, ConsistencyReport, CorruptEntry, ListFilter, Page, PurgePreview, PurgeReport,
    Stats,
};
use crate::log::{Cause, LogEntry};
use crate::retry::Backoff;
use crate::task::{Status, TaskError, TaskId, TaskInfo, Timestamp};

/// Where an admin server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// A UNIX socket path.
    Unix(PathBuf),
    /// A TCP address.
    Tcp(SocketAddr),
}

/// An HTTP response as received.
#[derive(Clone, Debug)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// Headers, names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// The first header of that (case-insensitive) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON.
    pub fn json(&self) -> Result<Value> {
        serde_json::from_slice(&self.body).map_err(|e| remote(self.status, "bad_response", e))
    }

    /// The body as (lossy) text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn remote(status: u16, code: &str, e: impl std::fmt::Display) -> Error {
    Error::Remote {
        status,
        code: code.into(),
        message: format!("admin server: {e}"),
    }
}

/// A client of one admin server.
pub struct Client {
    endpoint: Endpoint,
    token: Option<String>,
    csrf: Mutex<Option<String>>,
    timeout: Duration,
}

impl Client {
    /// A client for `endpoint` (requests time out after 30 s).
    pub fn new(endpoint: Endpoint) -> Client {
        Client {
            endpoint,
            token: None,
            csrf: Mutex::new(None),
            timeout: Duration::from_secs(30),
        }
    }

    /// Sends `Authorization: Bearer TOKEN` with every request.
    pub fn token(mut self, token: impl Into<String>) -> Client {
        self.token = Some(token.into());
        self
    }

    /// The endpoint.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Sends one request and reads the whole response. `headers` are sent as given (plus
    /// `Host`, `Connection: close`, `Content-Length` and the bearer token, if any).
    pub fn request(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<Response> {
        let mut head = format!("{method} {target} HTTP/1.1\r\n");
        let host = match &self.endpoint {
            Endpoint::Tcp(a) => a.to_string(),
            Endpoint::Unix(_) => "localhost".to_string(),
        };
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            head.push_str(&format!("Host: {host}\r\n"));
        }
        head.push_str("Connection: close\r\n");
        if let Some(t) = &self.token {
            head.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        if !body.is_empty() || method == "POST" {
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        let mut raw = Vec::new();
        match &self.endpoint {
            Endpoint::Unix(p) => {
                let mut s = UnixStream::connect(p)?;
                s.set_read_timeout(Some(self.timeout))?;
                s.set_write_timeout(Some(self.timeout))?;
                s.write_all(head.as_bytes())?;
                s.write_all(body)?;
                s.read_to_end(&mut raw)?;
            }
            Endpoint::Tcp(a) => {
                let mut s = TcpStream::connect_timeout(a, self.timeout)?;
                s.set_read_timeout(Some(self.timeout))?;
                s.set_write_timeout(Some(self.timeout))?;
                s.write_all(head.as_bytes())?;
                s.write_all(body)?;
                s.read_to_end(&mut raw)?;
            }
        }
        parse_response(&raw)
            .ok_or_else(|| std::io::Error::other("malformed HTTP response from the admin server"))
    }

    fn call(&self, method: &str, target: &str, body: Option<&Value>) -> Result<Value> {
        let mut headers: Vec<(&str, String)> = Vec::new();
        if method == "POST" {
            headers.push(("X-CSRF-Token", self.csrf_token()?));
            headers.push(("Content-Type", "application/json".into()));
        }
        let body = body
            .map(|b| serde_json::to_vec(b).unwrap_or_default())
            .unwrap_or_default();
        let hs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = self
            .request(method, target, &hs, &body)
            .map_err(|e| remote(0, "unreachable", e))?;
        let v = r.json()?;
        if r.status >= 400 {
            let message = v["error"]["message"]
                .as_str()
                .unwrap_or("the admin server refused the request")
                .to_string();
            return Err(Error::Remote {
                status: r.status,
                code: v["error"]["code"].as_str().unwrap_or("").to_string(),
                message,
            });
        }
        Ok(v)
    }

    fn csrf_token(&self) -> Result<String> {
        if let Some(t) = self.csrf.lock().clone() {
            return Ok(t);
        }
        let v = self.call("GET", "/api/v1/csrf", None)?;
        let t = v["token"]
            .as_str()
            .ok_or_else(|| remote(200, "bad_response", "no CSRF token in /api/v1/csrf"))?
            .to_string();
        *self.csrf.lock() = Some(t.clone());
        Ok(t)
    }

    /// `GET target`, as JSON; a 4xx/5xx answer is an [`Error::Remote`] with its message.
    pub fn get_json(&self, target: &str) -> Result<Value> {
        self.call("GET", target, None)
    }

    /// `POST target` with a JSON body and the CSRF token (fetched once).
    pub fn post_json(&self, target: &str, body: &Value) -> Result<Value> {
        self.call("POST", target, Some(body))
    }

    /// Counts per status and queue (`GET /api/v1/stats`).
    pub fn stats(&self) -> Result<Stats> {
        let v = self.get_json("/api/v1/stats")?;
        let mut stats = Stats {
            total: v["total"].as_u64().unwrap_or(0),
            ..Stats::default()
        };
        let counts = |o: &Value| {
            Status::ALL
                .iter()
                .filter_map(|s| o[s.as_str()].as_u64().filter(|n| *n > 0).map(|n| (*s, n)))
                .collect::<std::collections::BTreeMap<_, _>>()
        };
        stats.by_status = counts(&v["by_status"]);
        if let Some(m) = v["by_queue"].as_object() {
            for (q, c) in m {
                stats.by_queue.insert(q.clone(), counts(c));
            }
        }
        Ok(stats)
    }

    /// A page of tasks (`GET /api/v1/tasks`), with the same filter and cursor as
    /// [`Queue::list`](crate::Queue::list).
    pub fn list(&self, filter: &ListFilter) -> Result<Page> {
        let mut target = format!("/api/v1/tasks?limit={}", filter.effective_limit().min(1000));
        if let Some(s) = filter.status {
            target.push_str(&format!("&status={}", s.as_str()));
        }
        if let Some(q) = &filter.queue {
            target.push_str(&format!("&queue={}", encode(q)));
        }
        if let Some(k) = &filter.kind {
            target.push_str(&format!("&kind={}", encode(k)));
        }
        if let Some(c) = filter.cursor {
            target.push_str(&format!("&cursor={c}"));
        }
        let v = self.get_json(&target)?;
        let tasks = v["tasks"]
            .as_array()
            .map(|a| a.iter().map(task_from_json).collect::<Result<Vec<_>>>())
            .transpose()?
            .unwrap_or_default();
        let corrupt = v["corrupt"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|c| CorruptEntry {
                        key: c["key"].as_str().unwrap_or("").into(),
                        reason: c["reason"].as_str().unwrap_or("").into(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(Page {
            tasks,
            next_cursor: v["next_cursor"].as_str().and_then(|s| s.parse().ok()),
            corrupt,
        })
    }

    /// One task, or `None` if there is no such task.
    pub fn get(&self, id: TaskId) -> Result<Option<TaskInfo>> {
        Ok(self.detail(id)?.map(|(t, _)| t))
    }

    /// A task's transitions, oldest first (empty if there is no such task).
    pub fn history(&self, id: TaskId) -> Result<Vec<LogEntry>> {
        Ok(self.detail(id)?.map(|(_, h)| h).unwrap_or_default())
    }

    fn detail(&self, id: TaskId) -> Result<Option<(TaskInfo, Vec<LogEntry>)>> {
        let v = match self.get_json(&format!("/api/v1/tasks/{id}")) {
            Ok(v) => v,
            Err(Error::Remote { status: 404, .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let t = task_from_json(&v)?;
        let history = v["history"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|e| log_from_json(id, e))
                    .collect::<Result<Vec<_>>>()
            })
            .transpose()?
            .unwrap_or_default();
        Ok(Some((t, history)))
    }

    /// Every limit and how it stands (`GET /api/v1/limits`).
    pub fn limits(&self) -> Result<Vec<crate::LimitStatus>> {
        from_value("limits", self.get_json("/api/v1/limits")?)
    }

    /// Every schedule (`GET /api/v1/schedules`).
    pub fn schedules(&self) -> Result<Vec<crate::ScheduleInfo>> {
        from_value("schedules", self.get_json("/api/v1/schedules")?)
    }

    /// A task's unique key and schedule tick (`GET /api/v1/tasks/{id}/extras`).
    pub fn extras(&self, id: TaskId) -> Result<Option<crate::TaskExtras>> {
        from_value(
            "task extras",
            self.get_json(&format!("/api/v1/tasks/{id}/extras"))?,
        )
    }

    /// Re-queues a failed or cancelled task (`POST /api/v1/tasks/{id}/retry`).
    pub fn retry(&self, id: TaskId) -> Result<TaskInfo> {
        task_from_json(
            &self.post_json(&format!("/api/v1/tasks/{id}/retry"), &serde_json::json!({}))?,
        )
    }

    /// Cancels a pending task, or asks a running one to stop
    /// (`POST /api/v1/tasks/{id}/cancel`).
    pub fn cancel(&self, id: TaskId) -> Result<TaskInfo> {
        task_from_json(&self.post_json(
            &format!("/api/v1/tasks/{id}/cancel"),
            &serde_json::json!({}),
        )?)
    }

    /// Deletes finished tasks older than `age` (`POST /api/v1/purge`).
    pub fn purge(&self, age: Duration) -> Result<PurgeReport> {
        let body = serde_json::json!({"older_than": format!("{}ms", age.as_millis())});
        let v = self.post_json("/api/v1/purge", &body)?;
        Ok(PurgeReport {
            compaction: v
                .get("compaction")
                .filter(|c| !c.is_null())
                .map(compact_report),
            tasks_removed: usize::try_from(v["tasks_removed"].as_u64().unwrap_or(0))
                .unwrap_or(usize::MAX),
        })
    }

    /// Rewrites the store to give back the space dead data holds (`POST /api/v1/compact`).
    pub fn compact(&self) -> Result<CompactReport> {
        let v = self.post_json("/api/v1/compact", &serde_json::json!({}))?;
        Ok(compact_report(&v))
    }

    /// What a purge of tasks finished at least `age` ago would remove, with the first
    /// `sample` of them (`POST /api/v1/purge` with `dry_run`).
    pub fn purge_preview(&self, age: Duration, sample: usize) -> Result<PurgePreview> {
        let body = serde_json::json!({
            "older_than": format!("{}ms", age.as_millis()),
            "dry_run": true,
            "sample": sample,
        });
        let v = self.post_json("/api/v1/purge", &body)?;
        Ok(PurgePreview {
            cutoff: ts(&v["cutoff_ms"], "cutoff_ms")?,
            tasks: usize::try_from(v["matched"].as_u64().unwrap_or(0)).unwrap_or(usize::MAX),
            sample: v["sample"]
                .as_array()
                .map(|a| a.iter().map(task_from_json).collect::<Result<Vec<_>>>())
                .transpose()?
                .unwrap_or_default(),
        })
    }

    /// Runs the consistency checker (`GET /api/v1/check`).
    pub fn check(&self) -> Result<ConsistencyReport> {
        let v = self.get_json("/api/v1/check")?;
        Ok(ConsistencyReport {
            tasks: usize::try_from(v["tasks"].as_u64().unwrap_or(0)).unwrap_or(usize::MAX),
            log_entries: usize::try_from(v["log_entries"].as_u64().unwrap_or(0))
                .unwrap_or(usize::MAX),
            problems: v["problems"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|p| p.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default(),
        })
    }
}

/// Percent-encodes a query value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn parse_response(raw: &[u8]) -> Option<Response> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..split]).ok()?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let rest = &raw[split + 4..];
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        dechunk(rest)?
    } else {
        rest.to_vec()
    };
    Some(Response {
        status,
        headers,
        body,
    })
}

fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n")?;
        let size_line = std::str::from_utf8(&b[..eol]).ok()?;
        let size = usize::from_str_radix(size_line.split(';').next()?.trim(), 16).ok()?;
        b = &b[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(b.get(..size)?);
        b = b.get(size + 2..)?;
    }
}

fn bad(what: &str) -> Error {
    remote(
        200,
        "bad_response",
        format!("unexpected task JSON ({what})"),
    )
}

fn ts(v: &Value, what: &str) -> Result<Timestamp> {
    v.as_u64().map(Timestamp).ok_or_else(|| bad(what))
}

fn error_from_json(v: &Value) -> Result<TaskError> {
    Ok(TaskError {
        error_type: v["error_type"]
            .as_str()
            .ok_or_else(|| bad("error_type"))?
            .into(),
        message: v["message"].as_str().unwrap_or("").into(),
        retry_count: u32::try_from(v["retry_count"].as_u64().unwrap_or(0)).unwrap_or(u32::MAX),
        timestamp: ts(&v["timestamp_ms"], "timestamp_ms")?,
        permanent: v["permanent"].as_bool().unwrap_or(false),
    })
}

/// Rebuilds a task from the API's JSON (the inverse of the server's `task_json`).
fn task_from_json(v: &Value) -> Result<TaskInfo> {
    let opt_ts = |k: &str| v[k].as_u64().map(Timestamp);
    let json_bytes = |x: &Value| serde_json::to_vec(x).unwrap_or_default();
    Ok(TaskInfo {
        id: v["id"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("id"))?,
        kind: v["kind"].as_str().ok_or_else(|| bad("kind"))?.into(),
        queue: v["queue"].as_str().ok_or_else(|| bad("queue"))?.into(),
        payload: json_bytes(&v["payload"]),
        status: v["status"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("status"))?,
        attempts: u32::try_from(v["attempts"].as_u64().unwrap_or(0)).unwrap_or(u32::MAX),
        max_retries: u32::try_from(v["max_retries"].as_u64().unwrap_or(0)).unwrap_or(u32::MAX),
        priority: i8::try_from(v["priority"].as_i64().unwrap_or(0)).unwrap_or(0),
        created_at: ts(&v["created_at_ms"], "created_at_ms")?,
        next_run_at: ts(&v["next_run_at_ms"], "next_run_at_ms")?,
        started_at: opt_ts("started_at_ms"),
        finished_at: opt_ts("finished_at_ms"),
        timeout_ms: v["timeout_ms"].as_u64(),
        backoff: v["backoff"].as_object().map(|b| Backoff {
            base_ms: b.get("base_ms").and_then(Value::as_u64).unwrap_or(0),
            cap_ms: b.get("cap_ms").and_then(Value::as_u64).unwrap_or(0),
            jitter: b.get("jitter").and_then(Value::as_f64).unwrap_or(0.0),
        }),
        result: (!v["result"].is_null()).then(|| json_bytes(&v["result"])),
        last_error: match &v["last_error"] {
            Value::Null => None,
            e => Some(error_from_json(e)?),
        },
        errors: v["errors"]
            .as_array()
            .map(|a| a.iter().map(error_from_json).collect::<Result<Vec<_>>>())
            .transpose()?
            .unwrap_or_default(),
        lease: v["lease"].as_u64().unwrap_or(0),
    })
}

fn log_from_json(task_id: TaskId, v: &Value) -> Result<LogEntry> {
    let d = &v["cause_detail"];
    let cause = match d["kind"].as_str().ok_or_else(|| bad("cause_detail"))? {
        "enqueued" => Cause::Enqueued,
        "claimed" => Cause::Claimed,
        "succeeded" => Cause::Succeeded,
        "failed" => Cause::Failed {
            error_type: d["error_type"].as_str().unwrap_or("").into(),
            permanent: d["permanent"].as_bool().unwrap_or(false),
        },
        "cancelled" => Cause::Cancelled,
        "manual_retry" => Cause::ManualRetry,
        "released" => Cause::Released,
        _ => return Err(bad("cause_detail.kind")),
    };
    let status = |x: &Value| x.as_str().and_then(|s| s.parse::<Status>().ok());
    Ok(LogEntry {
        seq: v["seq"].as_u64().ok_or_else(|| bad("seq"))?,
        task_id,
        from: status(&v["from"]),
        to: status(&v["to"]).ok_or_else(|| bad("to"))?,
        attempt: u32::try_from(v["attempt"].as_u64().unwrap_or(0)).unwrap_or(u32::MAX),
        cause,
        at: ts(&v["at_ms"], "at_ms")?,
        run_id: v["run_id"].as_u64().unwrap_or(0),
    })
}

/// Decodes an API answer into `T`, naming what did not decode.
fn from_value<T: serde::de::DeserializeOwned>(what: &str, v: Value) -> Result<T> {
    serde_json::from_value(v).map_err(|e| Error::Remote {
        status: 0,
        code: "bad_answer".into(),
        message: format!("the admin API's {what} do not decode: {e}"),
    })
}

/// A [`CompactReport`] from its JSON (`POST /api/v1/compact`, or a purge's `compaction`).
fn compact_report(v: &Value) -> CompactReport {
    let ms = |key: &str| Duration::from_secs_f64(v[key].as_f64().unwrap_or(0.0).max(0.0) / 1000.0);
    CompactReport {
        compacted: v["compacted"].as_bool().unwrap_or(false),
        note: v["note"].as_str().map(str::to_string),
        bytes_before: v["bytes_before"].as_u64().unwrap_or(0),
        bytes_after: v["bytes_after"].as_u64().unwrap_or(0),
        keys_copied: v["keys_copied"].as_u64().unwrap_or(0),
        live_bytes: v["live_bytes"].as_u64().unwrap_or(0),
        log_bytes: v["log_bytes"].as_u64().unwrap_or(0),
        duration: ms("duration_ms"),
        write_pause: ms("write_pause_ms"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_parse_plain_and_chunked() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\nContent-Type: x\r\n\r\nhello").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"hello"[..]));
        assert_eq!(r.header("content-type"), Some("x"));
        let r = parse_response(
            b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_slice()), (404, &b"abcde"[..]));
        assert!(parse_response(b"garbage").is_none());
    }

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(encode("a b&c"), "a%20b%26c");
    }
}
