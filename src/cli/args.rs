//! Command-line arguments (clap derive).

use std::path::PathBuf;

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};

/// `omniq`: run the demo, inspect and operate a queue (a directory, or a PostgreSQL schema with
/// --url), benchmark the engine.
#[derive(Parser, Debug)]
#[command(
    name = "omniq",
    version,
    about = "Operate an omniq queue (a directory, or PostgreSQL with --url): run the demo, inspect, retry, cancel, purge, check, benchmark.",
    after_help = "Every command takes --data DIR (default ./omniq_data) or, for a queue in PostgreSQL, \
--url URL [--schema NAME] (also OMNIQ_URL), and --json (one JSON document on stdout)."
)]
pub struct Cli {
    /// The queue directory (default ./omniq_data). Not with --url.
    #[arg(long, global = true, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// A queue in PostgreSQL instead of a directory: a postgres:// URL or a
    /// "host=... user=... dbname=..." string (also OMNIQ_URL). Not with --data.
    #[arg(long, global = true, value_name = "URL")]
    pub url: Option<String>,
    /// With --url: the schema holding the queue's tables (default omniq).
    #[arg(long, global = true, value_name = "NAME")]
    pub schema: Option<String>,
    /// Print exactly one JSON document on stdout instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Enqueue a mixed workload (or resume an unfinished one) and run it on a worker pool: ~20 s;
    /// Ctrl-C stops it gracefully (exit 130) and the next run resumes. Queue directories only
    /// (not --url).
    Demo(DemoArgs),
    /// Task counts per status and per queue.
    Stats,
    /// List tasks, newest first.
    List(ListArgs),
    /// Show one task: its fields, payload, result, errors and transition history.
    Show {
        /// The task id (a UUID, as printed by `omniq list`).
        id: String,
    },
    /// Re-queue a failed or cancelled task with a fresh retry budget.
    Retry(RetryArgs),
    /// Cancel a pending task.
    Cancel {
        /// The task id.
        id: String,
    },
    /// Delete finished tasks (and their history) that finished longer ago than DURATION.
    Purge {
        /// How old a finished task must be to be deleted, e.g. 7d, 12h, 30m.
        #[arg(long, value_name = "DURATION")]
        older_than: String,
        /// Delete nothing: say how many tasks would go, and show the first few.
        #[arg(long)]
        dry_run: bool,
    },
    /// Verify every record, index, counter and log entry; exits non-zero if anything disagrees.
    Check,
    /// Rewrite the store into fresh files holding only its live data and delete the old ones:
    /// gives back the space purged tasks held (sled does not by itself). A directory held by a
    /// running process is compacted by that process through its admin socket; one locked
    /// without a socket is refused (`locked`). On PostgreSQL there is nothing to do
    /// (autovacuum's job) and it says so.
    Compact {
        /// The queue directory (the same as --data DIR).
        #[arg(value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Run the built-in benchmark in a temporary directory (--data is not used; --url is
    /// refused).
    Bench(BenchArgs),
    /// Open a queue with no workers and serve its admin API, metrics and dashboard until
    /// stopped: a directory on DIR/admin/api.sock (and on TCP with --listen); a PostgreSQL
    /// queue (--url) on TCP only, at --listen (default 127.0.0.1:8080).
    Serve(ServeArgs),
    /// Create or upgrade the PostgreSQL schema of a queue given by --url URL (or OMNIQ_URL)
    /// and --schema NAME (default omniq). Refuses a schema migrated by a newer omniq.
    #[cfg(feature = "postgres")]
    Migrate,
    /// List recurring schedules: spec, missed-tick policy, last and next tick, counts.
    Schedules,
}

/// `omniq serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Also listen on TCP at this address, e.g. 127.0.0.1:8080 (a non-loopback address needs
    /// --token). With --url, the only listener (default 127.0.0.1:8080).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Bearer token required on TCP (also OMNIQ_ADMIN_TOKEN; at least 16 characters).
    #[arg(long, value_name = "TOKEN")]
    pub token: Option<String>,
    /// Refuse every action (retry, cancel, purge, pause): for sharing the dashboard.
    #[arg(long)]
    pub read_only: bool,
}

/// `omniq demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Tasks in a fresh workload (ignored when an unfinished workload is resumed). Fewer tasks
    /// finish sooner.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub tasks: u32,
    /// Worker threads.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub workers: u32,
    /// How long each handler works, in milliseconds (also OMNIQ_DEMO_WORK_MS). The default, 500,
    /// makes the default workload run ~20 s, long enough to interrupt; 5 runs it in a blink.
    #[arg(long, value_name = "MS")]
    pub work_ms: Option<u64>,
}

/// `omniq list`.
#[derive(Args, Debug)]
pub struct ListArgs {
    /// Only tasks in this state: pending, running, completed, failed, cancelled.
    #[arg(long, value_name = "STATUS")]
    pub status: Option<String>,
    /// Only tasks on this queue.
    #[arg(long, value_name = "QUEUE")]
    pub queue: Option<String>,
    /// Only tasks of this kind.
    #[arg(long, value_name = "KIND")]
    pub kind: Option<String>,
    /// At most this many tasks.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub limit: u32,
    /// Continue after this task id (the "next cursor" printed by the previous page). An id
    /// that names no task is an error.
    #[arg(long, value_name = "ID")]
    pub cursor: Option<String>,
}

/// `omniq retry`.
#[derive(Args, Debug)]
#[command(group(ArgGroup::new("which").required(true).args(["id", "all_failed"])))]
pub struct RetryArgs {
    /// The task id.
    pub id: Option<String>,
    /// Retry every failed task.
    #[arg(long)]
    pub all_failed: bool,
}

/// `omniq bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Tasks per row (the raw fdatasync row makes at most 2,000 writes, the latency rows take at
    /// most 500 samples).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub tasks: u64,
    /// Worker threads for every row that runs a pool.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub workers: u64,
    /// Durability mode of the main rows (the Group and Relaxed comparison rows always run).
    #[arg(long, value_enum, default_value_t = DurabilityArg::Group)]
    pub durability: DurabilityArg,
    /// Serve the admin API during the lifecycle phase and poll the dashboard once a second
    /// (to compare with a run without it).
    #[arg(long)]
    pub poll_dashboard: bool,
    /// Which benchmark: `default` (the rows above), `disk` (issue 12's table: raw fdatasync, then
    /// enqueue / drain / producer + workers / fail-once / bytes per completed task, medians of
    /// --runs, durability group), `rss` (peak RSS building --tasks pending with enqueue_many
    /// and draining them), or `churn` (directory and RSS levels under retention: --rate tasks/s
    /// for --seconds, --retention, --purge-interval).
    #[arg(long, value_enum, default_value_t = SuiteArg::Default)]
    pub suite: SuiteArg,
    /// Runs per row for `--suite disk` (the median is reported).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=100))]
    pub runs: u64,
    /// `--suite churn`: tasks enqueued per second.
    #[arg(long, default_value_t = 1_500, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub rate: u64,
    /// `--suite churn`: how long the producer runs, seconds.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(10..=86_400))]
    pub seconds: u64,
    /// `--suite churn`: finished tasks older than this many seconds are purged.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub retention: u64,
    /// `--suite churn`: seconds between background purges.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub purge_interval: u64,
}

/// `--suite` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SuiteArg {
    /// The default rows (all three durability modes, latency, enqueue_many).
    Default,
    /// Issue 12's table in one run.
    Disk,
    /// Peak memory building and draining a deep queue.
    Rss,
    /// Disk and memory levels of a queue running under retention (--rate, --seconds,
    /// --retention, --purge-interval).
    Churn,
}

/// `--durability` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DurabilityArg {
    /// Every write is its own flush + fsync.
    Immediate,
    /// Concurrent writes share one flush + fsync (the default).
    Group,
    /// Acknowledged in memory; flushed in the background.
    Relaxed,
}

impl From<DurabilityArg> for omniq::Durability {
    fn from(d: DurabilityArg) -> omniq::Durability {
        match d {
            DurabilityArg::Immediate => omniq::Durability::Immediate,
            DurabilityArg::Group => omniq::Durability::Group,
            DurabilityArg::Relaxed => omniq::Durability::Relaxed,
        }
    }
}
