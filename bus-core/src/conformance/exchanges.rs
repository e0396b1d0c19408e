//! Routing beyond one exchange: sender-selected distribution (`CC` and
//! `BCC`), alternate exchanges with their chains and loops, and
//! exchange-to-exchange bindings with their loops, unbinding and deletion.

use std::time::Duration;

use super::support::{
    bind, cleanup, consume, exchange, expect_bodies, expect_err, not_applicable, publish,
    publish_text, queue, queue_with, recv, until_exchange_gone, until_queue_gone,
};
use super::{fresh_name, Harness};
use crate::{
    Connection, ConnectionExt, ConsumeOptions, DeleteExchangeOptions, Error, ExchangeKind,
    ExchangeOptions, FieldTable, FieldValue, Message, PublishOptions, QueueOptions,
};

/// Declares a fresh exchange of `kind` whose alternate exchange is `ae`.
async fn exchange_with_ae(
    conn: &dyn Connection,
    prefix: &str,
    kind: ExchangeKind,
    ae: &str,
) -> String {
    let name = fresh_name(prefix);
    let mut options = ExchangeOptions::default();
    options
        .arguments
        .insert("alternate-exchange".into(), ae.into());
    conn.declare_exchange(&name, kind.clone(), options)
        .await
        .unwrap_or_else(|e| {
            panic!("declare {kind} exchange {name:?} with alternate {ae:?}: {e:?}")
        });
    name
}

/// Binds exchange `destination` to `source`, failing the case on error.
async fn bind_exchange(conn: &dyn Connection, destination: &str, source: &str, key: &str) {
    conn.bind_exchange(destination, source, key, FieldTable::new())
        .await
        .unwrap_or_else(|e| {
            panic!("bind exchange {destination:?} to {source:?} with {key:?}: {e:?}")
        });
}

/// Publishes mandatory, expecting [`Error::Unroutable`].
async fn expect_unroutable(conn: &dyn Connection, x: &str, key: &str, what: &str) {
    expect_err!(
        what,
        conn.publish(
            x,
            key,
            Message::new(what.to_owned()),
            PublishOptions::mandatory()
        )
        .await,
        Error::Unroutable { .. }
    );
}

/// Publishes mandatory, expecting it to be routed.
async fn publish_mandatory(conn: &dyn Connection, x: &str, key: &str, text: &str) {
    conn.publish(
        x,
        key,
        Message::new(text.to_owned()),
        PublishOptions::mandatory(),
    )
    .await
    .unwrap_or_else(|e| panic!("mandatory publish {text:?} to {x:?} with {key:?}: {e:?}"));
}

/// A `CC` or `BCC` header of routing keys.
fn keys(list: &[FieldValue]) -> FieldValue {
    FieldValue::Array(list.to_vec())
}

/// Checks sender-selected distribution on one exchange: queue `i` is bound
/// with `patterns[i]`; a message published with `key`, the `cc` and `bcc`
/// headers must reach exactly the queues `reached` (once each), carry its
/// `CC` header unchanged and no `BCC`.
async fn check_cc_bcc(
    conn: &dyn Connection,
    kind: ExchangeKind,
    patterns: &[&str],
    key: &str,
    cc: &[FieldValue],
    bcc: &[FieldValue],
    reached: &[bool],
) {
    let x = exchange(conn, "cc", kind.clone()).await;
    let mut queues = Vec::new();
    for p in patterns {
        let q = queue(conn, "cc").await;
        bind(conn, &q, &x, p).await;
        queues.push(q);
    }
    let msg = Message::new("selected")
        .with_header("CC", keys(cc))
        .with_header("BCC", keys(bcc))
        .with_header("other", "kept");
    publish(conn, &x, key, msg).await;
    for ((q, pattern), reached) in queues.iter().zip(patterns).zip(reached) {
        let what = format!("{kind} binding {pattern:?}, key {key:?}, CC {cc:?}, BCC {bcc:?}");
        if !reached {
            expect_bodies(conn, q, &[]).await;
            continue;
        }
        let mut c = consume(conn, q, ConsumeOptions::auto_ack()).await;
        let d = recv(&mut c, &what).await;
        let headers = &d.message.properties.headers;
        assert_eq!(
            headers.get("CC"),
            Some(&keys(cc)),
            "{what}: CC is delivered as sent"
        );
        assert_eq!(headers.get("BCC"), None, "{what}: BCC is never delivered");
        assert_eq!(
            headers.get("other"),
            Some(&"kept".into()),
            "{what}: other headers stay"
        );
        assert_eq!(
            d.routing_key, key,
            "{what}: the delivery names the publish key"
        );
        c.cancel().await.expect("cancel");
        drop(c);
        expect_bodies(conn, q, &[]).await;
    }
    let names: Vec<&str> = queues.iter().map(String::as_str).collect();
    cleanup(conn, &names, &[&x]).await;
}

/// Sender-selected distribution on a direct exchange: the string entries of
/// the `CC` and `BCC` headers are routed as routing keys too (entries that
/// are not strings are ignored); a queue that several keys reach gets one
/// copy; `CC` stays on the delivered message and `BCC` is removed.
pub async fn cc_and_bcc_route_on_a_direct_exchange(h: &dyn Harness) {
    let conn = h.connect().await;
    check_cc_bcc(
        &*conn,
        ExchangeKind::Direct,
        &["main", "cc", "bcc", "both", "ignored", "1"],
        "main",
        &[
            "cc".into(),
            "both".into(),
            FieldValue::I32(1),
            "main".into(),
        ],
        &["bcc".into(), "both".into(), FieldValue::Bool(true)],
        &[true, true, true, true, false, false],
    )
    .await;
}

/// Sender-selected distribution on a topic exchange: `CC` and `BCC` keys
/// are matched against the patterns like the routing key.
pub async fn cc_and_bcc_route_on_a_topic_exchange(h: &dyn Harness) {
    let conn = h.connect().await;
    check_cc_bcc(
        &*conn,
        ExchangeKind::Topic,
        &["a.*", "#.z", "b.#", "none.*"],
        "x",
        &["a.b".into()],
        &["q.z".into(), "b".into(), FieldValue::I64(3)],
        &[true, true, true, false],
    )
    .await;
}

/// Sender-selected distribution through the default exchange: the `CC` and
/// `BCC` keys name queues too.
pub async fn cc_and_bcc_route_through_the_default_exchange(h: &dyn Harness) {
    let conn = h.connect().await;
    let main = queue(&*conn, "cc-default").await;
    let copied = queue(&*conn, "cc-default").await;
    let blind = queue(&*conn, "cc-default").await;
    let msg = Message::new("to three")
        .with_header("CC", keys(&[copied.as_str().into()]))
        .with_header("BCC", keys(&[blind.as_str().into(), main.as_str().into()]));
    publish(&*conn, "", &main, msg).await;
    for q in [&main, &copied, &blind] {
        let mut c = consume(&*conn, q, ConsumeOptions::auto_ack()).await;
        let d = recv(&mut c, &format!("copy in {q:?}")).await;
        assert!(
            d.message.properties.headers.contains_key("CC"),
            "CC is delivered"
        );
        assert!(
            !d.message.properties.headers.contains_key("BCC"),
            "BCC is not"
        );
        c.cancel().await.expect("cancel");
        drop(c);
        expect_bodies(&*conn, q, &[]).await;
    }
    cleanup(&*conn, &[&main, &copied, &blind], &[]).await;
}

/// Alternate exchanges chain: a message no binding of exchange A matches
/// goes to A's alternate B, then to B's alternate C, until an exchange
/// routes it; a mandatory publish routed that way succeeds.
pub async fn alternate_exchanges_chain(h: &dyn Harness) {
    let conn = h.connect().await;
    let c = exchange(&*conn, "ae-c", ExchangeKind::Fanout).await;
    let b = exchange_with_ae(&*conn, "ae-b", ExchangeKind::Direct, &c).await;
    let a = exchange_with_ae(&*conn, "ae-a", ExchangeKind::Direct, &b).await;
    let qa = queue(&*conn, "ae-a").await;
    let qb = queue(&*conn, "ae-b").await;
    let qc = queue(&*conn, "ae-c").await;
    bind(&*conn, &qa, &a, "a").await;
    bind(&*conn, &qb, &b, "b").await;
    bind(&*conn, &qc, &c, "").await;
    publish_text(&*conn, &a, "a", "matched by a").await;
    publish_text(&*conn, &a, "b", "matched by b").await;
    publish_mandatory(&*conn, &a, "z", "matched by c").await;
    expect_bodies(&*conn, &qa, &["matched by a"]).await;
    expect_bodies(&*conn, &qb, &["matched by b"]).await;
    expect_bodies(&*conn, &qc, &["matched by c"]).await;
    cleanup(&*conn, &[&qa, &qb, &qc], &[&a, &b, &c]).await;
}

/// A loop of alternate exchanges (A's is B, B's is A) ends: each exchange
/// routes a message once, so what neither matches is dropped, or returned
/// as unroutable to a mandatory publisher; what B matches arrives once. An
/// alternate exchange that does not exist drops the message.
pub async fn alternate_exchange_loops_end(h: &dyn Harness) {
    let conn = h.connect().await;
    let a_name = fresh_name("ae-loop-a");
    let b = exchange_with_ae(&*conn, "ae-loop-b", ExchangeKind::Direct, &a_name).await;
    let mut options = ExchangeOptions::default();
    options
        .arguments
        .insert("alternate-exchange".into(), b.as_str().into());
    conn.declare_exchange(&a_name, ExchangeKind::Direct, options)
        .await
        .expect("declare the loop's first exchange");
    let a = a_name;
    let qb = queue(&*conn, "ae-loop").await;
    bind(&*conn, &qb, &b, "b").await;
    publish_text(&*conn, &a, "none", "dropped").await;
    expect_unroutable(
        &*conn,
        &a,
        "none",
        "mandatory publish around an alternate loop",
    )
    .await;
    expect_unroutable(
        &*conn,
        &b,
        "none",
        "mandatory publish around it from the other end",
    )
    .await;
    publish_text(&*conn, &a, "b", "once").await;
    expect_bodies(&*conn, &qb, &["once"]).await;
    let dangling = exchange_with_ae(
        &*conn,
        "ae-missing",
        ExchangeKind::Direct,
        &fresh_name("none"),
    )
    .await;
    expect_unroutable(
        &*conn,
        &dangling,
        "k",
        "mandatory publish to a missing alternate",
    )
    .await;
    cleanup(&*conn, &[&qb], &[&a, &b, &dangling]).await;
}

/// An `alternate-exchange` argument that is not a string is refused with
/// `PreconditionFailed` naming it, and nothing is declared.
pub async fn alternate_exchange_must_be_a_string(h: &dyn Harness) {
    let conn = h.connect().await;
    for value in [FieldValue::I32(1), FieldValue::Bool(true)] {
        let name = fresh_name("ae-bad");
        let mut options = ExchangeOptions::default();
        options
            .arguments
            .insert("alternate-exchange".into(), value.clone());
        let what = format!("declare an exchange with alternate-exchange = {value:?}");
        let err = expect_err!(
            &what,
            conn.declare_exchange(&name, ExchangeKind::Direct, options)
                .await,
            Error::PreconditionFailed(_)
        );
        assert!(
            err.to_string().contains("alternate-exchange"),
            "{what}: the error names the argument: {err}"
        );
        assert!(
            !conn.exchange_exists(&name).await.expect("passive declare"),
            "{what}: nothing was declared"
        );
    }
}

/// An exchange-to-exchange binding passes what its source routes through it
/// on to its destination: a fanout exchange bound to a topic exchange
/// (internal: reachable only through bindings) bound to queues; the
/// destination's own bindings decide, with the original routing key.
pub async fn exchange_bindings_route_through_exchanges(h: &dyn Harness) {
    let conn = h.connect().await;
    let fanout = exchange(&*conn, "e2e-fanout", ExchangeKind::Fanout).await;
    let topic = fresh_name("e2e-topic");
    let internal = ExchangeOptions {
        internal: true,
        ..ExchangeOptions::default()
    };
    conn.declare_exchange(&topic, ExchangeKind::Topic, internal)
        .await
        .expect("declare an internal topic exchange");
    bind_exchange(&*conn, &topic, &fanout, "ignored").await;
    let qa = queue(&*conn, "e2e-a").await;
    let qz = queue(&*conn, "e2e-z").await;
    bind(&*conn, &qa, &topic, "a.*").await;
    bind(&*conn, &qz, &topic, "#.z").await;
    publish_mandatory(&*conn, &fanout, "a.b", "a.b").await;
    publish_text(&*conn, &fanout, "y.z", "y.z").await;
    expect_unroutable(
        &*conn,
        &fanout,
        "c",
        "mandatory publish no binding downstream matches",
    )
    .await;
    expect_err!(
        "publish to the internal exchange",
        conn.publish(
            &topic,
            "a.b",
            Message::new("direct"),
            PublishOptions::default()
        )
        .await,
        Error::AccessRefused(_)
    );
    let conn = h.connect().await;
    expect_bodies(&*conn, &qa, &["a.b"]).await;
    expect_bodies(&*conn, &qz, &["y.z"]).await;
    cleanup(&*conn, &[&qa, &qz], &[&fanout, &topic]).await;
}

/// A queue that a message reaches along several paths (directly and
/// through two exchanges) receives it once.
pub async fn exchange_bindings_deliver_once_per_queue(h: &dyn Harness) {
    let conn = h.connect().await;
    let top = exchange(&*conn, "e2e-top", ExchangeKind::Fanout).await;
    let left = exchange(&*conn, "e2e-left", ExchangeKind::Direct).await;
    let right = exchange(&*conn, "e2e-right", ExchangeKind::Topic).await;
    bind_exchange(&*conn, &left, &top, "").await;
    bind_exchange(&*conn, &right, &top, "").await;
    bind_exchange(&*conn, &right, &left, "k").await;
    let q = queue(&*conn, "e2e-once").await;
    bind(&*conn, &q, &top, "").await;
    bind(&*conn, &q, &left, "k").await;
    bind(&*conn, &q, &right, "#").await;
    publish_text(&*conn, &top, "k", "once").await;
    expect_bodies(&*conn, &q, &["once"]).await;
    cleanup(&*conn, &[&q], &[&top, &left, &right]).await;
}

/// Loops of exchange-to-exchange bindings end (A to B, B to A, A to
/// itself): each exchange routes a message once, a queue on the loop gets
/// one copy, and a loop without queues is unroutable.
pub async fn exchange_binding_loops_end(h: &dyn Harness) {
    let conn = h.connect().await;
    let a = exchange(&*conn, "e2e-loop-a", ExchangeKind::Fanout).await;
    let b = exchange(&*conn, "e2e-loop-b", ExchangeKind::Topic).await;
    bind_exchange(&*conn, &b, &a, "#").await;
    bind_exchange(&*conn, &a, &b, "#").await;
    bind_exchange(&*conn, &a, &a, "").await;
    expect_unroutable(
        &*conn,
        &a,
        "k",
        "mandatory publish into a loop without queues",
    )
    .await;
    let q = queue(&*conn, "e2e-loop").await;
    bind(&*conn, &q, &b, "k").await;
    publish_text(&*conn, &a, "k", "from a").await;
    publish_text(&*conn, &b, "k", "from b").await;
    expect_bodies(&*conn, &q, &["from a", "from b"]).await;
    cleanup(&*conn, &[&q], &[&a, &b]).await;
}

/// Exchange binding errors: a missing source or destination is `NotFound`;
/// the default exchange on either side is `AccessRefused`.
pub async fn exchange_bind_to_missing_or_default_exchange(h: &dyn Harness) {
    let conn = h.connect().await;
    let x = exchange(&*conn, "e2e-errors", ExchangeKind::Direct).await;
    let missing = fresh_name("e2e-missing");
    for (destination, source) in [(&missing, &x), (&x, &missing)] {
        expect_err!(
            format!("bind exchange {destination:?} to {source:?}"),
            conn.bind_exchange(destination, source, "k", FieldTable::new())
                .await,
            Error::NotFound(_)
        );
    }
    let conn = h.connect().await;
    for (destination, source) in [("", x.as_str()), (x.as_str(), "")] {
        expect_err!(
            format!("bind exchange {destination:?} to {source:?}"),
            conn.bind_exchange(destination, source, "k", FieldTable::new())
                .await,
            Error::AccessRefused(_)
        );
    }
    let conn = h.connect().await;
    cleanup(&*conn, &[], &[&x]).await;
}

/// Unbinding an exchange from another stops routing through that binding
/// at once; unbinding one that is not there (or names a missing exchange)
/// succeeds; an auto-delete source left without bindings is deleted.
pub async fn exchange_unbind_stops_routing(h: &dyn Harness) {
    let conn = h.connect().await;
    let source = fresh_name("e2e-unbind-src");
    let auto = ExchangeOptions {
        auto_delete: true,
        ..ExchangeOptions::default()
    };
    conn.declare_exchange(&source, ExchangeKind::Direct, auto)
        .await
        .expect("declare an auto-delete source");
    let dest = exchange(&*conn, "e2e-unbind-dst", ExchangeKind::Fanout).await;
    let q = queue(&*conn, "e2e-unbind").await;
    bind(&*conn, &q, &dest, "").await;
    bind_exchange(&*conn, &dest, &source, "k").await;
    bind_exchange(&*conn, &dest, &source, "k").await;
    publish_text(&*conn, &source, "k", "bound").await;
    expect_bodies(&*conn, &q, &["bound"]).await;
    conn.unbind_exchange(&dest, &source, "other", FieldTable::new())
        .await
        .expect("unbind a binding that is not there");
    publish_text(&*conn, &source, "k", "still bound").await;
    expect_bodies(&*conn, &q, &["still bound"]).await;
    conn.unbind_exchange(&dest, &source, "k", FieldTable::new())
        .await
        .expect("unbind");
    assert!(
        !conn
            .exchange_exists(&source)
            .await
            .expect("passive declare"),
        "the auto-delete source without bindings is gone"
    );
    conn.unbind_exchange(&dest, &source, "k", FieldTable::new())
        .await
        .expect("unbind from a missing exchange");
    let plain = exchange(&*conn, "e2e-unbind-plain", ExchangeKind::Direct).await;
    bind_exchange(&*conn, &dest, &plain, "k").await;
    conn.unbind_exchange(&dest, &plain, "k", FieldTable::new())
        .await
        .expect("unbind");
    expect_unroutable(&*conn, &plain, "k", "mandatory publish after the unbind").await;
    expect_bodies(&*conn, &q, &[]).await;
    cleanup(&*conn, &[&q], &[&dest, &plain]).await;
}

/// Deleting an exchange removes the exchange-to-exchange bindings it is
/// the destination of and those it is the source of: declared again, it
/// has none. Only bindings it is the source of make it "in use". An
/// auto-delete source left without bindings by the deletion goes too.
pub async fn exchange_delete_removes_exchange_bindings(h: &dyn Harness) {
    let conn = h.connect().await;
    let source = exchange(&*conn, "e2e-del-src", ExchangeKind::Fanout).await;
    let dest = exchange(&*conn, "e2e-del-dst", ExchangeKind::Fanout).await;
    let auto_source = fresh_name("e2e-del-auto");
    let auto = ExchangeOptions {
        auto_delete: true,
        ..ExchangeOptions::default()
    };
    conn.declare_exchange(&auto_source, ExchangeKind::Direct, auto)
        .await
        .expect("declare an auto-delete source");
    let q = queue(&*conn, "e2e-del").await;
    bind_exchange(&*conn, &dest, &source, "").await;
    bind_exchange(&*conn, &dest, &auto_source, "").await;
    conn.delete_exchange(&dest, DeleteExchangeOptions::if_unused())
        .await
        .expect("a destination with no bindings of its own is unused");
    assert!(
        !conn
            .exchange_exists(&auto_source)
            .await
            .expect("passive declare"),
        "an auto-delete source left without bindings goes with the destination"
    );
    expect_unroutable(
        &*conn,
        &source,
        "k",
        "mandatory publish after deleting the destination",
    )
    .await;
    conn.declare_exchange(&dest, ExchangeKind::Fanout, ExchangeOptions::default())
        .await
        .expect("declare the destination again");
    bind(&*conn, &q, &dest, "").await;
    expect_unroutable(
        &*conn,
        &source,
        "k",
        "the binding did not come back with the exchange",
    )
    .await;
    bind_exchange(&*conn, &dest, &source, "").await;
    publish_mandatory(&*conn, &source, "k", "through").await;
    expect_err!(
        "delete a source if unused",
        conn.delete_exchange(&source, DeleteExchangeOptions::if_unused())
            .await,
        Error::PreconditionFailed(_)
    );
    let conn = h.connect().await;
    conn.delete_exchange(&source, DeleteExchangeOptions::default())
        .await
        .expect("delete the source");
    conn.declare_exchange(&source, ExchangeKind::Fanout, ExchangeOptions::default())
        .await
        .expect("declare the source again");
    expect_unroutable(
        &*conn,
        &source,
        "k",
        "the source came back without its binding",
    )
    .await;
    publish_text(&*conn, &dest, "k", "direct").await;
    expect_bodies(&*conn, &q, &["through", "direct"]).await;
    cleanup(&*conn, &[&q], &[&source, &dest]).await;
}

/// An exchange whose bindings lead only to other exchanges has routed the
/// message, even if nothing downstream takes it: its alternate exchange is
/// not used (RabbitMQ hands a message to the alternate only when the
/// exchange's own bindings match nothing).
pub async fn alternate_exchange_skipped_when_an_exchange_binding_matches(h: &dyn Harness) {
    let conn = h.connect().await;
    let ae = exchange(&*conn, "ae-skip-ae", ExchangeKind::Fanout).await;
    let a = exchange_with_ae(&*conn, "ae-skip-a", ExchangeKind::Direct, &ae).await;
    let empty = exchange(&*conn, "ae-skip-empty", ExchangeKind::Direct).await;
    let q = queue(&*conn, "ae-skip").await;
    bind(&*conn, &q, &ae, "").await;
    bind_exchange(&*conn, &empty, &a, "to-empty").await;
    expect_unroutable(&*conn, &a, "to-empty", "mandatory publish into a dead end").await;
    publish_text(&*conn, &a, "unbound", "alternate").await;
    expect_bodies(&*conn, &q, &["alternate"]).await;
    cleanup(&*conn, &[&q], &[&a, &ae, &empty]).await;
}

/// A dead letter is routed, not published: a dead-letter exchange may be
/// internal, and a message expiring in a queue reaches the queues bound to
/// it.
pub async fn internal_exchange_takes_dead_letters(h: &dyn Harness) {
    let case = "internal_exchange_takes_dead_letters";
    let caps = h.capabilities();
    if not_applicable(h, caps.dead_lettering, case, "no dead-letter exchanges")
        || not_applicable(h, caps.message_ttl, case, "no message TTL")
    {
        return;
    }
    let conn = h.connect().await;
    let dlx = fresh_name("dl-internal");
    let internal = ExchangeOptions {
        internal: true,
        ..ExchangeOptions::default()
    };
    conn.declare_exchange(&dlx, ExchangeKind::Fanout, internal)
        .await
        .expect("declare an internal dead-letter exchange");
    let dead = queue(&*conn, "dl-internal-dead").await;
    bind(&*conn, &dead, &dlx, "").await;
    let mut options = QueueOptions::default();
    options.arguments.message_ttl = Some(Duration::from_millis(50));
    options.arguments.dead_letter_exchange = Some(dlx.clone());
    let source = queue_with(&*conn, "dl-internal-src", options).await;
    publish_text(&*conn, "", &source, "expired").await;
    expect_bodies(&*conn, &dead, &["expired"]).await;
    cleanup(&*conn, &[&source, &dead], &[&dlx]).await;
}

/// An auto-delete exchange goes when the last queue bound to it goes:
/// deleted, or expired under `x-expires` (the queue's deletion removes its
/// bindings). While one bound queue remains, the exchange stays and
/// routes to it.
pub async fn auto_delete_exchange_goes_with_its_last_queue(h: &dyn Harness) {
    let conn = h.connect().await;
    let auto = ExchangeOptions {
        auto_delete: true,
        ..ExchangeOptions::default()
    };
    let x = fresh_name("auto-delete-x");
    conn.declare_exchange(&x, ExchangeKind::Fanout, auto.clone())
        .await
        .expect("declare an auto-delete exchange");
    let first = queue(&*conn, "auto-delete-x-first").await;
    let second = queue(&*conn, "auto-delete-x-second").await;
    bind(&*conn, &first, &x, "").await;
    bind(&*conn, &second, &x, "").await;
    cleanup(&*conn, &[&first], &[]).await;
    assert!(
        conn.exchange_exists(&x).await.expect("passive declare"),
        "the exchange stays while a bound queue remains"
    );
    publish_text(&*conn, &x, "", "still routed").await;
    expect_bodies(&*conn, &second, &["still routed"]).await;
    cleanup(&*conn, &[&second], &[]).await;
    until_exchange_gone(
        &*conn,
        &x,
        Duration::from_millis(10),
        "auto-delete exchange after its last queue was deleted",
    )
    .await;

    if not_applicable(
        h,
        h.capabilities().queue_expiry,
        "auto_delete_exchange_goes_with_its_last_queue (expired queue)",
        "no queue expiry",
    ) {
        return;
    }
    let x = fresh_name("auto-delete-x-expiring");
    conn.declare_exchange(&x, ExchangeKind::Fanout, auto)
        .await
        .expect("declare an auto-delete exchange");
    let mut expiring = QueueOptions::default();
    expiring.arguments.expires = Some(Duration::from_millis(100));
    let q = queue_with(&*conn, "auto-delete-x-expiring", expiring).await;
    bind(&*conn, &q, &x, "").await;
    // A check renews the queue's lease (RabbitMQ counts a declaration as
    // use), so checks are spaced beyond the expiry.
    until_queue_gone(
        &*conn,
        &q,
        Duration::from_millis(300),
        "queue unused past x-expires",
    )
    .await;
    until_exchange_gone(
        &*conn,
        &x,
        Duration::from_millis(10),
        "auto-delete exchange after its last queue expired",
    )
    .await;
}
