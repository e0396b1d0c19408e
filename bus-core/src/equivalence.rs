//! What a redeclaration must match, for the transports that keep their own
//! topology (the in-process and folder brokers): RabbitMQ's "inequivalent
//! arg" checks, in RabbitMQ's order, each failing with
//! [`Error::inequivalent_argument`], which names the entity and the
//! argument.

use crate::error::{Error, Result, Subject};
use crate::topology::{ExchangeKind, ExchangeOptions, QueueArguments, QueueOptions, QueueType};

/// What RabbitMQ compares when an existing exchange is declared again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExchangeSettings<'a> {
    /// The exchange type.
    pub kind: &'a ExchangeKind,
    /// Survives a restart.
    pub durable: bool,
    /// Deleted with its last binding.
    pub auto_delete: bool,
    /// Not published to directly.
    pub internal: bool,
    /// The `alternate-exchange` argument, the only argument RabbitMQ
    /// compares (a value that is not a string counts as none).
    pub alternate: Option<&'a str>,
}

impl<'a> ExchangeSettings<'a> {
    /// The settings a declaration asks for.
    #[must_use]
    pub fn declared(kind: &'a ExchangeKind, options: &'a ExchangeOptions) -> Self {
        ExchangeSettings {
            kind,
            durable: options.durable,
            auto_delete: options.auto_delete,
            internal: options.internal,
            alternate: options
                .arguments
                .get("alternate-exchange")
                .and_then(|v| v.as_str()),
        }
    }
}

/// Checks a redeclaration of the exchange `name`: `wanted` must match
/// `existing` in type, `durable`, `auto_delete`, `internal` and
/// `alternate-exchange`; other arguments are not compared, as in RabbitMQ.
///
/// # Errors
/// [`Error::PreconditionFailed`] naming the exchange and the first
/// setting that differs (`type`, `durable`, ...).
pub fn check_exchange(
    name: &str,
    existing: &ExchangeSettings<'_>,
    wanted: &ExchangeSettings<'_>,
) -> Result<()> {
    let subject = || Subject::exchange(name);
    if existing.kind != wanted.kind {
        return Err(Error::inequivalent_argument(
            subject(),
            "type",
            &format!("'{}'", wanted.kind),
            &format!("'{}'", existing.kind),
        ));
    }
    same_flag(subject, "durable", existing.durable, wanted.durable)?;
    same_flag(
        subject,
        "auto_delete",
        existing.auto_delete,
        wanted.auto_delete,
    )?;
    same_flag(subject, "internal", existing.internal, wanted.internal)?;
    if existing.alternate != wanted.alternate {
        return Err(Error::inequivalent_argument(
            subject(),
            "alternate-exchange",
            &show(&wanted.alternate),
            &show(&existing.alternate),
        ));
    }
    Ok(())
}

/// Checks the `durable` and `auto_delete` flags of a redeclaration of the
/// queue `name` (RabbitMQ checks the exclusive owner next, then the
/// arguments with [`check_queue_arguments`]).
///
/// # Errors
/// [`Error::PreconditionFailed`] naming the queue and the flag.
pub fn check_queue_flags(
    name: &str,
    durable: bool,
    auto_delete: bool,
    wanted: &QueueOptions,
) -> Result<()> {
    let subject = || Subject::queue(name);
    same_flag(subject, "durable", durable, wanted.durable)?;
    same_flag(subject, "auto_delete", auto_delete, wanted.auto_delete)
}

/// Compares the arguments RabbitMQ checks when the queue `name` is
/// declared again (both normalised, see [`QueueArguments::normalized`]);
/// others (unknown `x-` arguments, `x-delivery-limit` redeclared on a
/// classic queue) are ignored, as RabbitMQ ignores them; a quorum queue's
/// `x-delivery-limit` is compared. A missing `x-queue-type` matches
/// a classic queue.
///
/// # Errors
/// [`Error::PreconditionFailed`] naming the queue and the first argument
/// that differs.
pub fn check_queue_arguments(
    name: &str,
    existing: &QueueArguments,
    wanted: &QueueArguments,
) -> Result<()> {
    let differs = |arg: &str, received: String, current: String| {
        Err(Error::inequivalent_argument(
            Subject::queue(name),
            arg,
            &received,
            &current,
        ))
    };
    macro_rules! same {
        ($field:ident, $arg:literal) => {
            if existing.$field != wanted.$field {
                return differs($arg, show(&wanted.$field), show(&existing.$field));
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
    if existing.single_active_consumer != wanted.single_active_consumer {
        return differs(
            "x-single-active-consumer",
            wanted.single_active_consumer.to_string(),
            existing.single_active_consumer.to_string(),
        );
    }
    // RabbitMQ takes a missing x-queue-type for the current type of a
    // classic queue, but not of a quorum one.
    let kind = |t: Option<QueueType>| t.unwrap_or(QueueType::Classic);
    if kind(existing.queue_type) != kind(wanted.queue_type) {
        return differs(
            "x-queue-type",
            show(&wanted.queue_type),
            show(&existing.queue_type),
        );
    }
    // A quorum queue's delivery limit must match (RabbitMQ 3.10 refuses
    // another one, or none, as inequivalent); a classic queue has none.
    if existing.queue_type == Some(QueueType::Quorum) {
        same!(delivery_limit, "x-delivery-limit");
    }
    Ok(())
}

fn same_flag(subject: impl Fn() -> Subject, flag: &str, have: bool, want: bool) -> Result<()> {
    if have == want {
        return Ok(());
    }
    Err(Error::inequivalent_argument(
        subject(),
        flag,
        &format!("'{want}'"),
        &format!("'{have}'"),
    ))
}

fn show<T: std::fmt::Debug>(v: &Option<T>) -> String {
    match v {
        Some(v) => format!("{v:?}"),
        None => "none".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_first_difference_is_named_in_fields() {
        let topic = ExchangeKind::Topic;
        let durable = ExchangeOptions::durable();
        let have = ExchangeSettings::declared(&topic, &durable);
        assert!(check_exchange("x", &have, &have).is_ok());
        let direct = ExchangeKind::Direct;
        let e =
            check_exchange("x", &have, &ExchangeSettings::declared(&direct, &durable)).unwrap_err();
        assert_eq!(e.subject(), Some(&Subject::exchange("x")));
        assert_eq!(e.argument(), Some("type"));
        let with_ae = ExchangeOptions::durable().alternate_exchange("ae");
        let e =
            check_exchange("x", &have, &ExchangeSettings::declared(&topic, &with_ae)).unwrap_err();
        assert_eq!(e.argument(), Some("alternate-exchange"));
        let other_argument = ExchangeOptions::durable().argument("x-other", 1i32);
        assert!(
            check_exchange(
                "x",
                &have,
                &ExchangeSettings::declared(&topic, &other_argument)
            )
            .is_ok(),
            "arguments other than alternate-exchange are not compared"
        );

        let e = check_queue_flags("q", false, false, &QueueOptions::durable()).unwrap_err();
        assert_eq!(
            (e.subject(), e.argument()),
            (Some(&Subject::queue("q")), Some("durable"))
        );
        let ttl = |ms| QueueArguments::default().message_ttl(Duration::from_millis(ms));
        let e = check_queue_arguments("q", &ttl(100), &ttl(200)).unwrap_err();
        assert!(matches!(&e, Error::PreconditionFailed(d)
            if d.queue() == Some("q") && d.argument() == Some("x-message-ttl")));
        assert!(e
            .to_string()
            .contains("received 200ms but current is 100ms"));
        let classic = QueueArguments::default().queue_type(QueueType::Classic);
        assert!(check_queue_arguments("q", &QueueArguments::default(), &classic).is_ok());
    }

    #[test]
    fn a_quorum_queue_compares_its_delivery_limit_and_a_classic_one_does_not() {
        let quorum = |limit: Option<u32>| QueueArguments {
            queue_type: Some(QueueType::Quorum),
            delivery_limit: limit,
            ..QueueArguments::default()
        };
        assert!(check_queue_arguments("q", &quorum(Some(2)), &quorum(Some(2))).is_ok());
        for other in [Some(5), None] {
            let e = check_queue_arguments("q", &quorum(Some(2)), &quorum(other)).unwrap_err();
            assert_eq!(e.argument(), Some("x-delivery-limit"), "{other:?}: {e:?}");
        }
        let e = check_queue_arguments("q", &quorum(None), &quorum(Some(2))).unwrap_err();
        assert_eq!(e.argument(), Some("x-delivery-limit"));
        let limited = QueueArguments {
            delivery_limit: Some(2),
            ..QueueArguments::default()
        };
        assert!(
            check_queue_arguments("q", &QueueArguments::default(), &limited).is_ok(),
            "redeclaring a classic queue with a limit is accepted, as RabbitMQ 3.10 does"
        );
    }
}
