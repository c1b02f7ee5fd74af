//! Recurring schedules: when ticks fall, and which ticks a schedule owes at a given time.
//!
//! A [`Spec`] is a standard 5-field cron expression (minute hour day-of-month month
//! day-of-week, parsed by `croner`) read in an IANA time zone, or a plain interval. A schedule
//! remembers `last_fired`, the last tick it has accounted for (fired or skipped by its
//! [`Missed`] policy). At time `now` it owes the ticks `t` with `last_fired < t <= now`;
//! [`owed`] says which of them to fire and the new `last_fired`. A backend fires them in the
//! same atomic commit that advances `last_fired`, and only if `last_fired` is still what it read
//! (sled: the single writer; SQL: `UPDATE schedules SET last_fired = $new WHERE name = $1 AND
//! last_fired = $seen`), so a tick is fired exactly once whatever crashes.
//!
//! Daylight saving (cron in a zone with DST): a tick whose wall-clock time does not exist (the
//! spring-forward gap) fires at the first instant after the gap (02:30 -> 03:00 when clocks
//! jump from 02:00 to 03:00); a wall-clock time that happens twice (the fall-back overlap) fires
//! once, at its first occurrence. Intervals are plain durations in UTC and ignore DST.
//!
//! ```
//! use omniq::rules::schedule::{Missed, Spec};
//! use omniq::Timestamp;
//! let daily = Spec::cron("0 9 * * *", "Europe/Paris").unwrap();
//! // 2026-01-15T00:00:00Z: the next 09:00 in Paris (UTC+1 in winter) is 08:00 UTC.
//! let next = daily.next_after(Timestamp(1_768_435_200_000)).unwrap().unwrap();
//! assert_eq!(next.to_string(), "2026-01-15T08:00:00.000Z");
//! ```

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::task::Timestamp;

/// When a schedule ticks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Spec {
    /// A 5-field cron expression in an IANA time zone (`"UTC"`, `"Europe/Paris"`, ...).
    Cron {
        /// The expression, e.g. `"0 9 * * 1-5"`.
        expr: String,
        /// The zone its wall-clock times are read in.
        zone: String,
    },
    /// Every `ms` milliseconds, counted from when the schedule was created.
    Every {
        /// The interval in milliseconds (at least 1).
        ms: u64,
    },
}

impl Spec {
    /// A cron spec; fails with [`Error::Invalid`] naming what does not parse.
    pub fn cron(expr: &str, zone: &str) -> Result<Spec> {
        let spec = Spec::Cron {
            expr: expr.trim().to_string(),
            zone: zone.trim().to_string(),
        };
        spec.validate()?;
        Ok(spec)
    }

    /// An interval spec (at least 1 ms).
    pub fn every(d: Duration) -> Spec {
        Spec::Every {
            ms: u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1),
        }
    }

    /// Checks that the expression and zone parse.
    pub fn validate(&self) -> Result<()> {
        match self {
            Spec::Cron { expr, zone } => {
                parse_cron(expr)?;
                parse_zone(zone)?;
                Ok(())
            }
            Spec::Every { ms } if *ms == 0 => Err(Error::Invalid {
                what: "schedule interval",
                reason: "an interval of zero".into(),
            }),
            Spec::Every { .. } => Ok(()),
        }
    }

    /// The first tick strictly after `t`, if there is one.
    pub fn next_after(&self, t: Timestamp) -> Result<Option<Timestamp>> {
        match self {
            Spec::Every { ms } => Ok(t.0.checked_add((*ms).max(1)).map(Timestamp)),
            Spec::Cron { expr, zone } => {
                let cron = parse_cron(expr)?;
                let tz = parse_zone(zone)?;
                let Some(start) = DateTime::<Utc>::from_timestamp_millis(t.0 as i64) else {
                    return Ok(None);
                };
                let mut from = start.with_timezone(&tz);
                // croner finds the next matching wall-clock time; in an overlap it answers the
                // first occurrence, which can be before `t` (when `t` is in the second one):
                // step past such answers.
                for _ in 0..64 {
                    let next = match cron.find_next_occurrence(&from, false) {
                        Ok(n) => n,
                        Err(_) => return Ok(None),
                    };
                    let ms = next.timestamp_millis();
                    if ms > t.0 as i64 {
                        return Ok(u64::try_from(ms).ok().map(Timestamp));
                    }
                    from = next;
                }
                Ok(None)
            }
        }
    }
}

impl std::fmt::Display for Spec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Spec::Cron { expr, zone } => write!(f, "cron \"{expr}\" {zone}"),
            Spec::Every { ms } => write!(
                f,
                "every {}",
                humantime::format_duration(Duration::from_millis(*ms))
            ),
        }
    }
}

fn parse_cron(expr: &str) -> Result<croner::Cron> {
    if expr.split_whitespace().count() != 5 {
        return Err(Error::Invalid {
            what: "cron expression",
            reason: format!("{expr:?} does not have 5 fields (minute hour day month weekday)"),
        });
    }
    croner::Cron::new(expr).parse().map_err(|e| Error::Invalid {
        what: "cron expression",
        reason: format!("{expr:?}: {e}"),
    })
}

fn parse_zone(zone: &str) -> Result<chrono_tz::Tz> {
    chrono_tz::Tz::from_str(zone).map_err(|e| Error::Invalid {
        what: "time zone",
        reason: format!("{zone:?} is not an IANA time zone ({e})"),
    })
}

/// What to do with ticks that came due while nothing was ticking (the program was down, or
/// every worker pool was stopped).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Missed {
    /// Fire only a tick that is on time (due at most [`ON_TIME`] ago); skip the others.
    #[default]
    Skip,
    /// Fire one task for all the owed ticks, carrying the latest tick's time.
    RunOnce,
    /// Fire the most recent owed ticks, at most this many (at least 1).
    CatchUp(u32),
}

/// How late a tick may be and still count as on time under [`Missed::Skip`]: a pool's
/// dispatcher wakes at the tick, so a later tick is one that was missed.
pub const ON_TIME: Duration = Duration::from_secs(60);

/// Most ticks enumerated for one decision; beyond, the oldest are skipped whatever the policy
/// (a schedule every second that was down a month owes millions).
pub const MAX_ENUMERATED: usize = 100_000;

/// The ticks to fire at `now` and the new `last_fired`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owed {
    /// Ticks to fire, oldest first; each becomes one task carrying its tick as its due time.
    pub fire: Vec<Timestamp>,
    /// Ticks skipped by the policy.
    pub skipped: u64,
    /// The new `last_fired`: the latest owed tick (unchanged when none is owed).
    pub last_fired: Timestamp,
}

/// Which of the ticks in `(last_fired, now]` to fire under `missed`.
pub fn owed(spec: &Spec, last_fired: Timestamp, now: Timestamp, missed: Missed) -> Result<Owed> {
    let mut ticks: Vec<Timestamp> = Vec::new();
    let mut dropped = 0u64;
    let mut at = last_fired;
    match spec {
        Spec::Every { ms } => {
            let ms = (*ms).max(1);
            let count = now.0.saturating_sub(last_fired.0) / ms;
            let keep = count.min(MAX_ENUMERATED as u64);
            dropped = count - keep;
            let first = last_fired.0 + (dropped + 1) * ms;
            ticks.extend((0..keep).map(|i| Timestamp(first + i * ms)));
        }
        Spec::Cron { .. } => {
            while let Some(next) = spec.next_after(at)? {
                if next > now {
                    break;
                }
                if ticks.len() == MAX_ENUMERATED {
                    ticks.remove(0);
                    dropped += 1;
                }
                ticks.push(next);
                at = next;
            }
        }
    }
    let Some(&latest) = ticks.last() else {
        return Ok(Owed {
            fire: Vec::new(),
            skipped: 0,
            last_fired,
        });
    };
    let total = ticks.len() as u64 + dropped;
    let fire: Vec<Timestamp> = match missed {
        Missed::Skip => {
            let on_time = now.since(latest) <= ON_TIME;
            if on_time {
                vec![latest]
            } else {
                Vec::new()
            }
        }
        Missed::RunOnce => vec![latest],
        Missed::CatchUp(n) => {
            let n = (n.max(1) as usize).min(ticks.len());
            ticks[ticks.len() - n..].to_vec()
        }
    };
    Ok(Owed {
        skipped: total - fire.len() as u64,
        fire,
        last_fired: latest,
    })
}

/// The zone's UTC offset at `t`, in seconds (for display).
pub fn utc_offset_seconds(zone: &str, t: Timestamp) -> Result<i32> {
    use chrono::Offset;
    let tz = parse_zone(zone)?;
    let utc = DateTime::<Utc>::from_timestamp_millis(t.0 as i64).unwrap_or_default();
    Ok(tz
        .offset_from_utc_datetime(&utc.naive_utc())
        .fix()
        .local_minus_utc())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Milliseconds of a UTC date-time.
    fn utc(s: &str) -> Timestamp {
        let t = humantime::parse_rfc3339(s).unwrap();
        Timestamp::from_system_time(t)
    }

    #[test]
    fn cron_in_a_zone() {
        let s = Spec::cron("0 9 * * *", "America/New_York").unwrap();
        // Summer (EDT, UTC-4): 09:00 local is 13:00 UTC.
        let next = s.next_after(utc("2026-07-01T00:00:00Z")).unwrap().unwrap();
        assert_eq!(next, utc("2026-07-01T13:00:00Z"));
        assert!(Spec::cron("0 9 * *", "UTC").is_err(), "4 fields");
        assert!(Spec::cron("0 0 9 * * *", "UTC").is_err(), "6 fields");
        assert!(Spec::cron("0 9 * * *", "Mars/Olympus").is_err());
        assert!(Spec::cron("61 9 * * *", "UTC").is_err());
    }

    /// 2026-03-08: New York jumps from 02:00 EST to 03:00 EDT. A 02:30 job fires at 03:00 EDT
    /// (07:00 UTC) that day, once.
    #[test]
    fn spring_forward_gap_fires_at_the_end_of_the_gap() {
        let s = Spec::cron("30 2 * * *", "America/New_York").unwrap();
        let day_before = utc("2026-03-07T07:30:00Z"); // 02:30 EST on the 7th
        let next = s.next_after(day_before).unwrap().unwrap();
        assert_eq!(next, utc("2026-03-08T07:00:00Z"));
        let after = s.next_after(next).unwrap().unwrap();
        assert_eq!(after, utc("2026-03-09T06:30:00Z"), "02:30 EDT the next day");
    }

    /// 2026-11-01: New York falls back from 02:00 EDT to 01:00 EST; 01:30 happens twice. It
    /// fires once, at the first (EDT, 05:30 UTC).
    #[test]
    fn fall_back_overlap_fires_once() {
        let s = Spec::cron("30 1 * * *", "America/New_York").unwrap();
        let from = utc("2026-11-01T04:00:00Z"); // 00:00 EDT
        let o = owed(&s, from, utc("2026-11-01T12:00:00Z"), Missed::CatchUp(10)).unwrap();
        assert_eq!(o.fire, vec![utc("2026-11-01T05:30:00Z")]);
        // From inside the second 01:xx (EST), the next is the following day.
        let next = s.next_after(utc("2026-11-01T06:10:00Z")).unwrap().unwrap();
        assert_eq!(next, utc("2026-11-02T06:30:00Z"));
    }

    #[test]
    fn missed_policies() {
        let s = Spec::every(Duration::from_secs(60));
        let last = Timestamp(1_000_000);
        let now = Timestamp(1_000_000 + 5 * 60_000 + 10_000); // 5 ticks owed, latest 10 s ago
        let latest = Timestamp(1_000_000 + 5 * 60_000);
        let skip = owed(&s, last, now, Missed::Skip).unwrap();
        assert_eq!((skip.fire.clone(), skip.skipped), (vec![latest], 4));
        assert_eq!(skip.last_fired, latest);
        let hourly = Spec::every(Duration::from_secs(3600));
        let late_now = Timestamp(last.0 + 3_600_000)
            .plus(ON_TIME)
            .plus(Duration::from_millis(1));
        let late = owed(&hourly, last, late_now, Missed::Skip).unwrap();
        assert!(late.fire.is_empty() && late.skipped == 1, "{late:?}");
        assert_eq!(late.last_fired, Timestamp(last.0 + 3_600_000));
        assert_eq!(
            owed(&s, last, now, Missed::RunOnce).unwrap().fire,
            vec![latest]
        );
        let catch = owed(&s, last, now, Missed::CatchUp(3)).unwrap();
        assert_eq!(catch.fire.len(), 3);
        assert_eq!(catch.fire[2], latest);
        assert_eq!(catch.skipped, 2);
        let none = owed(&s, last, Timestamp(1_000_000 + 59_999), Missed::Skip).unwrap();
        assert!(none.fire.is_empty());
        assert_eq!(none.last_fired, last);
    }

    #[test]
    fn a_tick_is_owed_once() {
        let s = Spec::cron("*/15 * * * *", "UTC").unwrap();
        let mut last = utc("2026-01-01T00:00:00Z");
        let mut fired = Vec::new();
        for minute in 0..=60 {
            let now = utc("2026-01-01T00:00:00Z").plus(Duration::from_secs(60 * minute));
            let o = owed(&s, last, now, Missed::Skip).unwrap();
            fired.extend(o.fire);
            last = o.last_fired;
        }
        assert_eq!(fired.len(), 4, "{fired:?}");
    }
}
