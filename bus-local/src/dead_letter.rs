//! Dead-lettering: the `x-death` bookkeeping RabbitMQ 3.10 writes when a
//! message leaves a queue rejected, expired or pushed out by a length limit.

use std::time::{SystemTime, UNIX_EPOCH};

use bus_core::routing::sender_routes;
use bus_core::{FieldTable, FieldValue};

use crate::queue::Envelope;

/// Why a message left its queue, as `x-death` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reason {
    /// Nacked or rejected without requeue.
    Rejected,
    /// Its TTL passed.
    Expired,
    /// A length limit pushed it out (`drop-head`) or refused it
    /// (`reject-publish-dlx`).
    MaxLen,
}

impl Reason {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Reason::Rejected => "rejected",
            Reason::Expired => "expired",
            Reason::MaxLen => "maxlen",
        }
    }
}

/// A message on its way to a dead-letter exchange.
#[derive(Debug)]
pub(crate) struct DeadLetter {
    pub(crate) envelope: Envelope,
    pub(crate) reason: Reason,
}

/// Builds the dead-lettered copy of `envelope` leaving `queue` for `dlx`, as
/// `rabbit_dead_letter:make_msg` does: `x-death` updated (newest first, the
/// count of an existing queue-and-reason entry incremented), `x-first-death-*`
/// set on the first death, the `expiration` property moved to
/// `original-expiration`, and the routing keys replaced by the dead-letter
/// routing key when the queue has one (dropping `CC`).
pub(crate) fn dead_letter(
    envelope: &Envelope,
    reason: Reason,
    queue: &str,
    dlx: &str,
    dlx_routing_key: Option<&str>,
) -> DeadLetter {
    let mut message = envelope.message.clone();
    let props = &mut message.properties;
    let first_key = envelope.routing_key.clone();
    let mut routes = vec![FieldValue::String(first_key)];
    routes.extend(sender_routes(&props.headers).map(FieldValue::from));
    let time = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut info = FieldTable::new();
    info.insert("reason".into(), reason.as_str().into());
    info.insert("queue".into(), queue.into());
    info.insert("time".into(), FieldValue::Timestamp(time));
    info.insert("exchange".into(), envelope.exchange.as_str().into());
    info.insert("routing-keys".into(), FieldValue::Array(routes));
    if let Some(expiration) = props.expiration.take() {
        info.insert("original-expiration".into(), expiration.into());
    }
    update_x_death(&mut props.headers, info, queue, reason, &envelope.exchange);
    let (routing_key, cc) = match dlx_routing_key {
        Some(key) => {
            props.headers.remove("CC");
            (key.to_owned(), Vec::new())
        }
        None => (envelope.routing_key.clone(), envelope.cc.clone()),
    };
    DeadLetter {
        envelope: Envelope {
            message,
            exchange: dlx.to_owned(),
            routing_key,
            cc,
        },
        reason,
    }
}

fn entry_is(entry: &FieldValue, field: &str, value: &str) -> bool {
    entry
        .as_table()
        .and_then(|t| t.get(field))
        .and_then(FieldValue::as_str)
        == Some(value)
}

fn update_x_death(
    headers: &mut FieldTable,
    mut info: FieldTable,
    queue: &str,
    reason: Reason,
    exchange: &str,
) {
    let deaths = match headers.get_mut("x-death") {
        Some(FieldValue::Array(deaths)) if !deaths.is_empty() => deaths,
        _ => {
            info.insert("count".into(), FieldValue::I64(1));
            headers.insert(
                "x-death".into(),
                FieldValue::Array(vec![FieldValue::Table(info)]),
            );
            headers.insert("x-first-death-reason".into(), reason.as_str().into());
            headers.insert("x-first-death-queue".into(), queue.into());
            headers.insert("x-first-death-exchange".into(), exchange.into());
            return;
        }
    };
    let same = deaths
        .iter()
        .position(|d| entry_is(d, "queue", queue) && entry_is(d, "reason", reason.as_str()));
    let entry = match same {
        // RabbitMQ keeps the earlier entry (its time, exchange and keys) and
        // only bumps its count, moving it to the front.
        Some(i) => match deaths.remove(i) {
            FieldValue::Table(mut t) => {
                let count = t.get("count").and_then(FieldValue::as_i64).unwrap_or(0);
                t.insert("count".into(), FieldValue::I64(count.saturating_add(1)));
                t
            }
            _ => unreachable!("entry_is matched a table"),
        },
        None => {
            info.insert("count".into(), FieldValue::I64(1));
            info
        }
    };
    deaths.insert(0, FieldValue::Table(entry));
}

/// Whether dead-lettering into `queue` closes a cycle that RabbitMQ drops: the
/// message died in `queue` before and no death since (including that one) was
/// a rejection. `deaths` is the message's updated `x-death`, newest first.
pub(crate) fn is_cycle(queue: &str, headers: &FieldTable) -> bool {
    let Some(deaths) = headers.get("x-death").and_then(FieldValue::as_array) else {
        return false;
    };
    match deaths.iter().position(|d| entry_is(d, "queue", queue)) {
        None => false,
        Some(i) => deaths[..=i]
            .iter()
            .all(|d| d.as_table().is_some() && !entry_is(d, "reason", "rejected")),
    }
}

#[cfg(test)]
mod tests {
    use bus_core::Message;

    use super::*;

    fn envelope(message: Message) -> Envelope {
        Envelope {
            message,
            exchange: "in".into(),
            routing_key: "k1".into(),
            cc: vec!["k2".into()],
        }
    }

    #[test]
    fn first_death_writes_the_full_entry() {
        let env = envelope(
            Message::new("x")
                .with_expiration_ms(60000)
                .with_header("CC", vec![FieldValue::from("k2")]),
        );
        let dl = dead_letter(&env, Reason::Rejected, "src", "dlx", None);
        let h = &dl.envelope.message.properties.headers;
        let deaths = h["x-death"].as_array().unwrap();
        assert_eq!(deaths.len(), 1);
        let d = deaths[0].as_table().unwrap();
        assert_eq!(d["count"], FieldValue::I64(1));
        assert_eq!(d["reason"], FieldValue::from("rejected"));
        assert_eq!(d["queue"], FieldValue::from("src"));
        assert_eq!(d["exchange"], FieldValue::from("in"));
        assert!(matches!(d["time"], FieldValue::Timestamp(_)));
        assert_eq!(
            d["routing-keys"],
            FieldValue::Array(vec!["k1".into(), "k2".into()])
        );
        assert_eq!(d["original-expiration"], FieldValue::from("60000"));
        assert_eq!(h["x-first-death-reason"], FieldValue::from("rejected"));
        assert_eq!(h["x-first-death-queue"], FieldValue::from("src"));
        assert_eq!(h["x-first-death-exchange"], FieldValue::from("in"));
        assert_eq!(dl.envelope.message.properties.expiration, None);
        assert_eq!(dl.envelope.exchange, "dlx");
        assert_eq!(
            dl.envelope.routing_keys().collect::<Vec<_>>(),
            vec!["k1", "k2"]
        );
    }

    #[test]
    fn repeated_deaths_count_up_and_move_to_the_front() {
        let mut env = envelope(Message::new("x"));
        for (q, n) in [("a", 1), ("b", 1), ("a", 2)] {
            let dl = dead_letter(&env, Reason::Expired, q, "", Some("next"));
            env = dl.envelope;
            let deaths = env.message.properties.headers["x-death"]
                .as_array()
                .unwrap()
                .to_vec();
            let front = deaths[0].as_table().unwrap();
            assert_eq!(front["queue"], FieldValue::from(q));
            assert_eq!(front["count"], FieldValue::I64(n));
        }
        assert_eq!(env.routing_keys().collect::<Vec<_>>(), vec!["next"]);
        let h = &env.message.properties.headers;
        assert_eq!(h["x-death"].as_array().unwrap().len(), 2);
        assert_eq!(h["x-first-death-queue"], FieldValue::from("a"));
        assert!(is_cycle("a", h));
        assert!(is_cycle("b", h));
        assert!(!is_cycle("c", h));
    }

    #[test]
    fn a_rejection_in_the_loop_is_not_a_cycle() {
        let env = envelope(Message::new("x"));
        let dl = dead_letter(&env, Reason::Rejected, "a", "", None);
        assert!(!is_cycle("a", &dl.envelope.message.properties.headers));
    }
}
