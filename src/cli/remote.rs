//! The queue a command operates on: the directory itself, or — when a live process holds it
//! and serves its admin socket — that process, through the socket. Both answer the same calls
//! with the same types, so every command prints the same thing either way.

use std::path::{Path, PathBuf};
use std::time::Duration;

use omniq::admin::{Client, Endpoint};
use omniq::{
    ConsistencyReport, ListFilter, LogEntry, Page, PurgePreview, PurgeReport, Queue, Stats, TaskId,
    TaskInfo,
};

/// A queue opened in this process, or a live one reached through its admin socket.
pub enum Target {
    /// Opened directly (nobody else holds the directory).
    Local(Queue),
    /// Held by a live process: every call goes through its admin socket.
    Remote {
        /// The directory as the user named it (printed exactly as a local open would).
        dir: PathBuf,
        /// The client of its admin socket.
        client: Client,
    },
}

/// If a live process serves `dir`'s admin socket, a client of it (`None` when there is no
/// socket or nobody answers on it: a stale socket of a dead process).
pub fn connect(dir: &Path) -> Option<Target> {
    let socket = omniq::admin::default_socket_path(dir);
    if !socket.exists() {
        return None;
    }
    let client = Client::new(Endpoint::Unix(socket.clone()));
    match client.get_json("/api/v1/health") {
        Ok(v) if v["status"] == "ok" => {
            eprintln!(
                "note: {} is held by a running process; going through its admin socket {}",
                dir.display(),
                socket.display()
            );
            Some(Target::Remote {
                dir: dir.to_path_buf(),
                client,
            })
        }
        _ => None,
    }
}

/// The CLI's `error.kind` for an error the admin server answered with (the same kind the
/// command reports when it opens the directory itself).
pub fn error_kind(code: &str) -> &'static str {
    match code {
        "not_found" => "not_found",
        "invalid_state" => "invalid_state",
        "bad_request" | "bad_id" | "bad_filter" | "bad_body" | "bad_query" => "invalid_argument",
        "closed" => "storage",
        _ => "remote",
    }
}

impl Target {
    /// The directory.
    pub fn path(&self) -> &Path {
        match self {
            Target::Local(q) => q.path(),
            Target::Remote { dir, .. } => dir,
        }
    }
    /// Counts per status and queue.
    pub fn stats(&self) -> omniq::Result<Stats> {
        match self {
            Target::Local(q) => q.stats(),
            Target::Remote { client, .. } => client.stats(),
        }
    }
    /// A page of tasks.
    pub fn list(&self, filter: &ListFilter) -> omniq::Result<Page> {
        match self {
            Target::Local(q) => q.list(filter),
            Target::Remote { client, .. } => {
                // The API pages by at most 1,000: fetch as many pages as the limit asks for.
                let want = filter.limit.max(1);
                let mut f = filter.clone();
                let mut out = Page {
                    tasks: Vec::new(),
                    next_cursor: None,
                    corrupt: Vec::new(),
                };
                loop {
                    f.limit = (want - out.tasks.len()).min(1000);
                    let p = client.list(&f)?;
                    out.tasks.extend(p.tasks);
                    out.corrupt.extend(p.corrupt);
                    out.next_cursor = p.next_cursor;
                    match p.next_cursor {
                        Some(c) if out.tasks.len() < want => f.cursor = Some(c),
                        _ => return Ok(out),
                    }
                }
            }
        }
    }
    /// One task.
    pub fn get(&self, id: TaskId) -> omniq::Result<Option<TaskInfo>> {
        match self {
            Target::Local(q) => q.get(id),
            Target::Remote { client, .. } => client.get(id),
        }
    }
    /// A task's transitions.
    pub fn history(&self, id: TaskId) -> omniq::Result<Vec<LogEntry>> {
        match self {
            Target::Local(q) => q.history(id),
            Target::Remote { client, .. } => client.history(id),
        }
    }
    /// Re-queues a failed or cancelled task.
    pub fn retry(&self, id: TaskId) -> omniq::Result<TaskInfo> {
        match self {
            Target::Local(q) => q.retry(id),
            Target::Remote { client, .. } => client.retry(id),
        }
    }
    /// Cancels a task (a live queue can also cancel a running one).
    pub fn cancel(&self, id: TaskId) -> omniq::Result<TaskInfo> {
        match self {
            Target::Local(q) => q.cancel(id),
            Target::Remote { client, .. } => client.cancel(id),
        }
    }
    /// Deletes finished tasks older than `age`.
    pub fn purge(&self, age: Duration) -> omniq::Result<PurgeReport> {
        match self {
            Target::Local(q) => q.purge(age),
            Target::Remote { client, .. } => client.purge(age),
        }
    }
    /// What a purge would remove.
    pub fn purge_preview(&self, age: Duration, sample: usize) -> omniq::Result<PurgePreview> {
        match self {
            Target::Local(q) => q.purge_preview(age, sample),
            Target::Remote { client, .. } => client.purge_preview(age, sample),
        }
    }
    /// Rewrites the store into fresh files holding only its live data.
    pub fn compact(&self) -> omniq::Result<omniq::CompactReport> {
        match self {
            Target::Local(q) => q.compact(),
            Target::Remote { client, .. } => client.compact(),
        }
    }
    /// The consistency checker.
    pub fn check_consistency(&self) -> omniq::Result<ConsistencyReport> {
        match self {
            Target::Local(q) => q.check_consistency(),
            Target::Remote { client, .. } => client.check(),
        }
    }
    /// Limits and how they stand.
    pub fn limits(&self) -> omniq::Result<Vec<omniq::LimitStatus>> {
        match self {
            Target::Local(q) => q.limits(),
            Target::Remote { client, .. } => client.limits(),
        }
    }
    /// A task's unique key and schedule tick.
    pub fn extras(&self, id: TaskId) -> omniq::Result<Option<omniq::TaskExtras>> {
        match self {
            Target::Local(q) => q.extras(id),
            Target::Remote { client, .. } => client.extras(id),
        }
    }
    /// Recurring schedules.
    pub fn schedules(&self) -> omniq::Result<Vec<omniq::ScheduleInfo>> {
        match self {
            Target::Local(q) => q.schedules(),
            Target::Remote { client, .. } => client.schedules(),
        }
    }
}
