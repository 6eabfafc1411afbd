//! The `fedmq` command: thin entry point; the subcommands live in `cli/`.

mod cli;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    if args.moves_buffers_only() {
        return_big_buffers_to_the_os();
    }
    cli::init_tracing(args.verbose, args.quiet_logs());
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", cli::one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// Makes glibc serve allocations of 1 MiB and more with their own mappings, returned to the OS on
/// free. In the server, store and broker, the big allocations are model-sized transfer buffers
/// that live for one step of a round; by default glibc raises its mmap threshold after the first
/// such free (up to 32 MiB) and then keeps freed buffers in per-thread arenas, which roughly
/// doubled the server's resident memory at 1M parameters without making anything faster. Not
/// used when training: there it made every per-batch buffer a fresh page-faulted mapping (about
/// 10 million extra page faults in the default `fedmq run`).
fn return_big_buffers_to_the_os() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; it is called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}
