//! The `omniq` command-line tool: argument parsing, error reporting and dispatch. Each command
//! lives in `commands.rs` (inspect and operate), `demo.rs` (the main job) or calls
//! `omniq::bench`.

mod args;
mod commands;
mod demo;
mod output;
mod remote;
mod serve;

use std::path::Path;
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
    match run(&cli) {
        Ok(code) => code,
        Err(e) => report(e, cli.json, &cli.data),
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

fn run(cli: &Cli) -> Result<ExitCode, CliError> {
    let json = cli.json;
    let dir = cli.data.as_path();
    match &cli.command {
        Command::Demo(a) => demo::run(dir, json, a),
        Command::Bench(a) => commands::bench(json, a),
        Command::Stats => commands::stats(&open_existing(dir, json)?, json),
        Command::List(a) => {
            // Arguments are validated before the directory is touched.
            let status = a.status.as_deref().map(parse_status).transpose()?;
            let cursor = a.cursor.as_deref().map(parse_id).transpose()?;
            commands::list(&open_existing(dir, json)?, json, a, status, cursor)
        }
        Command::Show { id } => {
            let id = parse_id(id)?;
            commands::show(&open_existing(dir, json)?, json, id)
        }
        Command::Retry(a) => {
            let id = a.id.as_deref().map(parse_id).transpose()?;
            commands::retry(&open_existing(dir, json)?, json, id)
        }
        Command::Cancel { id } => {
            let id = parse_id(id)?;
            commands::cancel(&open_existing(dir, json)?, json, id)
        }
        Command::Purge {
            older_than,
            dry_run,
        } => {
            let age = parse_duration(older_than)?;
            commands::purge(&open_existing(dir, json)?, json, older_than, age, *dry_run)
        }
        Command::Check => commands::check(&open_existing(dir, json)?, json),
        Command::Serve(a) => serve::run(dir, json, a),
        #[cfg(feature = "postgres")]
        Command::Migrate { url, schema } => commands::migrate(json, url, schema),
        Command::Schedules => commands::schedules(&open_existing(dir, json)?, json),
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

/// The queue directory a command works on: through its admin socket when a live process holds
/// it and serves one (said on stderr), otherwise opened here (see `open_local`).
fn open_existing(dir: &Path, json: bool) -> Result<Target, CliError> {
    if let Some(remote) = remote::connect(dir) {
        return Ok(remote);
    }
    open_local(dir, json).map(Target::Local)
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
