//! Dead-lettering as RabbitMQ 3.10 writes it (`rabbit_dead_letter:make_msg`):
//! the message a queue sends to its dead-letter exchange when it rejects,
//! expires or pushes out a message, or a quorum queue's message passes its
//! delivery limit, and the cycle rule that drops it.
//!
//! What the dead-lettered message carries (pinned by the conformance suite
//! against RabbitMQ 3.10.8, see `docs/SEMANTICS.md`):
//! - `x-death`, an array of tables, one per (queue, reason), the current
//!   death first. A new entry has `count` 1 (a 64-bit integer), `reason`,
//!   `queue`, `time` (a timestamp, seconds), `exchange` (where the message was
//!   published to), `routing-keys` (its publish routing key, then the string
//!   values of its `CC` header; never `BCC`, which no queue sees) and, when
//!   the message had an `expiration`, `original-expiration`.
//! - A death in a queue for a reason that already has an entry keeps that
//!   entry as it is (its `time`, `exchange`, `routing-keys`: those of the
//!   first such death) and adds one to its `count`.
//! - Where the message has two or more entries, RabbitMQ 3.10 first groups
//!   them by (queue, reason), keeping the first entry of each, in reverse
//!   order; the current death then goes in front of the rest.
//! - `x-first-death-reason`, `x-first-death-queue` and
//!   `x-first-death-exchange`, set when the message had no `x-death` header
//!   at all (and then overwriting any a publisher put there). RabbitMQ 3.10
//!   writes no `x-last-death-*` headers.
//! - No `expiration` property. With `x-dead-letter-routing-key`, that key is
//!   the only routing key and the `CC` header is removed; without it, the
//!   message is routed with the keys it had.
//!
//! Hostile `x-death` values from a publisher never panic:
//! - a value that is not an array is replaced by one new entry (and no
//!   `x-first-death-*` headers are written, as RabbitMQ does);
//! - an integer `count` of any width becomes the next 64-bit integer,
//!   wrapping at the end of the range as RabbitMQ's encoding does
//!   (`i64::MAX` becomes `i64::MIN`); a missing `count` becomes 1; a void one
//!   stays void;
//! - where RabbitMQ 3.10 fails (an array element that is not a table, a
//!   `count` that is neither an integer nor void: its queue process crashes
//!   and the queue loses its messages, or the connection that receives the
//!   message is closed), this module drops the elements that are not tables
//!   and starts such a `count` again at 1.

use std::collections::HashSet;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::{FieldTable, FieldValue, Message, QueueArguments};

/// Why a message left its queue, as `x-death` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Reason {
    /// Nacked or rejected without requeue (`rejected`).
    Rejected,
    /// Its TTL passed (`expired`).
    Expired,
    /// A length limit pushed it out (`drop-head`) or refused it
    /// (`reject-publish-dlx`) (`maxlen`).
    MaxLen,
    /// A quorum queue's message was returned more times than its
    /// `x-delivery-limit` (`delivery_limit`; see
    /// [`delivery_limit`](super::delivery_limit)).
    DeliveryLimit,
}

impl Reason {
    /// The `reason` value of its `x-death` entry.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Rejected => "rejected",
            Reason::Expired => "expired",
            Reason::MaxLen => "maxlen",
            Reason::DeliveryLimit => "delivery_limit",
        }
    }
}

/// One death of a message: why and where it left a queue, and how it had
/// been routed there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Death<'a> {
    /// Why it left.
    pub reason: Reason,
    /// The queue it left.
    pub queue: &'a str,
    /// The exchange it was published (or last dead-lettered) to.
    pub exchange: &'a str,
    /// Its publish routing key (the first of its routing keys).
    pub routing_key: &'a str,
    /// When, in seconds since the Unix epoch.
    pub time: u64,
}

impl<'a> Death<'a> {
    /// A death now, by the system clock (`x-death` times are wall-clock
    /// times, whatever clock the transport runs its timers on).
    #[must_use]
    pub fn new(reason: Reason, queue: &'a str, exchange: &'a str, routing_key: &'a str) -> Self {
        let time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Death {
            reason,
            queue,
            exchange,
            routing_key,
            time,
        }
    }

    /// The same death at `time` (seconds since the Unix epoch).
    #[must_use]
    pub fn at(self, time: u64) -> Self {
        Death { time, ..self }
    }
}

/// A dead-lettered message on its way to its queue's dead-letter exchange.
#[derive(Clone, Debug, PartialEq)]
pub struct DeadLetter {
    /// The message as dead-lettered (see the [module](self) documentation).
    pub message: Message,
    /// The dead-letter exchange to publish it to.
    pub exchange: String,
    /// `Some`: the queue's `x-dead-letter-routing-key`, the only key the
    /// message is routed with. `None`: it is routed with the routing keys it
    /// had (its publish key and the `CC`/`BCC` keys it was published with).
    pub routing_key: Option<String>,
    /// Why it died.
    pub reason: Reason,
}

impl DeadLetter {
    /// Whether routing this dead letter into `queue` closes a cycle that
    /// RabbitMQ drops: the message died in `queue` before, and neither this
    /// death nor any since that one was a rejection. The transport leaves
    /// such a queue out of the dead letter's targets.
    #[must_use]
    pub fn cycles_into(&self, queue: &str) -> bool {
        cycles_into(self.reason, queue, &self.message.properties.headers)
    }
}

/// [`DeadLetter::cycles_into`] for a transport that keeps the dead-lettered
/// message's `headers` and the `reason` it died for in its own form.
#[must_use]
pub fn cycles_into(reason: Reason, queue: &str, headers: &FieldTable) -> bool {
    reason != Reason::Rejected && is_cycle(queue, headers)
}

/// The dead-lettering of `message` as it leaves the queue declared with
/// `args`: `None` when the queue has no dead-letter exchange (the message is
/// dropped).
#[must_use]
pub fn dead_letter(
    message: &Message,
    death: &Death<'_>,
    args: &QueueArguments,
) -> Option<DeadLetter> {
    let exchange = args.dead_letter_exchange.as_ref()?;
    let routing_key = args.dead_letter_routing_key.clone();
    Some(DeadLetter {
        message: dead_lettered(message.clone(), death, routing_key.as_deref()),
        exchange: exchange.clone(),
        routing_key,
        reason: death.reason,
    })
}

/// `message` as `rabbit_dead_letter:make_msg` rewrites it for `death`, with
/// the queue's `x-dead-letter-routing-key` if it has one (see the
/// [module](self) documentation).
#[must_use]
pub fn dead_lettered(
    mut message: Message,
    death: &Death<'_>,
    dead_letter_routing_key: Option<&str>,
) -> Message {
    let props = &mut message.properties;
    let mut keys = vec![FieldValue::from(death.routing_key)];
    keys.extend(cc_keys(&props.headers).map(FieldValue::from));
    let mut info = FieldTable::new();
    info.insert("reason".into(), death.reason.as_str().into());
    info.insert("queue".into(), death.queue.into());
    info.insert("time".into(), FieldValue::Timestamp(death.time));
    info.insert("exchange".into(), death.exchange.into());
    info.insert("routing-keys".into(), FieldValue::Array(keys));
    if let Some(expiration) = props.expiration.take() {
        info.insert("original-expiration".into(), expiration.into());
    }
    update_x_death(&mut props.headers, death, info);
    if dead_letter_routing_key.is_some() {
        props.headers.remove("CC");
    }
    message
}

/// The string values of the `CC` header (others are ignored, as RabbitMQ
/// ignores them).
fn cc_keys(headers: &FieldTable) -> impl Iterator<Item = &str> {
    headers
        .get("CC")
        .and_then(FieldValue::as_array)
        .into_iter()
        .flatten()
        .filter_map(FieldValue::as_str)
}

fn with_count_one(mut info: FieldTable) -> FieldValue {
    info.insert("count".into(), FieldValue::I64(1));
    FieldValue::Table(info)
}

fn update_x_death(headers: &mut FieldTable, death: &Death<'_>, info: FieldTable) {
    let entries = match headers.remove("x-death") {
        None => {
            for (name, value) in [
                ("x-first-death-reason", death.reason.as_str()),
                ("x-first-death-queue", death.queue),
                ("x-first-death-exchange", death.exchange),
            ] {
                headers.insert(name.into(), value.into());
            }
            headers.insert(
                "x-death".into(),
                FieldValue::Array(vec![with_count_one(info)]),
            );
            return;
        }
        Some(FieldValue::Array(entries)) => entries,
        Some(_) => {
            headers.insert(
                "x-death".into(),
                FieldValue::Array(vec![with_count_one(info)]),
            );
            return;
        }
    };
    let tables: Vec<FieldTable> = entries
        .into_iter()
        .filter_map(|e| match e {
            FieldValue::Table(t) => Some(t),
            _ => None,
        })
        .collect();
    let tables = if tables.len() > 1 {
        group_by_queue_and_reason(tables)
    } else {
        tables
    };
    let mut matched = None;
    let mut rest = Vec::with_capacity(tables.len() + 1);
    rest.push(FieldValue::Void);
    for t in tables {
        if matched.is_none() && is_entry_for(&t, death.queue, death.reason) {
            matched = Some(t);
        } else {
            rest.push(FieldValue::Table(t));
        }
    }
    rest[0] = match matched {
        Some(mut t) => {
            increment_count(&mut t);
            FieldValue::Table(t)
        }
        None => with_count_one(info),
    };
    headers.insert("x-death".into(), FieldValue::Array(rest));
}

/// What groups entries: the values of their `queue` and `reason` fields.
#[derive(PartialEq, Eq, Hash)]
enum Part<'a> {
    Missing,
    Str(&'a str),
    Other(String),
}

impl<'a> Part<'a> {
    fn of(t: &'a FieldTable, field: &str) -> Self {
        match t.get(field) {
            None => Part::Missing,
            Some(FieldValue::String(s)) => Part::Str(s),
            Some(other) => Part::Other(format!("{other:?}")),
        }
    }
}

/// RabbitMQ 3.10's `group_by_queue_and_reason`: one entry per (queue,
/// reason), the first of each kept as it is, in reverse order.
fn group_by_queue_and_reason(tables: Vec<FieldTable>) -> Vec<FieldTable> {
    let keep: Vec<bool> = {
        let mut seen = HashSet::with_capacity(tables.len());
        tables
            .iter()
            .map(|t| seen.insert((Part::of(t, "queue"), Part::of(t, "reason"))))
            .collect()
    };
    let mut out: Vec<FieldTable> = tables
        .into_iter()
        .zip(keep)
        .filter_map(|(t, keep)| keep.then_some(t))
        .collect();
    out.reverse();
    out
}

fn is_entry_for(t: &FieldTable, queue: &str, reason: Reason) -> bool {
    t.get("queue").and_then(FieldValue::as_str) == Some(queue)
        && t.get("reason").and_then(FieldValue::as_str) == Some(reason.as_str())
}

fn increment_count(t: &mut FieldTable) {
    let next = match t.get("count") {
        None => 1,
        Some(FieldValue::Void) => return,
        // RabbitMQ adds one without bound and writes the result as a 64-bit
        // integer: the bits wrap.
        Some(FieldValue::Timestamp(n)) => i64::from_ne_bytes(n.to_ne_bytes()).wrapping_add(1),
        Some(v) => v.as_i64().map_or(1, |n| n.wrapping_add(1)),
    };
    t.insert("count".into(), FieldValue::I64(next));
}

/// Whether dead-lettering into `queue` closes a cycle that RabbitMQ drops:
/// the message's `x-death` (as updated for the current death, newest first)
/// names `queue`, and no entry up to and including that one is a rejection
/// or something other than a table. See [`DeadLetter::cycles_into`], which
/// also exempts a current death that is a rejection.
#[must_use]
pub fn is_cycle(queue: &str, headers: &FieldTable) -> bool {
    let Some(deaths) = headers.get("x-death").and_then(FieldValue::as_array) else {
        return false;
    };
    let names_queue = |d: &FieldValue| {
        d.as_table()
            .and_then(|t| t.get("queue"))
            .and_then(FieldValue::as_str)
            == Some(queue)
    };
    match deaths.iter().position(names_queue) {
        None => false,
        Some(i) => deaths[..=i].iter().all(|d| {
            d.as_table().is_some_and(|t| {
                t.get("reason").and_then(FieldValue::as_str) != Some(Reason::Rejected.as_str())
            })
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> FieldValue {
        FieldValue::from(v)
    }

    fn entry(queue: &str, reason: &str, count: Option<FieldValue>) -> FieldValue {
        let mut t = FieldTable::new();
        t.insert("queue".into(), s(queue));
        t.insert("reason".into(), s(reason));
        t.insert("time".into(), FieldValue::Timestamp(1000));
        if let Some(c) = count {
            t.insert("count".into(), c);
        }
        FieldValue::Table(t)
    }

    fn with_deaths(deaths: FieldValue) -> Message {
        Message::new("x").with_header("x-death", deaths)
    }

    fn die(m: Message, queue: &str, reason: Reason) -> Message {
        dead_lettered(m, &Death::new(reason, queue, "in", "k").at(2000), None)
    }

    fn deaths(m: &Message) -> Vec<FieldTable> {
        m.properties.headers["x-death"]
            .as_array()
            .expect("x-death is an array")
            .iter()
            .map(|d| d.as_table().expect("entries are tables").clone())
            .collect()
    }

    fn summary(m: &Message) -> Vec<(String, String, Option<FieldValue>)> {
        deaths(m)
            .iter()
            .map(|t| {
                (
                    t["queue"].as_str().unwrap().to_owned(),
                    t["reason"].as_str().unwrap().to_owned(),
                    t.get("count").cloned(),
                )
            })
            .collect()
    }

    #[test]
    fn a_first_death_writes_every_field() {
        let m = Message::new("x")
            .with_expiration_ms(60000)
            .with_header("CC", vec![s("c1"), FieldValue::I32(3), s("c2")])
            .with_header("x-first-death-queue", "forged");
        let death = Death::new(Reason::Rejected, "src", "in", "k1").at(1234);
        let m = dead_lettered(m, &death, None);
        let h = &m.properties.headers;
        let d = &deaths(&m)[0];
        assert_eq!(deaths(&m).len(), 1);
        assert_eq!(d["count"], FieldValue::I64(1));
        assert_eq!(d["reason"], s("rejected"));
        assert_eq!(d["queue"], s("src"));
        assert_eq!(d["exchange"], s("in"));
        assert_eq!(d["time"], FieldValue::Timestamp(1234));
        assert_eq!(
            d["routing-keys"],
            FieldValue::Array(vec![s("k1"), s("c1"), s("c2")])
        );
        assert_eq!(d["original-expiration"], s("60000"));
        assert_eq!(d.len(), 7, "no other fields: {d:?}");
        assert_eq!(m.properties.expiration, None);
        assert_eq!(h["x-first-death-reason"], s("rejected"));
        assert_eq!(
            h["x-first-death-queue"],
            s("src"),
            "a forged one is overwritten"
        );
        assert_eq!(h["x-first-death-exchange"], s("in"));
        assert!(
            h.contains_key("CC"),
            "CC stays without a dead-letter routing key"
        );
        assert!(!h.keys().any(|k| k.starts_with("x-last-death")));
    }

    #[test]
    fn a_dead_letter_routing_key_drops_cc_but_x_death_names_it() {
        let m = Message::new("x").with_header("CC", vec![s("c1")]);
        let m = dead_lettered(m, &Death::new(Reason::Expired, "q", "", "q"), Some("dead"));
        assert!(!m.properties.headers.contains_key("CC"));
        assert_eq!(
            deaths(&m)[0]["routing-keys"],
            FieldValue::Array(vec![s("q"), s("c1")])
        );
    }

    #[test]
    fn a_repeated_death_keeps_the_first_entry_and_counts() {
        let m = Message::new("x").with_expiration_ms(500);
        let m = dead_lettered(
            m,
            &Death::new(Reason::Rejected, "q", "first-x", "k1").at(100),
            None,
        );
        let m = dead_lettered(
            m,
            &Death::new(Reason::Rejected, "q", "loop-x", "k2").at(900),
            None,
        );
        let d = deaths(&m);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0]["count"], FieldValue::I64(2));
        assert_eq!(
            d[0]["time"],
            FieldValue::Timestamp(100),
            "the first death's time"
        );
        assert_eq!(d[0]["exchange"], s("first-x"));
        assert_eq!(d[0]["routing-keys"], FieldValue::Array(vec![s("k1")]));
        assert_eq!(d[0]["original-expiration"], s("500"));
        assert_eq!(m.properties.headers["x-first-death-exchange"], s("first-x"));
    }

    #[test]
    fn deaths_in_two_queues_alternate_at_the_front() {
        let mut m = Message::new("x");
        let mut want = Vec::new();
        for (q, a, b) in [("a", 1, 0), ("b", 1, 1), ("a", 2, 1), ("b", 2, 2)] {
            m = die(m, q, Reason::Rejected);
            let other = if q == "a" { "b" } else { "a" };
            let (mine, theirs) = if q == "a" { (a, b) } else { (b, a) };
            want.clear();
            want.push((
                q.to_owned(),
                "rejected".to_owned(),
                Some(FieldValue::I64(mine)),
            ));
            if theirs > 0 {
                want.push((
                    other.to_owned(),
                    "rejected".to_owned(),
                    Some(FieldValue::I64(theirs)),
                ));
            }
            assert_eq!(summary(&m), want);
        }
    }

    #[test]
    fn two_or_more_entries_are_grouped_and_reversed_as_rabbitmq_3_10_does() {
        let i = |n| Some(FieldValue::I64(n));
        let m = with_deaths(FieldValue::Array(vec![
            entry("a", "expired", i(5)),
            entry("b", "expired", i(3)),
            entry("a", "expired", i(7)),
            entry("src", "rejected", i(4)),
        ]));
        let m = die(m, "src", Reason::Rejected);
        let st = |q: &str, r: &str, c| (q.to_owned(), r.to_owned(), i(c));
        assert_eq!(
            summary(&m),
            vec![
                st("src", "rejected", 5),
                st("b", "expired", 3),
                st("a", "expired", 5)
            ]
        );
        assert!(!m.properties.headers.contains_key("x-first-death-queue"));
        let m = with_deaths(FieldValue::Array(vec![
            entry("q1", "expired", i(1)),
            entry("q3", "expired", i(9)),
            entry("q2", "expired", i(4)),
        ]));
        let m = die(m, "src", Reason::Rejected);
        assert_eq!(
            summary(&m),
            vec![
                st("src", "rejected", 1),
                st("q2", "expired", 4),
                st("q3", "expired", 9),
                st("q1", "expired", 1)
            ]
        );
    }

    #[test]
    fn hostile_counts_never_panic() {
        for (count, want) in [
            (
                Some(FieldValue::I64(i64::MAX)),
                Some(FieldValue::I64(i64::MIN)),
            ),
            (Some(FieldValue::I64(-5)), Some(FieldValue::I64(-4))),
            (Some(FieldValue::I64(0)), Some(FieldValue::I64(1))),
            (
                Some(FieldValue::I32(i32::MAX)),
                Some(FieldValue::I64(1 << 31)),
            ),
            (Some(FieldValue::U8(200)), Some(FieldValue::I64(201))),
            (
                Some(FieldValue::Timestamp(u64::MAX)),
                Some(FieldValue::I64(0)),
            ),
            (None, Some(FieldValue::I64(1))),
            (Some(FieldValue::Void), Some(FieldValue::Void)),
            (Some(s("7")), Some(FieldValue::I64(1))),
            (Some(FieldValue::F64(1.5)), Some(FieldValue::I64(1))),
            (Some(FieldValue::Bool(true)), Some(FieldValue::I64(1))),
        ] {
            let m = with_deaths(FieldValue::Array(vec![entry(
                "src",
                "rejected",
                count.clone(),
            )]));
            let m = die(m, "src", Reason::Rejected);
            let d = deaths(&m);
            assert_eq!(d.len(), 1, "{count:?}");
            assert_eq!(d[0].get("count"), want.as_ref(), "{count:?}");
            assert_eq!(d[0]["time"], FieldValue::Timestamp(1000), "{count:?}");
        }
    }

    #[test]
    fn hostile_x_death_values_never_panic() {
        for hostile in [
            s("garbage"),
            FieldValue::Table(FieldTable::new()),
            FieldValue::Array(vec![]),
            FieldValue::Array(vec![s("x")]),
            FieldValue::Array(vec![s("x"), FieldValue::I64(3)]),
        ] {
            let m = die(with_deaths(hostile.clone()), "src", Reason::Expired);
            let d = deaths(&m);
            assert_eq!(d.len(), 1, "{hostile:?}");
            assert_eq!(d[0]["count"], FieldValue::I64(1));
            assert_eq!(d[0]["time"], FieldValue::Timestamp(2000));
            assert!(
                !m.properties.headers.contains_key("x-first-death-reason"),
                "x-death was there: no first death ({hostile:?})"
            );
        }
        let m = with_deaths(FieldValue::Array(vec![
            s("junk"),
            entry("a", "expired", Some(FieldValue::I64(2))),
        ]));
        let m = die(m, "a", Reason::Expired);
        assert_eq!(
            summary(&m),
            vec![("a".into(), "expired".into(), Some(FieldValue::I64(3)))]
        );
    }

    #[test]
    fn dead_letter_follows_the_queue_arguments() {
        let m = Message::new("x");
        let death = Death::new(Reason::MaxLen, "q", "", "q");
        assert_eq!(dead_letter(&m, &death, &QueueArguments::default()), None);
        let args = QueueArguments {
            dead_letter_exchange: Some("dlx".into()),
            dead_letter_routing_key: Some("dead".into()),
            ..QueueArguments::default()
        };
        let dl = dead_letter(&m, &death, &args).expect("dead-lettered");
        assert_eq!(
            (dl.exchange.as_str(), dl.routing_key.as_deref(), dl.reason),
            ("dlx", Some("dead"), Reason::MaxLen)
        );
        assert_eq!(deaths(&dl.message)[0]["reason"], s("maxlen"));
    }

    #[test]
    fn cycles_without_a_rejection_are_dropped() {
        let args = QueueArguments {
            dead_letter_exchange: Some(String::new()),
            ..QueueArguments::default()
        };
        let mut m = Message::new("x");
        for q in ["a", "b"] {
            let dl = dead_letter(&m, &Death::new(Reason::Expired, q, "", q), &args).unwrap();
            m = dl.message;
        }
        let dl = dead_letter(&m, &Death::new(Reason::Expired, "a", "", "a"), &args).unwrap();
        assert!(dl.cycles_into("a"));
        assert!(dl.cycles_into("b"));
        assert!(!dl.cycles_into("c"));
        let rejected = dead_letter(&m, &Death::new(Reason::Rejected, "c", "", "c"), &args).unwrap();
        assert!(
            !rejected.cycles_into("a"),
            "a rejection now breaks the cycle"
        );
        let once = dead_letter(
            &Message::new("y"),
            &Death::new(Reason::Rejected, "a", "", "a"),
            &args,
        )
        .unwrap();
        let again = dead_letter(
            &once.message,
            &Death::new(Reason::Expired, "b", "", "b"),
            &args,
        )
        .unwrap();
        assert!(!again.cycles_into("a"), "a rejection in the loop");
        assert!(!is_cycle("a", &FieldTable::new()));
    }
}
