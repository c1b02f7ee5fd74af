//! Golden bytes pinning on-disk formats 1, 2 and 3: value envelopes (task records, log entries,
//! meta values; format 2 adds task extras, limits and schedules) and every key layout in
//! `src/keys.rs`; format 3 adds the write-ahead log's record layout and `m/wal`. If one of these tests fails, the bytes
//! omniq writes have changed: existing directories would no longer read. Do not update the
//! golden bytes; add a new schema/format version with a conversion instead.
//!
//! Golden bytes are written as commented segments: hex (spaces ignored), optionally followed by
//! `'text` for the UTF-8 bytes of a string (`"0a 'send_email"`: length 10, then the text). Values use
//! bincode 2's standard config: little-endian varints (< 251: one byte; 251 = u16, 252 = u32,
//! 253 = u64 follows), `i8` as one byte, `f64` as 8 LE bytes, `Option` as a 0/1 tag, enums as
//! a varint variant index, byte strings and `String`s length-prefixed. Keys are big-endian.

use std::time::Duration;

use omniq::codec::{decode, encode, RecordKind};
use omniq::testing::ManualClock;
use omniq::{
    keys, Backoff, Cause, EnqueueOptions, Error, LogEntry, Queue, Status, TaskError, TaskId,
    TaskInfo, Timestamp, FORMAT_VERSION,
};

mod common;
use common::{raw_db, reopen};

/// The fixture task id, 018f3a2b-4c5d-7e6f-8a9b-0c1d2e3f4a5b, as hex.
macro_rules! id_hex {
    () => {
        "018f3a2b4c5d7e6f8a9b0c1d2e3f4a5b"
    };
}
const ID_HEX: &str = id_hex!();

fn id() -> TaskId {
    TaskId::from_bytes(golden(&[ID_HEX]).try_into().unwrap())
}

fn golden(parts: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    for part in parts {
        let (hex_part, text) = part.split_once('\'').unwrap_or((part, ""));
        let digits: String = hex_part.chars().filter(|c| !c.is_whitespace()).collect();
        assert!(digits.len().is_multiple_of(2), "odd hex segment {part:?}");
        for i in (0..digits.len()).step_by(2) {
            out.push(
                u8::from_str_radix(&digits[i..i + 2], 16)
                    .unwrap_or_else(|_| panic!("bad hex {part:?}")),
            );
        }
        out.extend_from_slice(text.as_bytes());
    }
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Encoding `value` gives exactly the golden bytes, and the golden bytes decode to `value`.
fn assert_golden<T>(what: &str, kind: RecordKind, value: &T, parts: &[&str])
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let expected = golden(parts);
    let actual = encode(kind, value).unwrap();
    assert_eq!(
        hex(&actual),
        hex(&expected),
        "{what}: the encoding changed; format version 1 directories would no longer read"
    );
    let decoded: T = decode(kind, &expected, &|| what.to_string()).unwrap();
    assert_eq!(
        &decoded, value,
        "{what}: the golden bytes decode to something else"
    );
}

const T_CREATED: Timestamp = Timestamp(1_717_171_717_000); // 0x0000018fcf690388

fn full_task() -> TaskInfo {
    let network = TaskError {
        error_type: "network".into(),
        message: "connection reset".into(),
        retry_count: 0,
        timestamp: Timestamp(1_717_171_718_000),
        permanent: false,
    };
    let timeout = TaskError {
        error_type: "timeout".into(),
        message: "attempt 2 exceeded 30s".into(),
        retry_count: 1,
        timestamp: Timestamp(1_717_171_750_500),
        permanent: false,
    };
    TaskInfo {
        id: id(),
        kind: "send_email".into(),
        queue: "emails".into(),
        payload: br#"{"to":"ada@example.com"}"#.to_vec(),
        status: Status::Completed,
        attempts: 3,
        max_retries: 5,
        priority: -7,
        created_at: T_CREATED,
        next_run_at: Timestamp(1_717_171_752_750),
        started_at: Some(Timestamp(1_717_171_752_800)),
        finished_at: Some(Timestamp(1_717_171_753_000)),
        timeout_ms: Some(30_000),
        backoff: Some(Backoff {
            base_ms: 250,
            cap_ms: 10_000,
            jitter: 0.5,
        }),
        result: Some(br#""sent""#.to_vec()),
        last_error: Some(timeout.clone()),
        errors: vec![network, timeout],
        lease: 42,
    }
}

#[test]
fn format_version_is_four() {
    assert_eq!(FORMAT_VERSION, 4);
    assert_eq!(omniq::codec::SCHEMA_VERSION, 1);
    assert_eq!(
        [
            RecordKind::Task as u8,
            RecordKind::Log as u8,
            RecordKind::Meta as u8,
            RecordKind::WriteAhead as u8,
            RecordKind::Extras as u8,
            RecordKind::Limit as u8,
            RecordKind::Schedule as u8,
            RecordKind::TaskLog as u8,
        ],
        [1, 2, 3, 4, 5, 6, 7, 8]
    );
}

/// Format 4: a task record holds the task and its log. Pinned with the minimal task and two
/// entries: `[08][0001][task length][task as the v1 payload][entry count]` then per entry
/// `[length][the v1 log entry payload without its task id]`.
#[test]
fn task_record_with_log_v4() {
    let t = minimal_task();
    let task_body = [
        concat!("10 ", id_hex!()),
        "01 'k",
        "07 'default",
        "04 'null",
        "00 00 03 00 00 fa",
        "00 00 00 00 00 00 00 00",
    ];
    let body_len = golden(&task_body).len();
    assert_eq!(body_len, 46);
    let enqueued = LogEntry {
        seq: 1,
        task_id: id(),
        from: None,
        to: Status::Pending,
        attempt: 0,
        cause: Cause::Enqueued,
        at: T_CREATED,
        run_id: 300,
    };
    let failed = LogEntry {
        seq: 70_000,
        from: Some(Status::Pending),
        to: Status::Running,
        attempt: 1,
        cause: Cause::Failed {
            error_type: "network".into(),
            permanent: true,
        },
        ..enqueued.clone()
    };
    // An entry: seq, from, to, attempt, cause, at (T_CREATED), run_id 300.
    const TAIL: &str = "fd 880369cf8f010000 fb 2c01";
    let mut parts = vec!["08 0001", "2e"];
    parts.extend(task_body);
    parts.extend([
        "02",
        "11",
        "01 00 00 00 00",
        TAIL,
        "1f",
        "fc 70110100 01 00 01 01 03 07 'network",
        "01",
        TAIL,
    ]);
    let expected = golden(&parts);
    let mut entries = omniq::record::encode_entry(&enqueued).unwrap();
    entries.extend(omniq::record::encode_entry(&failed).unwrap());
    let actual = omniq::record::encode(&t, 2, &entries).unwrap();
    assert_eq!(
        hex(&actual),
        hex(&expected),
        "the format-4 record encoding changed; format-4 directories would no longer read"
    );
    let appended = omniq::record::append(
        Some(&omniq::record::append(None, &t, Some(&enqueued), &|| "t".into()).unwrap()),
        &t,
        Some(&failed),
        &|| "t".into(),
    )
    .unwrap();
    assert_eq!(
        hex(&appended),
        hex(&expected),
        "append builds the same bytes"
    );
    let (task, log) = omniq::record::decode(&expected, &|| "t".into()).unwrap();
    assert_eq!(task, t);
    assert_eq!(log, vec![enqueued, failed]);
    assert!(omniq::record::is_record(&expected));
    assert!(!omniq::record::is_record(
        &encode(RecordKind::Task, &t).unwrap()
    ));
}

#[test]
fn finish_bucket_key_v4() {
    let id = id();
    let minute = 1_717_171_753_000 / 60_000; // 28_619_529 = 0x1b4b309
    assert_eq!(keys::bucket_of(Timestamp(1_717_171_753_000)), minute);
    assert_eq!(
        hex(&keys::finish_bucket(minute)),
        hex(&golden(&["66", "0000000001b4b309"]))
    );
    assert_eq!(
        keys::decode_finish_bucket(&keys::finish_bucket(minute)).unwrap(),
        minute
    );
    assert_eq!(keys::describe(&keys::finish_bucket(minute)), "f/28619529");
    assert_eq!(
        keys::decode_bucket_value(&keys::finish_bucket(minute), &golden(&[ID_HEX])).unwrap(),
        id
    );
    assert!(keys::decode_bucket_value(b"f", b"short").is_err());
    assert!(keys::decode_finish_bucket(&keys::finished(Timestamp(5), id)).is_err());
}

#[test]
fn full_task_record_v1() {
    assert_golden(
        "full task record",
        RecordKind::Task,
        &full_task(),
        &[
            "01 0001",                         // envelope: kind 1 (task), schema 1 (u16 BE)
            concat!("10 ", id_hex!()),         // id: 16 bytes, length-prefixed
            "0a 'send_email",                  // kind
            "06 'emails",                      // queue
            r#"18 '{"to":"ada@example.com"}"#, // payload (JSON bytes)
            "02",                              // status: Completed (variant 2)
            "03",                              // attempts
            "05",                              // max_retries
            "f9",                              // priority: -7 as one byte
            "fd 880369cf8f010000",             // created_at (u64 varint)
            "fd 2e8f69cf8f010000",             // next_run_at
            "01 fd 608f69cf8f010000",          // started_at: Some
            "01 fd 289069cf8f010000",          // finished_at: Some
            "01 fb 3075",                      // timeout_ms: Some(30_000)
            "01 fa fb1027 000000000000e03f",   // backoff: Some { 250, 10_000, 0.5 }
            r#"01 06 '"sent""#,                // result: Some
            "01",                              // last_error: Some
            "07 'timeout",                     //   error_type
            "16 'attempt 2 exceeded 30s",      //   message
            "01 fd 648669cf8f010000 00",       //   retry_count, timestamp, permanent
            "02",                              // errors: 2
            "07 'network",                     //   [0]
            "10 'connection reset",            //
            "00 fd 700769cf8f010000 00",       //
            "07 'timeout",                     //   [1]
            "16 'attempt 2 exceeded 30s",      //
            "01 fd 648669cf8f010000 00",       //
            "2a",                              // lease
        ],
    );
}

fn minimal_task() -> TaskInfo {
    TaskInfo {
        id: id(),
        kind: "k".into(),
        queue: "default".into(),
        payload: b"null".to_vec(),
        status: Status::Pending,
        attempts: 0,
        max_retries: 3,
        priority: 0,
        created_at: Timestamp(0),
        next_run_at: Timestamp(250),
        started_at: None,
        finished_at: None,
        timeout_ms: None,
        backoff: None,
        result: None,
        last_error: None,
        errors: Vec::new(),
        lease: 0,
    }
}

#[test]
fn minimal_task_record_v1() {
    let t = minimal_task();
    assert_golden(
        "minimal task record",
        RecordKind::Task,
        &t,
        &[
            "01 0001",
            concat!("10 ", id_hex!()),
            "01 'k",
            "07 'default",
            "04 'null",
            "00",                // status: Pending (variant 0)
            "00 03",             // attempts, max_retries
            "00",                // priority
            "00 fa",             // created_at 0, next_run_at 250 (largest one-byte varint)
            "00 00 00 00 00 00", // started_at .. last_error: None
            "00",                // errors: empty
            "00",                // lease
        ],
    );
}

/// Exhaustive on purpose: a new `Cause` variant does not compile here until it gets a fixture.
fn cause_variant(c: &Cause) -> usize {
    match c {
        Cause::Enqueued => 0,
        Cause::Claimed => 1,
        Cause::Succeeded => 2,
        Cause::Failed { .. } => 3,
        Cause::Cancelled => 4,
        Cause::ManualRetry => 5,
        Cause::Released => 6,
    }
}

#[test]
fn log_entry_for_every_cause_v1() {
    // Common tail of every entry: at (T_CREATED), run_id 300.
    const TAIL: &str = "fd 880369cf8f010000 fb 2c01";
    let entry = |seq, from, to, attempt, cause| LogEntry {
        seq,
        task_id: id(),
        from,
        to,
        attempt,
        cause,
        at: T_CREATED,
        run_id: 300,
    };
    use Status::*;
    let cases: Vec<(LogEntry, Vec<&str>)> = vec![
        (
            entry(1, None, Pending, 0, Cause::Enqueued),
            // seq 1, id, from None, to Pending (0), attempt 0, cause Enqueued (0)
            vec!["02 0001", "01", "10", ID_HEX, "00", "00", "00", "00", TAIL],
        ),
        (
            entry(2, Some(Pending), Running, 1, Cause::Claimed),
            vec![
                "02 0001", "02", "10", ID_HEX, "01 00", "01", "01", "01", TAIL,
            ],
        ),
        (
            entry(
                3,
                Some(Running),
                Pending,
                1,
                Cause::Failed {
                    error_type: "network".into(),
                    permanent: false,
                },
            ),
            vec![
                "02 0001",
                "03",
                "10",
                ID_HEX,
                "01 01",
                "00",
                "01",
                "03 07 'network",
                "00",
                TAIL,
            ],
        ),
        (
            // seq 70_000 needs the u32 varint form.
            entry(70_000, Some(Running), Completed, 3, Cause::Succeeded),
            vec![
                "02 0001",
                "fc 70110100",
                "10",
                ID_HEX,
                "01 01",
                "02",
                "03",
                "02",
                TAIL,
            ],
        ),
        (
            entry(
                9,
                Some(Running),
                Failed,
                1,
                Cause::Failed {
                    error_type: "invalid".into(),
                    permanent: true,
                },
            ),
            vec![
                "02 0001",
                "09",
                "10",
                ID_HEX,
                "01 01",
                "03",
                "01",
                "03 07 'invalid",
                "01",
                TAIL,
            ],
        ),
        (
            entry(10, Some(Pending), Cancelled, 0, Cause::Cancelled),
            vec![
                "02 0001", "0a", "10", ID_HEX, "01 00", "04", "00", "04", TAIL,
            ],
        ),
        (
            entry(11, Some(Failed), Pending, 0, Cause::ManualRetry),
            vec![
                "02 0001", "0b", "10", ID_HEX, "01 03", "00", "00", "05", TAIL,
            ],
        ),
        (
            // A claimed-ahead task handed back unstarted (attempt given back).
            entry(12, Some(Running), Pending, 0, Cause::Released),
            vec![
                "02 0001", "0c", "10", ID_HEX, "01 01", "00", "00", "06", TAIL,
            ],
        ),
    ];
    let mut covered = [false; 7];
    for (e, parts) in &cases {
        covered[cause_variant(&e.cause)] = true;
        assert_golden(
            &format!("log entry {:?}", e.cause),
            RecordKind::Log,
            e,
            parts,
        );
    }
    assert!(
        covered.iter().all(|c| *c),
        "every Cause variant has a fixture"
    );
}

#[test]
fn meta_values_v1() {
    assert_golden(
        "format version 1",
        RecordKind::Meta,
        &1u32,
        &["03 0001", "01"],
    );
    assert_golden(
        "format version",
        RecordKind::Meta,
        &2u32,
        &["03 0001", "02"],
    );
    assert_golden(
        "format version",
        RecordKind::Meta,
        &3u32,
        &["03 0001", "03"],
    );
    assert_golden(
        "format version",
        RecordKind::Meta,
        &FORMAT_VERSION,
        &["03 0001", "04"],
    );
    assert_golden(
        "last sequence",
        RecordKind::Meta,
        &1_000_000u64,
        &["03 0001", "fc 40420f00"],
    );
    assert_golden("run id", RecordKind::Meta, &7u64, &["03 0001", "07"]);
}

#[test]
fn every_key_layout_v1() {
    let id = id();
    let ts = Timestamp(1_717_171_752_750); // 0x0000018fcf698f2e
    let cases: Vec<(&str, Vec<u8>, Vec<&str>)> = vec![
        ("task", keys::task(id), vec!["74", ID_HEX]),
        (
            "state pending",
            keys::state(Status::Pending, id),
            vec!["73 01", ID_HEX],
        ),
        (
            "state running",
            keys::state(Status::Running, id),
            vec!["73 02", ID_HEX],
        ),
        (
            "state completed",
            keys::state(Status::Completed, id),
            vec!["73 03", ID_HEX],
        ),
        (
            "state failed",
            keys::state(Status::Failed, id),
            vec!["73 04", ID_HEX],
        ),
        (
            "state cancelled",
            keys::state(Status::Cancelled, id),
            vec!["73 05", ID_HEX],
        ),
        (
            "state prefix",
            keys::state_prefix(Status::Running),
            vec!["73 02"],
        ),
        (
            "pending, priority -7",
            keys::pending("emails", -7, ts, id),
            // p, queue length, queue, 127 - priority, next_run_ms BE, id
            vec!["70 06 'emails", "86", "0000018fcf698f2e", ID_HEX],
        ),
        (
            "pending, priority 127",
            keys::pending("default", 127, Timestamp(0), id),
            vec!["70 07 'default", "00", "0000000000000000", ID_HEX],
        ),
        (
            "pending, priority -128",
            keys::pending("q", -128, Timestamp(u64::MAX), id),
            vec!["70 01 'q", "ff", "ffffffffffffffff", ID_HEX],
        ),
        (
            "pending queue prefix",
            keys::pending_queue_prefix("emails"),
            vec!["70 06 'emails"],
        ),
        (
            "pending bucket prefix",
            keys::pending_bucket_prefix("emails", keys::priority_byte(0)),
            vec!["70 06 'emails", "7f"],
        ),
        (
            "finished",
            keys::finished(ts, id),
            vec!["66", "0000018fcf698f2e", ID_HEX],
        ),
        (
            "log",
            keys::log(id, 70_000),
            vec!["6c", ID_HEX, "0000000000011170"],
        ),
        ("log prefix", keys::log_prefix(id), vec!["6c", ID_HEX]),
        (
            "count",
            keys::count(Status::Completed, "emails"),
            vec!["63 03 'emails"],
        ),
        ("meta format", keys::META_FORMAT.to_vec(), vec!["'mformat"]),
        ("meta seq", keys::META_SEQ.to_vec(), vec!["'mseq"]),
        ("meta run", keys::META_RUN.to_vec(), vec!["'mrun"]),
    ];
    for (what, actual, parts) in &cases {
        assert_eq!(
            hex(actual),
            hex(&golden(parts)),
            "key layout of {what} changed"
        );
    }
    // And the golden bytes decode back to their parts.
    assert_eq!(keys::decode_task(&golden(&["74", ID_HEX])).unwrap(), id);
    for st in Status::ALL {
        assert_eq!(keys::decode_state(&keys::state(st, id)).unwrap(), (st, id));
    }
    let pk = keys::decode_pending(&golden(&[
        "70 06 'emails",
        "86",
        "0000018fcf698f2e",
        ID_HEX,
    ]))
    .unwrap();
    assert_eq!(
        (pk.queue.as_str(), pk.priority, pk.next_run, pk.id),
        ("emails", -7, ts, id)
    );
    let pk =
        keys::decode_pending(&golden(&["70 01 'q", "ff", "ffffffffffffffff", ID_HEX])).unwrap();
    assert_eq!((pk.priority, pk.next_run), (-128, Timestamp(u64::MAX)));
    assert_eq!(
        keys::decode_finished(&golden(&["66", "0000018fcf698f2e", ID_HEX])).unwrap(),
        (ts, id)
    );
    assert_eq!(
        keys::decode_log(&golden(&["6c", ID_HEX, "0000000000011170"])).unwrap(),
        (id, 70_000)
    );
    assert_eq!(
        keys::decode_count(&golden(&["63 03 'emails"])).unwrap(),
        (Status::Completed, "emails".to_string())
    );
    // The prefix letters themselves.
    assert_eq!(
        [
            keys::META,
            keys::TASK,
            keys::STATE,
            keys::PENDING,
            keys::FINISHED,
            keys::LOG,
            keys::COUNT
        ],
        *b"mtspflc"
    );
    assert_eq!(keys::MAX_QUEUE_NAME, 128);
}

/// A real queue writes exactly these layouts: enqueue one task at a known time and run another
/// to completion, close, and read the raw sled tree. The completed task is one key (format 4).
#[test]
fn a_queue_writes_the_pinned_layout() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T_CREATED);
    let (id, done) = {
        let q = Queue::builder(dir.path())
            .clock(clock.clone())
            .open()
            .unwrap();
        let id = q
            .enqueue_json(
                "send_email",
                &serde_json::json!({"to": "ada@example.com"}),
                EnqueueOptions::new()
                    .queue("emails")
                    .priority(-7)
                    .delay(Duration::from_secs(5)),
            )
            .unwrap();
        let done = q
            .enqueue_json(
                "k",
                &serde_json::json!(1),
                EnqueueOptions::new().queue("done"),
            )
            .unwrap();
        let c = omniq::testing::claim_next(&q).unwrap().unwrap();
        assert_eq!(c.task.id, done);
        assert!(c.succeed(&2).unwrap());
        (id, done)
    };
    let db = raw_db(dir.path());
    let due = T_CREATED + Duration::from_secs(5);
    let mut expected = vec![
        keys::task(id),
        keys::state(Status::Pending, id),
        keys::pending("emails", -7, due, id),
        keys::kind_pending("send_email", "emails", -7, due, id),
        keys::count(Status::Pending, "emails"),
        keys::task(done),
        keys::finish_bucket(keys::bucket_of(T_CREATED)),
        keys::count(Status::Completed, "done"),
        keys::META_FORMAT.to_vec(),
        keys::META_SEQ.to_vec(),
        keys::META_RUN.to_vec(),
        keys::META_WAL.to_vec(),
    ];
    expected.sort();
    let all: Vec<Vec<u8>> = db.iter().keys().map(|k| k.unwrap().to_vec()).collect();
    assert_eq!(
        all.iter().map(|k| keys::describe(k)).collect::<Vec<_>>(),
        expected
            .iter()
            .map(|k| keys::describe(k))
            .collect::<Vec<_>>()
    );
    assert_eq!(all, expected);

    assert_eq!(
        db.get(keys::META_FORMAT).unwrap().unwrap().as_ref(),
        golden(&["03 0001 04"])
    );
    assert_eq!(
        db.get(keys::META_RUN).unwrap().unwrap().as_ref(),
        golden(&["03 0001 01"]),
        "first run"
    );
    assert_eq!(
        db.get(keys::META_WAL).unwrap().unwrap().as_ref(),
        golden(&["03 0001 04"]),
        "the four groups' log records are applied"
    );
    assert_eq!(
        db.get(keys::count(Status::Pending, "emails"))
            .unwrap()
            .unwrap()
            .as_ref(),
        1u64.to_be_bytes(),
        "counters are raw u64 BE"
    );
    assert!(
        db.get(keys::state(Status::Pending, id))
            .unwrap()
            .unwrap()
            .is_empty(),
        "index values are empty"
    );
    assert_eq!(
        db.get(keys::finish_bucket(keys::bucket_of(T_CREATED)))
            .unwrap()
            .unwrap()
            .as_ref(),
        done.as_bytes(),
        "a bucket holds the largest id finished in its minute"
    );
    let (record, log) =
        omniq::record::decode(&db.get(keys::task(id)).unwrap().unwrap(), &|| "t".into()).unwrap();
    assert_eq!(
        (record.id, record.priority, record.next_run_at),
        (id, -7, due)
    );
    assert_eq!(log.len(), 1, "one log entry (the enqueue)");
    assert_eq!(
        (log[0].task_id, log[0].from, log[0].to, log[0].cause.clone()),
        (id, None, Status::Pending, Cause::Enqueued)
    );
    let (record, log) =
        omniq::record::decode(&db.get(keys::task(done)).unwrap().unwrap(), &|| "t".into()).unwrap();
    assert_eq!(record.status, Status::Completed);
    assert_eq!(
        log.iter().map(|e| e.cause.clone()).collect::<Vec<_>>(),
        [Cause::Enqueued, Cause::Claimed, Cause::Succeeded]
    );
}

#[test]
fn a_newer_format_is_refused_without_touching_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    let id = {
        let q = Queue::open(dir.path()).unwrap();
        q.enqueue_json("k", &serde_json::json!(1), EnqueueOptions::new())
            .unwrap()
    };
    let newer = encode(RecordKind::Meta, &5u32).unwrap();
    {
        let db = raw_db(dir.path());
        db.insert(keys::META_FORMAT, newer.clone()).unwrap();
        db.flush().unwrap();
    }
    let err = reopen(|| Queue::open(dir.path())).expect_err("a format-5 directory must be refused");
    match &err {
        Error::FormatTooNew {
            path,
            found,
            supported,
        } => {
            assert_eq!(path, dir.path());
            assert_eq!((*found, *supported), (5, 4));
        }
        other => panic!("expected FormatTooNew, got {other:?}"),
    }
    let text = err.to_string();
    assert!(text.contains(&dir.path().display().to_string()), "{text}");
    assert!(
        text.contains("format 5") && text.contains("format 4"),
        "{text}"
    );

    // The refused open changed nothing: same format value, same run counter.
    let db = raw_db(dir.path());
    assert_eq!(
        db.get(keys::META_FORMAT).unwrap().unwrap().as_ref(),
        newer.as_slice()
    );
    assert_eq!(
        db.get(keys::META_RUN).unwrap().unwrap().as_ref(),
        golden(&["03 0001 01"])
    );
    // Back to format 1, the directory opens (and is upgraded to 2) and the task is there.
    db.insert(keys::META_FORMAT, encode(RecordKind::Meta, &1u32).unwrap())
        .unwrap();
    db.flush().unwrap();
    drop(db);
    let q = reopen(|| Queue::open(dir.path())).unwrap();
    assert_eq!(q.get(id).unwrap().unwrap().status, Status::Pending);
}

#[test]
fn a_sled_directory_omniq_did_not_write_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = raw_db(dir.path());
        db.insert(b"someone else's key", b"value".to_vec()).unwrap();
        db.flush().unwrap();
    }
    // It has no OMNIQ marker, so only a temporary copy of it is opened: refused, untouched.
    match reopen(|| Queue::open(dir.path())) {
        Err(e @ Error::NotAStore { .. }) => {
            let text = e.to_string();
            assert!(
                text.contains(&dir.path().display().to_string()) && text.contains("format"),
                "{text}"
            );
        }
        Err(other) => panic!("expected Error::NotAStore, got {other:?}"),
        Ok(_) => panic!("a foreign sled database must not be adopted"),
    }
    assert!(!dir.path().join("OMNIQ").exists());
    let db = raw_db(dir.path());
    assert_eq!(db.len(), 1, "nothing was written to it");
}

/// The marker omniq writes when it creates a store (`omniq queue directory`, `format 4`; before
/// sled creates anything), and the watermark each open and clean close add (`run N`: the run
/// whose start is durable in sled; `seq S`: the last durable transition; `db_bytes L`: the data
/// file's length): pinned.
#[test]
fn marker_file_v1() {
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("q");
    drop(Queue::open(&q).unwrap());
    drop(reopen(|| Queue::open(&q)).unwrap());
    let text = std::fs::read_to_string(q.join("OMNIQ")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[..3],
        ["omniq queue directory", "format 4", "run 2"],
        "{text}"
    );
    assert_eq!(lines[3], "seq 0", "no transition yet: {text}");
    assert_eq!(lines.len(), 5, "{text}");
    assert!(text.ends_with('\n'));
    let bytes: u64 = lines[4].strip_prefix("db_bytes ").unwrap().parse().unwrap();
    assert_eq!(bytes, std::fs::metadata(q.join("db")).unwrap().len());
}

/// A marker naming a newer format is refused before sled opens anything.
#[test]
fn a_newer_marker_is_refused_before_sled_runs() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("OMNIQ"),
        "omniq queue directory\nformat 5\n",
    )
    .unwrap();
    let err = Queue::open(dir.path()).expect_err("refused");
    assert!(
        matches!(
            err,
            Error::FormatTooNew {
                found: 5,
                supported: 4,
                ..
            }
        ),
        "{err:?}"
    );
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["OMNIQ"], "sled created nothing");
}

#[test]
fn a_corrupt_format_value_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    drop(Queue::open(dir.path()).unwrap());
    {
        let db = raw_db(dir.path());
        db.insert(keys::META_FORMAT, vec![3, 0]).unwrap();
        db.flush().unwrap();
    }
    let err =
        reopen(|| Queue::open(dir.path())).expect_err("a corrupt format value must be refused");
    assert!(matches!(err, Error::Corrupt { .. }), "{err:?}");
    assert!(err.to_string().contains("m/format"), "{err}");
}

/// The write-ahead key and record kind (present on disk only while a commit group is being
/// applied, or after a crash interrupted one).
#[test]
fn write_ahead_key_and_kind_are_pinned() {
    assert_eq!(
        omniq::keys::write_ahead(1),
        vec![b'w', 0, 0, 0, 0, 0, 0, 0, 1]
    );
    assert_eq!(
        omniq::keys::describe(&omniq::keys::write_ahead(258)),
        "w/258"
    );
    let ops: Vec<(Vec<u8>, Option<Vec<u8>>)> =
        vec![(b"t1".to_vec(), Some(vec![7])), (b"s1".to_vec(), None)];
    let bytes = omniq::codec::encode(omniq::codec::RecordKind::WriteAhead, &ops).unwrap();
    // kind 4, schema 1, then bincode: 2 entries; "t1" (len 2) Some([7]); "s1" None.
    assert_eq!(
        bytes,
        vec![4, 0, 1, 2, 2, b't', b'1', 1, 1, 7, 2, b's', b'1', 0]
    );
}

/// A format-1 directory (what builds before unique keys, limits and schedules wrote) opens: it
/// is upgraded (to format 3) in place (format 2 adds key prefixes and converts nothing: the
/// upgrade builds the pending-by-kind index for pending tasks and rewrites `m/format`), and its
/// tasks read.
#[test]
fn a_format_1_directory_is_upgraded_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let id = {
        let q = Queue::open(dir.path()).unwrap();
        q.enqueue_json("k", &serde_json::json!(1), EnqueueOptions::new())
            .unwrap()
    };
    let before: Vec<(Vec<u8>, Vec<u8>)> = {
        let db = raw_db(dir.path());
        db.insert(keys::META_FORMAT, encode(RecordKind::Meta, &1u32).unwrap())
            .unwrap();
        // What a format-1 build wrote: no pending-by-kind entries.
        for k in db.scan_prefix([keys::KIND_PENDING]).keys() {
            db.remove(k.unwrap()).unwrap();
        }
        db.flush().unwrap();
        db.iter()
            .map(|kv| kv.unwrap())
            .filter(|(k, _)| !k.starts_with(b"m"))
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .collect()
    };
    {
        let q = reopen(|| Queue::open(dir.path())).unwrap();
        assert_eq!(q.get(id).unwrap().unwrap().status, Status::Pending);
        assert!(q.check_consistency().unwrap().is_consistent());
    }
    let db = raw_db(dir.path());
    assert_eq!(
        db.get(keys::META_FORMAT).unwrap().unwrap().as_ref(),
        golden(&["03 0001 04"])
    );
    type Entries = Vec<(Vec<u8>, Vec<u8>)>;
    let (built, after): (Entries, Entries) = db
        .iter()
        .map(|kv| kv.unwrap())
        .filter(|(k, _)| !k.starts_with(b"m"))
        .map(|(k, v)| (k.to_vec(), v.to_vec()))
        .partition(|(k, _)| k[0] == keys::KIND_PENDING);
    // Then format 4: the record holds its log, the `l` key is gone.
    let without = |e: &Entries| -> Entries {
        e.iter()
            .filter(|(k, _)| k[0] != keys::TASK && k[0] != keys::LOG)
            .cloned()
            .collect()
    };
    assert_eq!(
        without(&before),
        without(&after),
        "nothing but m/format, the record and its log was rewritten"
    );
    let (t, log) =
        omniq::record::decode(&db.get(keys::task(id)).unwrap().unwrap(), &|| "t".into()).unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(
        built,
        vec![(
            keys::kind_pending("k", &t.queue, t.priority, t.next_run_at, id),
            Vec::new()
        )],
        "the pending task got its pending-by-kind entry"
    );
}

#[test]
fn format_2_keys() {
    let id = id();
    let ts = Timestamp(1_717_171_752_750); // 0x0000018fcf698f2e
    let digest = [0xab; 32];
    let digest_hex = "ab".repeat(32);
    let cases: Vec<(&str, Vec<u8>, Vec<&str>)> = vec![
        (
            "unique holder",
            keys::unique(&digest),
            vec!["75", &digest_hex],
        ),
        ("extras", keys::extras(id), vec!["6f", ID_HEX]),
        (
            "queue limit",
            keys::limit(&omniq::LimitScope::queue("mails")),
            vec!["72 71 'mails"],
        ),
        (
            "kind limit",
            keys::limit(&omniq::LimitScope::kind("pdf")),
            vec!["72 6b 'pdf"],
        ),
        (
            "rate start",
            keys::rate_start(&omniq::LimitScope::queue("mails"), ts, id),
            vec!["61 71 05 'mails", "0000018fcf698f2e", ID_HEX],
        ),
        ("schedule", keys::schedule("nightly"), vec!["68 'nightly"]),
        (
            "pending by kind",
            keys::kind_pending("pdf", "mails", -7, ts, id),
            vec!["6b 03 'pdf", "05 'mails", "86", "0000018fcf698f2e", ID_HEX],
        ),
    ];
    for (what, actual, parts) in cases {
        assert_eq!(hex(&actual), hex(&golden(&parts)), "{what}");
    }
    assert_eq!(
        keys::decode_rate_start(&keys::rate_start(&omniq::LimitScope::kind("pdf"), ts, id))
            .unwrap(),
        (omniq::LimitScope::kind("pdf"), ts, id)
    );
}

#[test]
fn format_2_records() {
    use omniq::rules::unique::UniqueSpec;
    let extras = omniq::TaskExtras {
        unique: Some(UniqueSpec {
            digest: [0xab; 32],
            states: 0x0e,
            key: "k".into(),
            period: Some(5),
        }),
        scheduled: Some(omniq::ScheduledFrom {
            schedule: "s".into(),
            at: Timestamp(1_717_171_752_750),
        }),
    };
    let digest = "ab".repeat(32);
    assert_golden(
        "task extras",
        RecordKind::Extras,
        &extras,
        &[
            "05 0001",
            "01",                  // unique: Some
            &digest,               // digest: 32 bytes
            "0e",                  // hold set: Pending | Running | Completed
            "01 'k",               // readable key
            "01 05",               // period: Some(5)
            "01",                  // scheduled: Some
            "01 's",               // schedule name
            "fd 2e8f69cf8f010000", // tick
        ],
    );
    assert_golden(
        "limit",
        RecordKind::Limit,
        &omniq::Limit::new()
            .rate(10, Duration::from_secs(1))
            .concurrency(3),
        &["06 0001", "01 0a fb e803", "01 03"],
    );
    let schedule = omniq::ScheduleInfo {
        name: "nightly".into(),
        spec: omniq::Spec::Cron {
            expr: "0 9 * * *".into(),
            zone: "UTC".into(),
        },
        missed: omniq::Missed::CatchUp(3),
        kind: "report".into(),
        payload: b"{}".to_vec(),
        options: omniq::ScheduledTaskOptions {
            queue: "default".into(),
            priority: 0,
            max_retries: 3,
            timeout_ms: None,
            backoff: None,
            unique: None,
        },
        paused: false,
        last_fired: T_CREATED,
        created_at: T_CREATED,
        fired: 2,
        skipped: 1,
    };
    assert_golden(
        "schedule",
        RecordKind::Schedule,
        &schedule,
        &[
            "07 0001",
            "07 'nightly",
            "00 09 '0 9 * * *", // Cron { expr
            "03 'UTC",          //        zone }
            "02 03",            // CatchUp(3)
            "06 'report",
            "02 7b7d",             // payload
            "07 'default",         // queue
            "00 03 00 00 00",      // priority, max_retries, timeout, backoff, unique
            "00",                  // paused
            "fd 880369cf8f010000", // last_fired
            "fd 880369cf8f010000", // created_at
            "02 01",               // fired, skipped
        ],
    );
    let every = omniq::Spec::every(Duration::from_secs(90));
    assert_golden(
        "interval spec",
        RecordKind::Meta,
        &every,
        &["03 0001", "01 fc 905f0100"],
    );
}

/// The write-ahead log's record layout (format 3), pinned: `[payload length u32 LE][crc32 of the
/// rest u32 LE][lsn u64 LE][synced u64 LE]`, then each key write as `[key length u32 LE][key]`
/// and `[value length u32 LE][value]` or `ffffffff` for a remove. Segment file names too.
#[test]
fn wal_record_v3() {
    let ops: Vec<omniq::wal::Op> = vec![(b"t1".to_vec(), Some(vec![7])), (b"s1".to_vec(), None)];
    let mut bytes = Vec::new();
    omniq::wal::encode_record(5, 4, &ops, &mut bytes);
    let expected = golden(&[
        "15000000",         // payload: 21 bytes
        "4ab06d6a",         // crc32 (IEEE) of everything after it
        "0500000000000000", // lsn 5
        "0400000000000000", // synced through 4
        "02000000 't1",     // key "t1"
        "01000000 07",      // value [7]
        "02000000 's1",     // key "s1"
        "ffffffff",         // removed
    ]);
    assert_eq!(hex(&bytes), hex(&expected));
    assert_eq!(
        crc32fast_reference(&expected[8..]),
        u32::from_le_bytes(expected[4..8].try_into().unwrap()),
        "the checksum is CRC-32 (IEEE) of the bytes after it"
    );
    assert_eq!(
        omniq::wal::decode_payload(&expected[omniq::wal::HEADER_BYTES..]),
        Some(ops)
    );
    assert_eq!(omniq::wal::HEADER_BYTES, 24);
    assert_eq!(omniq::wal::segment_name(1), "wal.00000000000000000001");
    assert_eq!(
        omniq::wal::parse_segment_name("wal.00000000000000000258"),
        Some(258)
    );
    assert_eq!(omniq::wal::parse_segment_name("wal.1"), None);
}

/// CRC-32 (IEEE, reflected, polynomial 0xedb88320), bit by bit: an independent reference.
fn crc32fast_reference(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A format-2 store (no log, `m/format` 2, marker `format 2`, and a write-ahead entry `w` a
/// crash left mid-apply) is migrated at open: the entry is applied, `m/format` and the marker
/// become 4 (the format-4 step leaves the already-converted record and the stray `t` key it
/// cannot decode as they are), and its tasks read; the next transition goes through the log.
#[test]
fn a_format_2_directory_is_migrated_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let id = {
        let q = Queue::open(dir.path()).unwrap();
        q.enqueue_json("k", &serde_json::json!(1), EnqueueOptions::new())
            .unwrap()
    };
    let interrupted = b"t-not-a-real-key".to_vec();
    let before: Vec<(Vec<u8>, Vec<u8>)> = {
        let db = raw_db(dir.path());
        db.insert(keys::META_FORMAT, encode(RecordKind::Meta, &2u32).unwrap())
            .unwrap();
        db.remove(keys::META_WAL).unwrap();
        // A format-2 group interrupted after its `w` entry reached disk, before its writes.
        let ops: Vec<(Vec<u8>, Option<Vec<u8>>)> = vec![(interrupted.clone(), Some(vec![1]))];
        db.insert(
            keys::write_ahead(1),
            encode(RecordKind::WriteAhead, &ops).unwrap(),
        )
        .unwrap();
        db.flush().unwrap();
        db.iter()
            .map(|kv| kv.unwrap())
            .filter(|(k, _)| !k.starts_with(b"m") && !k.starts_with(b"w"))
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .collect()
    };
    let marker = std::fs::read_to_string(dir.path().join("OMNIQ")).unwrap();
    std::fs::write(
        dir.path().join("OMNIQ"),
        marker.replace("format 3", "format 2"),
    )
    .unwrap();
    assert!(!std::fs::read_dir(dir.path()).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with("wal.")));
    {
        let q = reopen(|| Queue::open(dir.path())).unwrap();
        assert_eq!(q.get(id).unwrap().unwrap().status, Status::Pending);
        q.cancel(id).unwrap();
    }
    let marker = std::fs::read_to_string(dir.path().join("OMNIQ")).unwrap();
    assert!(marker.contains("\nformat 4\n"), "{marker}");
    let db = raw_db(dir.path());
    assert_eq!(
        db.get(keys::META_FORMAT).unwrap().unwrap().as_ref(),
        golden(&["03 0001 04"])
    );
    assert_eq!(db.get(&interrupted).unwrap().unwrap().as_ref(), [1]);
    assert_eq!(db.scan_prefix([keys::WRITE_AHEAD]).count(), 0);
    assert!(
        db.get(keys::META_WAL).unwrap().is_some(),
        "the cancel was logged"
    );
    let after: Vec<(Vec<u8>, Vec<u8>)> = db
        .iter()
        .map(|kv| kv.unwrap())
        .filter(|(k, _)| !k.starts_with(b"m") && !k.starts_with(b"w") && k != &interrupted)
        .map(|(k, v)| (k.to_vec(), v.to_vec()))
        .collect();
    assert_ne!(before, after, "the cancel changed the task");
    drop(db);
    let q = reopen(|| Queue::open(dir.path())).unwrap();
    assert_eq!(q.get(id).unwrap().unwrap().status, Status::Cancelled);
}

/// The format-3 fixture (`tests/fixtures/format3`, written by main before format 4) copied to a
/// temporary directory.
fn format3_fixture() -> (tempfile::TempDir, serde_json::Value) {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/format3");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    std::fs::create_dir_all(dir.join("blobs")).unwrap();
    for f in ["OMNIQ", "conf", "db"] {
        std::fs::copy(src.join("store").join(f), dir.join(f)).unwrap();
    }
    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.join("expected.json")).unwrap()).unwrap();
    (tmp, expected)
}

/// Opens the (possibly partly migrated) fixture and checks everything the format-3 store held:
/// records, histories, counts, the raw layout, listing, purge and the pending order.
fn assert_fixture_migrated(dir: &std::path::Path, expected: &serde_json::Value) {
    let clock = ManualClock::new(Timestamp(expected["clock"].as_u64().unwrap()));
    let tasks: Vec<(TaskInfo, Vec<LogEntry>)> = expected["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                serde_json::from_value(t["task"].clone()).unwrap(),
                serde_json::from_value(t["history"].clone()).unwrap(),
            )
        })
        .collect();
    assert_eq!(tasks.len(), 13);
    {
        let q = reopen(|| Queue::builder(dir).clock(clock.clone()).open()).unwrap();
        for (t, h) in &tasks {
            assert_eq!(&q.get(t.id).unwrap().unwrap(), t, "record of {}", t.id);
            assert_eq!(&q.history(t.id).unwrap(), h, "history of {}", t.id);
        }
        assert_eq!(
            serde_json::to_value(q.stats().unwrap().by_queue).unwrap(),
            expected["counts"]
        );
        let report = q.check_consistency().unwrap();
        assert!(report.is_consistent(), "{:?}", report.problems);
        assert_eq!(
            report.log_entries,
            tasks.iter().map(|(_, h)| h.len()).sum::<usize>()
        );
    }
    {
        let db = raw_db(dir);
        assert_eq!(
            db.get(keys::META_FORMAT).unwrap().unwrap().as_ref(),
            golden(&["03 0001 04"])
        );
        for kv in db.iter() {
            let (k, v) = kv.unwrap();
            match k[0] {
                keys::LOG => panic!("a format-3 log key is left: {}", keys::describe(&k)),
                keys::FINISHED => assert_eq!(k.len(), 9, "{}", keys::describe(&k)),
                keys::STATE => assert!(
                    !keys::describe(&k).contains("Completed"),
                    "{}",
                    keys::describe(&k)
                ),
                keys::TASK => assert!(omniq::record::is_record(&v), "{}", keys::describe(&k)),
                _ => {}
            }
        }
        let buckets: Vec<Vec<u8>> = db
            .scan_prefix([keys::FINISHED])
            .keys()
            .map(|k| k.unwrap().to_vec())
            .collect();
        assert_eq!(
            buckets.len(),
            2,
            "finishes in two minutes: t0 and t0 + 10 min"
        );
    }
    let marker = std::fs::read_to_string(dir.join("OMNIQ")).unwrap();
    assert!(marker.contains("\nformat 4\n"), "{marker}");
    let q = reopen(|| Queue::builder(dir).clock(clock.clone()).open()).unwrap();
    // Completed tasks are listed (newest first) without a state index.
    let mut completed: Vec<_> = tasks
        .iter()
        .filter(|(t, _)| t.status == Status::Completed)
        .map(|(t, _)| t.id)
        .collect();
    completed.sort();
    completed.reverse();
    assert_eq!(completed.len(), 4);
    let listed: Vec<_> = q
        .list(&omniq::ListFilter {
            status: Some(Status::Completed),
            ..Default::default()
        })
        .unwrap()
        .tasks
        .iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(listed, completed);
    // Purge: the two tasks finished at t0 (10 minutes ago), nothing else.
    let report = q.purge(Duration::from_secs(300)).unwrap();
    assert_eq!(report.tasks_removed, 2);
    for (t, _) in &tasks {
        let gone = t.kind == "old";
        assert_eq!(q.get(t.id).unwrap().is_none(), gone, "{}", t.kind);
    }
    assert!(q.check_consistency().unwrap().is_consistent());
    // Pending order: priority, due time, enqueue order.
    let mut due: Vec<&TaskInfo> = tasks
        .iter()
        .map(|(t, _)| t)
        .filter(|t| t.status == Status::Pending && t.next_run_at <= clock.now())
        .collect();
    due.sort_by(|a, b| {
        b.priority
            .cmp(&a.priority)
            .then(a.next_run_at.cmp(&b.next_run_at))
            .then(a.id.cmp(&b.id))
    });
    assert_eq!(due.len(), 5);
    for t in due {
        let c = omniq::testing::claim_next(&q).unwrap().unwrap();
        assert_eq!(c.task.id, t.id);
    }
    assert!(omniq::testing::claim_next(&q).unwrap().is_none());
    assert!(q.check_consistency().unwrap().is_consistent());
}

/// A real format-3 store is migrated at open: every record gets its log inside, the old keys
/// go, and nothing the store held changes.
#[test]
fn a_format_3_directory_is_migrated_on_open() {
    let (tmp, expected) = format3_fixture();
    let dir = tmp.path().join("store");
    {
        let db = raw_db(&dir);
        assert_eq!(
            db.get(keys::META_FORMAT).unwrap().unwrap().as_ref(),
            golden(&["03 0001 03"])
        );
        assert!(
            db.scan_prefix([keys::LOG]).count() > 13,
            "the fixture has format-3 log keys"
        );
    }
    assert_fixture_migrated(&dir, &expected);
}

const MIGRATE_CHILD_DIR: &str = "OMNIQ_FORMAT_MIGRATE_CHILD_DIR";

/// Not a test on its own: the process the interrupted-migration test kills (it opens the
/// directory named by the environment, which aborts at the armed fault point).
#[test]
fn migrate_child() {
    let Ok(dir) = std::env::var(MIGRATE_CHILD_DIR) else {
        return;
    };
    let _ = Queue::open(dir);
}

/// A migration killed after some tasks were converted (the `migrate-4` fault point aborts the
/// process before the nth batch of two tasks is applied) leaves a store only this build opens
/// (the marker says format 4, `m/format` still 3), and the next open finishes it with nothing
/// lost.
#[test]
fn an_interrupted_migration_resumes() {
    for n in [1, 4, 7] {
        let (tmp, expected) = format3_fixture();
        let dir = tmp.path().join("store");
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "migrate_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(MIGRATE_CHILD_DIR, &dir)
            .env(omniq::wal::FAULT_ENV, format!("migrate-4:{n}"))
            .env("OMNIQ_MIGRATE_BATCH", "2")
            .output()
            .unwrap();
        assert!(
            !out.status.success()
                && String::from_utf8_lossy(&out.stderr).contains("aborting at migrate-4"),
            "n = {n}: {out:?}"
        );
        let marker = std::fs::read_to_string(dir.join("OMNIQ")).unwrap();
        assert!(marker.contains("\nformat 4\n"), "{marker}");
        {
            let db = raw_db(&dir);
            assert_eq!(
                db.get(keys::META_FORMAT).unwrap().unwrap().as_ref(),
                golden(&["03 0001 03"]),
                "not finished"
            );
            let converted = db
                .scan_prefix([keys::TASK])
                .values()
                .filter(|v| omniq::record::is_record(v.as_ref().unwrap()))
                .count();
            assert!(converted <= 2 * (n - 1), "n = {n}: {converted} converted");
            if n == 7 {
                // sled made (at least part of) the earlier batches durable: the resumed open
                // does meet converted records. (Not guaranteed by sled for an abort; checked
                // here only so that the test says when it stops exercising that path.)
                eprintln!("n = {n}: {converted} of 13 records were converted before the kill");
            }
        }
        assert_fixture_migrated(&dir, &expected);
    }
}
