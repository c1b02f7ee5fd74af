//! The `omniq` command-line tool. See `omniq --help`.

mod cli;

// sled allocates from several threads at once; mimalloc avoids glibc's arena-lock contention
// (see Cargo.toml and BENCHMARKS.md). Applications linking the library choose their own.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cli::main()
}
