//! A throwaway PostgreSQL schema per test, dropped when the test ends.
//!
//! The server is `OMNIQ_PG_URL` (default `host=127.0.0.1 user=postgres dbname=postgres`). When
//! it cannot be reached, a test is skipped (with a message) unless `CI` is set, where an
//! unreachable server is a failure.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use omniq::postgres::harness::PgHarness;
use omniq::postgres::{Liveness, PgOptions};
use omniq::retry::FixedJitter;
use omniq::testing::ManualClock;
use omniq::{Backoff, Timestamp};

pub fn url() -> String {
    std::env::var("OMNIQ_PG_URL")
        .unwrap_or_else(|_| "host=127.0.0.1 user=postgres dbname=postgres".into())
}

/// One test's schema. Dropped (with everything in it) on drop.
pub struct PgSchema {
    pub url: String,
    pub schema: String,
    pub admin: postgres::Client,
}

static NEXT: AtomicU64 = AtomicU64::new(0);

impl PgSchema {
    /// `None` (the test returns early) when the server is unreachable and `CI` is unset.
    pub fn new(test: &str) -> Option<PgSchema> {
        let url = url();
        let admin = match postgres::Client::connect(&url, postgres::NoTls) {
            Ok(c) => c,
            Err(e) => {
                let ci = std::env::var("CI")
                    .map(|v| !v.is_empty() && v != "false")
                    .unwrap_or(false);
                assert!(
                    !ci,
                    "CI is set but the PostgreSQL server at {url:?} is unreachable: {e}"
                );
                eprintln!("SKIPPED {test}: PostgreSQL at {url:?} is unreachable ({e}); set CI=true to make this a failure");
                return None;
            }
        };
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let schema = format!(
            "omniq_t_{}_{}_{}_{}",
            test.chars()
                .filter(|c| c.is_ascii_alphanumeric())
                .take(20)
                .collect::<String>(),
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            nanos
        );
        Some(PgSchema { url, schema, admin })
    }

    /// Options for tests: this schema, quick heartbeats and notifications, no background
    /// rescue or retention (tests call `rescue` themselves) unless they ask.
    pub fn options(&self) -> PgOptions {
        PgOptions {
            schema: self.schema.clone(),
            pool_size: 4,
            liveness: Liveness::SessionLock,
            heartbeat_interval: Duration::from_millis(200),
            dead_after: Duration::from_secs(30),
            rescue_interval: Duration::from_secs(3600),
            poll_interval: Duration::from_secs(3600),
            notify_interval: Duration::from_millis(10),
            retention: None,
            auto_migrate: true,
            connect_timeout: Duration::from_secs(10),
            read_only: false,
        }
    }

    /// A node on this schema with a manual clock and exact (unjittered) backoff.
    pub fn node(&self, options: PgOptions, clock: &Arc<ManualClock>) -> PgHarness {
        PgHarness::connect(
            &self.url,
            options,
            clock.clone(),
            Box::new(FixedJitter(0.5)),
            Backoff::default(),
        )
        .expect("connect a node")
    }

    pub fn execute(&mut self, sql: &str, params: &[&(dyn postgres::types::ToSql + Sync)]) -> u64 {
        self.admin
            .batch_execute(&format!("SET search_path TO \"{}\"", self.schema))
            .expect("set search_path");
        self.admin.execute(sql, params).expect(sql)
    }

    pub fn rows(
        &mut self,
        sql: &str,
        params: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Vec<postgres::Row> {
        self.admin
            .batch_execute(&format!("SET search_path TO \"{}\"", self.schema))
            .expect("set search_path");
        self.admin.query(sql, params).expect(sql)
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        let _ = self.admin.batch_execute(&format!(
            "DROP SCHEMA IF EXISTS \"{}\" CASCADE",
            self.schema
        ));
    }
}

/// A manual clock at a fixed, realistic time.
pub fn clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(Timestamp(1_700_000_000_000)))
}

/// Polls `f` until it holds or `timeout` passes; returns whether it held. For conditions set by
/// another thread or process (a session noticed lost), each check is a real observation.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
