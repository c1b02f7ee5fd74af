//! The `omniq` command-line tool: argument parsing, error reporting and dispatch. Each command
//! lives in `commands.rs` (inspect and operate), `demo.rs` (the main job) or calls
//! `omniq::bench`.

mod args;
mod commands;
mod demo;
mod output;
mod remote;
mod serve;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use omniq::{Queue, Status, TaskId};

use remote::Target;

use args::{Cli, Command};

/// A failure that ends the command: printed as one `error:` line on stderr, and with `--json`
/// also as a JSON document on stdout: `{"error": {"kind", "message", "exit_code"}}`.
#[derive(Debug)]
pub enum CliError {
    /// Bad arguments (exit status 2, like clap's own usage errors). `error.kind` is `usage`.
    Usage(String),
    /// Anything that went wrong while running (exit status 1). `error.kind` is `failed`.
    Runtime(String),
    /// A runtime failure with a stable `error.kind` (exit status 1).
    Kind(&'static str, String),
    /// An error from the library, rendered with the directory the command was pointed at.
    Lib(omniq::Error),
}

impl From<omniq::Error> for CliError {
    fn from(e: omniq::Error) -> CliError {
        CliError::Lib(e)
    }
}

impl CliError {
    /// The exit status, the stable `error.kind` for `--json`, and the one-line message.
    fn describe(self, dir: &Path) -> (u8, &'static str, String) {
        match self {
            CliError::Usage(m) => (2, "usage", m),
            CliError::Runtime(m) => (1, "failed", m),
            CliError::Kind(k, m) => (1, k, m),
            CliError::Lib(e) => {
                let (kind, msg) = lib_error(e, dir);
                (1, kind, msg)
            }
        }
    }
}

/// A library error in the CLI's words, with its stable kind.
fn lib_error(e: omniq::Error, dir: &Path) -> (&'static str, String) {
    use omniq::Error as E;
    let shown = |p: &Path| {
        std::path::absolute(p)
            .unwrap_or_else(|_| p.to_path_buf())
            .display()
            .to_string()
    };
    match e {
        E::Locked { path } => (
            "locked",
            format!(
                "queue directory {} is in use by another process (a running `omniq demo` or the program \
                 that embeds this queue holds its lock); stop that process and try again, or pass \
                 --data DIR to use a different directory",
                shown(&path)
            ),
        ),
        E::NotAStore { path, found } => (
            "not_a_store",
            format!(
                "{} is not an omniq queue directory ({found}); nothing in it was changed (pass \
                 --data DIR to point at a queue directory)",
                shown(&path)
            ),
        ),
        E::Damaged { path, detail } => (
            "corrupt",
            E::Damaged {
                path: Some(path.unwrap_or_else(|| dir.to_path_buf())),
                detail,
            }
            .to_string(),
        ),
        e @ E::Corrupt { .. } => (
            "corrupt",
            format!(
                "{e} (in {}; run `omniq check --data {}` to list every damaged record)",
                dir.display(),
                dir.display()
            ),
        ),
        e @ E::AlreadyOpen { .. } => ("locked", e.to_string()),
        e @ E::FormatTooNew { .. } => ("format_too_new", e.to_string()),
        e @ E::SchemaTooOld { .. } => ("schema_too_old", e.to_string()),
        e @ E::SchemaTooNew { .. } => ("schema_too_new", e.to_string()),
        e @ E::NotFound(_) => ("not_found", e.to_string()),
        e @ E::InvalidState { .. } => ("invalid_state", e.to_string()),
        e @ E::UniqueConflict { .. } => ("invalid_state", e.to_string()),
        e @ E::NoSuchSchedule { .. } => ("not_found", e.to_string()),
        e @ E::Invalid { .. } => ("invalid_argument", e.to_string()),
        e @ E::Payload { .. } => ("payload", e.to_string()),
        e @ E::WaitTimeout { .. } => ("timeout", e.to_string()),
        E::Remote { code, message, .. } => (remote::error_kind(&code), message),
        E::Storage(m) => (
            "storage",
            format!("storage error in {}: {m}", dir.display()),
        ),
        e => ("storage", e.to_string()),
    }
}

/// Runs the tool and returns the process exit status.
pub fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let cli = match Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(e) => return usage_error(e, &args),
    };
    let location = match Location::of(&cli) {
        Ok(l) => l,
        Err(e) => return report(e, cli.json, Path::new(".")),
    };
    match run(&cli, &location) {
        Ok(code) => code,
        Err(e) => report(e, cli.json, location.shown()),
    }
}

/// The directory a command uses when neither `--data` nor `--url` (nor `OMNIQ_URL`) is given.
const DEFAULT_DIR: &str = "./omniq_data";

/// Where the command's queue lives: a directory (`--data`), or a PostgreSQL schema (`--url`,
/// `--schema`, or `OMNIQ_URL`).
pub enum Location {
    /// A queue directory.
    Dir(PathBuf),
    /// A queue in PostgreSQL.
    #[cfg(feature = "postgres")]
    Pg {
        /// The connection string as given (it may hold a password: never printed).
        url: String,
        /// The schema holding the queue's tables.
        schema: String,
        /// The server, database and schema, without the password, for messages and output.
        label: PathBuf,
    },
}

impl Location {
    /// `--data` and `--url` are alternatives; an explicit `--data` wins over `OMNIQ_URL`.
    fn of(cli: &Cli) -> Result<Location, CliError> {
        // `omniq compact DIR`: the directory may be given as its argument.
        let data = match (&cli.command, &cli.data) {
            (Command::Compact { dir: Some(d) }, Some(data)) if d != data => {
                return Err(CliError::Usage(
                    "compact: give the directory once, as DIR or as --data DIR".into(),
                ))
            }
            (Command::Compact { dir: Some(d) }, _) => Some(d.clone()),
            _ => cli.data.clone(),
        };
        let url =
            match (&data, &cli.url) {
                (Some(_), Some(_)) => return Err(CliError::Usage(
                    "--data and --url are alternatives: give --data DIR for a queue directory or \
                     --url URL for a PostgreSQL queue, not both"
                        .into(),
                )),
                (Some(_), None) => None,
                (None, Some(u)) => Some(u.clone()),
                (None, None) => std::env::var("OMNIQ_URL").ok().filter(|u| !u.is_empty()),
            };
        let Some(url) = url else {
            if cli.schema.is_some() {
                return Err(CliError::Usage(
                    "--schema names a PostgreSQL schema: it needs --url URL (or OMNIQ_URL)".into(),
                ));
            }
            let dir = data.unwrap_or_else(|| PathBuf::from(DEFAULT_DIR));
            return Ok(Location::Dir(dir));
        };
        Location::pg(url, cli.schema.clone())
    }

    #[cfg(feature = "postgres")]
    fn pg(url: String, schema: Option<String>) -> Result<Location, CliError> {
        use std::str::FromStr;
        let schema = schema.unwrap_or_else(|| "omniq".to_string());
        // Parsed here only to name the server in messages; the password is left out. The
        // parser's message does not repeat the string.
        let config = postgres::Config::from_str(&url).map_err(|e| {
            CliError::Kind(
                "invalid_argument",
                format!(
                    "--url is not a PostgreSQL connection string ({e}); expected \
                     postgres://USER@HOST:PORT/DATABASE or \"host=... user=... dbname=...\""
                ),
            )
        })?;
        let hosts: Vec<String> = config
            .get_hosts()
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let host = match h {
                    postgres::config::Host::Tcp(name) => name.clone(),
                    #[cfg(unix)]
                    postgres::config::Host::Unix(path) => path.display().to_string(),
                };
                let port = config
                    .get_ports()
                    .get(i)
                    .or(config.get_ports().first())
                    .copied()
                    .unwrap_or(5432);
                format!("{host}:{port}")
            })
            .collect();
        let hosts = if hosts.is_empty() {
            "localhost:5432".to_string()
        } else {
            hosts.join(",")
        };
        let user = config
            .get_user()
            .map(|u| format!("{u}@"))
            .unwrap_or_default();
        let db = config.get_dbname().or(config.get_user()).unwrap_or("");
        let label = PathBuf::from(format!("postgres://{user}{hosts}/{db} schema {schema}"));
        Ok(Location::Pg { url, schema, label })
    }

    #[cfg(not(feature = "postgres"))]
    fn pg(_url: String, _schema: Option<String>) -> Result<Location, CliError> {
        Err(CliError::Usage(
            "--url needs the PostgreSQL backend: this omniq was built without feature `postgres`"
                .into(),
        ))
    }

    /// The directory, or the PostgreSQL label, as messages show it.
    fn shown(&self) -> &Path {
        match self {
            Location::Dir(d) => d,
            #[cfg(feature = "postgres")]
            Location::Pg { label, .. } => label,
        }
    }

    /// The directory, for the commands that work on a directory only.
    #[cfg_attr(not(feature = "postgres"), allow(unused_variables))]
    fn dir_only(&self, command: &str) -> Result<&Path, CliError> {
        match self {
            Location::Dir(d) => Ok(d),
            #[cfg(feature = "postgres")]
            Location::Pg { .. } => Err(CliError::Usage(format!(
                "`omniq {command}` works on a queue directory only: --url (or OMNIQ_URL) is not \
                 supported here; pass --data DIR"
            ))),
        }
    }
}

/// Prints a failure: one `error:` line on stderr; with `--json`, also the error document on
/// stdout.
fn report(e: CliError, json: bool, dir: &Path) -> ExitCode {
    let (code, kind, msg) = e.describe(dir);
    let msg = msg.replace(['\n', '\r'], " ");
    if json {
        // Nothing else was written to stdout: every command prints its document last.
        let _ = output::emit_json(&serde_json::json!({
            "error": { "kind": kind, "message": msg, "exit_code": code }
        }));
    }
    eprintln!("error: {msg}");
    ExitCode::from(code)
}

/// clap's usage errors as one line plus a hint (`--help` and `--version` print as clap does).
fn usage_error(e: clap::Error, args: &[std::ffi::OsString]) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit();
    }
    // clap's text: "error: WHAT\n  DETAIL...\n\n  tip: ...\n\nUsage: ...\n\nFor more ...".
    let rendered = e.render().to_string();
    let mut parts: Vec<String> = Vec::new();
    for line in rendered.lines() {
        let line = line.trim();
        if line.starts_with("Usage:") || line.starts_with("For more information") {
            break;
        }
        if !line.is_empty() {
            parts.push(line.trim_start_matches("error:").trim().to_string());
        }
    }
    let sub = args
        .iter()
        .skip(1)
        .filter_map(|a| a.to_str())
        .find(|a| Cli::command().get_subcommands().any(|c| c.get_name() == *a));
    let hint = match sub {
        Some(sub) => format!("run `omniq {sub} --help` for its usage"),
        None => "run `omniq --help` for the commands".to_string(),
    };
    let msg = format!("{} ({hint})", parts.join(" "));
    let json = args.iter().any(|a| a == "--json");
    report(CliError::Usage(msg), json, Path::new("."))
}

fn run(cli: &Cli, location: &Location) -> Result<ExitCode, CliError> {
    let json = cli.json;
    let open = || open_existing(location, json, false);
    // Commands that only read: on PostgreSQL they open read-only (nothing is written).
    let read = || open_existing(location, json, true);
    match &cli.command {
        Command::Demo(a) => demo::run(location.dir_only("demo")?, json, a),
        Command::Bench(a) => {
            if cli.url.is_some() {
                location.dir_only("bench")?;
            }
            commands::bench(json, a)
        }
        Command::Stats => commands::stats(&read()?, json),
        Command::List(a) => {
            // Arguments are validated before the queue is touched.
            let status = a.status.as_deref().map(parse_status).transpose()?;
            let cursor = a.cursor.as_deref().map(parse_id).transpose()?;
            commands::list(&read()?, json, a, status, cursor)
        }
        Command::Show { id } => {
            let id = parse_id(id)?;
            commands::show(&read()?, json, id)
        }
        Command::Retry(a) => {
            let id = a.id.as_deref().map(parse_id).transpose()?;
            commands::retry(&open()?, json, id)
        }
        Command::Cancel { id } => {
            let id = parse_id(id)?;
            commands::cancel(&open()?, json, id)
        }
        Command::Purge {
            older_than,
            dry_run,
        } => {
            let age = parse_duration(older_than)?;
            let queue = if *dry_run { read()? } else { open()? };
            commands::purge(&queue, json, older_than, age, *dry_run)
        }
        Command::Check => commands::check(&read()?, json),
        Command::Compact { .. } => commands::compact(&open()?, json),
        Command::Serve(a) => serve::run(location, json, a),
        #[cfg(feature = "postgres")]
        Command::Migrate => match location {
            Location::Pg { url, schema, .. } => commands::migrate(json, url, schema),
            Location::Dir(_) => Err(CliError::Usage(
                "`omniq migrate` needs --url URL (or OMNIQ_URL) naming the database; \
                 --schema NAME picks the schema (default omniq)"
                    .into(),
            )),
        },
        Command::Schedules => commands::schedules(&read()?, json),
    }
}

fn parse_id(s: &str) -> Result<TaskId, CliError> {
    s.parse::<TaskId>().map_err(|_| {
        CliError::Usage(format!(
            "{s:?} is not a task id (expected a UUID such as 0192f5e4-8c1a-7b3e-9f00-1a2b3c4d5e6f, as printed by `omniq list`)"
        ))
    })
}

fn parse_status(s: &str) -> Result<Status, CliError> {
    s.parse::<Status>().map_err(|_| {
        CliError::Usage(format!(
            "{s:?} is not a status (expected one of: pending, running, completed, failed, cancelled)"
        ))
    })
}

fn parse_duration(s: &str) -> Result<std::time::Duration, CliError> {
    humantime::parse_duration(s.trim()).map_err(|e| {
        CliError::Usage(format!(
            "{s:?} is not a duration ({e}); use forms like 7d, 12h, 30m, 90s"
        ))
    })
}

/// Refuses a `--data` path that is, or lies under, something other than a directory (a regular
/// file, say), before the storage engine reports a bare "Not a directory".
fn ensure_not_a_file(dir: &Path) -> Result<(), CliError> {
    let Some(existing) = dir.ancestors().find(|a| a.exists()) else {
        return Ok(());
    };
    if existing.is_dir() {
        return Ok(());
    }
    let shown = dir.display();
    Err(CliError::Kind(
        "not_a_store",
        if existing == dir {
            format!("{shown} is not a directory; pass --data DIR to point at a queue directory")
        } else {
            format!(
            "{shown} cannot be a queue directory: {} is not a directory; pass --data DIR to point at a queue directory",
            existing.display()
        )
        },
    ))
}

/// The queue a command works on. A directory: through its admin socket when a live process
/// holds it and serves one (said on stderr), otherwise opened here (see `open_local`). A
/// PostgreSQL queue: opened here, next to the processes that run it (see `open_pg`).
fn open_existing(location: &Location, json: bool, read_only: bool) -> Result<Target, CliError> {
    match location {
        Location::Dir(dir) => {
            if let Some(remote) = remote::connect(dir) {
                return Ok(remote);
            }
            open_local(dir, json).map(Target::Local)
        }
        #[cfg(feature = "postgres")]
        Location::Pg { url, schema, label } => {
            open_pg(url, schema, label, json, read_only).map(Target::Local)
        }
    }
}

/// A bound no interval of the CLI's node reaches (a century).
#[cfg(feature = "postgres")]
const NEVER: std::time::Duration = std::time::Duration::from_secs(100 * 365 * 24 * 3600);

/// Opens a PostgreSQL queue that must already exist: a schema that holds no queue is reported
/// (`no_queue`), never created, and an older schema is refused (`schema_too_old`: run `omniq
/// migrate`), never migrated. The queue runs no workers.
///
/// `read_only` (the read commands): the queue is opened read-only and writes nothing at all —
/// no node row, no rescue, connections that refuse writes. Otherwise (the operate commands
/// and `serve`) it joins as a node, which takes nothing from live nodes: its heartbeat bound
/// is a century, so it declares no heartbeat-mode node dead and terminates no session; it
/// rescues only the tasks of nodes whose database session has ended (as every node does),
/// runs no further rescue passes and no retention purge.
#[cfg(feature = "postgres")]
fn open_pg(
    url: &str,
    schema: &str,
    label: &Path,
    json: bool,
    read_only: bool,
) -> Result<Queue, CliError> {
    let options = omniq::postgres::PgOptions {
        read_only,
        schema: schema.to_string(),
        pool_size: 2,
        dead_after: NEVER,
        rescue_interval: NEVER,
        retention: None,
        auto_migrate: false,
        ..Default::default()
    };
    let shown = label.display();
    let version = omniq::postgres::schema_version(url, &options)?;
    if version == 0 {
        return Err(CliError::Kind(
            "no_queue",
            format!(
                "no queue at {shown}: schema {schema:?} holds no omniq tables (pass --schema NAME \
                 to name the queue's schema, or run `omniq migrate --url URL --schema {schema}` to \
                 create one)"
            ),
        ));
    }
    let queue = Queue::builder(label).postgres_with(url, options).open()?;
    let r = queue.recovery_report();
    if r.recovered > 0 && !json {
        eprintln!(
            "note: opening {shown} recovered {} task(s) left RUNNING by a node found dead: {} requeued, {} failed",
            r.recovered, r.requeued, r.failed
        );
    }
    Ok(queue)
}

/// Opens a queue directory that must already exist: commands that inspect or operate never
/// create one, and never touch a directory that is not an omniq queue (the library refuses it
/// before its storage engine sees it). Reports crash recovery done by this open on stderr.
fn open_local(dir: &Path, json: bool) -> Result<Queue, CliError> {
    let shown = dir.display();
    let no_queue = |why: &str| {
        CliError::Kind(
            "no_queue",
            format!(
                "no queue at {shown}: {why} (pass --data DIR to point at a queue directory, or run \
                 `omniq demo --data {shown}` to create one)"
            ),
        )
    };
    if !dir.exists() {
        return Err(no_queue("the directory does not exist"));
    }
    ensure_not_a_file(dir)?;
    if dir.is_dir() {
        // An empty directory would be created in by `Queue::open`: refuse it here instead.
        let entries = std::fs::read_dir(dir)
            .map_err(|e| CliError::Kind("storage", format!("cannot list {shown}: {e}")))?;
        let mut any = false;
        for entry in entries.flatten() {
            if entry.file_name() != "OMNIQ.tmp" {
                any = true;
                break;
            }
        }
        if !any {
            return Err(no_queue(
                "the directory exists but holds no omniq queue (it is empty)",
            ));
        }
    }
    let queue = Queue::open(dir)?;
    let r = queue.recovery_report();
    if r.recovered > 0 && !json {
        eprintln!(
            "note: opening {shown} recovered {} task(s) left RUNNING by a process that stopped: {} requeued, {} failed",
            r.recovered, r.requeued, r.failed
        );
    }
    Ok(queue)
}
