//! `bus declare`, `bind`, `unbind`, `inspect`, `purge`, `delete`.

use bus::{
    ConnectionExt, DeleteExchangeOptions, DeleteQueueOptions, ExchangeKind, ExchangeOptions,
    FieldTable, QueueArguments, QueueOptions,
};
use clap::{Args, Subcommand};

use crate::codec::parse_assignment;
use crate::fail::{CliResult, Fail};

/// Declare a queue or an exchange (idempotent: the same declaration again
/// is a no-op; a different one fails with "precondition failed").
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  bus declare queue jobs --durable
  bus declare queue asr --durable --arg x-max-priority:=10 --arg x-dead-letter-exchange=dlx
  bus declare exchange speech --type topic --durable
  bus declare exchange later --type x-delayed-message --arg x-delayed-type=direct")]
pub struct DeclareArgs {
    #[command(subcommand)]
    pub what: DeclareWhat,
}

/// What to declare.
#[derive(Debug, Subcommand)]
pub enum DeclareWhat {
    /// A queue.
    Queue(QueueDecl),
    /// An exchange.
    Exchange(ExchangeDecl),
}

/// A queue declaration.
#[derive(Debug, Args)]
pub struct QueueDecl {
    /// The queue's name.
    pub name: String,
    /// Survives a broker restart.
    #[arg(long)]
    pub durable: bool,
    /// Deleted when its last consumer leaves.
    #[arg(long)]
    pub auto_delete: bool,
    /// An argument: NAME=TEXT or NAME:=JSON (e.g. x-message-ttl:=60000) (repeatable).
    #[arg(long = "arg", value_name = "NAME=VALUE")]
    pub arguments: Vec<String>,
}

/// An exchange type as the command line and topology files write it:
/// `direct`, `fanout`, `topic`, `headers`, or a broker plugin's type, which
/// starts with `x-` (`x-delayed-message`, `x-consistent-hash`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kind(pub ExchangeKind);

impl std::str::FromStr for Kind {
    type Err = bus::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(Kind)
    }
}

impl<'de> serde::Deserialize<'de> for Kind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

impl From<Kind> for ExchangeKind {
    fn from(k: Kind) -> Self {
        k.0
    }
}

/// An exchange declaration.
#[derive(Debug, Args)]
pub struct ExchangeDecl {
    /// The exchange's name.
    pub name: String,
    /// Its type: direct, fanout, topic, headers, or a broker plugin's
    /// (x-delayed-message, x-consistent-hash: RabbitMQ with the plugin only).
    #[arg(long = "type", short = 't', default_value = "direct")]
    pub kind: Kind,
    /// Survives a broker restart.
    #[arg(long)]
    pub durable: bool,
    /// Deleted when its last binding goes.
    #[arg(long)]
    pub auto_delete: bool,
    /// Only other exchanges may publish to it.
    #[arg(long)]
    pub internal: bool,
    /// An argument: NAME=TEXT or NAME:=JSON (repeatable).
    #[arg(long = "arg", value_name = "NAME=VALUE")]
    pub arguments: Vec<String>,
}

/// Parses `--arg` assignments into a table.
pub fn table(assignments: &[String]) -> CliResult<FieldTable> {
    assignments.iter().map(|a| parse_assignment(a)).collect()
}

/// Runs `bus declare`.
pub async fn run_declare(url: &str, a: DeclareArgs) -> CliResult {
    let conn = crate::conn::open(url).await?;
    let result = match a.what {
        DeclareWhat::Queue(q) => {
            let options = QueueOptions::default()
                .with_durable(q.durable)
                .with_auto_delete(q.auto_delete)
                .with_arguments(QueueArguments::from_table(&table(&q.arguments)?)?);
            conn.declare_queue(&q.name, options).await.map(|info| {
                println!("{}", info.name);
            })
        }
        DeclareWhat::Exchange(x) => {
            let options = ExchangeOptions::default()
                .with_durable(x.durable)
                .with_auto_delete(x.auto_delete)
                .with_internal(x.internal)
                .with_arguments(table(&x.arguments)?);
            conn.declare_exchange(&x.name, x.kind.into(), options).await
        }
    };
    let _ = conn.close().await;
    Ok(result?)
}

/// Bind (or unbind) a queue to an exchange.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  bus bind asr.en speech --routing-key 'asr.en.#'
  bus bind audits events                      # fanout: no key needed
  bus bind urgent by-header --arg x-match=all --arg priority=high
  bus unbind asr.en speech --routing-key 'asr.en.#'")]
pub struct BindArgs {
    /// The queue.
    pub queue: String,
    /// The exchange.
    pub exchange: String,
    /// The binding key.
    #[arg(long, short = 'k', default_value = "")]
    pub routing_key: String,
    /// A binding argument (headers exchanges): NAME=TEXT or NAME:=JSON (repeatable).
    #[arg(long = "arg", value_name = "NAME=VALUE")]
    pub arguments: Vec<String>,
}

/// Runs `bus bind` (`bind` true) or `bus unbind`.
pub async fn run_bind(url: &str, a: BindArgs, bind: bool) -> CliResult {
    let args = table(&a.arguments)?;
    let conn = crate::conn::open(url).await?;
    let r = if bind {
        conn.bind_queue(&a.queue, &a.exchange, &a.routing_key, args)
            .await
    } else {
        conn.unbind_queue(&a.queue, &a.exchange, &a.routing_key, args)
            .await
    };
    let _ = conn.close().await;
    Ok(r?)
}

/// Show a queue's ready-message and consumer counts, or whether an
/// exchange exists (exit 1 if not).
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  bus inspect jobs                 # jobs: 12 messages ready, 2 consumers
  bus inspect jobs --json          # {\"queue\":\"jobs\",\"messages\":12,\"consumers\":2}
  bus inspect --exchange speech")]
pub struct InspectArgs {
    /// The queue (or exchange, with --exchange).
    pub name: String,
    /// NAME is an exchange.
    #[arg(long)]
    pub exchange: bool,
    /// One JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Runs `bus inspect`.
pub async fn run_inspect(url: &str, a: InspectArgs) -> CliResult {
    let conn = crate::conn::open(url).await?;
    let r = if a.exchange {
        match conn.exchange_exists(&a.name).await {
            Ok(true) => {
                if a.json {
                    println!(
                        "{}",
                        serde_json::json!({"exchange": a.name, "exists": true})
                    );
                } else {
                    println!("exchange {:?} exists", a.name);
                }
                Ok(())
            }
            Ok(false) => Err(Fail::error(format!("no exchange {:?}", a.name))),
            Err(e) => Err(e.into()),
        }
    } else {
        match conn.inspect_queue(&a.name).await {
            Ok(info) => {
                if a.json {
                    println!(
                        "{}",
                        serde_json::json!({
                            "queue": info.name,
                            "messages": info.message_count,
                            "consumers": info.consumer_count,
                        })
                    );
                } else {
                    println!(
                        "{}: {} messages ready, {} consumers",
                        info.name, info.message_count, info.consumer_count
                    );
                }
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    };
    let _ = conn.close().await;
    r
}

/// Remove the ready messages of a queue (not those held by consumers).
#[derive(Debug, Args)]
#[command(after_help = "Example:\n  bus purge jobs        # prints how many were removed")]
pub struct PurgeArgs {
    /// The queue.
    pub queue: String,
}

/// Runs `bus purge`.
pub async fn run_purge(url: &str, a: PurgeArgs) -> CliResult {
    let conn = crate::conn::open(url).await?;
    let r = conn.purge_queue(&a.queue).await;
    let _ = conn.close().await;
    println!("{}", r?);
    Ok(())
}

/// Delete a queue (with its messages) or an exchange (with its bindings).
/// Deleting what does not exist succeeds, as in RabbitMQ.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  bus delete queue jobs
  bus delete queue jobs --if-empty --if-unused
  bus delete exchange speech")]
pub struct DeleteArgs {
    #[command(subcommand)]
    pub what: DeleteWhat,
}

/// What to delete.
#[derive(Debug, Subcommand)]
pub enum DeleteWhat {
    /// A queue; prints how many ready messages went with it.
    Queue {
        /// The queue.
        name: String,
        /// Only if it has no consumers.
        #[arg(long)]
        if_unused: bool,
        /// Only if it has no messages.
        #[arg(long)]
        if_empty: bool,
    },
    /// An exchange.
    Exchange {
        /// The exchange.
        name: String,
        /// Only if it has no bindings.
        #[arg(long)]
        if_unused: bool,
    },
}

/// Runs `bus delete`.
pub async fn run_delete(url: &str, a: DeleteArgs) -> CliResult {
    let conn = crate::conn::open(url).await?;
    let r = match a.what {
        DeleteWhat::Queue {
            name,
            if_unused,
            if_empty,
        } => conn
            .delete_queue(
                &name,
                DeleteQueueOptions::default()
                    .with_if_unused(if_unused)
                    .with_if_empty(if_empty),
            )
            .await
            .map(|n| println!("{n}")),
        DeleteWhat::Exchange { name, if_unused } => {
            conn.delete_exchange(
                &name,
                DeleteExchangeOptions::default().with_if_unused(if_unused),
            )
            .await
        }
    };
    let _ = conn.close().await;
    Ok(r?)
}
