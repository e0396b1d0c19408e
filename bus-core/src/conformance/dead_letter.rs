//! Dead-lettering and what feeds it: rejection, TTL (queue and message),
//! max length with each overflow mode, a quorum queue's delivery limit; the
//! `x-death` header.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::support::{
    bind, body, cleanup, consume, exchange, expect_bodies, expect_err, not_applicable, publish,
    publish_text, queue, queue_with, recv, recv_bodies,
};
use super::Harness;
use crate::{
    Connection, ConsumeOptions, Consumer, Delivery, Error, ExchangeKind, FieldTable, FieldValue,
    Message, Overflow, PublishOptions, QueueOptions, QueueType, Requeue,
};

/// A fresh fanout dead-letter exchange with one queue bound to it, and a
/// consumer on that queue.
struct DeadLetters {
    exchange: String,
    queue: String,
    consumer: Consumer,
}

impl DeadLetters {
    async fn new(conn: &dyn Connection) -> Self {
        let exchange = exchange(conn, "dlx", ExchangeKind::Fanout).await;
        let queue = queue(conn, "dlq").await;
        bind(conn, &queue, &exchange, "").await;
        let consumer = consume(conn, &queue, ConsumeOptions::auto_ack()).await;
        DeadLetters {
            exchange,
            queue,
            consumer,
        }
    }

    /// Queue options dead-lettering to this exchange.
    fn options(&self) -> QueueOptions {
        QueueOptions::default().dead_letter_to(self.exchange.clone())
    }

    async fn recv(&mut self, what: &str) -> Delivery {
        recv(&mut self.consumer, what).await
    }

    /// Checks that nothing else was dead-lettered (a marker sent to the
    /// dead-letter queue is the next delivery) and deletes both.
    async fn finish(mut self, conn: &dyn Connection) {
        let marker = super::fresh_name("dl-marker");
        publish_text(conn, "", &self.queue, &marker).await;
        let d = self.recv("the marker behind the dead letters").await;
        assert_eq!(body(&d), marker, "an unexpected message was dead-lettered");
        self.consumer.cancel().await.expect("cancel");
        drop(self.consumer);
        cleanup(conn, &[&self.queue], &[&self.exchange]).await;
    }
}

fn applicable(h: &dyn Harness, case: &str, needs_ttl: bool, needs_max_length: bool) -> bool {
    let caps = h.capabilities();
    if not_applicable(h, caps.dead_lettering, case, "no dead-letter exchanges") {
        return false;
    }
    if needs_ttl && not_applicable(h, caps.message_ttl, case, "no message TTL") {
        return false;
    }
    if needs_max_length && not_applicable(h, caps.max_length, case, "no max length") {
        return false;
    }
    true
}

/// A connection and a [`DeadLetters`] sink for `case`, or `None` when the
/// case is not applicable (see [`applicable`]).
async fn with_dead_letters(
    h: &dyn Harness,
    case: &str,
    needs_ttl: bool,
    needs_max_length: bool,
) -> Option<(Arc<dyn Connection>, DeadLetters)> {
    if !applicable(h, case, needs_ttl, needs_max_length) {
        return None;
    }
    let conn = h.connect().await;
    let dl = DeadLetters::new(&*conn).await;
    Some((conn, dl))
}

/// The single `x-death` entry of a dead-lettered message, checked for the
/// fields every entry has and their types.
fn x_death(d: &Delivery) -> FieldTable {
    let deaths = d
        .message
        .properties
        .headers
        .get("x-death")
        .unwrap_or_else(|| panic!("a dead-lettered message has an x-death header: {d:?}"));
    let deaths = deaths
        .as_array()
        .unwrap_or_else(|| panic!("x-death is an array: {deaths:?}"));
    assert_eq!(
        deaths.len(),
        1,
        "one x-death entry per queue and reason: {deaths:?}"
    );
    let entry = deaths[0]
        .as_table()
        .unwrap_or_else(|| panic!("an x-death entry is a table: {:?}", deaths[0]))
        .clone();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    match entry.get("time") {
        Some(FieldValue::Timestamp(t)) => assert!(
            t.abs_diff(now) < 600,
            "x-death time {t} is the time of death (now is {now})"
        ),
        other => panic!("x-death time is a timestamp: {other:?}"),
    }
    entry
}

/// Takes the next message of `queue` with a consumer of its own and
/// rejects it without requeue.
async fn reject_next(conn: &dyn Connection, queue: &str) {
    let mut c = consume(conn, queue, ConsumeOptions::prefetch(1)).await;
    recv(&mut c, "the message to reject")
        .await
        .reject(Requeue::No)
        .await
        .expect("reject");
}

/// Asserts an `x-death` entry's reason, queue, exchange, routing keys and
/// count, with RabbitMQ's types.
fn expect_death(
    entry: &FieldTable,
    reason: &str,
    queue: &str,
    exchange: &str,
    keys: &[&str],
    count: i64,
) {
    let s = |v: &str| FieldValue::String(v.to_owned());
    assert_eq!(
        entry.get("reason"),
        Some(&s(reason)),
        "x-death reason: {entry:?}"
    );
    assert_eq!(
        entry.get("queue"),
        Some(&s(queue)),
        "x-death queue: {entry:?}"
    );
    assert_eq!(
        entry.get("exchange"),
        Some(&s(exchange)),
        "x-death exchange: {entry:?}"
    );
    assert_eq!(
        entry.get("routing-keys"),
        Some(&FieldValue::Array(keys.iter().map(|k| s(k)).collect())),
        "x-death routing-keys: {entry:?}"
    );
    assert_eq!(
        entry.get("count"),
        Some(&FieldValue::I64(count)),
        "x-death count: {entry:?}"
    );
}

/// A message rejected without requeue is dead-lettered with its body,
/// properties and original routing key, and an `x-death` entry: reason
/// `rejected`, the queue, the exchange it was published to, its routing
/// keys, count 1 (a 64-bit integer) and the time.
pub async fn rejected_message_is_dead_lettered_with_x_death(h: &dyn Harness) {
    let Some((conn, mut dl)) = with_dead_letters(
        h,
        "rejected_message_is_dead_lettered_with_x_death",
        false,
        false,
    )
    .await
    else {
        return;
    };
    let x = exchange(&*conn, "dl-source", ExchangeKind::Direct).await;
    let q = queue_with(&*conn, "dl-rejecting", dl.options()).await;
    bind(&*conn, &q, &x, "rk").await;
    let sent = Message::new("doomed")
        .with_header("h", "v")
        .with_content_type("text/plain")
        .with_message_id("id-1");
    publish(&*conn, &x, "rk", sent.clone()).await;
    reject_next(&*conn, &q).await;
    let d = dl.recv("the dead-lettered message").await;
    assert_eq!(body(&d), "doomed");
    assert_eq!(
        (d.exchange.as_str(), d.routing_key.as_str(), d.redelivered),
        (dl.exchange.as_str(), "rk", false),
        "dead-lettered through the DLX with the original routing key"
    );
    let p = &d.message.properties;
    assert_eq!(p.content_type, sent.properties.content_type);
    assert_eq!(p.message_id, sent.properties.message_id);
    assert_eq!(
        p.headers.get("h"),
        Some(&FieldValue::from("v")),
        "headers kept"
    );
    let entry = x_death(&d);
    expect_death(&entry, "rejected", &q, &x, &["rk"], 1);
    expect_bodies(&*conn, &q, &[]).await;
    cleanup(&*conn, &[&q], &[&x]).await;
    dl.finish(&*conn).await;
}

/// With `x-dead-letter-routing-key`, a dead-lettered message is routed with
/// that key only and loses its `CC` header; `x-death` keeps the original
/// routing keys, CC keys included. Nack without requeue dead-letters like
/// reject.
pub async fn dead_letter_routing_key_replaces_the_key(h: &dyn Harness) {
    if !applicable(h, "dead_letter_routing_key_replaces_the_key", false, false) {
        return;
    }
    let conn = h.connect().await;
    let dlx = exchange(&*conn, "dlx-direct", ExchangeKind::Direct).await;
    let dead = queue(&*conn, "dead").await;
    let other = queue(&*conn, "dead-other").await;
    bind(&*conn, &dead, &dlx, "dead").await;
    let mut options = QueueOptions::default();
    options.arguments.dead_letter_exchange = Some(dlx.clone());
    options.arguments.dead_letter_routing_key = Some("dead".into());
    let q = queue_with(&*conn, "dl-rerouting", options).await;
    bind(&*conn, &other, &dlx, &q).await;
    let cc = super::fresh_name("cc");
    publish(
        &*conn,
        "",
        &q,
        Message::new("rerouted").with_header("CC", vec![FieldValue::from(cc.as_str())]),
    )
    .await;
    let mut c = consume(&*conn, &q, ConsumeOptions::prefetch(1)).await;
    recv(&mut c, "the message to nack")
        .await
        .nack(Requeue::No)
        .await
        .expect("nack");
    let mut dc = consume(&*conn, &dead, ConsumeOptions::auto_ack()).await;
    let d = recv(&mut dc, "the dead-lettered message").await;
    assert_eq!(
        (d.exchange.as_str(), d.routing_key.as_str()),
        (dlx.as_str(), "dead")
    );
    expect_death(&x_death(&d), "rejected", &q, "", &[&q, &cc], 1);
    assert!(
        !d.message.properties.headers.contains_key("CC"),
        "CC removed: {:?}",
        d.message.properties.headers
    );
    drop((c, dc));
    expect_bodies(&*conn, &other, &[]).await;
    cleanup(&*conn, &[&q, &dead, &other], &[&dlx]).await;
}

/// A message dead-lettered again from the same queue for the same reason
/// keeps one `x-death` entry for them, whose count grows.
pub async fn x_death_counts_repeated_deaths(h: &dyn Harness) {
    if !applicable(h, "x_death_counts_repeated_deaths", false, false) {
        return;
    }
    let conn = h.connect().await;
    let lx = exchange(&*conn, "dl-loop", ExchangeKind::Fanout).await;
    let mut options = QueueOptions::default();
    options.arguments.dead_letter_exchange = Some(lx.clone());
    let q = queue_with(&*conn, "dl-loop", options).await;
    bind(&*conn, &q, &lx, "").await;
    publish_text(&*conn, "", &q, "again and again").await;
    let mut c = consume(&*conn, &q, ConsumeOptions::prefetch(1)).await;
    let d = recv(&mut c, "first life").await;
    assert!(!d.message.properties.headers.contains_key("x-death"));
    d.reject(Requeue::No).await.expect("reject");
    let d = recv(&mut c, "second life").await;
    assert_eq!(d.exchange, lx);
    assert_eq!(
        x_death(&d).get("count"),
        Some(&FieldValue::I64(1)),
        "count after one death"
    );
    d.reject(Requeue::No).await.expect("reject again");
    let d = recv(&mut c, "third life").await;
    let entry = x_death(&d);
    assert_eq!(entry.get("count"), Some(&FieldValue::I64(2)), "{entry:?}");
    assert_eq!(entry.get("reason"), Some(&FieldValue::from("rejected")));
    assert_eq!(entry.get("queue"), Some(&FieldValue::from(q.as_str())));
    d.ack().await.expect("ack");
    drop(c);
    cleanup(&*conn, &[&q], &[&lx]).await;
}

/// The first dead-lettering adds `x-first-death-reason`,
/// `x-first-death-queue` and `x-first-death-exchange` (strings), as
/// RabbitMQ does.
pub async fn first_death_headers(h: &dyn Harness) {
    let Some((conn, mut dl)) = with_dead_letters(h, "first_death_headers", false, false).await
    else {
        return;
    };
    let x = exchange(&*conn, "first-death", ExchangeKind::Fanout).await;
    let q = queue_with(&*conn, "first-death", dl.options()).await;
    bind(&*conn, &q, &x, "").await;
    publish_text(&*conn, &x, "k", "first death").await;
    reject_next(&*conn, &q).await;
    let d = dl.recv("dead-lettered").await;
    let headers = &d.message.properties.headers;
    for (name, want) in [
        ("x-first-death-reason", "rejected"),
        ("x-first-death-queue", q.as_str()),
        ("x-first-death-exchange", x.as_str()),
    ] {
        assert_eq!(
            headers.get(name),
            Some(&FieldValue::from(want)),
            "{name} in {headers:?}"
        );
    }
    cleanup(&*conn, &[&q], &[&x]).await;
    dl.finish(&*conn).await;
}

/// With `x-message-ttl`, a message not consumed in time expires: it is
/// dead-lettered with reason `expired` and never delivered from its queue.
/// The queue is bound to its own dead-letter exchange too: the copy that
/// would go back into it is dropped (RabbitMQ's cycle rule: it died there
/// before, with no rejection since), the other queues get theirs.
pub async fn queue_ttl_expires_messages(h: &dyn Harness) {
    let Some((conn, mut dl)) =
        with_dead_letters(h, "queue_ttl_expires_messages", true, false).await
    else {
        return;
    };
    let mut options = dl.options();
    options.arguments.message_ttl = Some(Duration::from_millis(100));
    let q = queue_with(&*conn, "queue-ttl", options).await;
    bind(&*conn, &q, &dl.exchange, "").await;
    publish_text(&*conn, "", &q, "short-lived").await;
    let d = dl.recv("the expired message").await;
    assert_eq!(body(&d), "short-lived");
    assert_eq!(d.routing_key, q, "dead-lettered with its original key");
    let entry = x_death(&d);
    expect_death(&entry, "expired", &q, "", &[&q], 1);
    assert!(
        !entry.contains_key("original-expiration"),
        "no per-message expiration to record: {entry:?}"
    );
    // Had the copy for the queue itself not been dropped, it would expire
    // again and reach the dead-letter queue a second time before the
    // marker `finish` sends after this wait.
    tokio::time::sleep(Duration::from_millis(400)).await;
    expect_bodies(&*conn, &q, &[]).await;
    cleanup(&*conn, &[&q], &[]).await;
    dl.finish(&*conn).await;
}

/// A message whose `expiration` property (milliseconds) passes expires: it
/// is dead-lettered with reason `expired`, without its `expiration`
/// property, which `x-death` keeps as `original-expiration`.
pub async fn message_ttl_expires_messages(h: &dyn Harness) {
    let Some((conn, mut dl)) =
        with_dead_letters(h, "message_ttl_expires_messages", true, false).await
    else {
        return;
    };
    let q = queue_with(&*conn, "message-ttl", dl.options()).await;
    let msg = Message::new("short-lived")
        .with_expiration_ms(100)
        .with_header("h", "v");
    publish(&*conn, "", &q, msg).await;
    let d = dl.recv("the expired message").await;
    assert_eq!(body(&d), "short-lived");
    assert_eq!(
        d.message.properties.expiration, None,
        "dead-lettering removes the expiration"
    );
    assert_eq!(
        d.message.properties.headers.get("h"),
        Some(&FieldValue::from("v"))
    );
    let entry = x_death(&d);
    expect_death(&entry, "expired", &q, "", &[&q], 1);
    assert_eq!(
        entry.get("original-expiration"),
        Some(&FieldValue::from("100")),
        "{entry:?}"
    );
    expect_bodies(&*conn, &q, &[]).await;
    cleanup(&*conn, &[&q], &[]).await;
    dl.finish(&*conn).await;
}

/// An expired message is never delivered, with or without a dead-letter
/// exchange, even when it expires behind a live message: after its TTL has
/// passed, a consumer sees only the live messages.
pub async fn expired_message_is_never_delivered(h: &dyn Harness) {
    if not_applicable(
        h,
        h.capabilities().message_ttl,
        "expired_message_is_never_delivered",
        "no message TTL",
    ) {
        return;
    }
    let conn = h.connect().await;
    let q = queue(&*conn, "expired-dropped").await;
    publish_text(&*conn, "", &q, "live 1").await;
    publish(
        &*conn,
        "",
        &q,
        Message::new("expiring").with_expiration_ms(50),
    )
    .await;
    publish_text(&*conn, "", &q, "live 2").await;
    let mut options = QueueOptions::default();
    options.arguments.message_ttl = Some(Duration::from_millis(50));
    let q2 = queue_with(&*conn, "expired-queue-ttl", options).await;
    publish_text(&*conn, "", &q2, "expiring too").await;
    // Time passing is the condition itself, not a hope that work is done.
    tokio::time::sleep(Duration::from_millis(200)).await;
    expect_bodies(&*conn, &q, &["live 1", "live 2"]).await;
    let mut c = consume(&*conn, &q2, ConsumeOptions::auto_ack()).await;
    publish_text(&*conn, "", &q2, "fresh").await;
    let d = recv(&mut c, "a fresh message after the expired one").await;
    assert_eq!(body(&d), "fresh", "the expired message was not delivered");
    drop(c);
    cleanup(&*conn, &[&q, &q2], &[]).await;
}

fn limited(
    max_length: Option<u64>,
    max_bytes: Option<u64>,
    overflow: Option<Overflow>,
) -> QueueOptions {
    let mut o = QueueOptions::default();
    o.arguments.max_length = max_length;
    o.arguments.max_length_bytes = max_bytes;
    o.arguments.overflow = overflow;
    o
}

/// With `x-max-length` (default overflow `drop-head`), a new message pushes
/// the oldest out.
pub async fn max_length_drops_the_oldest(h: &dyn Harness) {
    if not_applicable(
        h,
        h.capabilities().max_length,
        "max_length_drops_the_oldest",
        "no max length",
    ) {
        return;
    }
    let conn = h.connect().await;
    let q = queue_with(&*conn, "max-length", limited(Some(2), None, None)).await;
    let explicit = queue_with(
        &*conn,
        "max-length-drop-head",
        limited(Some(2), None, Some(Overflow::DropHead)),
    )
    .await;
    for queue in [&q, &explicit] {
        for m in ["a", "b", "c"] {
            publish_text(&*conn, "", queue, m).await;
        }
        expect_bodies(&*conn, queue, &["b", "c"]).await;
    }
    cleanup(&*conn, &[&q, &explicit], &[]).await;
}

/// With `x-max-length-bytes`, the oldest messages are dropped until the
/// ready bodies fit.
pub async fn max_length_bytes_drops_the_oldest(h: &dyn Harness) {
    if not_applicable(
        h,
        h.capabilities().max_length,
        "max_length_bytes_drops_the_oldest",
        "no max length",
    ) {
        return;
    }
    let conn = h.connect().await;
    let q = queue_with(&*conn, "max-bytes", limited(None, Some(10), None)).await;
    for m in ["aaaa", "bbbb", "cccc"] {
        publish_text(&*conn, "", &q, m).await;
    }
    let mut c = consume(&*conn, &q, ConsumeOptions::auto_ack()).await;
    let got = recv_bodies(&mut c, 2, "what fits in 10 bytes").await;
    assert_eq!(got, ["bbbb", "cccc"]);
    // A marker that fits, to show nothing else was left.
    publish_text(&*conn, "", &q, "end").await;
    let d = recv(&mut c, "the marker").await;
    assert_eq!(body(&d), "end");
    drop(c);
    cleanup(&*conn, &[&q], &[]).await;
}

/// On overflow with `drop-head`, the oldest message is dead-lettered with
/// reason `maxlen` when the queue has a dead-letter exchange.
pub async fn max_length_dead_letters_the_oldest(h: &dyn Harness) {
    let Some((conn, mut dl)) =
        with_dead_letters(h, "max_length_dead_letters_the_oldest", false, true).await
    else {
        return;
    };
    let mut options = dl.options();
    options.arguments.max_length = Some(1);
    let q = queue_with(&*conn, "max-length-dlx", options).await;
    publish_text(&*conn, "", &q, "old").await;
    publish_text(&*conn, "", &q, "new").await;
    let d = dl.recv("the dropped head").await;
    assert_eq!(body(&d), "old");
    expect_death(&x_death(&d), "maxlen", &q, "", &[&q], 1);
    expect_bodies(&*conn, &q, &["new"]).await;
    cleanup(&*conn, &[&q], &[]).await;
    dl.finish(&*conn).await;
}

/// With `x-overflow = reject-publish`, a publish to a full queue fails with
/// [`Error::Nacked`] and the queue keeps its messages; nothing is
/// dead-lettered. Once there is room, publishing works again.
pub async fn reject_publish_nacks_the_new_message(h: &dyn Harness) {
    if not_applicable(
        h,
        h.capabilities().max_length,
        "reject_publish_nacks_the_new_message",
        "no max length",
    ) {
        return;
    }
    let conn = h.connect().await;
    let dl = if h.capabilities().dead_lettering {
        Some(DeadLetters::new(&*conn).await)
    } else {
        None
    };
    let mut options = dl.as_ref().map(DeadLetters::options).unwrap_or_default();
    options.arguments.max_length = Some(1);
    options.arguments.overflow = Some(Overflow::RejectPublish);
    let q = queue_with(&*conn, "reject-publish", options).await;
    publish_text(&*conn, "", &q, "first").await;
    expect_err!(
        "publish to a full reject-publish queue",
        conn.publish("", &q, Message::new("refused"), PublishOptions::default())
            .await,
        Error::Nacked(_)
    );
    expect_bodies(&*conn, &q, &["first"]).await;
    publish_text(&*conn, "", &q, "room again").await;
    expect_bodies(&*conn, &q, &["room again"]).await;
    cleanup(&*conn, &[&q], &[]).await;
    if let Some(dl) = dl {
        dl.finish(&*conn).await;
    }
}

/// With `x-overflow = reject-publish-dlx`, a publish to a full queue fails
/// with [`Error::Nacked`] and the refused message is dead-lettered with
/// reason `maxlen`.
pub async fn reject_publish_dlx_nacks_and_dead_letters(h: &dyn Harness) {
    let Some((conn, mut dl)) =
        with_dead_letters(h, "reject_publish_dlx_nacks_and_dead_letters", false, true).await
    else {
        return;
    };
    let mut options = dl.options();
    options.arguments.max_length = Some(1);
    options.arguments.overflow = Some(Overflow::RejectPublishDlx);
    let q = queue_with(&*conn, "reject-publish-dlx", options).await;
    publish_text(&*conn, "", &q, "first").await;
    expect_err!(
        "publish to a full reject-publish-dlx queue",
        conn.publish("", &q, Message::new("refused"), PublishOptions::default())
            .await,
        Error::Nacked(_)
    );
    let d = dl.recv("the refused message").await;
    assert_eq!(body(&d), "refused");
    expect_death(&x_death(&d), "maxlen", &q, "", &[&q], 1);
    expect_bodies(&*conn, &q, &["first"]).await;
    cleanup(&*conn, &[&q], &[]).await;
    dl.finish(&*conn).await;
}

/// The `x-death` array of a dead-lettered message, each entry a table.
fn x_deaths(d: &Delivery) -> Vec<FieldTable> {
    let deaths = d
        .message
        .properties
        .headers
        .get("x-death")
        .unwrap_or_else(|| panic!("a dead-lettered message has an x-death header: {d:?}"));
    deaths
        .as_array()
        .unwrap_or_else(|| panic!("x-death is an array: {deaths:?}"))
        .iter()
        .map(|e| {
            e.as_table()
                .unwrap_or_else(|| panic!("an x-death entry is a table: {e:?}"))
                .clone()
        })
        .collect()
}

/// Each entry's (queue, reason, count), in order.
fn death_summary(d: &Delivery) -> Vec<(String, String, Option<FieldValue>)> {
    x_deaths(d)
        .iter()
        .map(|t| {
            let text = |f: &str| {
                t.get(f)
                    .and_then(FieldValue::as_str)
                    .unwrap_or("")
                    .to_owned()
            };
            (text("queue"), text("reason"), t.get("count").cloned())
        })
        .collect()
}

/// The `x-first-death-*` headers a dead-lettered message has.
fn first_death_headers_of(d: &Delivery) -> Vec<(String, FieldValue)> {
    d.message
        .properties
        .headers
        .iter()
        .filter(|(k, _)| k.starts_with("x-first-death-"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// A time in the past that no transport could write as the time of a
/// death now (2001-09-09).
const LONG_AGO: u64 = 1_000_000_000;

/// A publisher-made `x-death` entry for `queue` and `reason`.
fn forged_entry(queue: &str, reason: &str, count: Option<FieldValue>) -> FieldValue {
    let mut t = FieldTable::new();
    t.insert("queue".into(), queue.into());
    t.insert("reason".into(), reason.into());
    t.insert("time".into(), FieldValue::Timestamp(LONG_AGO));
    t.insert("exchange".into(), "elsewhere".into());
    t.insert(
        "routing-keys".into(),
        FieldValue::Array(vec!["before".into()]),
    );
    if let Some(count) = count {
        t.insert("count".into(), count);
    }
    FieldValue::Table(t)
}

/// Every field of a first `x-death` entry, as RabbitMQ writes it: `count`
/// (1, a 64-bit integer), `reason`, `queue`, `time` (a timestamp: the time
/// of death), `exchange` (the one the message was published to),
/// `routing-keys` (the publish key, then the `CC` keys; not the `BCC` ones)
/// and `original-expiration` (the `expiration` property, which the dead
/// letter no longer has); nothing else. The `x-first-death-*` headers are
/// set, no `x-last-death-*` ones, and the `CC` header stays.
pub async fn x_death_records_every_field(h: &dyn Harness) {
    let Some((conn, mut dl)) =
        with_dead_letters(h, "x_death_records_every_field", false, false).await
    else {
        return;
    };
    let x = exchange(&*conn, "dl-fields", ExchangeKind::Direct).await;
    let q = queue_with(&*conn, "dl-fields", dl.options()).await;
    bind(&*conn, &q, &x, "k").await;
    let (cc, bcc) = (super::fresh_name("cc"), super::fresh_name("bcc"));
    let sent = Message::new("every field")
        .with_expiration_ms(600_000)
        .with_header("CC", vec![FieldValue::from(cc.as_str())])
        .with_header("BCC", vec![FieldValue::from(bcc.as_str())]);
    publish(&*conn, &x, "k", sent).await;
    reject_next(&*conn, &q).await;
    let d = dl.recv("the dead-lettered message").await;
    assert_eq!(
        (d.exchange.as_str(), d.routing_key.as_str()),
        (dl.exchange.as_str(), "k")
    );
    let entry = x_death(&d);
    let s = |v: &str| FieldValue::from(v);
    assert_eq!(entry.get("count"), Some(&FieldValue::I64(1)), "{entry:?}");
    assert_eq!(entry.get("reason"), Some(&s("rejected")), "{entry:?}");
    assert_eq!(entry.get("queue"), Some(&s(&q)), "{entry:?}");
    assert_eq!(entry.get("exchange"), Some(&s(&x)), "{entry:?}");
    assert_eq!(
        entry.get("routing-keys"),
        Some(&FieldValue::Array(vec![s("k"), s(&cc)])),
        "the publish key and the CC keys, not BCC: {entry:?}"
    );
    assert_eq!(
        entry.get("original-expiration"),
        Some(&s("600000")),
        "{entry:?}"
    );
    let mut fields: Vec<&str> = entry.keys().map(String::as_str).collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        [
            "count",
            "exchange",
            "original-expiration",
            "queue",
            "reason",
            "routing-keys",
            "time"
        ],
        "no other fields"
    );
    let p = &d.message.properties;
    assert_eq!(p.expiration, None, "dead-lettering removes the expiration");
    assert_eq!(
        p.headers.get("CC"),
        Some(&FieldValue::Array(vec![s(&cc)])),
        "CC stays without a dead-letter routing key"
    );
    assert_eq!(
        first_death_headers_of(&d),
        [
            ("x-first-death-exchange".to_owned(), s(&x)),
            ("x-first-death-queue".to_owned(), s(&q)),
            ("x-first-death-reason".to_owned(), s("rejected")),
        ]
    );
    assert!(
        !p.headers.keys().any(|k| k.starts_with("x-last-death")),
        "RabbitMQ 3.10 writes no x-last-death headers: {:?}",
        p.headers
    );
    cleanup(&*conn, &[&q], &[&x]).await;
    dl.finish(&*conn).await;
}

/// A death in a queue for a reason the message already has an `x-death`
/// entry for keeps that entry as it is, `time` (the first death's),
/// `exchange` and `routing-keys` included, and adds one to its `count`;
/// the entry of that first death gets no `original-expiration` now, though
/// the `expiration` property is removed. `x-first-death-*` headers are
/// written only for a message without `x-death`.
pub async fn x_death_keeps_the_first_time_of_a_repeated_death(h: &dyn Harness) {
    let Some((conn, mut dl)) = with_dead_letters(
        h,
        "x_death_keeps_the_first_time_of_a_repeated_death",
        false,
        false,
    )
    .await
    else {
        return;
    };
    let q = queue_with(&*conn, "dl-again", dl.options()).await;
    let sent = Message::new("died before")
        .with_expiration_ms(600_000)
        .with_header(
            "x-death",
            FieldValue::Array(vec![forged_entry(&q, "rejected", Some(FieldValue::I64(1)))]),
        );
    publish(&*conn, "", &q, sent).await;
    reject_next(&*conn, &q).await;
    let d = dl.recv("the dead-lettered message").await;
    let deaths = x_deaths(&d);
    assert_eq!(
        deaths.len(),
        1,
        "one entry per queue and reason: {deaths:?}"
    );
    let FieldValue::Table(want) = forged_entry(&q, "rejected", Some(FieldValue::I64(2))) else {
        unreachable!("an entry is a table")
    };
    assert_eq!(deaths[0], want, "the first death's entry, counted again");
    assert_eq!(d.message.properties.expiration, None);
    assert_eq!(
        first_death_headers_of(&d),
        [],
        "x-death was there: no first death"
    );
    cleanup(&*conn, &[&q], &[]).await;
    dl.finish(&*conn).await;
}

/// A message rejected around a loop of two queues (each dead-lettering to
/// the other through the default exchange) carries one entry per queue,
/// the latest death first, each counting its queue's deaths, over two
/// cycles; `x-first-death-queue` stays the first queue.
pub async fn x_death_counts_grow_over_two_cycles(h: &dyn Harness) {
    if !applicable(h, "x_death_counts_grow_over_two_cycles", false, false) {
        return;
    }
    let conn = h.connect().await;
    let (a, b) = (super::fresh_name("dl-ping"), super::fresh_name("dl-pong"));
    // Each queue names the other, so both names are chosen up front.
    for (me, next) in [(&a, &b), (&b, &a)] {
        let mut options = QueueOptions::default();
        options.arguments.dead_letter_exchange = Some(String::new());
        options.arguments.dead_letter_routing_key = Some(next.clone());
        conn.declare_queue(me, options)
            .await
            .unwrap_or_else(|e| panic!("declare queue {me:?}: {e:?}"));
    }
    publish_text(&*conn, "", &a, "ball").await;
    let mut ca = consume(&*conn, &a, ConsumeOptions::prefetch(1)).await;
    let mut cb = consume(&*conn, &b, ConsumeOptions::prefetch(1)).await;
    let d = recv(&mut ca, "the first serve").await;
    assert!(!d.message.properties.headers.contains_key("x-death"));
    d.reject(Requeue::No).await.expect("reject in a");
    let i = |n| Some(FieldValue::I64(n));
    let st = |q: &str, n| (q.to_owned(), "rejected".to_owned(), i(n));
    // (in b?, x-death after the death)
    let expected = [
        (true, vec![st(&a, 1)]),
        (false, vec![st(&b, 1), st(&a, 1)]),
        (true, vec![st(&a, 2), st(&b, 1)]),
        (false, vec![st(&b, 2), st(&a, 2)]),
    ];
    let last = expected.len() - 1;
    for (n, (in_b, want)) in expected.into_iter().enumerate() {
        let consumer = if in_b { &mut cb } else { &mut ca };
        let d = recv(consumer, "the ball after a death").await;
        assert_eq!(death_summary(&d), want, "after death {}", n + 1);
        assert_eq!(
            d.message.properties.headers.get("x-first-death-queue"),
            Some(&FieldValue::from(a.as_str()))
        );
        if n == last {
            d.ack().await.expect("ack");
        } else {
            d.reject(Requeue::No).await.expect("reject");
        }
    }
    drop((ca, cb));
    cleanup(&*conn, &[&a, &b], &[]).await;
}

/// Rejects `sent` from a fresh queue dead-lettering to `dl` and returns
/// the dead letter; `sent` is built for the queue's name.
async fn reject_through(
    conn: &dyn Connection,
    dl: &mut DeadLetters,
    sent: impl FnOnce(&str) -> Message,
) -> (String, Delivery) {
    let q = queue_with(conn, "dl-hostile", dl.options()).await;
    publish(conn, "", &q, sent(&q)).await;
    reject_next(conn, &q).await;
    let d = dl.recv("the dead-lettered message").await;
    cleanup(conn, &[&q], &[]).await;
    (q, d)
}

/// `x-death` values a publisher made up are handled as RabbitMQ 3.10 does,
/// and never break the transport: a `count` of `i64::MAX` wraps to
/// `i64::MIN` (RabbitMQ adds one and writes 64 bits), a negative one counts
/// up, a missing one becomes 1; an `x-death` that is not an array, or an
/// empty one, is replaced by one new entry, and no `x-first-death-*`
/// headers are written (the header was there). Entries of other queues are
/// kept as they are; where there are two or more, RabbitMQ 3.10 groups them
/// by queue and reason (the first of each kept) in reverse order before the
/// new entry goes in front.
pub async fn x_death_from_a_publisher_is_handled_as_rabbitmq_does(h: &dyn Harness) {
    let Some((conn, mut dl)) = with_dead_letters(
        h,
        "x_death_from_a_publisher_is_handled_as_rabbitmq_does",
        false,
        false,
    )
    .await
    else {
        return;
    };
    for (count, want) in [
        (Some(FieldValue::I64(i64::MAX)), FieldValue::I64(i64::MIN)),
        (Some(FieldValue::I64(-5)), FieldValue::I64(-4)),
        (None, FieldValue::I64(1)),
    ] {
        let (q, d) = reject_through(&*conn, &mut dl, |q| {
            Message::new("counted").with_header(
                "x-death",
                FieldValue::Array(vec![forged_entry(q, "rejected", count.clone())]),
            )
        })
        .await;
        let deaths = x_deaths(&d);
        assert_eq!(deaths.len(), 1, "{deaths:?}");
        assert_eq!(deaths[0].get("count"), Some(&want), "count {count:?}");
        assert_eq!(deaths[0].get("queue"), Some(&FieldValue::from(q.as_str())));
        assert_eq!(
            deaths[0].get("time"),
            Some(&FieldValue::Timestamp(LONG_AGO)),
            "the entry is kept"
        );
    }
    for hostile in [
        FieldValue::from("not an array"),
        FieldValue::Table(FieldTable::new()),
        FieldValue::Array(Vec::new()),
    ] {
        let (q, d) = reject_through(&*conn, &mut dl, |_| {
            Message::new("hostile").with_header("x-death", hostile.clone())
        })
        .await;
        let entry = x_death(&d);
        expect_death(&entry, "rejected", &q, "", &[&q], 1);
        assert_eq!(
            first_death_headers_of(&d),
            [],
            "x-death {hostile:?} was there: no first death"
        );
    }
    let i = |n| Some(FieldValue::I64(n));
    let (q, d) = reject_through(&*conn, &mut dl, |_| {
        Message::new("travelled").with_header(
            "x-death",
            FieldValue::Array(vec![
                forged_entry("q1", "expired", i(1)),
                forged_entry("q3", "maxlen", i(9)),
                forged_entry("q1", "expired", i(7)),
                forged_entry("q2", "expired", i(4)),
            ]),
        )
    })
    .await;
    let st = |q: &str, r: &str, n| (q.to_owned(), r.to_owned(), i(n));
    assert_eq!(
        death_summary(&d),
        [
            st(&q, "rejected", 1),
            st("q2", "expired", 4),
            st("q3", "maxlen", 9),
            st("q1", "expired", 1),
        ]
    );
    let deaths = x_deaths(&d);
    assert_eq!(
        deaths[1].get("time"),
        Some(&FieldValue::Timestamp(LONG_AGO)),
        "{deaths:?}"
    );
    dl.finish(&*conn).await;
}

/// Whether `case` applies: the transport keeps quorum queues' delivery
/// counts and limits (and, with `dead_letters`, dead-letters).
fn delivery_limit_applies(h: &dyn Harness, case: &str, dead_letters: bool) -> bool {
    let caps = h.capabilities();
    if not_applicable(
        h,
        caps.delivery_limit,
        case,
        "no quorum queue delivery limit",
    ) {
        return false;
    }
    !dead_letters || applicable(h, case, false, false)
}

/// A durable quorum queue's options with `x-delivery-limit` = `limit`.
fn quorum_with_limit(limit: u32) -> QueueOptions {
    QueueOptions::durable()
        .queue_type(QueueType::Quorum)
        .delivery_limit(limit)
}

/// A delivery's `x-delivery-count` header.
fn delivery_count(d: &Delivery) -> Option<FieldValue> {
    d.message
        .properties
        .headers
        .get("x-delivery-count")
        .cloned()
}

/// A quorum queue counts each requeueing nack of a message: its first
/// delivery carries no `x-delivery-count`, the `n`th redelivery carries
/// `x-delivery-count` = `n` (a 64-bit integer). With `x-delivery-limit` 2
/// the message is delivered three times; the third requeueing nack
/// dead-letters it instead, with reason `delivery_limit`, as it was
/// published (no `x-delivery-count`), and the queue is left empty.
/// Redeclaring the queue with another limit is `PreconditionFailed`. A classic
/// queue refuses `x-delivery-limit` (`PreconditionFailed` naming it) and
/// counts nothing: its redeliveries carry no `x-delivery-count`.
pub async fn delivery_limit_dead_letters_a_message_requeued_past_it(h: &dyn Harness) {
    let case = "delivery_limit_dead_letters_a_message_requeued_past_it";
    if !delivery_limit_applies(h, case, true) {
        return;
    }
    let conn = h.connect().await;
    let mut dl = DeadLetters::new(&*conn).await;
    let q = queue_with(
        &*conn,
        "dl-limited",
        quorum_with_limit(2).dead_letter_to(dl.exchange.clone()),
    )
    .await;
    publish(
        &*conn,
        "",
        &q,
        Message::new("poison").persistent().with_header("h", "v"),
    )
    .await;
    let mut c = consume(&*conn, &q, ConsumeOptions::prefetch(1)).await;
    let mut seen = Vec::new();
    for i in 1..=3 {
        let d = recv(&mut c, &format!("delivery {i} of the requeued message")).await;
        assert_eq!(body(&d), "poison");
        seen.push((d.redelivered, delivery_count(&d)));
        d.nack(Requeue::Yes).await.expect("nack with requeue");
    }
    assert_eq!(
        seen,
        vec![
            (false, None),
            (true, Some(FieldValue::I64(1))),
            (true, Some(FieldValue::I64(2))),
        ],
        "(redelivered, x-delivery-count) of each delivery"
    );
    let d = dl.recv("the message past its delivery limit").await;
    assert_eq!(body(&d), "poison");
    let p = &d.message.properties;
    assert_eq!(
        p.headers.get("h"),
        Some(&FieldValue::from("v")),
        "headers kept"
    );
    assert_eq!(
        delivery_count(&d),
        None,
        "the dead letter is the message as published"
    );
    assert_eq!(
        p.headers.get("x-first-death-reason"),
        Some(&FieldValue::from("delivery_limit"))
    );
    expect_death(&x_death(&d), "delivery_limit", &q, "", &[&q], 1);
    let e = expect_err!(
        "redeclare the quorum queue with another delivery limit",
        conn.declare_queue(&q, quorum_with_limit(5).dead_letter_to(dl.exchange.clone()))
            .await,
        Error::PreconditionFailed(_)
    );
    assert_eq!(e.argument(), Some("x-delivery-limit"), "{e:?}");
    // Not requeued a fourth time: the marker behind it comes first.
    let marker = super::fresh_name("limit-marker");
    publish_text(&*conn, "", &q, &marker).await;
    let next = recv(&mut c, "the marker behind the dead-lettered message").await;
    assert_eq!(body(&next), marker, "the message came back past its limit");
    next.ack().await.expect("ack");
    c.cancel().await.expect("cancel");
    drop(c);

    let e = expect_err!(
        "declare a classic queue with a delivery limit",
        conn.declare_queue(
            &super::fresh_name("dl-classic-limit"),
            QueueOptions::durable().delivery_limit(2),
        )
        .await,
        Error::PreconditionFailed(_)
    );
    assert_eq!(e.argument(), Some("x-delivery-limit"), "{e:?}");
    let classic = queue_with(&*conn, "dl-classic", QueueOptions::durable()).await;
    publish_text(&*conn, "", &classic, "classic").await;
    let mut c = consume(&*conn, &classic, ConsumeOptions::prefetch(1)).await;
    for i in 1..=2 {
        let d = recv(&mut c, &format!("delivery {i} from a classic queue")).await;
        assert_eq!(
            (d.redelivered, delivery_count(&d)),
            (i > 1, None),
            "a classic queue counts nothing"
        );
        if i < 2 {
            d.nack(Requeue::Yes).await.expect("nack with requeue");
        } else {
            d.ack().await.expect("ack");
        }
    }
    drop(c);
    cleanup(&*conn, &[&q, &classic], &[]).await;
    dl.finish(&*conn).await;
}

/// A connection closed with a quorum queue's message unsettled (a worker
/// process that dies mid-message) returns it, and that return counts as a
/// requeueing nack does: the next delivery carries `x-delivery-count` 1,
/// replacing the one its publisher set (which the first delivery showed
/// untouched). Past its `x-delivery-limit` (1), a queue without a
/// dead-letter exchange drops the message.
pub async fn delivery_limit_counts_closed_connections_and_drops_without_a_dead_letter_exchange(
    h: &dyn Harness,
) {
    let case = "delivery_limit_counts_closed_connections_and_drops_without_a_dead_letter_exchange";
    if !delivery_limit_applies(h, case, false) {
        return;
    }
    let conn = h.connect().await;
    let q = queue_with(&*conn, "dl-limited-no-dlx", quorum_with_limit(1)).await;
    publish(
        &*conn,
        "",
        &q,
        Message::new("crash")
            .persistent()
            .with_header("x-delivery-count", FieldValue::I64(7)),
    )
    .await;
    let mut seen = Vec::new();
    for i in 1..=2 {
        let doomed = h.connect().await;
        let mut c = consume(&*doomed, &q, ConsumeOptions::prefetch(1)).await;
        let d = recv(
            &mut c,
            &format!("delivery {i} before its connection closes"),
        )
        .await;
        assert_eq!(body(&d), "crash");
        seen.push((d.redelivered, delivery_count(&d)));
        // Closing requeues what the connection held before it returns; the
        // delivery, dropped after, can no longer be settled.
        doomed.close().await.expect("close");
        drop(d);
        drop(c);
    }
    assert_eq!(
        seen,
        vec![
            (false, Some(FieldValue::I64(7))),
            (true, Some(FieldValue::I64(1))),
        ],
        "(redelivered, x-delivery-count) of each delivery"
    );
    expect_bodies(&*conn, &q, &[]).await;
    cleanup(&*conn, &[&q], &[]).await;
}

/// A delivery limit is kept or refused, never ignored: a transport with
/// [`Capabilities::delivery_limit`](crate::Capabilities::delivery_limit)
/// declares a quorum queue with one; any other refuses the declaration
/// (`NotSupported` or `PreconditionFailed`, naming `x-delivery-limit`), so
/// that a crash-loop protection that would never trigger cannot be set up.
pub async fn delivery_limit_is_never_ignored(h: &dyn Harness) {
    let conn = h.connect().await;
    let name = super::fresh_name("dl-limit-kept");
    let declared = conn.declare_queue(&name, quorum_with_limit(3)).await;
    if h.capabilities().delivery_limit {
        declared.unwrap_or_else(|e| panic!("declare a quorum queue with a limit: {e:?}"));
        cleanup(&*conn, &[&name], &[]).await;
        return;
    }
    let e = expect_err!(
        "declare a quorum queue with a delivery limit the transport does not keep",
        declared,
        Error::NotSupported(_) | Error::PreconditionFailed(_)
    );
    let text = e.to_string();
    assert!(
        text.contains("x-delivery-limit"),
        "the refusal names x-delivery-limit: {text}"
    );
}
