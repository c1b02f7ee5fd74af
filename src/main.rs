//! The `omniq` command-line tool. See `omniq --help`.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
