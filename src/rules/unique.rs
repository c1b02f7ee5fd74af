//! Unique jobs: a key, the states in which it is held, and an optional period.
//!
//! A task enqueued with [`Unique`] gets a *digest*: SHA-256 over either its kind and its
//! arguments as canonical JSON (object keys sorted, no whitespace) or an explicit key, plus —
//! with a period — the number of the period the enqueue falls in (`created_at / period`, as in
//! River's `ByPeriod`). The task *holds* its digest while its status is in its hold set, which
//! always contains `Pending` and `Running` (so no two live tasks ever share a key) and may add
//! terminal states (e.g. `Completed`: "at most one successful run per key and period").
//!
//! An enqueue whose digest is held is refused as a duplicate and answered with the holder's id.
//! A task releases its digest when it leaves its hold set, and when it is purged. A manual
//! retry that would bring a task back into its hold set while another task holds the digest is
//! refused ([`crate::Error::UniqueConflict`]).
//!
//! In SQL (the PostgreSQL backend) this is a holder table whose primary key is the digest:
//! `INSERT ... ON CONFLICT DO NOTHING RETURNING` in the insert's transaction, a read of the
//! holder on conflict, and a delete of the row by the transition that leaves the hold set.
//!
//! ```
//! use omniq::rules::unique::{hold_change, Hold, Unique};
//! use omniq::Status;
//! let u = Unique::by_args().states([Status::Completed]);
//! let mask = u.state_mask();
//! assert_eq!(hold_change(mask, None, Some(Status::Pending)), Hold::Acquire);
//! assert_eq!(hold_change(mask, Some(Status::Running), Some(Status::Completed)), Hold::Keep);
//! assert_eq!(hold_change(mask, Some(Status::Running), Some(Status::Failed)), Hold::Release);
//! ```

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::task::{Status, Timestamp};

/// How a task is made unique: see the [module docs](self).
///
/// ```
/// use std::time::Duration;
/// use omniq::{EnqueueOptions, Status, Unique};
/// // One pending-or-running "sync_account" per account id (the args).
/// let o = EnqueueOptions::new().unique(Unique::by_args());
/// // At most one welcome mail per user ever (until purged), whatever the args hold.
/// let o = EnqueueOptions::new().unique(Unique::key("welcome:user:42").states([Status::Completed]));
/// // At most one report per hour bucket.
/// let o = EnqueueOptions::new().unique(Unique::by_args().period(Duration::from_secs(3600)));
/// # let _ = o;
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unique {
    pub(crate) key: Option<String>,
    pub(crate) states: u8,
    pub(crate) period: Option<Duration>,
}

impl Unique {
    /// The key is the task's kind and its arguments (as canonical JSON).
    pub fn by_args() -> Unique {
        Unique {
            key: None,
            states: always_held(),
            period: None,
        }
    }

    /// The key is `key`, whatever the task's kind and arguments (include the kind in it if
    /// two kinds may use the same key).
    pub fn key(key: impl Into<String>) -> Unique {
        Unique {
            key: Some(key.into()),
            ..Unique::by_args()
        }
    }

    /// States in which the key is held besides `Pending` and `Running`, which always hold it
    /// (otherwise two live tasks could share a key).
    pub fn states(mut self, states: impl IntoIterator<Item = Status>) -> Unique {
        for s in states {
            self.states |= bit(s);
        }
        self
    }

    /// Uniqueness per period: the key includes which `period` (counted from the Unix epoch) the
    /// enqueue falls in, so one task per key per period (a period of zero is ignored).
    pub fn period(mut self, period: Duration) -> Unique {
        self.period = (!period.is_zero()).then_some(period);
        self
    }

    /// The hold set as a bit mask (bit `status code`).
    pub fn state_mask(&self) -> u8 {
        self.states | always_held()
    }
}

fn bit(s: Status) -> u8 {
    1u8 << s.code()
}

fn always_held() -> u8 {
    bit(Status::Pending) | bit(Status::Running)
}

/// Whether a task in `status` holds its key, given its hold set `mask`.
pub fn holds(mask: u8, status: Status) -> bool {
    (mask | always_held()) & bit(status) != 0
}

/// The statuses in a hold set, in lifecycle order.
pub fn states_of(mask: u8) -> Vec<Status> {
    Status::ALL
        .into_iter()
        .filter(|s| holds(mask, *s))
        .collect()
}

/// What a transition does to a task's hold on its key (`None` = the task does not exist:
/// before its insert, after its purge).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hold {
    /// It starts holding the key (insert, or a manual retry back into the hold set).
    Acquire,
    /// It stops holding the key.
    Release,
    /// It held the key and still does.
    Keep,
    /// It held it neither before nor after.
    Nothing,
}

/// The rule for one transition.
pub fn hold_change(mask: u8, before: Option<Status>, after: Option<Status>) -> Hold {
    let was = before.is_some_and(|s| holds(mask, s));
    let is = after.is_some_and(|s| holds(mask, s));
    match (was, is) {
        (false, true) => Hold::Acquire,
        (true, false) => Hold::Release,
        (true, true) => Hold::Keep,
        (false, false) => Hold::Nothing,
    }
}

/// What is stored about a unique task: its digest, hold set, and the key in readable form.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UniqueSpec {
    /// SHA-256 of the key (see the module docs).
    pub digest: [u8; 32],
    /// The hold set (bit per status code).
    pub states: u8,
    /// The key for humans: the explicit key, or `kind` and the canonical arguments.
    pub key: String,
    /// With a period: the period number the key includes.
    pub period: Option<u64>,
}

impl UniqueSpec {
    /// The digest in hex, as `omniq show` prints it.
    pub fn digest_hex(&self) -> String {
        self.digest.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Longest readable key kept (the digest covers the whole key).
const KEY_DISPLAY_MAX: usize = 200;

/// Computes the spec of a task of `kind` with JSON `payload` enqueued at `now`.
pub fn spec(u: &Unique, kind: &str, payload: &[u8], now: Timestamp) -> Result<UniqueSpec> {
    let mut h = Sha256::new();
    h.update(b"omniq/unique/1\0");
    let key = match &u.key {
        Some(k) => {
            h.update(b"key\0");
            h.update((k.len() as u64).to_be_bytes());
            h.update(k.as_bytes());
            k.clone()
        }
        None => {
            let value: serde_json::Value =
                serde_json::from_slice(payload).map_err(|e| Error::Invalid {
                    what: "unique key",
                    reason: format!("the {kind} payload is not JSON ({e})"),
                })?;
            let mut canonical = String::new();
            canonical_json(&value, &mut canonical);
            h.update(b"args\0");
            h.update((kind.len() as u64).to_be_bytes());
            h.update(kind.as_bytes());
            h.update((canonical.len() as u64).to_be_bytes());
            h.update(canonical.as_bytes());
            format!("{kind} {canonical}")
        }
    };
    let period = u.period.map(|p| {
        let ms = u64::try_from(p.as_millis()).unwrap_or(u64::MAX).max(1);
        now.0 / ms
    });
    match period {
        Some(n) => {
            h.update(b"\0period\0");
            h.update(n.to_be_bytes());
        }
        None => h.update(b"\0forever"),
    }
    let mut key = key;
    if key.len() > KEY_DISPLAY_MAX {
        let mut cut = KEY_DISPLAY_MAX;
        while !key.is_char_boundary(cut) {
            cut -= 1;
        }
        key.truncate(cut);
        key.push('…');
    }
    Ok(UniqueSpec {
        digest: h.finalize().into(),
        states: u.state_mask(),
        key,
        period,
    })
}

/// JSON with object keys sorted and no whitespace, whatever order the producer used.
pub fn canonical_json(v: &serde_json::Value, out: &mut String) {
    use serde_json::Value;
    match v {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                canonical_json(v, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical_json(v, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_and_running_always_hold() {
        let m = Unique::by_args().state_mask();
        assert!(holds(m, Status::Pending) && holds(m, Status::Running));
        assert!(!holds(m, Status::Completed));
        assert!(
            holds(0, Status::Running),
            "even an empty mask holds live states"
        );
        let m = Unique::by_args().states([Status::Completed]).state_mask();
        assert_eq!(
            states_of(m),
            vec![Status::Pending, Status::Running, Status::Completed]
        );
    }

    #[test]
    fn digest_ignores_key_order_and_separates_kinds_keys_and_periods() {
        let u = Unique::by_args();
        let a = spec(&u, "k", br#"{"a":1,"b":[1,{"y":2,"x":1}]}"#, Timestamp(0)).unwrap();
        let b = spec(
            &u,
            "k",
            br#"{ "b":[1,{"x":1,"y":2}], "a":1 }"#,
            Timestamp(9),
        )
        .unwrap();
        assert_eq!(a.digest, b.digest);
        assert_eq!(a.key, r#"k {"a":1,"b":[1,{"x":1,"y":2}]}"#);
        let other_kind = spec(&u, "j", br#"{"a":1,"b":[1,{"y":2,"x":1}]}"#, Timestamp(0));
        assert_ne!(other_kind.unwrap().digest, a.digest);
        let explicit = spec(&Unique::key("k"), "k", b"{}", Timestamp(0)).unwrap();
        let derived = spec(&u, "k", b"{}", Timestamp(0)).unwrap();
        assert_ne!(explicit.digest, derived.digest);
        let hourly = Unique::key("r").period(Duration::from_secs(3600));
        let h1 = spec(&hourly, "k", b"{}", Timestamp(3_599_999)).unwrap();
        let h2 = spec(&hourly, "k", b"{}", Timestamp(3_600_000)).unwrap();
        assert_ne!(h1.digest, h2.digest);
        assert_eq!((h1.period, h2.period), (Some(0), Some(1)));
        assert!(spec(&u, "k", b"not json", Timestamp(0)).is_err());
    }

    #[test]
    fn hold_changes() {
        let m = Unique::by_args().state_mask();
        use Status::*;
        assert_eq!(hold_change(m, None, Some(Pending)), Hold::Acquire);
        assert_eq!(hold_change(m, Some(Pending), Some(Running)), Hold::Keep);
        assert_eq!(hold_change(m, Some(Running), Some(Pending)), Hold::Keep);
        assert_eq!(
            hold_change(m, Some(Running), Some(Completed)),
            Hold::Release
        );
        assert_eq!(hold_change(m, Some(Failed), Some(Pending)), Hold::Acquire);
        assert_eq!(hold_change(m, Some(Failed), None), Hold::Nothing);
        let keep_done = Unique::by_args().states([Completed]).state_mask();
        assert_eq!(hold_change(keep_done, Some(Completed), None), Hold::Release);
    }
}
