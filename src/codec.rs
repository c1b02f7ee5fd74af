//! Value encoding: a versioned envelope around a bincode 2 (serde) payload.
//!
//! ```text
//! [record kind: u8][schema version: u16 BE][bincode payload ...]
//! ```
//!
//! Keys are never encoded here (see `keys.rs`); only values. Decoding never panics: bad bytes
//! give a `Corrupt` error naming the key they came from.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, Result};

/// Kinds of stored values. Part of the on-disk format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    /// A task record ([`TaskInfo`](crate::TaskInfo)).
    Task = 1,
    /// A transition-log entry ([`LogEntry`](crate::LogEntry)).
    Log = 2,
    /// A metadata value (format version, sequence numbers, counters).
    Meta = 3,
    /// The key writes of a commit group, stored while the group is applied.
    WriteAhead = 4,
    /// A task's extras ([`TaskExtras`](crate::TaskExtras)), format 2.
    Extras = 5,
    /// A limit ([`Limit`](crate::Limit)), format 2.
    Limit = 6,
    /// A schedule ([`ScheduleInfo`](crate::ScheduleInfo)), format 2.
    Schedule = 7,
    /// A task record with its transition log inside (format 4; see [`crate::record`]).
    TaskLog = 8,
}

impl RecordKind {
    fn name(self) -> &'static str {
        match self {
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
}

/// The schema version written for every record kind by this build.
pub const SCHEMA_VERSION: u16 = 1;

/// Upper bound on what one decode may allocate: protects against corrupt length prefixes.
const DECODE_LIMIT: usize = 64 << 20;

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Encodes `value` as a versioned envelope of kind `kind`.
pub fn encode<T: Serialize>(kind: RecordKind, value: &T) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(64);
    out.push(kind as u8);
    out.extend_from_slice(&SCHEMA_VERSION.to_be_bytes());
    let body = bincode::serde::encode_to_vec(value, config()).map_err(|e| Error::Encode {
        what: kind.name(),
        reason: e.to_string(),
    })?;
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decodes an envelope of kind `kind`; `key` names where the bytes came from for the error.
pub fn decode<T: DeserializeOwned>(
    kind: RecordKind,
    bytes: &[u8],
    key: &dyn Fn() -> String,
) -> Result<T> {
    let corrupt = |reason: String| Error::Corrupt {
        what: kind.name(),
        key: key(),
        reason,
    };
    let [found_kind, v0, v1, body @ ..] = bytes else {
        return Err(corrupt(format!(
            "{} bytes is shorter than the 3-byte envelope header",
            bytes.len()
        )));
    };
    if *found_kind != kind as u8 {
        return Err(corrupt(format!(
            "record kind byte is {found_kind}, expected {}",
            kind as u8
        )));
    }
    let version = u16::from_be_bytes([*v0, *v1]);
    if version != SCHEMA_VERSION {
        return Err(corrupt(format!(
            "schema version {version} is not one this build reads (it reads {SCHEMA_VERSION})"
        )));
    }
    let cfg = config().with_limit::<DECODE_LIMIT>();
    let (value, used) = bincode::serde::decode_from_slice::<T, _>(body, cfg)
        .map_err(|e| corrupt(format!("payload does not decode: {e}")))?;
    if used != body.len() {
        return Err(corrupt(format!(
            "{} trailing bytes after the payload",
            body.len() - used
        )));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejections() {
        let bytes = encode(RecordKind::Meta, &42u32).unwrap();
        assert_eq!(bytes, vec![3, 0, 1, 42]);
        let key = || "m/format".to_string();
        assert_eq!(decode::<u32>(RecordKind::Meta, &bytes, &key).unwrap(), 42);
        assert!(decode::<u32>(RecordKind::Task, &bytes, &key).is_err());
        assert!(decode::<u32>(RecordKind::Meta, &bytes[..2], &key).is_err());
        let mut trailing = bytes.clone();
        trailing.push(0);
        let err = decode::<u32>(RecordKind::Meta, &trailing, &key)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("m/format") && err.contains("trailing"),
            "{err}"
        );
    }
}
