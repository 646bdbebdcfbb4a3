//! The `tome` binary: `run` serves the embedded default (coordinator and ranks in one process),
//! `serve coordinator` / `serve worker` the two processes of a cluster, `batch` a shelf of
//! documents (resumable),
//! `process` sends one document (to the embedded default, or to a coordinator), `info` describes
//! what a deployment serves, `bench` measures tome's side of the benchmark suite.

mod args;
mod batch;
mod bench;
mod embedded;
mod outputs;
mod process;
mod serve;
mod telemetry;

use clap::Parser;

use crate::args::{Cli, Command};
use crate::telemetry::Telemetry;

/// Iterations candle's elementwise worker threads spin before parking, unless the environment
/// says otherwise: ranks already keep every core busy, and spinning workers take their time.
const CANDLE_SPIN_LIMIT: &str = "100";

fn main() -> std::process::ExitCode {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // SAFETY: the first statement of main, before any thread exists.
        unsafe { std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", CANDLE_SPIN_LIMIT) };
    }
    let cli = Cli::parse();
    if cli.threads > 0 {
        // SAFETY: before any thread exists. Rayon's global pool and candle's kernels size
        // themselves by it, and the ranks of this process share that many.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", cli.threads.to_string()) };
    }
    let filter = match tracing_subscriber::EnvFilter::try_new(&cli.log) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: --log {:?} is not a log filter: {e} (e.g. info, or warn,tome_coordinator=debug)", cli.log);
            return std::process::ExitCode::from(2);
        }
    };
    // Before any other thread exists: every thread then allocates from the one main heap.
    let heap_policy = cli.heap_retain_mib > 0 && tome_server::heap::retain_freed_memory(cli.heap_retain_mib.saturating_mul(1 << 20));
    // Benchmarks are compute from start to end: they run on this thread, with no async runtime.
    if let Command::Bench(a) = cli.command {
        if let Err(e) = Telemetry::install(filter, cli.log_format, None) {
            return finish(Err(e));
        }
        return finish(bench::run(a));
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let telemetry = {
        let _in_runtime = runtime.enter();
        match Telemetry::install(filter, cli.log_format, cli.otlp_endpoint.as_deref()) {
            Ok(t) => t,
            Err(e) => return finish(Err(e)),
        }
    };
    if cli.heap_retain_mib > 0 && !heap_policy {
        tracing::debug!("this allocator takes no heap policy: freed memory goes back to the kernel at once");
    }
    let command = cli.command;
    let result = runtime.block_on(async {
        match command {
            Command::Run(a) => embedded::run(a).await,
            Command::Serve(c) => serve::serve(c).await,
            Command::Process(a) => process::process(a).await,
            Command::Batch(a) => return batch::run(a).await,
            Command::Info(a) => process::info(a).await,
            Command::Bench(_) => Ok(()), // handled above, off the runtime
        }
        .map(|()| 0)
    });
    telemetry.shutdown();
    match result {
        Ok(0) => std::process::ExitCode::SUCCESS,
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => finish(Err(e)),
    }
}

fn finish(result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
