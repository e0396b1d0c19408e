//! Exchanges, queues and bindings: declaration, redeclaration, passive
//! checks, reserved names, bad input, deletion, purge and counts.

use super::support::{
    bind, cleanup, consume, exchange, expect_bodies, expect_err, not_applicable, publish_text,
    queue, queue_with, recv,
};
use super::{fresh_name, Harness};
use crate::{
    ConnectionExt, ConsumeOptions, DeleteExchangeOptions, DeleteQueueOptions, Error, ExchangeKind,
    ExchangeOptions, FieldTable, FieldValue, QueueOptions, QueueType, Requeue, Subject,
    PREDECLARED_EXCHANGES,
};
use futures::StreamExt;

/// `amq.direct`, `amq.fanout`, `amq.topic`, `amq.headers` and `amq.match`
/// exist on a fresh broker, and `amq.direct` routes like a direct exchange.
pub async fn predeclared_exchanges_exist(h: &dyn Harness) {
    let conn = h.connect().await;
    for (name, kind) in PREDECLARED_EXCHANGES {
        let exists = conn
            .exchange_exists(name)
            .await
            .unwrap_or_else(|e| panic!("passive declare of {name:?}: {e:?}"));
        assert!(exists, "predeclared {kind} exchange {name:?} exists");
    }
    let q = queue(&*conn, "predeclared").await;
    let key = fresh_name("key");
    bind(&*conn, &q, "amq.direct", &key).await;
    publish_text(&*conn, "amq.direct", &key, "via amq.direct").await;
    expect_bodies(&*conn, &q, &["via amq.direct"]).await;
    cleanup(&*conn, &[&q], &[]).await;
}

/// Redeclaring a predeclared exchange with its own settings (its kind,
/// durable) is a no-op; with another kind or durability it is
/// `PreconditionFailed`, and the exchange is unchanged.
pub async fn predeclared_exchanges_redeclare_with_their_settings(h: &dyn Harness) {
    let conn = h.connect().await;
    for (name, kind) in PREDECLARED_EXCHANGES {
        conn.declare_exchange(name, kind.clone(), ExchangeOptions::durable())
            .await
            .unwrap_or_else(|e| panic!("redeclare {name:?} as durable {kind}: {e:?}"));
    }
    expect_err!(
        "redeclare amq.direct as non-durable",
        conn.declare_exchange(
            "amq.direct",
            ExchangeKind::Direct,
            ExchangeOptions::default()
        )
        .await,
        Error::PreconditionFailed(_)
    );
    expect_err!(
        "redeclare amq.topic as direct",
        conn.declare_exchange(
            "amq.topic",
            ExchangeKind::Direct,
            ExchangeOptions::durable()
        )
        .await,
        Error::PreconditionFailed(_)
    );
    // Still a topic exchange: a pattern binding routes.
    let q = queue(&*conn, "predeclared-redeclare").await;
    let word = fresh_name("word").replace('.', "-");
    bind(&*conn, &q, "amq.topic", &format!("{word}.*")).await;
    publish_text(&*conn, "amq.topic", &format!("{word}.x"), "topic still").await;
    expect_bodies(&*conn, &q, &["topic still"]).await;
    cleanup(&*conn, &[&q], &[]).await;
}

/// Deleting a predeclared exchange is `AccessRefused`; it still exists.
pub async fn predeclared_exchanges_cannot_be_deleted(h: &dyn Harness) {
    let conn = h.connect().await;
    for (name, _) in PREDECLARED_EXCHANGES {
        expect_err!(
            format!("delete predeclared {name:?}"),
            conn.delete_exchange(name, DeleteExchangeOptions::default())
                .await,
            Error::AccessRefused(_)
        );
        assert!(
            conn.exchange_exists(name).await.expect("passive declare"),
            "{name:?} survives an attempt to delete it"
        );
    }
}

/// Declaring the default exchange `""` explicitly is `AccessRefused`.
pub async fn default_exchange_cannot_be_declared(h: &dyn Harness) {
    let conn = h.connect().await;
    for options in [ExchangeOptions::default(), ExchangeOptions::durable()] {
        expect_err!(
            format!("declare the default exchange with {options:?}"),
            conn.declare_exchange("", ExchangeKind::Direct, options.clone())
                .await,
            Error::AccessRefused(_)
        );
    }
}

/// Deleting the default exchange is `AccessRefused`; it still routes.
pub async fn default_exchange_cannot_be_deleted(h: &dyn Harness) {
    let conn = h.connect().await;
    expect_err!(
        "delete the default exchange",
        conn.delete_exchange("", DeleteExchangeOptions::default())
            .await,
        Error::AccessRefused(_)
    );
    let q = queue(&*conn, "default-delete").await;
    publish_text(&*conn, "", &q, "still routed").await;
    expect_bodies(&*conn, &q, &["still routed"]).await;
    cleanup(&*conn, &[&q], &[]).await;
}

/// Binding a queue to the default exchange, or unbinding it, is
/// `AccessRefused`; the implicit binding by queue name is unchanged.
pub async fn default_exchange_cannot_be_bound(h: &dyn Harness) {
    let conn = h.connect().await;
    let q = queue(&*conn, "default-bind").await;
    expect_err!(
        "bind to the default exchange",
        conn.bind_queue(&q, "", "other-key", FieldTable::new())
            .await,
        Error::AccessRefused(_)
    );
    expect_err!(
        "unbind from the default exchange",
        conn.unbind_queue(&q, "", &q, FieldTable::new()).await,
        Error::AccessRefused(_)
    );
    publish_text(&*conn, "", "other-key", "not for q").await;
    publish_text(&*conn, "", &q, "by name").await;
    expect_bodies(&*conn, &q, &["by name"]).await;
    cleanup(&*conn, &[&q], &[]).await;
}

/// Redeclaring an exchange with the same kind and options is a no-op that
/// keeps its bindings.
pub async fn exchange_redeclare_same_settings_is_noop(h: &dyn Harness) {
    let conn = h.connect().await;
    let x = exchange(&*conn, "redeclare-same", ExchangeKind::Direct).await;
    let q = queue(&*conn, "redeclare-same").await;
    bind(&*conn, &q, &x, "k").await;
    conn.declare_exchange(&x, ExchangeKind::Direct, ExchangeOptions::default())
        .await
        .expect("redeclare with the same settings succeeds");
    publish_text(&*conn, &x, "k", "kept binding").await;
    expect_bodies(&*conn, &q, &["kept binding"]).await;
    cleanup(&*conn, &[&q], &[&x]).await;
}

/// Redeclaring an exchange with another kind is `PreconditionFailed`; it
/// keeps its kind and bindings.
pub async fn exchange_redeclare_other_kind_fails(h: &dyn Harness) {
    let conn = h.connect().await;
    let x = exchange(&*conn, "redeclare-kind", ExchangeKind::Direct).await;
    let q = queue(&*conn, "redeclare-kind").await;
    bind(&*conn, &q, &x, "k").await;
    for kind in [
        ExchangeKind::Fanout,
        ExchangeKind::Topic,
        ExchangeKind::Headers,
    ] {
        expect_err!(
            format!("redeclare a direct exchange as {kind}"),
            conn.declare_exchange(&x, kind.clone(), ExchangeOptions::default())
                .await,
            Error::PreconditionFailed(_)
        );
    }
    // Still direct: a fanout would deliver the other key too.
    publish_text(&*conn, &x, "other", "other key").await;
    publish_text(&*conn, &x, "k", "bound key").await;
    expect_bodies(&*conn, &q, &["bound key"]).await;
    cleanup(&*conn, &[&q], &[&x]).await;
}

/// Redeclaring an exchange with other durable or auto-delete flags is
/// `PreconditionFailed`.
pub async fn exchange_redeclare_other_durability_fails(h: &dyn Harness) {
    let conn = h.connect().await;
    let x = exchange(&*conn, "redeclare-durable", ExchangeKind::Fanout).await;
    expect_err!(
        "redeclare a transient exchange as durable",
        conn.declare_exchange(&x, ExchangeKind::Fanout, ExchangeOptions::durable())
            .await,
        Error::PreconditionFailed(_)
    );
    let auto_delete = ExchangeOptions::default().with_auto_delete(true);
    expect_err!(
        "redeclare an exchange as auto-delete",
        conn.declare_exchange(&x, ExchangeKind::Fanout, auto_delete)
            .await,
        Error::PreconditionFailed(_)
    );
    assert!(conn.exchange_exists(&x).await.expect("passive declare"));
    cleanup(&*conn, &[], &[&x]).await;
}

/// Redeclaring a queue with the same settings is a no-op: it keeps its
/// messages and reports them.
pub async fn queue_redeclare_same_settings_is_noop(h: &dyn Harness) {
    let conn = h.connect().await;
    let q = queue(&*conn, "queue-redeclare-same").await;
    publish_text(&*conn, "", &q, "one").await;
    publish_text(&*conn, "", &q, "two").await;
    let info = conn
        .declare_queue(&q, QueueOptions::default())
        .await
        .expect("redeclare with the same settings succeeds");
    assert_eq!(info.name, q);
    if h.capabilities().exact_counts {
        assert_eq!(info.message_count, 2, "redeclaration reports the messages");
    }
    expect_bodies(&*conn, &q, &["one", "two"]).await;
    cleanup(&*conn, &[&q], &[]).await;
}

/// Redeclaring a queue with another durable or auto-delete flag, or other
/// `x-` arguments, is `PreconditionFailed`; the queue and its messages are
/// unchanged.
pub async fn queue_redeclare_other_settings_fails(h: &dyn Harness) {
    let conn = h.connect().await;
    let q = queue(&*conn, "queue-redeclare-other").await;
    publish_text(&*conn, "", &q, "kept").await;
    let mut variants = vec![
        ("durable", QueueOptions::durable()),
        (
            "auto-delete",
            QueueOptions::default().with_auto_delete(true),
        ),
    ];
    if h.capabilities().max_length {
        let mut o = QueueOptions::default();
        o.arguments.max_length = Some(5);
        variants.push(("x-max-length added", o));
    }
    for (what, options) in variants {
        expect_err!(
            format!("redeclare a plain queue with {what}"),
            conn.declare_queue(&q, options).await,
            Error::PreconditionFailed(_)
        );
    }
    if h.capabilities().max_length {
        let mut o = QueueOptions::default();
        o.arguments.max_length = Some(5);
        let limited = queue_with(&*conn, "queue-redeclare-limited", o).await;
        expect_err!(
            "redeclare a queue without its x-max-length",
            conn.declare_queue(&limited, QueueOptions::default()).await,
            Error::PreconditionFailed(_)
        );
        let mut o = QueueOptions::default();
        o.arguments.max_length = Some(6);
        expect_err!(
            "redeclare a queue with another x-max-length",
            conn.declare_queue(&limited, o).await,
            Error::PreconditionFailed(_)
        );
        cleanup(&*conn, &[&limited], &[]).await;
    }
    expect_bodies(&*conn, &q, &["kept"]).await;
    cleanup(&*conn, &[&q], &[]).await;
}

/// A passive declaration of a missing queue or exchange is `NotFound` and
/// creates nothing.
pub async fn passive_declare_missing_is_not_found(h: &dyn Harness) {
    let conn = h.connect().await;
    let q = fresh_name("missing-queue");
    let x = fresh_name("missing-exchange");
    for _ in 0..2 {
        expect_err!(
            "passive declare of a missing queue",
            conn.declare_queue(&q, QueueOptions::passive()).await,
            Error::NotFound(_)
        );
        expect_err!(
            "passive declare of a missing exchange",
            conn.declare_exchange(&x, ExchangeKind::Fanout, ExchangeOptions::passive())
                .await,
            Error::NotFound(_)
        );
    }
}

/// A passive declaration only checks existence: the other settings it
/// carries (durable, kind) are not compared.
pub async fn passive_declare_ignores_settings(h: &dyn Harness) {
    let conn = h.connect().await;
    let q = queue(&*conn, "passive-settings").await;
    let x = exchange(&*conn, "passive-settings", ExchangeKind::Direct).await;
    conn.declare_queue(&q, QueueOptions::durable().with_passive(true))
        .await
        .expect("passive declare with other flags succeeds");
    conn.declare_exchange(
        &x,
        ExchangeKind::Fanout,
        ExchangeOptions::durable().with_passive(true),
    )
    .await
    .expect("passive exchange declare with another kind succeeds");
    cleanup(&*conn, &[&q], &[&x]).await;
}

/// Declaring a queue with an empty name creates one with a server-generated
/// name that differs every time and works like any other.
pub async fn server_named_queues_are_unique(h: &dyn Harness) {
    if not_applicable(
        h,
        h.capabilities().server_named_queues,
        "server_named_queues_are_unique",
        "no server-named queues",
    ) {
        return;
    }
    let conn = h.connect().await;
    let a = conn
        .declare_queue("", QueueOptions::default())
        .await
        .expect("declare a server-named queue")
        .name;
    let b = conn
        .declare_queue("", QueueOptions::default())
        .await
        .expect("declare a second server-named queue")
        .name;
    assert!(!a.is_empty(), "the generated name is not empty");
    assert_ne!(a, b, "generated names are unique");
    publish_text(&*conn, "", &a, "to a").await;
    expect_bodies(&*conn, &a, &["to a"]).await;
    cleanup(&*conn, &[&a, &b], &[]).await;
}

/// New queue and exchange names starting with `amq.` are `AccessRefused`,
/// and nothing is created.
pub async fn reserved_names_are_refused(h: &dyn Harness) {
    let conn = h.connect().await;
    let name = format!("amq.{}", fresh_name("reserved"));
    expect_err!(
        "declare a queue named amq.*",
        conn.declare_queue(&name, QueueOptions::default()).await,
        Error::AccessRefused(_)
    );
    expect_err!(
        "declare an exchange named amq.*",
        conn.declare_exchange(&name, ExchangeKind::Direct, ExchangeOptions::default())
            .await,
        Error::AccessRefused(_)
    );
    expect_err!(
        "the refused queue was not created",
        conn.inspect_queue(&name).await,
        Error::NotFound(_)
    );
    assert!(
        !conn.exchange_exists(&name).await.expect("passive declare"),
        "the refused exchange was not created"
    );
}

/// Names of 255 bytes are accepted; longer ones are `InvalidArgument` and
/// create nothing.
pub async fn overlong_names_are_refused(h: &dyn Harness) {
    let conn = h.connect().await;
    let base = fresh_name("long");
    let longest = format!("{base}{}", "x".repeat(255 - base.len()));
    assert_eq!(longest.len(), 255);
    conn.declare_queue(&longest, QueueOptions::default())
        .await
        .expect("a 255-byte queue name is accepted");
    let too_long = format!("{longest}y");
    expect_err!(
        "declare a queue with a 256-byte name",
        conn.declare_queue(&too_long, QueueOptions::default()).await,
        Error::InvalidArgument(_)
    );
    expect_err!(
        "declare an exchange with a 256-byte name",
        conn.declare_exchange(&too_long, ExchangeKind::Direct, ExchangeOptions::default())
            .await,
        Error::InvalidArgument(_)
    );
    // The connection is still usable and the valid queue untouched.
    publish_text(&*conn, "", &longest, "fits").await;
    expect_bodies(&*conn, &longest, &["fits"]).await;
    cleanup(&*conn, &[&longest], &[]).await;
}

/// Queue arguments of the wrong type or out of range are
/// `PreconditionFailed` (as RabbitMQ reports them) and create nothing.
pub async fn wrong_argument_types_are_refused(h: &dyn Harness) {
    let conn = h.connect().await;
    let cases: Vec<(&str, FieldValue)> = vec![
        ("x-message-ttl", "soon".into()),
        ("x-message-ttl", FieldValue::I32(-1)),
        ("x-expires", "later".into()),
        ("x-expires", FieldValue::I32(0)),
        ("x-max-length", "ten".into()),
        ("x-max-length", FieldValue::I32(-1)),
        ("x-max-length-bytes", FieldValue::I32(-1)),
        ("x-overflow", "spill".into()),
        ("x-overflow", FieldValue::I32(1)),
        ("x-dead-letter-exchange", FieldValue::I32(5)),
        ("x-max-priority", "high".into()),
        ("x-max-priority", FieldValue::I32(300)),
        ("x-single-active-consumer", FieldValue::I32(1)),
        ("x-queue-type", "fancy".into()),
        // A dead-letter routing key needs a dead-letter exchange.
        ("x-dead-letter-routing-key", "k".into()),
    ];
    for (arg, value) in cases {
        let name = fresh_name("bad-arg");
        let mut options = QueueOptions::default();
        options.arguments.raw.insert(arg.to_owned(), value.clone());
        let what = format!("declare a queue with {arg} = {value:?}");
        let err = expect_err!(
            &what,
            conn.declare_queue(&name, options).await,
            Error::PreconditionFailed(_)
        );
        assert!(
            err.to_string().contains(arg),
            "{what}: the error names the argument: {err}"
        );
        expect_err!(
            format!("{what}: nothing was created"),
            conn.inspect_queue(&name).await,
            Error::NotFound(_)
        );
    }
}

/// Binding a missing queue, or to a missing exchange, is `NotFound` and
/// creates nothing.
pub async fn bind_to_missing_queue_or_exchange_is_not_found(h: &dyn Harness) {
    let conn = h.connect().await;
    let q = queue(&*conn, "bind-missing").await;
    let missing_q = fresh_name("missing-queue");
    let missing_x = fresh_name("missing-exchange");
    expect_err!(
        "bind a missing queue",
        conn.bind_queue(&missing_q, "amq.direct", "k", FieldTable::new())
            .await,
        Error::NotFound(_)
    );
    expect_err!(
        "bind to a missing exchange",
        conn.bind_queue(&q, &missing_x, "k", FieldTable::new())
            .await,
        Error::NotFound(_)
    );
    expect_err!(
        "the missing queue was not created",
        conn.inspect_queue(&missing_q).await,
        Error::NotFound(_)
    );
    assert!(!conn.exchange_exists(&missing_x).await.expect("passive"));
    cleanup(&*conn, &[&q], &[]).await;
}

/// Binding the same queue, exchange and key twice makes one binding: one
/// copy is routed, and one unbind removes it.
pub async fn binding_twice_is_one_binding(h: &dyn Harness) {
    let conn = h.connect().await;
    let x = exchange(&*conn, "bind-twice", ExchangeKind::Direct).await;
    let q = queue(&*conn, "bind-twice").await;
    bind(&*conn, &q, &x, "k").await;
    bind(&*conn, &q, &x, "k").await;
    publish_text(&*conn, &x, "k", "once").await;
    expect_bodies(&*conn, &q, &["once"]).await;
    conn.unbind_queue(&q, &x, "k", FieldTable::new())
        .await
        .expect("unbind");
    publish_text(&*conn, &x, "k", "after unbind").await;
    expect_bodies(&*conn, &q, &[]).await;
    cleanup(&*conn, &[&q], &[&x]).await;
}

/// Unbinding stops routing through that binding at once; the queue's other
/// bindings keep routing.
pub async fn unbind_stops_routing(h: &dyn Harness) {
    let conn = h.connect().await;
    let x = exchange(&*conn, "unbind", ExchangeKind::Topic).await;
    let q = queue(&*conn, "unbind").await;
    bind(&*conn, &q, &x, "a.*").await;
    bind(&*conn, &q, &x, "b.*").await;
    publish_text(&*conn, &x, "a.1", "a before").await;
    conn.unbind_queue(&q, &x, "a.*", FieldTable::new())
        .await
        .expect("unbind");
    publish_text(&*conn, &x, "a.2", "a after").await;
    publish_text(&*conn, &x, "b.1", "b after").await;
    expect_bodies(&*conn, &q, &["a before", "b after"]).await;
    cleanup(&*conn, &[&q], &[&x]).await;
}

/// Unbinding a binding that does not exist succeeds, even when the queue or
/// the exchange is missing (as in RabbitMQ).
pub async fn unbind_of_missing_binding_succeeds(h: &dyn Harness) {
    let conn = h.connect().await;
    let x = exchange(&*conn, "unbind-missing", ExchangeKind::Direct).await;
    let q = queue(&*conn, "unbind-missing").await;
    conn.unbind_queue(&q, &x, "never-bound", FieldTable::new())
        .await
        .expect("unbind of a binding that does not exist");
    conn.unbind_queue(&fresh_name("missing-queue"), &x, "k", FieldTable::new())
        .await
        .expect("unbind of a missing queue");
    conn.unbind_queue(&q, &fresh_name("missing-exchange"), "k", FieldTable::new())
        .await
        .expect("unbind from a missing exchange");
    cleanup(&*conn, &[&q], &[&x]).await;
}

/// Deleting an exchange removes its bindings: publishing to it is then
/// `NotFound`, and a new exchange of the same name starts unbound.
pub async fn exchange_delete_removes_its_bindings(h: &dyn Harness) {
    let conn = h.connect().await;
    let x = exchange(&*conn, "delete-exchange", ExchangeKind::Direct).await;
    let q = queue(&*conn, "delete-exchange").await;
    bind(&*conn, &q, &x, "k").await;
    conn.delete_exchange(&x, DeleteExchangeOptions::default())
        .await
        .expect("delete");
    assert!(!conn.exchange_exists(&x).await.expect("passive"));
    expect_err!(
        "publish to the deleted exchange",
        conn.publish(&x, "k", crate::Message::new("x"), Default::default())
            .await,
        Error::NotFound(_)
    );
    conn.declare_exchange(&x, ExchangeKind::Direct, ExchangeOptions::default())
        .await
        .expect("declare again");
    publish_text(&*conn, &x, "k", "no binding left").await;
    expect_bodies(&*conn, &q, &[]).await;
    cleanup(&*conn, &[&q], &[&x]).await;
}

/// A custom exchange type that nothing provides is `NotSupported`, naming
/// the type, permanent, and creates nothing; on a transport without
/// [`plugin_exchange_kinds`](crate::Capabilities::plugin_exchange_kinds)
/// well-known plugin types are refused the same way. A custom spelling of a
/// built-in kind (`Custom("topic")`) is `InvalidArgument`. The connection
/// stays usable afterwards (RabbitMQ closes it over an unknown type; it
/// recovers).
pub async fn unknown_exchange_kinds_are_refused(h: &dyn Harness) {
    let conn = h.connect().await;
    let x = fresh_name("custom-kind");
    let mut types = vec!["x-bus-test-no-such-type"];
    if !h.capabilities().plugin_exchange_kinds {
        types.extend(["x-delayed-message", "x-consistent-hash"]);
    }
    for t in types {
        let e = expect_err!(
            format!("declare an exchange of type {t:?}"),
            conn.declare_exchange(&x, ExchangeKind::custom(t), ExchangeOptions::default())
                .await,
            Error::NotSupported(_)
        );
        assert!(
            e.to_string().contains(t),
            "the refusal names the type {t:?}: {e}"
        );
        assert!(!e.is_temporary(), "the refusal is permanent: {e:?}");
        assert!(
            !conn
                .exchange_exists(&x)
                .await
                .expect("passive declare after the refusal"),
            "a refused declaration of type {t:?} created the exchange"
        );
    }
    expect_err!(
        "declare an exchange of type Custom(\"topic\")",
        conn.declare_exchange(
            &x,
            ExchangeKind::custom("topic"),
            ExchangeOptions::default()
        )
        .await,
        Error::InvalidArgument(_)
    );
    assert!(!conn.exchange_exists(&x).await.expect("passive declare"));
    let q = queue(&*conn, "custom-kind").await;
    publish_text(&*conn, "", &q, "still usable").await;
    expect_bodies(&*conn, &q, &["still usable"]).await;
    cleanup(&*conn, &[&q], &[]).await;
}

/// Errors about a queue, an exchange or an argument name them in fields
/// ([`Error::subject`], [`Error::argument`]), not only in their text: a
/// missing queue or exchange (consume, bind, passive declare, publish), an
/// inequivalent redeclaration (the argument or flag that differs), a queue
/// exclusive to another connection.
pub async fn errors_name_their_queue_exchange_and_argument(h: &dyn Harness) {
    fn check(what: &str, e: &Error, subject: &Subject, argument: Option<&str>) {
        assert_eq!(e.subject(), Some(subject), "{what}: the subject of {e:?}");
        assert_eq!(e.argument(), argument, "{what}: the argument of {e:?}");
    }
    let conn = h.connect().await;
    let missing_q = fresh_name("missing-queue");
    let missing_x = fresh_name("missing-exchange");
    let e = expect_err!(
        "consume from a missing queue",
        conn.consume(&missing_q, ConsumeOptions::default()).await,
        Error::NotFound(_)
    );
    check("consume", &e, &Subject::queue(&missing_q), None);
    let e = expect_err!(
        "passive declare of a missing exchange",
        conn.declare_exchange(&missing_x, ExchangeKind::Direct, ExchangeOptions::passive())
            .await,
        Error::NotFound(_)
    );
    check("passive exchange", &e, &Subject::exchange(&missing_x), None);
    let q = queue(&*conn, "subject").await;
    let e = expect_err!(
        "bind to a missing exchange",
        conn.bind_queue(&q, &missing_x, "k", FieldTable::new())
            .await,
        Error::NotFound(_)
    );
    check("bind", &e, &Subject::exchange(&missing_x), None);
    let e = expect_err!(
        "publish to a missing exchange",
        conn.publish(
            &missing_x,
            "k",
            crate::Message::new("x"),
            crate::PublishOptions::default()
        )
        .await,
        Error::NotFound(_)
    );
    check("publish", &e, &Subject::exchange(&missing_x), None);

    let e = expect_err!(
        "redeclare a queue with another x-message-ttl",
        conn.declare_queue(
            &q,
            QueueOptions::default().message_ttl(std::time::Duration::from_secs(60))
        )
        .await,
        Error::PreconditionFailed(_)
    );
    check("ttl", &e, &Subject::queue(&q), Some("x-message-ttl"));
    let e = expect_err!(
        "redeclare a queue as durable",
        conn.declare_queue(&q, QueueOptions::durable()).await,
        Error::PreconditionFailed(_)
    );
    check("durable", &e, &Subject::queue(&q), Some("durable"));
    let x = exchange(&*conn, "subject", ExchangeKind::Direct).await;
    let e = expect_err!(
        "redeclare a direct exchange as fanout",
        conn.declare_exchange(&x, ExchangeKind::Fanout, ExchangeOptions::default())
            .await,
        Error::PreconditionFailed(_)
    );
    check("type", &e, &Subject::exchange(&x), Some("type"));

    if h.capabilities().exclusive_queues {
        let owner = h.connect().await;
        let private = fresh_name("subject-exclusive");
        owner
            .declare_queue(&private, QueueOptions::default().with_exclusive(true))
            .await
            .expect("declare an exclusive queue");
        let e = expect_err!(
            "inspect another connection's exclusive queue",
            conn.inspect_queue(&private).await,
            Error::ResourceLocked(_)
        );
        check("exclusive", &e, &Subject::queue(&private), None);
        owner.close().await.expect("close the owner");
    }
    cleanup(&*conn, &[&q], &[&x]).await;
}

/// `delete_exchange(if_unused)` is `PreconditionFailed` while the exchange
/// has bindings (it stays, and routes) and succeeds once it has none.
pub async fn exchange_delete_if_unused(h: &dyn Harness) {
    let conn = h.connect().await;
    let x = exchange(&*conn, "delete-if-unused", ExchangeKind::Direct).await;
    let q = queue(&*conn, "delete-if-unused").await;
    bind(&*conn, &q, &x, "k").await;
    expect_err!(
        "delete a bound exchange if unused",
        conn.delete_exchange(&x, DeleteExchangeOptions::if_unused())
            .await,
        Error::PreconditionFailed(_)
    );
    publish_text(&*conn, &x, "k", "still routes").await;
    expect_bodies(&*conn, &q, &["still routes"]).await;
    conn.unbind_queue(&q, &x, "k", FieldTable::new())
        .await
        .expect("unbind");
    conn.delete_exchange(&x, DeleteExchangeOptions::if_unused())
        .await
        .expect("delete an unbound exchange if unused");
    assert!(!conn.exchange_exists(&x).await.expect("passive"));
    cleanup(&*conn, &[&q], &[]).await;
}

/// Deleting a queue or an exchange that does not exist succeeds (the queue
/// deletion reports 0 messages), as in RabbitMQ.
pub async fn delete_of_missing_entities_succeeds(h: &dyn Harness) {
    let conn = h.connect().await;
    let n = conn
        .delete_queue(&fresh_name("missing"), DeleteQueueOptions::default())
        .await
        .expect("delete a missing queue");
    assert_eq!(n, 0, "a missing queue held no messages");
    conn.delete_exchange(&fresh_name("missing"), DeleteExchangeOptions::default())
        .await
        .expect("delete a missing exchange");
}

/// `if_empty` refuses to delete a queue holding messages and `if_unused`
/// one with consumers (`PreconditionFailed`, the queue unchanged); a
/// deletion reports the ready messages it removed.
pub async fn queue_delete_if_unused_and_if_empty(h: &dyn Harness) {
    let conn = h.connect().await;
    let q = queue(&*conn, "delete-if-empty").await;
    publish_text(&*conn, "", &q, "one").await;
    publish_text(&*conn, "", &q, "two").await;
    expect_err!(
        "delete a queue with messages if empty",
        conn.delete_queue(&q, DeleteQueueOptions::if_empty()).await,
        Error::PreconditionFailed(_)
    );
    let removed = conn
        .delete_queue(&q, DeleteQueueOptions::if_unused())
        .await
        .expect("delete a queue without consumers if unused");
    if h.capabilities().exact_counts {
        assert_eq!(removed, 2, "the deletion reports the messages it removed");
    }
    expect_err!(
        "the deleted queue is gone",
        conn.inspect_queue(&q).await,
        Error::NotFound(_)
    );

    let busy = queue(&*conn, "delete-if-unused").await;
    let mut consumer = consume(&*conn, &busy, ConsumeOptions::auto_ack()).await;
    expect_err!(
        "delete a queue with a consumer if unused",
        conn.delete_queue(&busy, DeleteQueueOptions::if_unused())
            .await,
        Error::PreconditionFailed(_)
    );
    publish_text(&*conn, "", &busy, "still consumed").await;
    let d = recv(&mut consumer, "the consumer survives a refused deletion").await;
    assert_eq!(&d.message.body[..], b"still consumed");
    consumer.cancel().await.expect("cancel");
    drop(consumer);
    conn.delete_queue(&busy, DeleteQueueOptions::if_unused().with_if_empty(true))
        .await
        .expect("delete an unused empty queue");
}

/// Deleting a queue ends the streams of its consumers.
pub async fn queue_delete_ends_its_consumers(h: &dyn Harness) {
    let conn = h.connect().await;
    let q = queue(&*conn, "delete-consumers").await;
    let mut consumer = consume(&*conn, &q, ConsumeOptions::prefetch(1)).await;
    publish_text(&*conn, "", &q, "before deletion").await;
    let d = recv(&mut consumer, "a delivery before deletion").await;
    d.ack().await.expect("ack");
    conn.delete_queue(&q, DeleteQueueOptions::default())
        .await
        .expect("delete");
    match tokio::time::timeout(super::WAIT, consumer.next()).await {
        Ok(None) => {}
        Ok(Some(other)) => panic!("after its queue was deleted the consumer yielded {other:?}"),
        Err(_) => panic!("the consumer's stream did not end after its queue was deleted"),
    }
}

/// Purge removes the ready messages and reports how many; unacked
/// deliveries are not purged and can still be requeued.
pub async fn purge_removes_ready_messages_only(h: &dyn Harness) {
    let conn = h.connect().await;
    let q = queue(&*conn, "purge").await;
    for m in ["one", "two", "three"] {
        publish_text(&*conn, "", &q, m).await;
    }
    let mut consumer = consume(&*conn, &q, ConsumeOptions::prefetch(1)).await;
    let held = recv(&mut consumer, "first delivery").await;
    assert_eq!(&held.message.body[..], b"one");
    let purged = conn.purge_queue(&q).await.expect("purge");
    if h.capabilities().exact_counts {
        assert_eq!(purged, 2, "purge reports the ready messages it removed");
    }
    held.nack(Requeue::Yes).await.expect("nack with requeue");
    let again = recv(&mut consumer, "the unacked delivery survives a purge").await;
    assert_eq!(&again.message.body[..], b"one");
    assert!(
        again.redelivered,
        "a requeued message is marked redelivered"
    );
    again.ack().await.expect("ack");
    consumer.cancel().await.expect("cancel");
    drop(consumer);
    expect_bodies(&*conn, &q, &[]).await;
    expect_err!(
        "purge a missing queue",
        conn.purge_queue(&fresh_name("missing")).await,
        Error::NotFound(_)
    );
    cleanup(&*conn, &[&q], &[]).await;
}

/// A queue declaration reports the ready messages (unacked ones excluded)
/// and the consumers, exactly.
pub async fn counts_report_ready_messages_and_consumers(h: &dyn Harness) {
    if not_applicable(
        h,
        h.capabilities().exact_counts,
        "counts_report_ready_messages_and_consumers",
        "message and consumer counts are not exact",
    ) {
        return;
    }
    let conn = h.connect().await;
    let q = queue(&*conn, "counts").await;
    for m in ["1", "2", "3"] {
        publish_text(&*conn, "", &q, m).await;
    }
    let info = conn.inspect_queue(&q).await.expect("inspect");
    assert_eq!((info.message_count, info.consumer_count), (3, 0));
    let mut a = consume(&*conn, &q, ConsumeOptions::prefetch(1)).await;
    let da = recv(&mut a, "consumer a").await;
    let mut b = consume(&*conn, &q, ConsumeOptions::prefetch(1)).await;
    let db = recv(&mut b, "consumer b").await;
    let info = conn.inspect_queue(&q).await.expect("inspect");
    assert_eq!(
        (info.message_count, info.consumer_count),
        (1, 2),
        "two unacked deliveries are not counted; two consumers are"
    );
    let info = conn
        .declare_queue(&q, QueueOptions::default())
        .await
        .expect("redeclare");
    assert_eq!((info.message_count, info.consumer_count), (1, 2));
    // Cancel before acking, so the third message cannot go to `a`.
    a.cancel().await.expect("cancel");
    da.ack().await.expect("ack after cancel");
    drop(a);
    let info = conn.inspect_queue(&q).await.expect("inspect");
    assert_eq!(
        info.consumer_count, 1,
        "a cancelled consumer is not counted"
    );
    db.ack().await.expect("ack");
    recv(&mut b, "the last message")
        .await
        .ack()
        .await
        .expect("ack");
    let info = conn.inspect_queue(&q).await.expect("inspect");
    assert_eq!(info.message_count, 0);
    drop(b);
    cleanup(&*conn, &[&q], &[]).await;
}

/// Quorum queues must be durable and cannot be exclusive
/// (`PreconditionFailed`); a durable one works as a FIFO queue, and
/// redeclaring it as classic is `PreconditionFailed`.
pub async fn quorum_queues_are_durable_only(h: &dyn Harness) {
    if not_applicable(
        h,
        h.capabilities().quorum_queues,
        "quorum_queues_are_durable_only",
        "no quorum queues",
    ) {
        return;
    }
    let conn = h.connect().await;
    let quorum = |durable: bool, exclusive: bool| {
        let mut o = QueueOptions::default()
            .with_durable(durable)
            .with_exclusive(exclusive);
        o.arguments.queue_type = Some(QueueType::Quorum);
        o
    };
    expect_err!(
        "declare a non-durable quorum queue",
        conn.declare_queue(&fresh_name("quorum"), quorum(false, false))
            .await,
        Error::PreconditionFailed(_)
    );
    expect_err!(
        "declare an exclusive quorum queue",
        conn.declare_queue(&fresh_name("quorum"), quorum(true, true))
            .await,
        Error::PreconditionFailed(_)
    );
    let q = queue_with(&*conn, "quorum", quorum(true, false)).await;
    expect_err!(
        "redeclare a quorum queue as classic",
        conn.declare_queue(&q, QueueOptions::durable()).await,
        Error::PreconditionFailed(_)
    );
    publish_text(&*conn, "", &q, "q1").await;
    publish_text(&*conn, "", &q, "q2").await;
    expect_bodies(&*conn, &q, &["q1", "q2"]).await;
    cleanup(&*conn, &[&q], &[]).await;
}
