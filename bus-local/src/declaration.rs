//! What a declaration must satisfy before it changes anything: a
//! redeclaration matches what exists (RabbitMQ's "inequivalent arg"
//! checks, in RabbitMQ's order), and a queue type allows the options.

use bus_core::{
    Error, ExchangeKind, ExchangeOptions, QueueArguments, QueueOptions, QueueType, Result,
};

use crate::exchange::Exchange;
use crate::queue::Queue;

/// The queue's arguments, normalised, or the first one that is refused,
/// naming the queue.
pub(crate) fn queue_arguments(name: &str, options: &QueueOptions) -> Result<QueueArguments> {
    options.arguments.normalized().map_err(|e| match e {
        Error::PreconditionFailed(why) => {
            Error::PreconditionFailed(format!("queue '{name}': {why}"))
        }
        other => other,
    })
}

/// Checks a redeclaration of an existing exchange.
pub(crate) fn check_exchange_redeclare(
    name: &str,
    existing: &Exchange,
    kind: &ExchangeKind,
    options: &ExchangeOptions,
    alternate: &Option<String>,
) -> Result<()> {
    if existing.kind != *kind {
        return Err(inequivalent(
            "exchange",
            name,
            "type",
            &format!("'{kind}'"),
            &format!("'{}'", existing.kind),
        ));
    }
    same_flag(
        "exchange",
        name,
        "durable",
        existing.durable,
        options.durable,
    )?;
    same_flag(
        "exchange",
        name,
        "auto_delete",
        existing.auto_delete,
        options.auto_delete,
    )?;
    same_flag(
        "exchange",
        name,
        "internal",
        existing.internal,
        options.internal,
    )?;
    if existing.alternate != *alternate {
        return Err(inequivalent(
            "exchange",
            name,
            "alternate-exchange",
            &show(alternate),
            &show(&existing.alternate),
        ));
    }
    Ok(())
}

/// Checks the durable and auto-delete flags of a queue redeclaration (the
/// exclusive flag is the owner check, which comes next in RabbitMQ).
pub(crate) fn check_queue_flags(queue: &Queue, options: &QueueOptions) -> Result<()> {
    same_flag(
        "queue",
        &queue.name,
        "durable",
        queue.durable,
        options.durable,
    )?;
    same_flag(
        "queue",
        &queue.name,
        "auto_delete",
        queue.auto_delete,
        options.auto_delete,
    )
}

fn same_flag(what: &str, name: &str, arg: &str, have: bool, want: bool) -> Result<()> {
    if have == want {
        return Ok(());
    }
    Err(inequivalent(
        what,
        name,
        arg,
        &format!("'{want}'"),
        &format!("'{have}'"),
    ))
}

fn inequivalent(what: &str, name: &str, arg: &str, received: &str, current: &str) -> Error {
    Error::PreconditionFailed(format!(
        "inequivalent arg '{arg}' for {what} '{name}': received {received} but current is {current}"
    ))
}

fn show<T: std::fmt::Debug>(v: &Option<T>) -> String {
    match v {
        Some(v) => format!("{v:?}"),
        None => "none".into(),
    }
}

/// Compares the arguments RabbitMQ checks on redeclaration; others (unknown
/// `x-` arguments) are ignored, as RabbitMQ ignores them.
pub(crate) fn check_equivalent_args(
    name: &str,
    have: &QueueArguments,
    want: &QueueArguments,
) -> Result<()> {
    macro_rules! same {
        ($field:ident, $arg:literal) => {
            if have.$field != want.$field {
                return Err(inequivalent(
                    "queue",
                    name,
                    $arg,
                    &show(&want.$field),
                    &show(&have.$field),
                ));
            }
        };
    }
    same!(message_ttl, "x-message-ttl");
    same!(expires, "x-expires");
    same!(max_length, "x-max-length");
    same!(max_length_bytes, "x-max-length-bytes");
    same!(overflow, "x-overflow");
    same!(dead_letter_exchange, "x-dead-letter-exchange");
    same!(dead_letter_routing_key, "x-dead-letter-routing-key");
    same!(max_priority, "x-max-priority");
    if have.single_active_consumer != want.single_active_consumer {
        return Err(inequivalent(
            "queue",
            name,
            "x-single-active-consumer",
            &want.single_active_consumer.to_string(),
            &have.single_active_consumer.to_string(),
        ));
    }
    // RabbitMQ takes a missing x-queue-type for the current type of a
    // classic queue, but not of a quorum one.
    let kind = |t: Option<QueueType>| t.unwrap_or(QueueType::Classic);
    if kind(have.queue_type) != kind(want.queue_type) {
        return Err(inequivalent(
            "queue",
            name,
            "x-queue-type",
            &show(&want.queue_type),
            &show(&have.queue_type),
        ));
    }
    Ok(())
}

/// Refuses what RabbitMQ 3.10 refuses for a queue type.
pub(crate) fn check_queue_type(
    name: &str,
    options: &QueueOptions,
    args: &QueueArguments,
) -> Result<()> {
    match args.queue_type {
        None | Some(QueueType::Classic) => Ok(()),
        Some(QueueType::Stream) => Err(Error::NotSupported(format!(
            "queue '{name}': stream queues are not supported by the in-process broker"
        ))),
        Some(QueueType::Quorum) => {
            let refused = if !options.durable {
                Some("invalid property 'non-durable'")
            } else if options.exclusive {
                Some("invalid property 'exclusive-owner'")
            } else if options.auto_delete {
                Some("invalid property 'auto-delete'")
            } else if args.max_priority.is_some() {
                Some("invalid arg 'x-max-priority'")
            } else {
                None
            };
            match refused {
                Some(why) => Err(Error::PreconditionFailed(format!(
                    "{why} for quorum queue '{name}'"
                ))),
                None => Ok(()),
            }
        }
    }
}
