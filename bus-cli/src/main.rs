//! `bus`: publish, consume, call services, bridge transports, put programs
//! behind queues and manage topology from a shell, on RabbitMQ (`amqp://`,
//! `amqps://`) or a folder (`file://`).
//!
//! Exit codes: 0 ok, 1 error, 2 usage, 3 timeout, 4 unroutable.

mod admin;
mod bench;
mod bridge;
mod codec;
mod conn;
mod consume;
mod exec;
mod fail;
mod publish;
mod rpc;
mod signals;
mod topology;
mod work;

use clap::{Parser, Subcommand};

use crate::fail::{CliResult, Fail};

const AFTER_HELP: &str = "\
Exit codes: 0 ok, 1 error, 2 usage, 3 timeout, 4 unroutable.
URLs: amqp://USER:PASS@HOST:PORT/VHOST, amqps://..., file:///PATH (memory:// is refused:
it would end with the command). Credentials are never printed.

Examples:
  export BUS_URL=amqp://guest:guest@127.0.0.1:5672/%2f
  bus declare queue jobs --durable
  bus publish --queue jobs 'hello'
  bus get jobs --json
  bus help publish";

/// The bus command line: operate, inspect and migrate without writing code.
#[derive(Debug, Parser)]
#[command(name = "bus", version, about, after_help = AFTER_HELP)]
struct Cli {
    /// The transport: amqp://, amqps:// or file:///PATH.
    #[arg(
        long,
        env = "BUS_URL",
        global = true,
        default_value = conn::DEFAULT_URL,
        hide_env_values = true,
        hide_default_value = true
    )]
    url: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Publish(publish::PublishArgs),
    Consume(consume::ConsumeArgs),
    Get(consume::GetArgs),
    Call(rpc::CallArgs),
    Work(work::WorkArgs),
    Serve(rpc::ServeArgs),
    Bridge(bridge::BridgeArgs),
    Declare(admin::DeclareArgs),
    Bind(admin::BindArgs),
    Unbind(admin::BindArgs),
    Inspect(admin::InspectArgs),
    Purge(admin::PurgeArgs),
    Delete(admin::DeleteArgs),
    Topology(topology::TopologyArgs),
    Bench(bench::BenchArgs),
}

async fn run(cli: Cli) -> CliResult {
    let url = cli.url;
    match cli.command {
        Command::Publish(a) => publish::run(&url, a).await,
        Command::Consume(a) => consume::run_consume(&url, a).await,
        Command::Get(a) => consume::run_get(&url, a).await,
        Command::Call(a) => rpc::run_call(&url, a).await,
        Command::Work(a) => work::run(&url, a).await,
        Command::Serve(a) => rpc::run_serve(&url, a).await,
        Command::Bridge(a) => bridge::run(&url, a).await,
        Command::Declare(a) => admin::run_declare(&url, a).await,
        Command::Bind(a) => admin::run_bind(&url, a, true).await,
        Command::Unbind(a) => admin::run_bind(&url, a, false).await,
        Command::Inspect(a) => admin::run_inspect(&url, a).await,
        Command::Purge(a) => admin::run_purge(&url, a).await,
        Command::Delete(a) => admin::run_delete(&url, a).await,
        Command::Topology(a) => topology::run(&url, a).await,
        Command::Bench(a) => bench::run(&url, a).await,
    }
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version are successes; everything else is usage.
            let code = if e.use_stderr() {
                fail::USAGE
            } else {
                fail::OK
            };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bus: cannot start: {e}");
            std::process::exit(fail::ERROR);
        }
    };
    let result = runtime.block_on(run(cli));
    // Connections close in the background; do not wait on stragglers.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    match result {
        Ok(()) => std::process::exit(fail::OK),
        Err(Fail { code, message }) => {
            eprintln!("bus: {message}");
            std::process::exit(code);
        }
    }
}
