//! The format-4 task record: one `t` value holding the task and its transition log.
//!
//! ```text
//! [record kind 8: u8][schema version: u16 BE]
//! [task length: varint][task: bincode TaskInfo][entry count: varint]
//! [entry length: varint][entry: bincode log entry without its task id]   (once per transition)
//! ...
//! ```
//!
//! Lengths and the count are bincode 2 varints (`< 251`: one byte); the count makes a record
//! cut short at an entry boundary an error rather than a shorter history. A log entry is stored without its task id
//! (the key holds it). Entries follow the task in transition order, so a commit builds the new
//! value from the new task body, the stored entry bytes copied as they are (never decoded) and
//! the new entry: see [`append`].
//!
//! Why one key: sled costs ~150-250 bytes per key whatever its size, so a completed task with a
//! record, a state-index key, a finished-index key and three log keys (format 3) took ~1.4 KB on
//! disk; as a single key it takes ~410 B (BENCHMARKS.md, "Format 4").
//!
//! Decoding never panics: bad bytes give a [`Error::Corrupt`] naming the key.

use serde::{Deserialize, Serialize};

use crate::codec::{RecordKind, SCHEMA_VERSION};
use crate::error::{Error, Result};
use crate::log::{Cause, LogEntry};
use crate::task::{Status, TaskId, TaskInfo, Timestamp};

/// What the errors call a format-4 task record.
const WHAT: &str = "task record";

/// Upper bound on one length prefix (a corrupt prefix must not make us slice past the value).
const MAX_PART: u64 = 64 << 20;

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// A log entry as stored inside a record (no task id), borrowed for encoding.
#[derive(Serialize)]
struct EntryRef<'a> {
    seq: u64,
    from: &'a Option<Status>,
    to: &'a Status,
    attempt: u32,
    cause: &'a Cause,
    at: &'a Timestamp,
    run_id: u64,
}

/// A log entry as stored inside a record, decoded.
#[derive(Deserialize)]
struct EntryOwned {
    seq: u64,
    from: Option<Status>,
    to: Status,
    attempt: u32,
    cause: Cause,
    at: Timestamp,
    run_id: u64,
}

fn encode_err(e: impl std::fmt::Display) -> Error {
    Error::Encode {
        what: WHAT,
        reason: e.to_string(),
    }
}

fn push_len(out: &mut Vec<u8>, len: usize) -> Result<()> {
    let bytes = bincode::serde::encode_to_vec(len as u64, config()).map_err(encode_err)?;
    out.extend_from_slice(&bytes);
    Ok(())
}

/// One stored entry: its length prefix and its bytes.
pub fn encode_entry(entry: &LogEntry) -> Result<Vec<u8>> {
    let body = bincode::serde::encode_to_vec(
        EntryRef {
            seq: entry.seq,
            from: &entry.from,
            to: &entry.to,
            attempt: entry.attempt,
            cause: &entry.cause,
            at: &entry.at,
            run_id: entry.run_id,
        },
        config(),
    )
    .map_err(encode_err)?;
    let mut out = Vec::with_capacity(body.len() + 1);
    push_len(&mut out, body.len())?;
    out.extend_from_slice(&body);
    Ok(out)
}

/// A whole record: the task, then `count` entries (stored entry bytes, as [`split`] returns them
/// or [`encode_entry`] makes them, concatenated).
pub fn encode(task: &TaskInfo, count: u64, entries: &[u8]) -> Result<Vec<u8>> {
    let body = bincode::serde::encode_to_vec(task, config()).map_err(encode_err)?;
    let mut out = Vec::with_capacity(3 + 3 + body.len() + entries.len());
    out.push(RecordKind::TaskLog as u8);
    out.extend_from_slice(&SCHEMA_VERSION.to_be_bytes());
    push_len(&mut out, body.len())?;
    out.extend_from_slice(&body);
    push_len(&mut out, count as usize)?;
    out.extend_from_slice(entries);
    Ok(out)
}

/// The new value of a task's record: `task`, the entries of `old` (the stored value, if any)
/// copied without decoding them, then `entry`. `key` names the record for errors.
pub fn append(
    old: Option<&[u8]>,
    task: &TaskInfo,
    entry: Option<&LogEntry>,
    key: &dyn Fn() -> String,
) -> Result<Vec<u8>> {
    let (mut count, kept) = match old {
        Some(bytes) => {
            let (_, count, kept) = split(bytes, key)?;
            (count, kept)
        }
        None => (0, &[][..]),
    };
    let mut entries = Vec::with_capacity(kept.len() + 40);
    entries.extend_from_slice(kept);
    if let Some(e) = entry {
        entries.extend_from_slice(&encode_entry(e)?);
        count += 1;
    }
    encode(task, count, &entries)
}

/// Whether `bytes` starts with the format-4 record envelope (the migration tells converted
/// records from format-3 ones by it).
pub fn is_record(bytes: &[u8]) -> bool {
    bytes.first() == Some(&(RecordKind::TaskLog as u8))
}

fn corrupt(key: &dyn Fn() -> String, reason: String) -> Error {
    Error::Corrupt {
        what: WHAT,
        key: key(),
        reason,
    }
}

/// Reads a length prefix at the start of `bytes`: (length, prefix size).
fn read_len(bytes: &[u8], key: &dyn Fn() -> String) -> Result<(usize, usize)> {
    let (len, used) = bincode::serde::decode_from_slice::<u64, _>(bytes, config())
        .map_err(|e| corrupt(key, format!("a length prefix does not decode: {e}")))?;
    if len > MAX_PART || len as usize > bytes.len() - used {
        return Err(corrupt(
            key,
            format!(
                "a length prefix says {len} bytes but {} remain",
                bytes.len() - used
            ),
        ));
    }
    Ok((len as usize, used))
}

/// Splits a record into (task bytes, entry count, entry bytes), checking the envelope.
pub fn split<'a>(bytes: &'a [u8], key: &dyn Fn() -> String) -> Result<(&'a [u8], u64, &'a [u8])> {
    let [kind, v0, v1, rest @ ..] = bytes else {
        return Err(corrupt(
            key,
            format!(
                "{} bytes is shorter than the 3-byte envelope header",
                bytes.len()
            ),
        ));
    };
    if *kind != RecordKind::TaskLog as u8 {
        return Err(corrupt(
            key,
            format!(
                "record kind byte is {kind}, expected {}",
                RecordKind::TaskLog as u8
            ),
        ));
    }
    let version = u16::from_be_bytes([*v0, *v1]);
    if version != SCHEMA_VERSION {
        return Err(corrupt(
            key,
            format!(
                "schema version {version} is not one this build reads (it reads {SCHEMA_VERSION})"
            ),
        ));
    }
    let (len, used) = read_len(rest, key)?;
    let (task, rest) = rest[used..].split_at(len);
    let (count, used) = bincode::serde::decode_from_slice::<u64, _>(rest, config())
        .map_err(|e| corrupt(key, format!("the entry count does not decode: {e}")))?;
    Ok((task, count, &rest[used..]))
}

/// The entries' bytes, one slice per entry (length prefix removed), checking the framing and
/// the count.
fn frames<'a>(
    count: u64,
    mut entries: &'a [u8],
    key: &dyn Fn() -> String,
) -> Result<Vec<&'a [u8]>> {
    let mut out = Vec::new();
    while !entries.is_empty() {
        let (len, used) = read_len(entries, key)?;
        out.push(&entries[used..used + len]);
        entries = &entries[used + len..];
    }
    if out.len() as u64 != count {
        return Err(corrupt(
            key,
            format!("it holds {} log entries but says {count}", out.len()),
        ));
    }
    Ok(out)
}

/// Decodes `bytes` as exactly one `T`; errors are `Corrupt { what: kind, .. }`.
fn decode_exact<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    kind: &'static str,
    part: &str,
    key: &dyn Fn() -> String,
) -> Result<T> {
    let err = |reason: String| Error::Corrupt {
        what: kind,
        key: key(),
        reason,
    };
    let cfg = config().with_limit::<{ 64 << 20 }>();
    let (value, used) = bincode::serde::decode_from_slice::<T, _>(bytes, cfg)
        .map_err(|e| err(format!("{part} does not decode: {e}")))?;
    if used != bytes.len() {
        return Err(err(format!(
            "{} trailing bytes after {part}",
            bytes.len() - used
        )));
    }
    Ok(value)
}

/// The task of a record. The log's framing is checked too (not its entries' contents), so a
/// record whose log is cut short is reported here rather than at the next commit.
pub fn decode_task(bytes: &[u8], key: &dyn Fn() -> String) -> Result<TaskInfo> {
    let (task, count, entries) = split(bytes, key)?;
    frames(count, entries, key)?;
    decode_exact(task, WHAT, "the task", key)
}

/// The log of a record (task `id`), oldest first. An entry that does not decode is a
/// `Corrupt` error about a `"log entry"` (the framing around it, a `"task record"` one).
pub fn decode_log(id: TaskId, bytes: &[u8], key: &dyn Fn() -> String) -> Result<Vec<LogEntry>> {
    let (_, count, entries) = split(bytes, key)?;
    frames(count, entries, key)?
        .into_iter()
        .enumerate()
        .map(|(i, f)| {
            let e: EntryOwned = decode_exact(f, "log entry", &format!("entry {i}"), key)?;
            Ok(LogEntry {
                seq: e.seq,
                task_id: id,
                from: e.from,
                to: e.to,
                attempt: e.attempt,
                cause: e.cause,
                at: e.at,
                run_id: e.run_id,
            })
        })
        .collect()
}

/// Both: the task and its log.
pub fn decode(bytes: &[u8], key: &dyn Fn() -> String) -> Result<(TaskInfo, Vec<LogEntry>)> {
    let task = decode_task(bytes, key)?;
    let log = decode_log(task.id, bytes, key)?;
    Ok((task, log))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(t: &TaskInfo, seq: u64, to: Status, cause: Cause) -> LogEntry {
        LogEntry {
            seq,
            task_id: t.id,
            from: None,
            to,
            attempt: 0,
            cause,
            at: Timestamp(1_717_171_717_000),
            run_id: 3,
        }
    }

    #[test]
    fn append_keeps_the_old_entries_and_adds_the_new_one() {
        let key = || "t/x".to_string();
        let mut t = crate::task::test_task(3);
        let e1 = entry(&t, 1, Status::Pending, Cause::Enqueued);
        let v1 = append(None, &t, Some(&e1), &key).unwrap();
        assert!(is_record(&v1));
        t.status = Status::Running;
        t.attempts = 1;
        let mut e2 = entry(&t, 7, Status::Running, Cause::Claimed);
        e2.from = Some(Status::Pending);
        e2.cause = Cause::Failed {
            error_type: "x".repeat(300),
            permanent: false,
        };
        let v2 = append(Some(&v1), &t, Some(&e2), &key).unwrap();
        let (task, log) = decode(&v2, &key).unwrap();
        assert_eq!(task, t);
        assert_eq!(log, vec![e1.clone(), e2]);
        let v3 = append(Some(&v2), &t, None, &key).unwrap();
        assert_eq!(v3, v2, "no entry: the log is carried as is");
    }

    #[test]
    fn damaged_records_are_errors_naming_the_key() {
        let key = || "t/x".to_string();
        let t = crate::task::test_task(3);
        let v = append(
            None,
            &t,
            Some(&entry(&t, 1, Status::Pending, Cause::Enqueued)),
            &key,
        )
        .unwrap();
        for cut in 0..v.len() {
            let r = decode(&v[..cut], &key);
            let err = r.err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains("t/x"), "cut at {cut}: {err}");
        }
        let mut bad = v.clone();
        bad[0] = RecordKind::Task as u8;
        assert!(decode_task(&bad, &key).is_err());
        let mut long = v.clone();
        long.push(200);
        assert!(decode_task(&long, &key).is_err(), "a frame past the end");
    }
}
