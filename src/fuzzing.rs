//! Entry points shared by the fuzz targets (`fuzz/fuzz_targets/`) and the stable-toolchain
//! replay test (`tests/fuzz_corpus.rs`). Not part of the public API.
//!
//! Each `decode_*` function decodes arbitrary bytes exactly as the store decodes what it reads
//! (same functions, same error construction). [`check`] runs one of them and verifies the
//! properties every decoder must have:
//!
//! - it never panics, whatever the input;
//! - a decode error is [`Error::Corrupt`] naming what was being decoded (`"task record"`,
//!   `"log entry"`, `"pending-index key"`, ...) and the key the bytes came from (for values, a
//!   key holding [`FUZZ_TASK_ID`]; for keys, the key itself);
//! - whatever decodes re-encodes, and the re-encoding decodes to a value that encodes to the
//!   same bytes again (decode and encode agree);
//! - a key that decodes is exactly the key the encoder builds from the decoded parts, and at
//!   most one key decoder (and at most one record kind) accepts any input.
//!
//! None of these functions panics: a broken property is returned as a [`Violation`], and the
//! fuzz targets turn it into a panic, which is how libFuzzer records a finding.

use std::fmt;

use uuid::Uuid;

use crate::codec::{self, RecordKind};
use crate::error::{Error, Result};
use crate::keys;
use crate::log::LogEntry;
use crate::task::{Status, TaskId, TaskInfo, Timestamp};

/// Fuzzed values are decoded as if they were stored under this task's key, so error messages
/// can be checked for naming it.
pub const FUZZ_TASK_ID: TaskId = TaskId(Uuid::from_bytes([
    0x01, 0x8f, 0x00, 0x00, 0x00, 0x00, 0x7f, 0xff, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00, 0xf0, 0x22,
]));

/// One fuzz target per decoder family; the name is the fuzz target's and its corpus folder's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// Task records with their log (format 4): [`decode_task_record`].
    TaskRecord,
    /// Format-3 transition-log entries (read by the migration): [`decode_log_entry`].
    LogEntry,
    /// Metadata values: [`decode_meta`].
    Meta,
    /// Every key decoder and [`keys::describe`]: [`decode_keys`].
    Keys,
    /// The envelope against every record kind: [`envelope`].
    Envelope,
}

impl Target {
    /// Every target.
    pub const ALL: [Target; 5] = [
        Target::TaskRecord,
        Target::LogEntry,
        Target::Meta,
        Target::Keys,
        Target::Envelope,
    ];

    /// The fuzz target's name (`fuzz/fuzz_targets/<name>.rs`, `fuzz/corpus/<name>/`).
    pub fn name(self) -> &'static str {
        match self {
            Target::TaskRecord => "task_record",
            Target::LogEntry => "log_entry",
            Target::Meta => "meta",
            Target::Keys => "keys",
            Target::Envelope => "envelope",
        }
    }

    /// The target with this name.
    pub fn from_name(name: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// A broken decoder property. Always a bug; bad input alone never produces one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation(pub String);

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The key fuzzed task records and log entries are attributed to, printed as errors print it.
pub fn task_key_name() -> String {
    keys::describe(&keys::task(FUZZ_TASK_ID))
}

fn log_key_name() -> String {
    keys::describe(&keys::log(FUZZ_TASK_ID, 1))
}

/// Decodes `data` as a stored task record (format 4: the task and its log).
pub fn decode_task_record(data: &[u8]) -> Result<(TaskInfo, Vec<LogEntry>)> {
    crate::record::decode(data, &task_key_name)
}

/// Decodes `data` as a stored transition-log entry.
pub fn decode_log_entry(data: &[u8]) -> Result<LogEntry> {
    codec::decode(RecordKind::Log, data, &log_key_name)
}

/// What [`decode_meta`] found: the meta entries hold a `u32` (the format version) or a `u64`
/// (the last sequence number, the last run id).
#[derive(Debug)]
pub struct DecodedMeta {
    /// `data` decoded as the format version (key `m/format`).
    pub format: Result<u32>,
    /// `data` decoded as the last sequence number (key `m/seq`).
    pub seq: Result<u64>,
}

/// Decodes `data` as each kind of metadata value.
pub fn decode_meta(data: &[u8]) -> DecodedMeta {
    DecodedMeta {
        format: codec::decode(RecordKind::Meta, data, &|| {
            keys::describe(keys::META_FORMAT)
        }),
        seq: codec::decode(RecordKind::Meta, data, &|| keys::describe(keys::META_SEQ)),
    }
}

/// What [`decode_keys`] found: `data` run through every key decoder.
#[derive(Debug)]
pub struct DecodedKeys {
    /// [`keys::decode_task`].
    pub task: Result<TaskId>,
    /// [`keys::decode_state`].
    pub state: Result<(Status, TaskId)>,
    /// [`keys::decode_pending`].
    pub pending: Result<keys::PendingKey>,
    /// [`keys::decode_finished`] (format 3).
    pub finished: Result<(Timestamp, TaskId)>,
    /// [`keys::decode_finish_bucket`].
    pub bucket: Result<u64>,
    /// [`keys::decode_log`].
    pub log: Result<(TaskId, u64)>,
    /// [`keys::decode_count`].
    pub count: Result<(Status, String)>,
    /// [`keys::describe`].
    pub description: String,
}

/// Runs every key decoder and [`keys::describe`] on `data`.
pub fn decode_keys(data: &[u8]) -> DecodedKeys {
    DecodedKeys {
        task: keys::decode_task(data),
        state: keys::decode_state(data),
        pending: keys::decode_pending(data),
        finished: keys::decode_finished(data),
        bucket: keys::decode_finish_bucket(data),
        log: keys::decode_log(data),
        count: keys::decode_count(data),
        description: keys::describe(data),
    }
}

/// What [`envelope`] found: `data` decoded as a value of every record kind.
#[derive(Debug)]
pub struct DecodedEnvelope {
    /// As a task record (format 4).
    pub task: Result<(TaskInfo, Vec<LogEntry>)>,
    /// As a format-3 task record (read by the migration).
    pub task_v3: Result<TaskInfo>,
    /// As a log entry.
    pub log: Result<LogEntry>,
    /// As a metadata value.
    pub meta: Result<u64>,
    /// As a write-ahead entry (the key writes of a commit group).
    pub write_ahead: Result<WriteAheadOps>,
}

/// The payload of a write-ahead entry: `(key, Some(value) | None for a removal)`, in order.
pub type WriteAheadOps = Vec<(Vec<u8>, Option<Vec<u8>>)>;

/// Decodes `data` as every record kind (only the kind named by its first byte can succeed).
pub fn envelope(data: &[u8]) -> DecodedEnvelope {
    DecodedEnvelope {
        task: decode_task_record(data),
        task_v3: codec::decode(RecordKind::Task, data, &task_key_name),
        log: decode_log_entry(data),
        meta: decode_meta(data).seq,
        write_ahead: codec::decode(RecordKind::WriteAhead, data, &|| {
            keys::describe(&keys::write_ahead(1))
        }),
    }
}

/// Runs `target`'s entry point on `data` and checks every property listed in the module docs.
pub fn check(target: Target, data: &[u8]) -> std::result::Result<(), Violation> {
    match target {
        Target::TaskRecord => check_task_record(decode_task_record(data)),
        Target::LogEntry => check_record(RecordKind::Log, decode_log_entry(data), &log_key_name()),
        Target::Meta => {
            let m = decode_meta(data);
            check_record(
                RecordKind::Meta,
                m.format,
                &keys::describe(keys::META_FORMAT),
            )?;
            check_record(RecordKind::Meta, m.seq, &keys::describe(keys::META_SEQ))
        }
        Target::Keys => check_keys(data),
        Target::Envelope => {
            let e = envelope(data);
            let accepted = [
                e.task.is_ok(),
                e.task_v3.is_ok(),
                e.log.is_ok(),
                e.meta.is_ok(),
                e.write_ahead.is_ok(),
            ];
            let accepted_kind = [
                RecordKind::TaskLog,
                RecordKind::Task,
                RecordKind::Log,
                RecordKind::Meta,
                RecordKind::WriteAhead,
            ]
            .into_iter()
            .zip(accepted)
            .filter(|(_, ok)| *ok)
            .map(|(k, _)| k as u8)
            .collect::<Vec<_>>();
            match accepted_kind.as_slice() {
                [] => {}
                [kind] if data.first() == Some(kind) => {}
                other => {
                    return Err(Violation(format!(
                        "{} accepted as record kinds {other:?}",
                        hex(data)
                    )))
                }
            }
            check_task_record(e.task)?;
            check_record(RecordKind::Task, e.task_v3, &task_key_name())?;
            check_record(RecordKind::Log, e.log, &log_key_name())?;
            check_record(RecordKind::Meta, e.meta, &keys::describe(keys::META_SEQ))?;
            check_record(
                RecordKind::WriteAhead,
                e.write_ahead,
                &keys::describe(&keys::write_ahead(1)),
            )
        }
    }
}

fn kind_name(kind: RecordKind) -> &'static str {
    match kind {
        RecordKind::Task => "task record",
        RecordKind::Log => "log entry",
        RecordKind::Meta => "metadata value",
        RecordKind::WriteAhead => "write-ahead entry",
        RecordKind::Extras => "task extras",
        RecordKind::Limit => "limit",
        RecordKind::Schedule => "schedule",
        RecordKind::TaskLog => "task record",
    }
}

/// A format-4 record either decodes to a task and log that re-encode stably, or is a `Corrupt`
/// error naming the task record and its key.
fn check_task_record(
    decoded: Result<(TaskInfo, Vec<LogEntry>)>,
) -> std::result::Result<(), Violation> {
    let key = task_key_name();
    let (task, log) = match decoded {
        Ok(v) => v,
        Err(
            e @ Error::Corrupt {
                what: "log entry", ..
            },
        ) => return check_error(&e, "log entry", &key),
        Err(e) => return check_error(&e, "task record", &key),
    };
    let fail =
        |what: &str, e: &dyn fmt::Display| Violation(format!("a decoded task record: {what}: {e}"));
    let encode = |task: &TaskInfo, log: &[LogEntry]| -> Result<Vec<u8>> {
        let mut entries = Vec::new();
        for e in log {
            entries.extend_from_slice(&crate::record::encode_entry(e)?);
        }
        crate::record::encode(task, log.len() as u64, &entries)
    };
    let once = encode(&task, &log).map_err(|e| fail("does not re-encode", &e))?;
    let (t2, l2) = crate::record::decode(&once, &|| key.clone())
        .map_err(|e| fail("re-encoding does not decode", &e))?;
    let twice = encode(&t2, &l2).map_err(|e| fail("does not re-encode twice", &e))?;
    if once != twice {
        return Err(fail(
            "encoding is not stable",
            &format!("{} then {}", hex(&once), hex(&twice)),
        ));
    }
    Ok(())
}

/// A decode result is either a value that round-trips or a `Corrupt` error naming the record
/// kind and the key.
fn check_record<T>(
    kind: RecordKind,
    decoded: Result<T>,
    key: &str,
) -> std::result::Result<(), Violation>
where
    T: serde::Serialize + serde::de::DeserializeOwned,
{
    let value = match decoded {
        Ok(v) => v,
        Err(e) => return check_error(&e, kind_name(kind), key),
    };
    let fail = |what: &str, e: &dyn fmt::Display| {
        Violation(format!("a decoded {}: {what}: {e}", kind_name(kind)))
    };
    let once = codec::encode(kind, &value).map_err(|e| fail("does not re-encode", &e))?;
    let again: T = codec::decode(kind, &once, &|| key.to_string())
        .map_err(|e| fail("re-encoding does not decode", &e))?;
    let twice = codec::encode(kind, &again).map_err(|e| fail("does not re-encode twice", &e))?;
    if once != twice {
        return Err(fail(
            "encoding is not stable",
            &format!("{} then {}", hex(&once), hex(&twice)),
        ));
    }
    Ok(())
}

/// A decode error must be `Corrupt`, say what was being decoded, and name the key.
fn check_error(e: &Error, what: &str, key: &str) -> std::result::Result<(), Violation> {
    match e {
        Error::Corrupt {
            what: w,
            key: k,
            reason,
        } if *w == what && k == key && !reason.is_empty() => {
            let text = e.to_string();
            if text.contains(what) && text.contains(key) {
                Ok(())
            } else {
                Err(Violation(format!(
                    "error {text:?} does not name {what} at {key}"
                )))
            }
        }
        other => Err(Violation(format!(
            "expected a Corrupt error naming {what} at {key}, got {other:?}"
        ))),
    }
}

fn check_keys(data: &[u8]) -> std::result::Result<(), Violation> {
    let d = decode_keys(data);
    let name = d.description.clone();
    if name.is_empty() {
        return Err(Violation(format!("describe({}) is empty", hex(data))));
    }
    let mut accepted = Vec::new();
    let mut key_check = |what: &str,
                         decoded: std::result::Result<Vec<u8>, &Error>|
     -> std::result::Result<(), Violation> {
        match decoded {
            Ok(rebuilt) => {
                accepted.push(what.to_string());
                if rebuilt != data {
                    return Err(Violation(format!(
                        "{what} {} decodes, but its parts re-encode as {}",
                        hex(data),
                        hex(&rebuilt)
                    )));
                }
                Ok(())
            }
            Err(e) => check_error(e, what, &name),
        }
    };
    key_check("task key", d.task.as_ref().map(|id| keys::task(*id)))?;
    key_check(
        "state-index key",
        d.state.as_ref().map(|(s, id)| keys::state(*s, *id)),
    )?;
    key_check(
        "pending-index key",
        d.pending
            .as_ref()
            .map(|p| keys::pending(&p.queue, p.priority, p.next_run, p.id)),
    )?;
    key_check(
        "finished-index key",
        d.finished.as_ref().map(|(at, id)| keys::finished(*at, *id)),
    )?;
    key_check(
        "finish-bucket key",
        d.bucket.as_ref().map(|m| keys::finish_bucket(*m)),
    )?;
    key_check(
        "log key",
        d.log.as_ref().map(|(id, seq)| keys::log(*id, *seq)),
    )?;
    key_check(
        "counter key",
        d.count.as_ref().map(|(s, q)| keys::count(*s, q)),
    )?;
    if accepted.len() > 1 {
        return Err(Violation(format!("{} accepted as {accepted:?}", hex(data))));
    }
    // Keys that hold a task id are described with it, so errors about them name the task.
    let id = d
        .task
        .as_ref()
        .ok()
        .copied()
        .or_else(|| d.state.as_ref().ok().map(|(_, id)| *id))
        .or_else(|| d.finished.as_ref().ok().map(|(_, id)| *id))
        .or_else(|| d.log.as_ref().ok().map(|(id, _)| *id));
    if let Some(id) = id {
        if !name.contains(&id.to_string()) {
            return Err(Violation(format!(
                "describe({}) = {name:?} does not name task {id}",
                hex(data)
            )));
        }
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(2 + bytes.len() * 2);
    s.push_str("0x");
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}
