//! The key layout: every key omniq stores, encoded by hand as fixed-width big-endian bytes so
//! that sled's byte order is the order we scan in. All keys live in one sled tree, so one
//! `apply_batch` updates a record and all its index entries atomically.
//!
//! | prefix | layout                                                        | value            |
//! |--------|---------------------------------------------------------------|------------------|
//! | `m`    | `m` name                                                      | meta envelope    |
//! | `t`    | `t` id(16)                                                    | task + its log   |
//! | `s`    | `s` status(1) id(16), not for `Completed`                     | empty            |
//! | `p`    | `p` qlen(1) queue prio(1) next_run_ms(8) id(16)               | empty            |
//! | `f`    | `f` minute(8): a finish bucket                                | largest id(16)   |
//! | `c`    | `c` status(1) queue                                           | u64 BE count     |
//! | `w`    | `w` n(8)                                                      | write-ahead env. |
//! | `q`    | `q` queue                                                     | u64 BE paused-at |
//! | `u`    | `u` digest(32)                                                | holder id(16)    |
//! | `o`    | `o` id(16)                                                    | extras envelope  |
//! | `r`    | `r` scope(1) name                                             | limit envelope   |
//! | `a`    | `a` scope(1) nlen(1) name start_ms(8) id(16)                  | empty            |
//! | `h`    | `h` name                                                      | schedule env.    |
//! | `k`    | `k` klen(1) kind qlen(1) queue prio(1) next_run_ms(8) id(16)  | empty            |
//!
//! `prio` is `127 - priority` (as a byte), so higher priority sorts first; within a priority,
//! earlier `next_run_ms` first, then the id (UUIDv7, so enqueue order).
//!
//! Format 4 (issue 12: sled costs ~150-250 bytes per key, so a completed task must be one key):
//! a `t` value holds the task and its transition log (`crate::record`); a `Completed` task has
//! no index key at all (listing completed tasks scans `t`); the state index keeps `Pending`,
//! `Running`, `Failed` and `Cancelled`. Retention reads per-minute *finish buckets*: `f`
//! minute (`finished_at / 60_000`, u64 BE) -> the largest id (16 bytes, the `t` key order) of a
//! task that reached a terminal state with `finished_at` in that minute. Every terminal task
//! finished in minute `m` has an id <= bucket `m`'s value, so the terminal tasks finished
//! before a cutoff are all among the `t` keys up to the largest value of the buckets at or
//! before the cutoff's minute. Keys per task: a pending task has `t s p k`, a running, failed or
//! cancelled one `t s`, a completed one `t` alone.
//!
//! Format 3 (read only by the migration to format 4) also had `l` id(16) seq(8) -> one log
//! entry each, `f` finished_ms(8) id(16) -> empty per terminal task, and `s` for `Completed`.

use crate::error::{Error, Result};
use crate::task::{Status, TaskId, Timestamp};

/// Prefix bytes. Part of the on-disk format.
pub const META: u8 = b'm';
/// Task records.
pub const TASK: u8 = b't';
/// State index.
pub const STATE: u8 = b's';
/// Pending (due-time) index.
pub const PENDING: u8 = b'p';
/// Finish buckets (format 4, for retention; in format 3, a per-task finished-time index).
pub const FINISHED: u8 = b'f';
/// Transition log (format 3 only: format 4 keeps the log inside the task record).
pub const LOG: u8 = b'l';
/// Per-status, per-queue counters.
pub const COUNT: u8 = b'c';
/// Write-ahead entries of commit groups being applied (empty after a clean close).
pub const WRITE_AHEAD: u8 = b'w';

/// Paused queues: present only while the queue is paused (added in format 1 without changing
/// any existing encoding: an older build simply ignores the prefix).
pub const PAUSED: u8 = b'q';

/// Unique-key holders (format 2): digest -> the task holding it.
pub const UNIQUE: u8 = b'u';
/// Task extras (format 2): unique spec, schedule tick.
pub const EXTRAS: u8 = b'o';
/// Limits (format 2): scope -> limit.
pub const LIMIT: u8 = b'r';
/// Execution starts counted by rate limits (format 2).
pub const RATE_START: u8 = b'a';
/// Schedules (format 2): name -> schedule.
pub const SCHEDULE: u8 = b'h';
/// Pending index by kind (format 2): the `Pending` tasks again, by kind then queue, so a claim
/// can step over a kind whose limit is spent without reading its tasks.
pub const KIND_PENDING: u8 = b'k';

/// Meta key holding the on-disk format version.
pub const META_FORMAT: &[u8] = b"mformat";
/// Meta key holding the last transition sequence number used.
pub const META_SEQ: &[u8] = b"mseq";
/// Meta key holding the last process-run id.
pub const META_RUN: &[u8] = b"mrun";
/// Meta key holding the last write-ahead log record applied (format 3), written in the same
/// sled batch as the record's key writes.
pub const META_WAL: &[u8] = b"mwal";

/// Longest queue name (it is length-prefixed by one byte in keys).
pub const MAX_QUEUE_NAME: usize = 128;

/// `w` n: the write-ahead entry of one commit group.
pub fn write_ahead(n: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(WRITE_AHEAD);
    k.extend_from_slice(&n.to_be_bytes());
    k
}

/// `t` id
pub fn task(id: TaskId) -> Vec<u8> {
    let mut k = Vec::with_capacity(17);
    k.push(TASK);
    k.extend_from_slice(id.as_bytes());
    k
}

/// `s` status id
pub fn state(status: Status, id: TaskId) -> Vec<u8> {
    let mut k = Vec::with_capacity(18);
    k.push(STATE);
    k.push(status.code());
    k.extend_from_slice(id.as_bytes());
    k
}

/// `s` status: the prefix of one state's index.
pub fn state_prefix(status: Status) -> Vec<u8> {
    vec![STATE, status.code()]
}

/// Priority byte: higher priority sorts first.
pub fn priority_byte(priority: i8) -> u8 {
    (127i16 - i16::from(priority)) as u8
}

fn priority_from_byte(b: u8) -> i8 {
    (127i16 - i16::from(b)) as i8
}

/// `p` qlen queue: the prefix of one queue's pending index.
pub fn pending_queue_prefix(queue: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + queue.len() + 25);
    k.push(PENDING);
    k.push(queue.len() as u8);
    k.extend_from_slice(queue.as_bytes());
    k
}

/// `p` qlen queue prio: the prefix of one priority bucket of one queue.
pub fn pending_bucket_prefix(queue: &str, prio_byte: u8) -> Vec<u8> {
    let mut k = pending_queue_prefix(queue);
    k.push(prio_byte);
    k
}

/// `p` qlen queue prio next_run id
pub fn pending(queue: &str, priority: i8, next_run: Timestamp, id: TaskId) -> Vec<u8> {
    let mut k = pending_bucket_prefix(queue, priority_byte(priority));
    k.extend_from_slice(&next_run.0.to_be_bytes());
    k.extend_from_slice(id.as_bytes());
    k
}

/// A decoded pending-index key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingKey {
    /// Queue name.
    pub queue: String,
    /// Task priority.
    pub priority: i8,
    /// When it is due.
    pub next_run: Timestamp,
    /// The task.
    pub id: TaskId,
}

/// Decodes a `p` key.
pub fn decode_pending(key: &[u8]) -> Result<PendingKey> {
    let bad = |reason: &str| corrupt_key("pending-index key", key, reason);
    let [PENDING, qlen, rest @ ..] = key else {
        return Err(bad("wrong prefix or too short"));
    };
    let qlen = *qlen as usize;
    if rest.len() != qlen + 1 + 8 + 16 {
        return Err(bad("wrong length"));
    }
    let (queue, rest) = rest.split_at(qlen);
    let queue = std::str::from_utf8(queue).map_err(|_| bad("queue name is not UTF-8"))?;
    let priority = priority_from_byte(rest[0]);
    let next_run = Timestamp(u64::from_be_bytes(fixed(&rest[1..9])));
    let id = TaskId::from_bytes(fixed(&rest[9..25]));
    Ok(PendingKey {
        queue: queue.to_string(),
        priority,
        next_run,
        id,
    })
}

/// Milliseconds per finish bucket.
pub const BUCKET_MS: u64 = 60_000;

/// The finish bucket (minute) a time falls in.
pub fn bucket_of(at: Timestamp) -> u64 {
    at.0 / BUCKET_MS
}

/// `f` minute: a finish bucket (format 4).
pub fn finish_bucket(minute: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(FINISHED);
    k.extend_from_slice(&minute.to_be_bytes());
    k
}

/// Decodes an `f` key of format 4 into its minute.
pub fn decode_finish_bucket(key: &[u8]) -> Result<u64> {
    match key {
        [FINISHED, rest @ ..] if rest.len() == 8 => Ok(u64::from_be_bytes(fixed(rest))),
        _ => Err(corrupt_key(
            "finish-bucket key",
            key,
            "wrong prefix or length",
        )),
    }
}

/// Decodes a finish bucket's value (the largest id in it).
pub fn decode_bucket_value(key: &[u8], value: &[u8]) -> Result<TaskId> {
    if value.len() != 16 {
        return Err(corrupt_key(
            "finish bucket",
            key,
            "value is not a 16-byte id",
        ));
    }
    Ok(TaskId::from_bytes(fixed(value)))
}

/// `f` finished_ms id: format 3's per-task finished index (the migration removes it).
pub fn finished(at: Timestamp, id: TaskId) -> Vec<u8> {
    let mut k = Vec::with_capacity(25);
    k.push(FINISHED);
    k.extend_from_slice(&at.0.to_be_bytes());
    k.extend_from_slice(id.as_bytes());
    k
}

/// Decodes an `f` key into (finished_at, id).
pub fn decode_finished(key: &[u8]) -> Result<(Timestamp, TaskId)> {
    match key {
        [FINISHED, rest @ ..] if rest.len() == 24 => Ok((
            Timestamp(u64::from_be_bytes(fixed(&rest[..8]))),
            TaskId::from_bytes(fixed(&rest[8..])),
        )),
        _ => Err(corrupt_key(
            "finished-index key",
            key,
            "wrong prefix or length",
        )),
    }
}

/// `l` id seq: format 3's log entry key (the migration removes it).
pub fn log(id: TaskId, seq: u64) -> Vec<u8> {
    let mut k = log_prefix(id);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// `l` id: the prefix of one task's log.
pub fn log_prefix(id: TaskId) -> Vec<u8> {
    let mut k = Vec::with_capacity(25);
    k.push(LOG);
    k.extend_from_slice(id.as_bytes());
    k
}

/// Decodes an `l` key into (id, seq).
pub fn decode_log(key: &[u8]) -> Result<(TaskId, u64)> {
    match key {
        [LOG, rest @ ..] if rest.len() == 24 => Ok((
            TaskId::from_bytes(fixed(&rest[..16])),
            u64::from_be_bytes(fixed(&rest[16..])),
        )),
        _ => Err(corrupt_key("log key", key, "wrong prefix or length")),
    }
}

/// Decodes a `t` key into the id.
pub fn decode_task(key: &[u8]) -> Result<TaskId> {
    match key {
        [TASK, rest @ ..] if rest.len() == 16 => Ok(TaskId::from_bytes(fixed(rest))),
        _ => Err(corrupt_key("task key", key, "wrong prefix or length")),
    }
}

/// Decodes an `s` key into (status, id).
pub fn decode_state(key: &[u8]) -> Result<(Status, TaskId)> {
    match key {
        [STATE, code, rest @ ..] if rest.len() == 16 => {
            let status = Status::from_code(*code)
                .ok_or_else(|| corrupt_key("state-index key", key, "unknown status byte"))?;
            Ok((status, TaskId::from_bytes(fixed(rest))))
        }
        _ => Err(corrupt_key(
            "state-index key",
            key,
            "wrong prefix or length",
        )),
    }
}

/// `c` status queue
pub fn count(status: Status, queue: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + queue.len());
    k.push(COUNT);
    k.push(status.code());
    k.extend_from_slice(queue.as_bytes());
    k
}

/// Decodes a `c` key into (status, queue).
pub fn decode_count(key: &[u8]) -> Result<(Status, String)> {
    let bad = |r: &str| corrupt_key("counter key", key, r);
    match key {
        [COUNT, code, queue @ ..] => {
            let status = Status::from_code(*code).ok_or_else(|| bad("unknown status byte"))?;
            let queue = std::str::from_utf8(queue).map_err(|_| bad("queue name is not UTF-8"))?;
            Ok((status, queue.to_string()))
        }
        _ => Err(bad("wrong prefix")),
    }
}

/// `q` queue: the pause flag of one queue.
pub fn paused(queue: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + queue.len());
    k.push(PAUSED);
    k.extend_from_slice(queue.as_bytes());
    k
}

/// Decodes a `q` key into the queue name.
pub fn decode_paused(key: &[u8]) -> Result<String> {
    match key {
        [PAUSED, queue @ ..] if !queue.is_empty() => std::str::from_utf8(queue)
            .map(str::to_string)
            .map_err(|_| corrupt_key("pause key", key, "queue name is not UTF-8")),
        _ => Err(corrupt_key("pause key", key, "wrong prefix or empty queue")),
    }
}

/// `u` digest
pub fn unique(digest: &[u8; 32]) -> Vec<u8> {
    let mut k = Vec::with_capacity(33);
    k.push(UNIQUE);
    k.extend_from_slice(digest);
    k
}

/// Decodes a `u` key into the digest.
pub fn decode_unique(key: &[u8]) -> Result<[u8; 32]> {
    match key {
        [UNIQUE, rest @ ..] if rest.len() == 32 => Ok(fixed(rest)),
        _ => Err(corrupt_key("unique key", key, "wrong prefix or length")),
    }
}

/// Decodes a `u` value (the holder's id).
pub fn decode_holder(key: &[u8], value: &[u8]) -> Result<TaskId> {
    if value.len() != 16 {
        return Err(corrupt_key(
            "unique holder",
            key,
            "value is not a 16-byte id",
        ));
    }
    Ok(TaskId::from_bytes(fixed(value)))
}

/// `o` id
pub fn extras(id: TaskId) -> Vec<u8> {
    let mut k = Vec::with_capacity(17);
    k.push(EXTRAS);
    k.extend_from_slice(id.as_bytes());
    k
}

/// Decodes an `o` key into the id.
pub fn decode_extras(key: &[u8]) -> Result<TaskId> {
    match key {
        [EXTRAS, rest @ ..] if rest.len() == 16 => Ok(TaskId::from_bytes(fixed(rest))),
        _ => Err(corrupt_key("extras key", key, "wrong prefix or length")),
    }
}

/// `r` scope name
pub fn limit(scope: &crate::rules::limit::LimitScope) -> Vec<u8> {
    let mut k = vec![LIMIT, scope.code()];
    k.extend_from_slice(scope.name().as_bytes());
    k
}

/// Decodes an `r` key into the scope.
pub fn decode_limit(key: &[u8]) -> Result<crate::rules::limit::LimitScope> {
    let bad = |r: &str| corrupt_key("limit key", key, r);
    match key {
        [LIMIT, code, name @ ..] if !name.is_empty() => {
            let name = std::str::from_utf8(name).map_err(|_| bad("name is not UTF-8"))?;
            crate::rules::limit::LimitScope::from_code(*code, name.to_string())
                .ok_or_else(|| bad("unknown scope byte"))
        }
        _ => Err(bad("wrong prefix or empty name")),
    }
}

/// `a` scope nlen name: the prefix of one scope's counted starts.
pub fn rate_start_prefix(scope: &crate::rules::limit::LimitScope) -> Vec<u8> {
    let name = scope.name().as_bytes();
    let mut k = Vec::with_capacity(3 + name.len() + 24);
    k.push(RATE_START);
    k.push(scope.code());
    k.push(name.len().min(255) as u8);
    k.extend_from_slice(name);
    k
}

/// `a` scope nlen name start id
pub fn rate_start(scope: &crate::rules::limit::LimitScope, at: Timestamp, id: TaskId) -> Vec<u8> {
    let mut k = rate_start_prefix(scope);
    k.extend_from_slice(&at.0.to_be_bytes());
    k.extend_from_slice(id.as_bytes());
    k
}

/// Decodes an `a` key into (scope, start, id).
pub fn decode_rate_start(
    key: &[u8],
) -> Result<(crate::rules::limit::LimitScope, Timestamp, TaskId)> {
    let bad = |r: &str| corrupt_key("rate-start key", key, r);
    let [RATE_START, code, nlen, rest @ ..] = key else {
        return Err(bad("wrong prefix or too short"));
    };
    let nlen = *nlen as usize;
    if rest.len() != nlen + 24 {
        return Err(bad("wrong length"));
    }
    let name = std::str::from_utf8(&rest[..nlen]).map_err(|_| bad("name is not UTF-8"))?;
    let scope = crate::rules::limit::LimitScope::from_code(*code, name.to_string())
        .ok_or_else(|| bad("unknown scope byte"))?;
    let at = Timestamp(u64::from_be_bytes(fixed(&rest[nlen..nlen + 8])));
    Ok((scope, at, TaskId::from_bytes(fixed(&rest[nlen + 8..]))))
}

/// `k` klen kind: the prefix of one kind's pending-by-kind entries.
pub fn kind_prefix(kind: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + kind.len() + 2 + 25);
    k.push(KIND_PENDING);
    k.push(kind.len().min(255) as u8);
    k.extend_from_slice(kind.as_bytes());
    k
}

/// `k` klen kind qlen queue: the prefix of one kind's pending tasks on one queue.
pub fn kind_queue_prefix(kind: &str, queue: &str) -> Vec<u8> {
    let mut k = kind_prefix(kind);
    k.push(queue.len().min(255) as u8);
    k.extend_from_slice(queue.as_bytes());
    k
}

/// `k` klen kind qlen queue prio next_run id
pub fn kind_pending(
    kind: &str,
    queue: &str,
    priority: i8,
    next_run: Timestamp,
    id: TaskId,
) -> Vec<u8> {
    let mut k = kind_queue_prefix(kind, queue);
    k.push(priority_byte(priority));
    k.extend_from_slice(&next_run.0.to_be_bytes());
    k.extend_from_slice(id.as_bytes());
    k
}

/// Decodes a `k` key into (kind, the pending key it mirrors).
pub fn decode_kind_pending(key: &[u8]) -> Result<(String, PendingKey)> {
    let bad = |reason: &str| corrupt_key("pending-by-kind key", key, reason);
    let [KIND_PENDING, klen, rest @ ..] = key else {
        return Err(bad("wrong prefix or too short"));
    };
    let klen = *klen as usize;
    if rest.len() < klen + 1 {
        return Err(bad("too short"));
    }
    let (kind, rest) = rest.split_at(klen);
    let kind = std::str::from_utf8(kind).map_err(|_| bad("kind is not UTF-8"))?;
    let mut p = vec![PENDING];
    p.extend_from_slice(rest);
    let pk = decode_pending(&p).map_err(|_| bad("wrong length"))?;
    Ok((kind.to_string(), pk))
}

/// `h` name
pub fn schedule(name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + name.len());
    k.push(SCHEDULE);
    k.extend_from_slice(name.as_bytes());
    k
}

/// A key, printed for humans: the prefix letter, then a task id where the key holds one.
/// Never fails (it is used to build error messages, so it must not produce errors itself).
pub fn describe(key: &[u8]) -> String {
    let id_at = |off: usize| TaskId::from_bytes(fixed(&key[off..off + 16]));
    let hex = || key.iter().map(|b| format!("{b:02x}")).collect::<String>();
    match (key.first(), key.len()) {
        (Some(&TASK), 17) => format!("t/{}", id_at(1)),
        (Some(&LOG), 25) => format!("l/{}/{}", id_at(1), u64::from_be_bytes(fixed(&key[17..]))),
        (Some(&STATE), 18) => match Status::from_code(key[1]) {
            Some(st) => format!("s/{st}/{}", id_at(2)),
            None => format!("s/?{}/{}", key[1], id_at(2)),
        },
        (Some(&FINISHED), 25) => {
            format!("f/{}/{}", u64::from_be_bytes(fixed(&key[1..9])), id_at(9))
        }
        (Some(&FINISHED), 9) => format!("f/{}", u64::from_be_bytes(fixed(&key[1..9]))),
        (Some(&META), _) => format!("m/{}", String::from_utf8_lossy(&key[1..])),
        (Some(&WRITE_AHEAD), 9) => format!("w/{}", u64::from_be_bytes(fixed(&key[1..]))),
        (Some(&EXTRAS), 17) => format!("o/{}", id_at(1)),
        (Some(&UNIQUE), 33) => format!("u/{}", &hex()[2..]),
        (Some(&SCHEDULE), _) => format!("h/{}", String::from_utf8_lossy(&key[1..])),
        (Some(&LIMIT), n) if n >= 2 => format!(
            "r/{}/{}",
            key[1] as char,
            String::from_utf8_lossy(&key[2..])
        ),
        _ => format!("0x{}", hex()),
    }
}

fn corrupt_key(what: &'static str, key: &[u8], reason: &str) -> Error {
    Error::Corrupt {
        what,
        key: describe(key),
        reason: reason.to_string(),
    }
}

/// Copies a slice of known length into an array. Callers check lengths first; a mismatch can
/// only come from a bug here, and yields zeros rather than a panic.
fn fixed<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    if bytes.len() == N {
        out.copy_from_slice(bytes);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_keys_sort_by_priority_then_time_then_id() {
        let a = TaskId::generate();
        let b = TaskId::generate();
        let high = pending("q", 5, Timestamp(2_000), b);
        let low_early = pending("q", 0, Timestamp(1_000), a);
        let low_late = pending("q", 0, Timestamp(1_500), a);
        let neg = pending("q", -3, Timestamp(0), a);
        let mut keys = vec![
            neg.clone(),
            low_late.clone(),
            high.clone(),
            low_early.clone(),
        ];
        keys.sort();
        assert_eq!(keys, vec![high, low_early, low_late, neg]);
        let same_time_a = pending("q", 0, Timestamp(7), a);
        let same_time_b = pending("q", 0, Timestamp(7), b);
        assert!(same_time_a < same_time_b, "enqueue order breaks ties");
    }

    #[test]
    fn keys_round_trip() {
        let id = TaskId::generate();
        let k = pending("emails", -128, Timestamp(u64::MAX), id);
        let d = decode_pending(&k).unwrap();
        assert_eq!(
            (d.queue.as_str(), d.priority, d.next_run, d.id),
            ("emails", -128, Timestamp(u64::MAX), id)
        );
        assert_eq!(decode_log(&log(id, 9)).unwrap(), (id, 9));
        assert_eq!(
            decode_finished(&finished(Timestamp(5), id)).unwrap(),
            (Timestamp(5), id)
        );
        assert_eq!(
            decode_state(&state(Status::Failed, id)).unwrap(),
            (Status::Failed, id)
        );
        assert_eq!(decode_task(&task(id)).unwrap(), id);
        assert_eq!(decode_paused(&paused("emails")).unwrap(), "emails");
        assert!(decode_paused(b"q").is_err());
        assert!(decode_paused(b"q\xff").is_err());
        assert_eq!(decode_unique(&unique(&[7; 32])).unwrap(), [7; 32]);
        assert_eq!(decode_extras(&extras(id)).unwrap(), id);
        let scope = crate::rules::limit::LimitScope::kind("mail");
        assert_eq!(decode_limit(&limit(&scope)).unwrap(), scope);
        assert_eq!(
            decode_rate_start(&rate_start(&scope, Timestamp(9), id)).unwrap(),
            (scope, Timestamp(9), id)
        );
        assert!(decode_rate_start(b"a").is_err());
        let kp = kind_pending("mail", "q", -2, Timestamp(9), id);
        let (kind, pk) = decode_kind_pending(&kp).unwrap();
        assert_eq!(
            (kind.as_str(), pk.queue.as_str(), pk.priority),
            ("mail", "q", -2)
        );
        assert_eq!((pk.next_run, pk.id), (Timestamp(9), id));
        assert!(decode_kind_pending(b"k\x09ab").is_err());
        assert!(decode_limit(b"rz").is_err());
        assert_eq!(
            decode_count(&count(Status::Running, "x")).unwrap(),
            (Status::Running, "x".into())
        );
    }

    #[test]
    fn bad_keys_are_errors_not_panics() {
        for bad in [
            &b""[..],
            b"p",
            b"p\x05ab",
            b"l123",
            b"s\x09aaaaaaaaaaaaaaaa",
            b"f",
        ] {
            assert!(decode_pending(bad).is_err());
            assert!(decode_log(bad).is_err());
            assert!(decode_state(bad).is_err());
            assert!(decode_finished(bad).is_err());
            let _ = describe(bad);
        }
    }
}
