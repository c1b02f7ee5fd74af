//! The fuzz targets' properties on the stable toolchain (cargo-fuzz needs nightly):
//!
//! - every file of the checked-in corpus (`fuzz/corpus/<target>/`) replayed through the same
//!   entry point the fuzz target calls (`omniq::fuzzing::check`);
//! - the seed corpus is exactly what `seeds()` generates (regenerate it with
//!   `OMNIQ_WRITE_CORPUS=1 cargo test --test fuzz_corpus seed_corpus`);
//! - every single-bit flip and every truncation of every valid seed;
//! - proptest: random bytes, and random mutations (bit flips, truncations, insertions,
//!   deletions, overwrites) of valid encodings, fed to every entry point.
//!
//! `check` fails when a decoder panics (the test panics with it), when an error is not a
//! `Corrupt` error naming the record kind and key, or when decode and encode disagree.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use omniq::codec::{encode, RecordKind};
use omniq::fuzzing::{self, check, Target, FUZZ_TASK_ID};
use omniq::{keys, Backoff, Cause, LogEntry, Status, TaskError, TaskInfo, Timestamp};
use proptest::prelude::*;

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join("corpus")
}

fn error(kind: &str, retry_count: u32, permanent: bool) -> TaskError {
    TaskError {
        error_type: kind.into(),
        message: format!("{kind} on attempt {}", retry_count + 1),
        retry_count,
        timestamp: Timestamp(1_717_171_718_000 + u64::from(retry_count)),
        permanent,
    }
}

fn task(status: Status) -> TaskInfo {
    let errors = vec![error("network", 0, false), error("timeout", 1, false)];
    TaskInfo {
        id: FUZZ_TASK_ID,
        kind: "send_email".into(),
        queue: "emails".into(),
        payload: br#"{"to":"ada@example.com"}"#.to_vec(),
        status,
        attempts: 3,
        max_retries: 5,
        priority: -7,
        created_at: Timestamp(1_717_171_717_000),
        next_run_at: Timestamp(1_717_171_752_750),
        started_at: Some(Timestamp(1_717_171_752_800)),
        finished_at: status.is_terminal().then_some(Timestamp(1_717_171_753_000)),
        timeout_ms: Some(30_000),
        backoff: Some(Backoff {
            base_ms: 250,
            cap_ms: 10_000,
            jitter: 0.5,
        }),
        result: (status == Status::Completed).then(|| br#""sent""#.to_vec()),
        last_error: errors.last().cloned(),
        errors,
        lease: 42,
    }
}

fn minimal_task() -> TaskInfo {
    TaskInfo {
        id: FUZZ_TASK_ID,
        kind: "k".into(),
        queue: "default".into(),
        payload: b"null".to_vec(),
        status: Status::Pending,
        attempts: 0,
        max_retries: 3,
        priority: 0,
        created_at: Timestamp(0),
        next_run_at: Timestamp(0),
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

fn log_entries() -> Vec<(&'static str, LogEntry)> {
    let e = |seq, from, to, attempt, cause| LogEntry {
        seq,
        task_id: FUZZ_TASK_ID,
        from,
        to,
        attempt,
        cause,
        at: Timestamp(1_717_171_717_000),
        run_id: 300,
    };
    use Status::*;
    let failed = |t: &str, permanent| Cause::Failed {
        error_type: t.into(),
        permanent,
    };
    vec![
        ("enqueued", e(1, None, Pending, 0, Cause::Enqueued)),
        ("claimed", e(2, Some(Pending), Running, 1, Cause::Claimed)),
        (
            "failed_transient",
            e(3, Some(Running), Pending, 1, failed("network", false)),
        ),
        (
            "failed_permanent",
            e(9, Some(Running), Failed, 1, failed("invalid", true)),
        ),
        (
            "crash",
            e(12, Some(Running), Failed, 4, failed("crash", false)),
        ),
        (
            "succeeded",
            e(
                u64::MAX,
                Some(Running),
                Completed,
                u32::MAX,
                Cause::Succeeded,
            ),
        ),
        (
            "cancelled",
            e(10, Some(Pending), Cancelled, 0, Cause::Cancelled),
        ),
        (
            "manual_retry",
            e(11, Some(Failed), Pending, 0, Cause::ManualRetry),
        ),
    ]
}

/// A format-4 task record: the task and its log.
fn record(t: &TaskInfo, log: &[LogEntry]) -> Vec<u8> {
    let mut entries = Vec::new();
    for e in log {
        entries.extend(omniq::record::encode_entry(e).unwrap());
    }
    omniq::record::encode(t, log.len() as u64, &entries).unwrap()
}

fn some_log() -> Vec<LogEntry> {
    log_entries().into_iter().map(|(_, e)| e).take(3).collect()
}

/// The seed corpus: valid encodings of every record kind and key, plus edge cases.
fn seeds() -> Vec<(Target, String, Vec<u8>)> {
    let mut out: Vec<(Target, String, Vec<u8>)> = Vec::new();
    let mut add = |t: Target, name: &str, bytes: Vec<u8>| out.push((t, name.to_string(), bytes));

    // Task records.
    for st in Status::ALL {
        add(
            Target::TaskRecord,
            &format!("task_{}", st.as_str().to_lowercase()),
            record(&task(st), &some_log()),
        );
    }
    add(
        Target::TaskRecord,
        "task_minimal",
        record(&minimal_task(), &[]),
    );
    let all: Vec<LogEntry> = log_entries().into_iter().map(|(_, e)| e).collect();
    add(
        Target::TaskRecord,
        "task_every_cause",
        record(&task(Status::Failed), &all),
    );
    let mut wide = task(Status::Failed);
    wide.kind = "κind-ü".into();
    wide.queue = "q".repeat(keys::MAX_QUEUE_NAME);
    wide.priority = i8::MIN;
    wide.attempts = u32::MAX;
    wide.next_run_at = Timestamp(u64::MAX);
    wide.errors = (0..16).map(|n| error("e", n, n == 15)).collect();
    wide.backoff = Some(Backoff {
        base_ms: u64::MAX,
        cap_ms: 0,
        jitter: f64::NAN,
    });
    add(
        Target::TaskRecord,
        "task_extremes",
        record(&wide, &some_log()),
    );
    let full = record(&task(Status::Completed), &some_log());
    add(Target::TaskRecord, "edge_empty", Vec::new());
    add(Target::TaskRecord, "edge_header_only", full[..3].to_vec());
    add(
        Target::TaskRecord,
        "edge_truncated",
        full[..full.len() / 2].to_vec(),
    );
    let mut trailing = full.clone();
    trailing.push(0);
    add(Target::TaskRecord, "edge_trailing_byte", trailing);
    let mut newer = full.clone();
    newer[2] = 2;
    add(Target::TaskRecord, "edge_schema_2", newer);
    let mut huge = full[..20].to_vec();
    huge.push(0xfd);
    huge.extend_from_slice(&u64::MAX.to_le_bytes());
    add(Target::TaskRecord, "edge_huge_length", huge);
    let mut fewer = full.clone();
    fewer.truncate(full.len() - omniq::record::encode_entry(&some_log()[2]).unwrap().len());
    add(Target::TaskRecord, "edge_entry_missing", fewer);
    add(
        Target::TaskRecord,
        "edge_format_3_record",
        encode(RecordKind::Task, &task(Status::Completed)).unwrap(),
    );

    // Log entries.
    for (name, e) in log_entries() {
        add(
            Target::LogEntry,
            &format!("log_{name}"),
            encode(RecordKind::Log, &e).unwrap(),
        );
    }
    let log = encode(RecordKind::Log, &log_entries()[0].1).unwrap();
    add(
        Target::LogEntry,
        "edge_truncated",
        log[..log.len() - 1].to_vec(),
    );
    let mut bad_cause = log.clone();
    let cause_at = 3 + 1 + 17 + 1 + 1 + 1; // header, seq, id, from, to, attempt
    bad_cause[cause_at] = 6;
    add(Target::LogEntry, "edge_unknown_cause", bad_cause);

    // Meta values.
    add(
        Target::Meta,
        "format_1",
        encode(RecordKind::Meta, &1u32).unwrap(),
    );
    add(
        Target::Meta,
        "format_2",
        encode(RecordKind::Meta, &2u32).unwrap(),
    );
    for n in [250u64, 251, 65_536, 1 << 32, u64::MAX] {
        add(
            Target::Meta,
            &format!("u64_{n}"),
            encode(RecordKind::Meta, &n).unwrap(),
        );
    }
    add(
        Target::Meta,
        "edge_u32_overflow",
        encode(RecordKind::Meta, &(1u64 << 32)).unwrap(),
    );
    add(Target::Meta, "edge_short", vec![3, 0]);

    // Keys.
    let id = FUZZ_TASK_ID;
    add(Target::Keys, "task", keys::task(id));
    for st in Status::ALL {
        add(
            Target::Keys,
            &format!("state_{}", st.as_str().to_lowercase()),
            keys::state(st, id),
        );
    }
    add(
        Target::Keys,
        "pending",
        keys::pending("emails", -7, Timestamp(1_717_171_752_750), id),
    );
    add(
        Target::Keys,
        "pending_extremes",
        keys::pending(
            &"q".repeat(keys::MAX_QUEUE_NAME),
            i8::MIN,
            Timestamp(u64::MAX),
            id,
        ),
    );
    add(
        Target::Keys,
        "pending_empty_queue",
        keys::pending("", 127, Timestamp(0), id),
    );
    add(
        Target::Keys,
        "finished",
        keys::finished(Timestamp(1_717_171_753_000), id),
    );
    add(Target::Keys, "log", keys::log(id, 70_000));
    add(
        Target::Keys,
        "finish_bucket",
        keys::finish_bucket(28_619_529),
    );
    add(
        Target::Keys,
        "finish_bucket_max",
        keys::finish_bucket(u64::MAX),
    );
    add(
        Target::Keys,
        "count",
        keys::count(Status::Completed, "emails"),
    );
    add(Target::Keys, "meta_format", keys::META_FORMAT.to_vec());
    add(Target::Keys, "meta_seq", keys::META_SEQ.to_vec());
    add(Target::Keys, "edge_empty", Vec::new());
    for (name, p) in [
        ("m", keys::META),
        ("t", keys::TASK),
        ("s", keys::STATE),
        ("p", keys::PENDING),
        ("f", keys::FINISHED),
        ("l", keys::LOG),
        ("c", keys::COUNT),
    ] {
        add(Target::Keys, &format!("edge_prefix_{name}"), vec![p]);
    }
    let mut bad_status = keys::state(Status::Pending, id);
    bad_status[1] = 9;
    add(Target::Keys, "edge_state_unknown_status", bad_status);
    let mut bad_qlen = keys::pending("emails", 0, Timestamp(5), id);
    bad_qlen[1] = 200;
    add(Target::Keys, "edge_pending_bad_length", bad_qlen);
    let mut bad_utf8 = keys::count(Status::Pending, "ab");
    bad_utf8[2] = 0xff;
    add(Target::Keys, "edge_count_not_utf8", bad_utf8);

    // Envelopes of every kind.
    add(Target::Envelope, "task", full);
    add(
        Target::Envelope,
        "task_format_3",
        encode(RecordKind::Task, &task(Status::Completed)).unwrap(),
    );
    add(Target::Envelope, "log", log);
    add(
        Target::Envelope,
        "meta",
        encode(RecordKind::Meta, &7u64).unwrap(),
    );
    add(Target::Envelope, "edge_unknown_kind", vec![9, 0, 1, 0]);
    out
}

#[test]
fn seed_corpus_is_checked_in() {
    let write = std::env::var_os("OMNIQ_WRITE_CORPUS").is_some();
    let mut missing = Vec::new();
    for (target, name, bytes) in seeds() {
        let path = corpus_dir().join(target.name()).join(&name);
        if write {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &bytes).unwrap();
        } else if std::fs::read(&path).ok().as_ref() != Some(&bytes) {
            missing.push(path.display().to_string());
        }
    }
    assert!(
        missing.is_empty(),
        "seed corpus files missing or different (OMNIQ_WRITE_CORPUS=1 cargo test --test fuzz_corpus \
         seed_corpus regenerates them): {missing:#?}"
    );
}

#[test]
fn every_corpus_file_replays_cleanly() {
    let mut per_target: BTreeMap<&str, usize> = BTreeMap::new();
    for dir in std::fs::read_dir(corpus_dir()).unwrap() {
        let dir = dir.unwrap().path();
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let target = Target::from_name(&name)
            .unwrap_or_else(|| panic!("{} is not a fuzz target", dir.display()));
        for file in std::fs::read_dir(&dir).unwrap() {
            let path = file.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            if let Err(v) = check(target, &data) {
                panic!("{}: {v}", path.display());
            }
            // Every input is also a valid input for the envelope and key targets.
            for t in [Target::Envelope, Target::Keys] {
                if let Err(v) = check(t, &data) {
                    panic!("{} as {}: {v}", path.display(), t.name());
                }
            }
            *per_target.entry(target.name()).or_insert(0) += 1;
        }
    }
    for t in Target::ALL {
        assert!(
            per_target.get(t.name()).copied().unwrap_or(0) >= 4,
            "too few corpus files for {}: {per_target:?}",
            t.name()
        );
    }
}

#[test]
fn valid_seeds_decode_and_errors_name_what_is_corrupt() {
    // The entry points are not vacuous: valid seeds decode, damaged ones are named errors.
    let t = record(&task(Status::Completed), &some_log());
    assert_eq!(
        fuzzing::decode_task_record(&t).unwrap(),
        (task(Status::Completed), some_log())
    );
    let err = fuzzing::decode_task_record(&t[..10])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("task record") && err.contains(&FUZZ_TASK_ID.to_string()),
        "{err}"
    );
    let l = encode(RecordKind::Log, &log_entries()[1].1).unwrap();
    assert_eq!(fuzzing::decode_log_entry(&l).unwrap(), log_entries()[1].1);
    let err = fuzzing::decode_log_entry(&t).unwrap_err().to_string();
    assert!(
        err.contains("log entry") && err.contains(&FUZZ_TASK_ID.to_string()),
        "{err}"
    );
    let m = fuzzing::decode_meta(&encode(RecordKind::Meta, &(1u64 << 32)).unwrap());
    assert!(m.format.is_err() && m.seq.unwrap() == 1 << 32);
    assert!(m.format.unwrap_err().to_string().contains("m/format"));
    let k = fuzzing::decode_keys(&keys::log(FUZZ_TASK_ID, 3));
    assert_eq!(k.log.unwrap(), (FUZZ_TASK_ID, 3));
    assert!(
        k.task.is_err()
            && k.state.is_err()
            && k.pending.is_err()
            && k.finished.is_err()
            && k.count.is_err()
    );
    let err = k.pending.unwrap_err().to_string();
    assert!(
        err.contains("pending-index key") && err.contains(&FUZZ_TASK_ID.to_string()),
        "{err}"
    );
    let e = fuzzing::envelope(&l);
    assert!(e.log.is_ok() && e.task.is_err() && e.meta.is_err());
}

/// Every single-bit flip and every truncation of every valid seed, through its own target and
/// the envelope target. Deterministic, and both outcomes (decodes / named error) occur.
#[test]
fn every_bit_flip_and_truncation_of_the_seeds() {
    let mut decoded = 0usize;
    let mut rejected = 0usize;
    let mut runs = 0usize;
    for (target, name, bytes) in seeds()
        .into_iter()
        .filter(|(_, n, _)| !n.starts_with("edge_"))
    {
        let mut run = |data: &[u8]| {
            for t in [target, Target::Envelope] {
                if let Err(v) = check(t, data) {
                    panic!("{} seed {name} mutated to {data:02x?}: {v}", t.name());
                }
            }
            if target == Target::TaskRecord {
                match fuzzing::decode_task_record(data) {
                    Ok(_) => decoded += 1,
                    Err(_) => rejected += 1,
                }
            }
            runs += 1;
        };
        for len in 0..bytes.len() {
            run(&bytes[..len]);
        }
        for bit in 0..bytes.len() * 8 {
            let mut m = bytes.clone();
            m[bit / 8] ^= 1 << (bit % 8);
            run(&m);
        }
    }
    assert!(runs > 10_000, "{runs}");
    assert!(
        decoded > 100 && rejected > 100,
        "decoded {decoded}, rejected {rejected}"
    );
}

#[derive(Clone, Debug)]
enum Mutation {
    FlipBit(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    Overwrite(usize, u8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..12))
            .prop_map(|(i, v)| Mutation::Insert(i, v)),
        (any::<usize>(), 1usize..8).prop_map(|(i, n)| Mutation::Delete(i, n)),
        (
            any::<usize>(),
            prop_oneof![
                Just(0u8),
                Just(0xff),
                Just(250),
                Just(251),
                Just(252),
                Just(253),
                any::<u8>()
            ]
        )
            .prop_map(|(i, b)| Mutation::Overwrite(i, b)),
    ]
}

fn apply(data: &mut Vec<u8>, m: &Mutation) {
    let at = |i: usize, len: usize| if len == 0 { 0 } else { i % len };
    match m {
        Mutation::FlipBit(i, b) => {
            if !data.is_empty() {
                let i = at(*i, data.len());
                data[i] ^= 1 << b;
            }
        }
        Mutation::Truncate(i) => data.truncate(at(*i, data.len() + 1)),
        Mutation::Insert(i, bytes) => {
            let i = at(*i, data.len() + 1);
            data.splice(i..i, bytes.iter().copied());
        }
        Mutation::Delete(i, n) => {
            if !data.is_empty() {
                let i = at(*i, data.len());
                let end = (i + n).min(data.len());
                data.drain(i..end);
            }
        }
        Mutation::Overwrite(i, b) => {
            if !data.is_empty() {
                let i = at(*i, data.len());
                data[i] = *b;
            }
        }
    }
}

fn target() -> impl Strategy<Value = Target> {
    prop::sample::select(Target::ALL.to_vec())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, failure_persistence: None, ..ProptestConfig::default() })]

    /// Random bytes, to a random entry point.
    #[test]
    fn random_bytes_never_break_a_decoder(t in target(), data in prop::collection::vec(any::<u8>(), 0..300)) {
        if let Err(v) = check(t, &data) {
            prop_assert!(false, "{}: {}", t.name(), v);
        }
    }

    /// A valid encoding with a few random mutations, to its own entry point and the envelope.
    #[test]
    fn mutated_valid_encodings_never_break_a_decoder(
        seed in prop::sample::select(seeds()),
        mutations in prop::collection::vec(mutation(), 1..5),
        other in target(),
    ) {
        let (t, name, mut data) = seed;
        for m in &mutations {
            apply(&mut data, m);
        }
        for t in [t, Target::Envelope, other] {
            if let Err(v) = check(t, &data) {
                prop_assert!(false, "{} on seed {} after {:?}: {}", t.name(), name, mutations, v);
            }
        }
    }
}

#[test]
fn fuzz_targets_exist_for_every_entry_point() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
    for t in Target::ALL {
        let src =
            std::fs::read_to_string(dir.join("fuzz_targets").join(format!("{}.rs", t.name())))
                .unwrap_or_else(|e| panic!("fuzz target {}: {e}", t.name()));
        let variant = format!("{t:?}");
        assert!(
            src.contains(&format!("Target::{variant}")),
            "fuzz target {} does not call its entry point",
            t.name()
        );
        assert!(
            manifest.contains(&format!("name = \"{}\"", t.name())),
            "{} is not in fuzz/Cargo.toml",
            t.name()
        );
    }
}
