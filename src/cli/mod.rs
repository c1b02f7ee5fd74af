//! The `omniq` command-line tool: argument parsing, error reporting and dispatch. Each command
//! lives in `commands.rs` (inspect and operate), `demo.rs` (the main job) or calls
//! `omniq::bench`.

mod args;
mod commands;
mod demo;
mod output;

use std::path::Path;
use std::process::ExitCode;

use clap::Parser;
use omniq::{Queue, Status, TaskId};

use args::{Cli, Command};

/// A failure that ends the command: printed as one `error:` line on stderr.
#[derive(Debug)]
pub enum CliError {
    /// Bad arguments (exit status 2, like clap's own usage errors).
    Usage(String),
    /// Anything that went wrong while running (exit status 1).
    Runtime(String),
}

impl From<omniq::Error> for CliError {
    fn from(e: omniq::Error) -> CliError {
        match e {
            omniq::Error::Locked { path } => {
                let shown = std::path::absolute(&path).unwrap_or(path);
                CliError::Runtime(format!(
                    "queue directory {} is in use by another process (a running `omniq demo` or the program \
                     that embeds this queue holds its lock); stop that process and try again, or pass \
                     --data DIR to use a different directory",
                    shown.display()
                ))
            }
            other => CliError::Runtime(other.to_string()),
        }
    }
}

/// Runs the tool and returns the process exit status.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(code) => code,
        Err(e) => {
            let (code, msg) = match e {
                CliError::Usage(m) => (2, m),
                CliError::Runtime(m) => (1, m),
            };
            eprintln!("error: {}", msg.replace(['\n', '\r'], " "));
            ExitCode::from(code)
        }
    }
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
        Command::Purge { older_than } => {
            let age = parse_duration(older_than)?;
            commands::purge(&open_existing(dir, json)?, json, older_than, age)
        }
        Command::Check => commands::check(&open_existing(dir, json)?, json),
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
    Err(CliError::Runtime(if existing == dir {
        format!("{shown} is not a directory; pass --data DIR to point at a queue directory")
    } else {
        format!(
            "{shown} cannot be a queue directory: {} is not a directory; pass --data DIR to point at a queue directory",
            existing.display()
        )
    }))
}

/// Opens a queue directory that must already exist: commands that inspect or operate never
/// create one. Reports crash recovery done by this open on stderr.
fn open_existing(dir: &Path, json: bool) -> Result<Queue, CliError> {
    let shown = dir.display();
    if !dir.exists() {
        return Err(CliError::Runtime(format!(
            "no queue at {shown}: the directory does not exist (pass --data DIR to point at a queue directory, or run `omniq demo --data {shown}` to create one)"
        )));
    }
    ensure_not_a_file(dir)?;
    if !dir.join("db").is_file() {
        return Err(CliError::Runtime(format!(
            "no queue at {shown}: the directory exists but holds no omniq queue (no `db` file); pass --data DIR to point at a queue directory"
        )));
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
