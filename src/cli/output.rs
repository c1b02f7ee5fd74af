//! Output: a tiny aligned-table formatter, JSON renderings of tasks and history, and writing
//! to stdout without panicking on a closed pipe.

use std::io::Write;

use omniq::{LogEntry, Status, TaskError, TaskInfo, Timestamp};
use serde_json::{json, Value};

use super::CliError;

/// Column alignment.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Align {
    /// Text columns.
    Left,
    /// Number columns.
    Right,
}

/// An aligned text table: a header row and data rows, columns separated by two spaces.
pub struct Table {
    headers: Vec<String>,
    align: Vec<Align>,
    rows: Vec<Vec<String>>,
    /// At most this many columns wide, by shortening the given column (see [`Table::fit`]).
    fit: Option<(usize, usize)>,
}

impl Table {
    /// A table with these column headers, all left-aligned.
    pub fn new(headers: &[&str]) -> Table {
        Table {
            headers: headers.iter().map(|h| h.to_string()).collect(),
            align: vec![Align::Left; headers.len()],
            rows: Vec::new(),
            fit: None,
        }
    }

    /// Keeps every line at most `width` characters by shortening the cells of `column` (with
    /// `…`), never below its header's width.
    pub fn fit(mut self, width: usize, column: usize) -> Table {
        self.fit = Some((width, column));
        self
    }

    /// Right-aligns these columns (numbers).
    pub fn right(mut self, columns: &[usize]) -> Table {
        for &c in columns {
            if let Some(a) = self.align.get_mut(c) {
                *a = Align::Right;
            }
        }
        self
    }

    /// Adds a row (missing cells are blank, extra cells are dropped).
    pub fn row<I, S>(&mut self, cells: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut r: Vec<String> = cells.into_iter().map(Into::into).collect();
        r.resize(self.headers.len(), String::new());
        self.rows.push(r);
    }

    /// The table as text, one line per row, ending with a newline.
    pub fn render(&self) -> String {
        let width = |s: &str| s.chars().count();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| width(h)).collect();
        for r in &self.rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(width(c));
            }
        }
        if let Some((max, c)) = self.fit {
            let total: usize = widths.iter().sum::<usize>() + 2 * widths.len().saturating_sub(1);
            if let (Some(w), Some(h)) = (widths.get(c).copied(), self.headers.get(c)) {
                let excess = total.saturating_sub(max);
                widths[c] = w.saturating_sub(excess).max(width(h));
            }
        }
        let mut out = String::new();
        for r in std::iter::once(&self.headers).chain(&self.rows) {
            let last = r.len().saturating_sub(1);
            let mut line = String::new();
            for (i, cell) in r.iter().enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                let shortened;
                let cell = if width(cell) > widths[i] {
                    shortened = truncate(cell, widths[i]);
                    &shortened
                } else {
                    cell
                };
                let pad = widths[i].saturating_sub(width(cell));
                match self.align[i] {
                    Align::Right => {
                        line.push_str(&" ".repeat(pad));
                        line.push_str(cell);
                    }
                    Align::Left => {
                        line.push_str(cell);
                        if i != last {
                            line.push_str(&" ".repeat(pad));
                        }
                    }
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Writes `text` to stdout. A closed pipe (`omniq list | head`) is not an error.
pub fn emit(text: &str) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(CliError::Runtime(format!("cannot write to stdout: {e}"))),
    }
}

/// Writes one JSON document (pretty-printed) and a newline to stdout.
pub fn emit_json(v: &Value) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(v)
        .map_err(|e| CliError::Runtime(format!("cannot encode JSON output: {e}")))?;
    emit(&format!("{text}\n"))
}

/// A timestamp as RFC 3339 (UTC, milliseconds).
pub fn ts(t: Timestamp) -> String {
    t.to_string()
}

/// An optional timestamp, `-` when absent.
pub fn ts_opt(t: Option<Timestamp>) -> String {
    t.map(ts).unwrap_or_else(|| "-".into())
}

/// A status name as printed everywhere (`COMPLETED`).
pub fn status_str(s: Status) -> &'static str {
    s.as_str()
}

/// One error record as JSON.
pub fn error_json(e: &TaskError) -> Value {
    json!({
        "error_type": e.error_type,
        "message": e.message,
        "retry_count": e.retry_count,
        "timestamp": ts(e.timestamp),
        "permanent": e.permanent,
    })
}

/// A task as JSON: every field, payload and result decoded as JSON.
pub fn task_json(t: &TaskInfo) -> Value {
    json!({
        "id": t.id.to_string(),
        "kind": t.kind,
        "queue": t.queue,
        "status": status_str(t.status),
        "attempts": t.attempts,
        "max_retries": t.max_retries,
        "priority": t.priority,
        "created_at": ts(t.created_at),
        "next_run_at": ts(t.next_run_at),
        "started_at": t.started_at.map(ts),
        "finished_at": t.finished_at.map(ts),
        "timeout_ms": t.timeout_ms,
        "backoff": t.backoff.map(|b| json!({"base_ms": b.base_ms, "cap_ms": b.cap_ms, "jitter": b.jitter})),
        "payload": t.payload_json(),
        "result": t.result_json(),
        "last_error": t.last_error.as_ref().map(error_json),
        "errors": t.errors.iter().map(error_json).collect::<Vec<_>>(),
    })
}

/// One transition as JSON.
pub fn log_json(e: &LogEntry) -> Value {
    json!({
        "seq": e.seq,
        "from": e.from.map(status_str),
        "to": status_str(e.to),
        "attempt": e.attempt,
        "cause": e.cause.to_string(),
        "at": ts(e.at),
        "run_id": e.run_id,
    })
}

/// Status counts as a JSON object with every status present (upper-case keys).
pub fn status_counts_json(count: impl Fn(Status) -> u64) -> Value {
    let mut m = serde_json::Map::new();
    for s in Status::ALL {
        m.insert(status_str(s).to_string(), json!(count(s)));
    }
    Value::Object(m)
}

/// Shortens `s` to at most `max` characters, marking the cut with `…`.
pub fn truncate(s: &str, max: usize) -> String {
    let one_line = s.replace(['\n', '\r'], " ");
    if one_line.chars().count() <= max {
        return one_line;
    }
    let mut t: String = one_line.chars().take(max.saturating_sub(1)).collect();
    t.push('…');
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let mut t = Table::new(&["NAME", "N"]).right(&[1]);
        t.row(["a", "1"]);
        t.row(["longer", "100"]);
        assert_eq!(t.render(), "NAME      N\na         1\nlonger  100\n");
    }

    #[test]
    fn a_fitted_table_shortens_its_column() {
        let mut t = Table::new(&["QUEUE", "N"]).right(&[1]).fit(12, 0);
        t.row(["a-very-long-queue-name", "1"]);
        t.row(["short", "22"]);
        let out = t.render();
        assert_eq!(out, "QUEUE      N\na-very-…   1\nshort     22\n");
        assert!(out.lines().all(|l| l.chars().count() <= 12), "{out}");
    }

    #[test]
    fn truncate_marks_the_cut() {
        assert_eq!(truncate("abcdef", 4), "abc…");
        assert_eq!(truncate("ab\ncd", 10), "ab cd");
    }
}
