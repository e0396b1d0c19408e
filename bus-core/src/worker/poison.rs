//! What a poisoned message carries, and reading it back.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::message::Message;
use crate::value::{FieldTable, FieldValue};

/// The header holding how many times a worker has run its handler on the
/// message so far (an integer). Delayed retries carry it through the broker,
/// so the count survives a worker restart.
pub const ATTEMPTS_HEADER: &str = "x-bus-attempts";
/// The header of a poisoned message holding the last error's text.
pub const ERROR_HEADER: &str = "x-bus-error";
/// The header of a poisoned message saying why it was poisoned: `permanent`
/// (the handler said so), `undecodable` (the body is not a valid value of
/// the handler's type) or `exhausted` (transient failures used up every
/// attempt).
pub const REASON_HEADER: &str = "x-bus-reason";
/// The header of a poisoned message holding the exchange it was first
/// published to.
pub const ORIGINAL_EXCHANGE_HEADER: &str = "x-bus-original-exchange";
/// The header of a poisoned message holding the routing key it was first
/// published with.
pub const ORIGINAL_ROUTING_KEY_HEADER: &str = "x-bus-original-routing-key";
/// The header of a poisoned message holding when it was poisoned (a
/// timestamp, seconds since the Unix epoch).
pub const FAILED_AT_HEADER: &str = "x-bus-failed-at";
/// The header of a poisoned message naming the worker that poisoned it.
pub const WORKER_HEADER: &str = "x-bus-worker";
/// On a poisoned message in the fallback queue: why its configured poison
/// destination refused it (a dead-letter exchange that routed it nowhere,
/// a poison queue deleted meanwhile).
pub const POISON_REFUSED_HEADER: &str = "x-bus-poison-refused";

/// Why a message went to the poison queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PoisonReason {
    /// The handler failed permanently.
    Permanent,
    /// The body (or its content type) could not be decoded.
    Undecodable,
    /// Transient failures used up every attempt the retry policy allows.
    Exhausted,
}

impl PoisonReason {
    /// The value of [`REASON_HEADER`].
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            PoisonReason::Permanent => "permanent",
            PoisonReason::Undecodable => "undecodable",
            PoisonReason::Exhausted => "exhausted",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "permanent" => Some(PoisonReason::Permanent),
            "undecodable" => Some(PoisonReason::Undecodable),
            "exhausted" => Some(PoisonReason::Exhausted),
            _ => None,
        }
    }
}

/// One entry of a message's `x-death` header: a time the broker
/// dead-lettered it (the delay queues of delayed retries appear here).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Death {
    /// The queue it was dead-lettered from.
    pub queue: String,
    /// `rejected`, `expired`, `maxlen` or `delivery_limit`.
    pub reason: String,
    /// How many times it died this way from this queue.
    pub count: i64,
    /// The exchange it had been published to.
    pub exchange: String,
    /// The routing keys it had been published with.
    pub routing_keys: Vec<String>,
}

/// What the headers of a message say about its failures: the worker's
/// poison headers and the broker's `x-death` history. Every field is
/// `None` (or empty) when the message does not carry it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FailureReport {
    /// Why it was poisoned ([`REASON_HEADER`]).
    pub reason: Option<PoisonReason>,
    /// The last error's text ([`ERROR_HEADER`]).
    pub error: Option<String>,
    /// How many times a handler ran on it ([`ATTEMPTS_HEADER`]).
    pub attempts: Option<u32>,
    /// The exchange it was first published to.
    pub original_exchange: Option<String>,
    /// The routing key it was first published with.
    pub original_routing_key: Option<String>,
    /// When it was poisoned, seconds since the Unix epoch.
    pub failed_at: Option<u64>,
    /// The worker that poisoned it ([`WORKER_HEADER`]).
    pub worker: Option<String>,
    /// The broker's `x-death` entries, most recent first.
    pub deaths: Vec<Death>,
}

impl FailureReport {
    /// Reads the failure headers of `message`.
    #[must_use]
    pub fn of(message: &Message) -> FailureReport {
        let h = &message.properties.headers;
        let text = |name: &str| h.get(name).and_then(field_text);
        FailureReport {
            reason: text(REASON_HEADER).as_deref().and_then(PoisonReason::parse),
            error: text(ERROR_HEADER),
            attempts: attempts(h),
            original_exchange: text(ORIGINAL_EXCHANGE_HEADER),
            original_routing_key: text(ORIGINAL_ROUTING_KEY_HEADER),
            failed_at: h.get(FAILED_AT_HEADER).and_then(|v| match v {
                FieldValue::Timestamp(t) => Some(*t),
                other => other.as_i64().and_then(|t| u64::try_from(t).ok()),
            }),
            worker: text(WORKER_HEADER),
            deaths: deaths(h),
        }
    }

    /// Whether the message carries any of the worker's poison headers.
    #[must_use]
    pub fn is_poisoned(&self) -> bool {
        self.reason.is_some()
    }
}

fn field_text(v: &FieldValue) -> Option<String> {
    match v {
        FieldValue::String(s) => Some(s.clone()),
        FieldValue::Bytes(b) => Some(String::from_utf8_lossy(b).into_owned()),
        _ => None,
    }
}

/// The attempts made so far, from [`ATTEMPTS_HEADER`]; a missing, negative
/// or non-integer value counts as none.
pub(crate) fn attempts(headers: &FieldTable) -> Option<u32> {
    headers
        .get(ATTEMPTS_HEADER)
        .and_then(FieldValue::as_i64)
        .and_then(|n| u32::try_from(n).ok())
}

fn deaths(headers: &FieldTable) -> Vec<Death> {
    let Some(entries) = headers.get("x-death").and_then(FieldValue::as_array) else {
        return Vec::new();
    };
    entries
        .iter()
        .filter_map(FieldValue::as_table)
        .map(|t| Death {
            queue: t.get("queue").and_then(field_text).unwrap_or_default(),
            reason: t.get("reason").and_then(field_text).unwrap_or_default(),
            count: t.get("count").and_then(FieldValue::as_i64).unwrap_or(0),
            exchange: t.get("exchange").and_then(field_text).unwrap_or_default(),
            routing_keys: t
                .get("routing-keys")
                .and_then(FieldValue::as_array)
                .map(|keys| keys.iter().filter_map(field_text).collect())
                .unwrap_or_default(),
        })
        .collect()
}

/// What a poisoned copy records about where the message came from.
pub(crate) struct Poisoning<'a> {
    pub(crate) reason: PoisonReason,
    pub(crate) error: &'a str,
    pub(crate) attempts: u32,
    pub(crate) exchange: &'a str,
    pub(crate) routing_key: &'a str,
    pub(crate) worker: &'a str,
}

impl Poisoning<'_> {
    /// Adds the poison headers to `message` (body and properties otherwise
    /// untouched). A message poisoned after a delayed retry keeps the
    /// exchange and key it was first published with.
    pub(crate) fn mark(&self, message: &mut Message) {
        let h = &mut message.properties.headers;
        let first = |h: &FieldTable, name: &str| h.get(name).and_then(field_text);
        let exchange =
            first(h, ORIGINAL_EXCHANGE_HEADER).unwrap_or_else(|| self.exchange.to_owned());
        let key =
            first(h, ORIGINAL_ROUTING_KEY_HEADER).unwrap_or_else(|| self.routing_key.to_owned());
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        h.insert(REASON_HEADER.into(), self.reason.as_str().into());
        h.insert(ERROR_HEADER.into(), self.error.into());
        h.insert(
            ATTEMPTS_HEADER.into(),
            FieldValue::I64(i64::from(self.attempts)),
        );
        h.insert(
            ORIGINAL_EXCHANGE_HEADER.into(),
            FieldValue::String(exchange),
        );
        h.insert(ORIGINAL_ROUTING_KEY_HEADER.into(), FieldValue::String(key));
        h.insert(FAILED_AT_HEADER.into(), FieldValue::Timestamp(now));
        h.insert(WORKER_HEADER.into(), self.worker.into());
    }
}
