//! `bus topology apply FILE`: exchanges, queues and bindings from TOML.

use std::path::PathBuf;

use bus::{
    Connection, ConnectionExt, Error, ExchangeOptions, FieldTable, FieldValue, QueueArguments,
    QueueOptions,
};
use clap::{Args, Subcommand};
use serde::Deserialize;

use crate::admin::Kind;
use crate::fail::{CliResult, Fail};

/// Declare a whole topology from a TOML file.
///
/// Idempotent: each exchange and queue is reported as `created`, `exists`
/// (declared before with the same settings) or `conflict` (exists with
/// other settings: the error says which); bindings as `bound` (binding
/// again is a no-op). Nothing stops half-way: every entry is tried, the
/// file is checked as a whole before anything is declared, and the exit
/// code is 1 if any entry failed.
#[derive(Debug, Args)]
#[command(after_help = "\
Example:
  bus topology apply speech.toml

speech.toml:
  [[exchange]]
  name = \"speech\"
  type = \"topic\"          # direct (default), fanout, topic, headers, x-... (a plugin's)
  durable = true

  [[queue]]
  name = \"asr.requests\"
  durable = true
  arguments = { x-max-priority = 10, x-dead-letter-exchange = \"speech.dlx\" }

  [[binding]]
  queue = \"asr.requests\"
  exchange = \"speech\"
  routing_key = \"asr.#\"
  # arguments = { x-match = \"all\", lang = \"en\" }   (headers exchanges)")]
pub struct TopologyArgs {
    #[command(subcommand)]
    pub action: Action,
}

/// What to do with the file.
#[derive(Debug, Subcommand)]
pub enum Action {
    /// Declare everything in FILE.
    Apply {
        /// The TOML file.
        file: PathBuf,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Topology {
    #[serde(default)]
    exchange: Vec<ExchangeDef>,
    #[serde(default)]
    queue: Vec<QueueDef>,
    #[serde(default)]
    binding: Vec<BindingDef>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExchangeDef {
    name: String,
    #[serde(rename = "type", default = "direct")]
    kind: Kind,
    #[serde(default)]
    durable: bool,
    #[serde(default)]
    auto_delete: bool,
    #[serde(default)]
    internal: bool,
    #[serde(default)]
    arguments: toml::Table,
}

fn direct() -> Kind {
    Kind(bus::ExchangeKind::Direct)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct QueueDef {
    name: String,
    #[serde(default)]
    durable: bool,
    #[serde(default)]
    auto_delete: bool,
    #[serde(default)]
    arguments: toml::Table,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BindingDef {
    queue: String,
    exchange: String,
    #[serde(default)]
    routing_key: String,
    #[serde(default)]
    arguments: toml::Table,
}

fn toml_to_field(v: &toml::Value) -> CliResult<FieldValue> {
    Ok(match v {
        toml::Value::String(s) => FieldValue::String(s.clone()),
        toml::Value::Integer(i) => FieldValue::I64(*i),
        toml::Value::Float(f) => FieldValue::F64(*f),
        toml::Value::Boolean(b) => FieldValue::Bool(*b),
        toml::Value::Array(items) => {
            FieldValue::Array(items.iter().map(toml_to_field).collect::<CliResult<_>>()?)
        }
        toml::Value::Table(t) => FieldValue::Table(toml_table(t)?),
        toml::Value::Datetime(d) => {
            return Err(Fail::usage(format!(
                "{d}: dates are not argument values (use a string or a number)"
            )))
        }
    })
}

fn toml_table(t: &toml::Table) -> CliResult<FieldTable> {
    t.iter()
        .map(|(k, v)| Ok((k.clone(), toml_to_field(v)?)))
        .collect()
}

/// One entry's outcome.
enum Outcome {
    Created,
    Exists,
    Bound,
    Conflict(Fail),
}

/// Runs `bus topology apply`.
pub async fn run(url: &str, a: TopologyArgs) -> CliResult {
    let Action::Apply { file } = a.action;
    let text = std::fs::read_to_string(&file)
        .map_err(|e| Fail::error(format!("cannot read {}: {e}", file.display())))?;
    let topo: Topology =
        toml::from_str(&text).map_err(|e| Fail::usage(format!("{}: {e}", file.display())))?;

    // Check the whole file before declaring anything.
    let mut exchanges = Vec::new();
    for x in &topo.exchange {
        bus::validate_name("exchange", &x.name).map_err(|e| Fail::usage(e.to_string()))?;
        let options = ExchangeOptions::default()
            .with_durable(x.durable)
            .with_auto_delete(x.auto_delete)
            .with_internal(x.internal)
            .with_arguments(toml_table(&x.arguments)?);
        exchanges.push((x, options));
    }
    let mut queues = Vec::new();
    for q in &topo.queue {
        bus::validate_name("queue", &q.name).map_err(|e| Fail::usage(e.to_string()))?;
        let arguments = QueueArguments::from_table(&toml_table(&q.arguments)?)
            .map_err(|e| Fail::usage(format!("queue {:?}: {e}", q.name)))?;
        let options = QueueOptions::default()
            .with_durable(q.durable)
            .with_auto_delete(q.auto_delete)
            .with_arguments(arguments);
        queues.push((q, options));
    }
    let mut bindings = Vec::new();
    for b in &topo.binding {
        bindings.push((b, toml_table(&b.arguments)?));
    }

    let conn = crate::conn::open(url).await?;
    let mut failed = 0;
    let mut report = |what: &str, name: &str, outcome: Outcome| match outcome {
        Outcome::Created => println!("created  {what} {name}"),
        Outcome::Exists => println!("exists   {what} {name}"),
        Outcome::Bound => println!("bound    {what} {name}"),
        Outcome::Conflict(e) => {
            failed += 1;
            println!("conflict {what} {name}: {e}");
        }
    };
    for (x, options) in exchanges {
        let o = exchange(&*conn, &x.name, x.kind.clone(), options).await;
        report("exchange", &x.name, o);
    }
    for (q, options) in queues {
        let o = queue(&*conn, &q.name, options).await;
        report("queue", &q.name, o);
    }
    for (b, args) in bindings {
        let name = format!("{} -> {} key {:?}", b.exchange, b.queue, b.routing_key);
        let o = match conn
            .bind_queue(&b.queue, &b.exchange, &b.routing_key, args)
            .await
        {
            Ok(()) => Outcome::Bound,
            Err(e) => Outcome::Conflict(e.into()),
        };
        report("binding", &name, o);
    }
    let _ = conn.close().await;
    if failed > 0 {
        return Err(Fail::error(format!(
            "{failed} entries of {} could not be applied (see above); the others are in place",
            file.display()
        )));
    }
    Ok(())
}

async fn exchange(
    conn: &dyn Connection,
    name: &str,
    kind: Kind,
    options: ExchangeOptions,
) -> Outcome {
    let existed = match conn.exchange_exists(name).await {
        Ok(e) => e,
        Err(e) => return Outcome::Conflict(e.into()),
    };
    match conn.declare_exchange(name, kind.into(), options).await {
        Ok(()) if existed => Outcome::Exists,
        Ok(()) => Outcome::Created,
        Err(e) => Outcome::Conflict(conflict(e)),
    }
}

async fn queue(conn: &dyn Connection, name: &str, options: QueueOptions) -> Outcome {
    let existed = match conn.inspect_queue(name).await {
        Ok(_) => true,
        Err(Error::NotFound(_)) => false,
        Err(e) => return Outcome::Conflict(e.into()),
    };
    match conn.declare_queue(name, options).await {
        Ok(_) if existed => Outcome::Exists,
        Ok(_) => Outcome::Created,
        Err(e) => Outcome::Conflict(conflict(e)),
    }
}

fn conflict(e: Error) -> Fail {
    let precondition = matches!(e, Error::PreconditionFailed(_));
    let f = Fail::from(e);
    if precondition {
        f.context("exists with other settings; delete it first or change the file")
    } else {
        f
    }
}
