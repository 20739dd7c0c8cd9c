//! `swarmbus-loadgen`: capacity tests against a swarmbus router. Parses arguments and
//! runs a scenario from the library modules.

mod fanout;
mod spawn;
mod units;

use clap::{Parser, Subcommand};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Capacity tests for a swarmbus router. Every figure comes from what the loadgen observed
/// on the wire.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// One publisher per swarm sends to that swarm's agents; reports delivered/s, loss,
    /// duplicates, reordering and end-to-end latency.
    Fanout(fanout::FanoutArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("swarmbus-loadgen: starting the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.scenario {
            Scenario::Fanout(args) => fanout::run(args).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("swarmbus-loadgen: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
