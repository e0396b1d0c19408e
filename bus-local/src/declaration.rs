//! What a declaration must satisfy before it changes anything: a
//! redeclaration matches what exists (RabbitMQ's "inequivalent arg"
//! checks, in RabbitMQ's order), and a queue type allows the options.

use bus_core::equivalence;
use bus_core::routing::Exchange;
use bus_core::{Error, ErrorDetail, QueueArguments, QueueOptions, QueueType, Result, Subject};

use crate::queue::Queue;

/// The queue's arguments, normalised, or the first one that is refused,
/// naming the queue.
pub(crate) fn queue_arguments(name: &str, options: &QueueOptions) -> Result<QueueArguments> {
    options.arguments.normalized().map_err(|e| match e {
        Error::PreconditionFailed(why) => {
            let mut detail =
                ErrorDetail::about(Subject::queue(name), format!("queue '{name}': {why}"));
            if let Some(argument) = why.argument() {
                detail = detail.with_argument(argument);
            }
            Error::PreconditionFailed(detail)
        }
        other => other,
    })
}

/// Checks a redeclaration of an existing exchange against the exchange the
/// declaration describes.
pub(crate) fn check_exchange_redeclare<Q: Clone + PartialEq>(
    name: &str,
    existing: &Exchange<Q>,
    declared: &Exchange<Q>,
) -> Result<()> {
    equivalence::check_exchange(name, &existing.settings(), &declared.settings())
}

/// Checks the durable and auto-delete flags of a queue redeclaration (the
/// exclusive flag is the owner check, which comes next in RabbitMQ).
pub(crate) fn check_queue_flags(queue: &Queue, options: &QueueOptions) -> Result<()> {
    equivalence::check_queue_flags(&queue.name, queue.durable, queue.auto_delete, options)
}

/// Refuses what RabbitMQ 3.10 refuses for a queue type (a classic queue's
/// `x-delivery-limit` among them).
pub(crate) fn check_queue_type(
    name: &str,
    options: &QueueOptions,
    args: &QueueArguments,
) -> Result<()> {
    match args.queue_type {
        None | Some(QueueType::Classic) if args.delivery_limit.is_some() => {
            Err(Error::PreconditionFailed(
                ErrorDetail::about(
                    Subject::queue(name),
                    format!(
                        "invalid arg 'x-delivery-limit' for queue '{name}' of queue type \
                         classic: only quorum queues have a delivery limit"
                    ),
                )
                .with_argument("x-delivery-limit"),
            ))
        }
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
                Some(why) => Err(Error::PreconditionFailed(
                    format!("{why} for quorum queue '{name}'").into(),
                )),
                None => Ok(()),
            }
        }
    }
}
