//! Declarations, bindings and routing, with the errors RabbitMQ 3.10 gives.

mod common;

use bus_core::{
    Connection, ConnectionExt, DeleteExchangeOptions, DeleteQueueOptions, Error, ExchangeKind,
    ExchangeOptions, FieldTable, FieldValue, Message, PublishOptions, QueueOptions, QueueType,
};
use common::*;

#[tokio::test(start_paused = true)]
async fn the_default_exchange_cannot_be_touched() {
    let (_b, conn) = setup();
    queue(&conn, "q").await;
    let e = conn
        .declare_exchange("", ExchangeKind::Direct, ExchangeOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::AccessRefused(_)), "{e}");
    let e = conn
        .declare_exchange("", ExchangeKind::Direct, ExchangeOptions::passive())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::AccessRefused(_)), "{e}");
    assert!(matches!(
        conn.delete_exchange("", DeleteExchangeOptions::default())
            .await,
        Err(Error::AccessRefused(_))
    ));
    assert!(matches!(
        conn.bind_queue("q", "", "q", FieldTable::new()).await,
        Err(Error::AccessRefused(_))
    ));
    assert!(matches!(
        conn.unbind_queue("q", "", "q", FieldTable::new()).await,
        Err(Error::AccessRefused(_))
    ));
}

#[tokio::test(start_paused = true)]
async fn predeclared_exchanges_exist_and_are_protected() {
    let (_b, conn) = setup();
    for name in [
        "amq.direct",
        "amq.fanout",
        "amq.topic",
        "amq.headers",
        "amq.match",
    ] {
        assert!(conn.exchange_exists(name).await.unwrap(), "{name}");
        assert!(matches!(
            conn.delete_exchange(name, DeleteExchangeOptions::default())
                .await,
            Err(Error::AccessRefused(_))
        ));
    }
    conn.declare_exchange(
        "amq.direct",
        ExchangeKind::Direct,
        ExchangeOptions::durable(),
    )
    .await
    .unwrap();
    assert!(matches!(
        conn.declare_exchange(
            "amq.direct",
            ExchangeKind::Fanout,
            ExchangeOptions::durable()
        )
        .await,
        Err(Error::PreconditionFailed(_))
    ));
    assert!(matches!(
        conn.declare_exchange("amq.mine", ExchangeKind::Direct, ExchangeOptions::default())
            .await,
        Err(Error::AccessRefused(_))
    ));
    assert!(!conn.exchange_exists("amq.mine").await.unwrap());
}

#[tokio::test(start_paused = true)]
async fn exchange_redeclaration_must_match() {
    let (_b, conn) = setup();
    exchange(&conn, "x", ExchangeKind::Topic).await;
    exchange(&conn, "x", ExchangeKind::Topic).await;
    for (kind, options) in [
        (ExchangeKind::Direct, ExchangeOptions::default()),
        (ExchangeKind::Topic, ExchangeOptions::durable()),
        (
            ExchangeKind::Topic,
            ExchangeOptions::default().with_auto_delete(true),
        ),
        (
            ExchangeKind::Topic,
            ExchangeOptions::default().with_internal(true),
        ),
        (
            ExchangeKind::Topic,
            ExchangeOptions::default().with_arguments(
                [("alternate-exchange".to_string(), FieldValue::from("ae"))].into(),
            ),
        ),
    ] {
        let e = conn.declare_exchange("x", kind, options).await.unwrap_err();
        assert!(matches!(e, Error::PreconditionFailed(_)), "{e}");
    }
    // Unknown arguments take no part, as in RabbitMQ.
    conn.declare_exchange(
        "x",
        ExchangeKind::Topic,
        ExchangeOptions::default()
            .with_arguments([("x-whatever".to_string(), FieldValue::I32(1))].into()),
    )
    .await
    .unwrap();
    assert!(matches!(
        conn.declare_exchange("nope", ExchangeKind::Topic, ExchangeOptions::passive())
            .await,
        Err(Error::NotFound(_))
    ));
}

#[tokio::test(start_paused = true)]
async fn deleting_missing_things_succeeds() {
    let (_b, conn) = setup();
    conn.delete_exchange("nope", DeleteExchangeOptions::default())
        .await
        .unwrap();
    assert_eq!(
        conn.delete_queue("nope", DeleteQueueOptions::default())
            .await
            .unwrap(),
        0
    );
    conn.unbind_queue("nope", "amq.direct", "k", FieldTable::new())
        .await
        .unwrap();
    assert!(matches!(
        conn.purge_queue("nope").await,
        Err(Error::NotFound(_))
    ));
}

#[tokio::test(start_paused = true)]
async fn invalid_names_and_arguments_change_nothing() {
    let (b, conn) = setup();
    let long = "q".repeat(256);
    assert!(matches!(
        conn.declare_queue(&long, QueueOptions::default()).await,
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        conn.declare_exchange("a\0b", ExchangeKind::Direct, ExchangeOptions::default())
            .await,
        Err(Error::InvalidArgument(_))
    ));
    let bad = QueueOptions::default().argument("x-message-ttl", "soon");
    assert!(matches!(
        conn.declare_queue("q", bad).await,
        Err(Error::PreconditionFailed(_))
    ));
    assert_eq!(b.queue_depth("q"), None);
    assert!(matches!(
        conn.declare_queue("amq.q", QueueOptions::default()).await,
        Err(Error::AccessRefused(_))
    ));
    assert_eq!(b.queue_depth("amq.q"), None);
}

#[tokio::test(start_paused = true)]
async fn queue_redeclaration_must_match() {
    let (_b, conn) = setup();
    let ttl = |ms| QueueOptions::default().message_ttl(std::time::Duration::from_millis(ms));
    queue_with(&conn, "q", ttl(100)).await;
    queue_with(&conn, "q", ttl(100)).await;
    for options in [
        ttl(200),
        QueueOptions::default(),
        ttl(100).with_durable(true),
        ttl(100).with_auto_delete(true),
    ] {
        let e = conn.declare_queue("q", options).await.unwrap_err();
        assert!(matches!(e, Error::PreconditionFailed(_)), "{e}");
    }
    // Redeclaring exclusive a queue that is not: locked, as in RabbitMQ.
    let e = conn
        .declare_queue("q", ttl(100).with_exclusive(true))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::ResourceLocked(_)), "{e}");
    // x-queue-type classic is what a queue without one is.
    queue(&conn, "c").await;
    queue_with(
        &conn,
        "c",
        QueueOptions::default().queue_type(QueueType::Classic),
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn quorum_declarations_follow_rabbitmq_rules() {
    let (_b, conn) = setup();
    let quorum = |durable| {
        QueueOptions::default()
            .with_durable(durable)
            .queue_type(QueueType::Quorum)
    };
    assert!(matches!(
        conn.declare_queue("qq", quorum(false)).await,
        Err(Error::PreconditionFailed(_))
    ));
    queue_with(&conn, "qq", quorum(true)).await;
    assert!(matches!(
        conn.declare_queue("qq", QueueOptions::durable()).await,
        Err(Error::PreconditionFailed(_))
    ));
}

#[tokio::test(start_paused = true)]
async fn server_named_queues_are_unique_and_reserved() {
    let (b, conn) = setup();
    let a = conn
        .declare_queue("", QueueOptions::default())
        .await
        .unwrap()
        .name;
    let c = conn
        .declare_queue("", QueueOptions::default())
        .await
        .unwrap()
        .name;
    assert!(
        a.starts_with("amq.gen-") && a.len() == "amq.gen-".len() + 22,
        "{a}"
    );
    assert_ne!(a, c);
    assert_eq!(b.queue_depth(&a), Some(0));
    // Redeclaring it by name is refused (reserved), passive works.
    assert!(matches!(
        conn.declare_queue(&a, QueueOptions::default()).await,
        Err(Error::AccessRefused(_))
    ));
    assert_eq!(conn.inspect_queue(&a).await.unwrap().name, a);
}

#[tokio::test(start_paused = true)]
async fn exclusive_queues_belong_to_their_connection() {
    let (b, owner) = setup();
    let other = b.connect();
    queue_with(&owner, "mine", QueueOptions::exclusive()).await;
    for e in [
        other.inspect_queue("mine").await.unwrap_err(),
        other
            .declare_queue("mine", QueueOptions::exclusive())
            .await
            .unwrap_err(),
        other.consume("mine", Default::default()).await.unwrap_err(),
        other.purge_queue("mine").await.unwrap_err(),
        other
            .delete_queue("mine", DeleteQueueOptions::default())
            .await
            .unwrap_err(),
        other
            .bind_queue("mine", "amq.direct", "k", FieldTable::new())
            .await
            .unwrap_err(),
    ] {
        assert!(matches!(e, Error::ResourceLocked(_)), "{e}");
    }
    // Anyone may publish to it.
    send(&other, "mine", "hello").await;
    assert_eq!(owner.inspect_queue("mine").await.unwrap().message_count, 1);
    owner.close().await.unwrap();
    assert_eq!(b.queue_depth("mine"), None);
    assert!(matches!(
        owner.inspect_queue("mine").await,
        Err(Error::Closed(_))
    ));
}

#[tokio::test(start_paused = true)]
async fn dropping_the_last_clone_closes_the_connection() {
    let b = bus_local::LocalBroker::new();
    let conn = b.connect();
    let clone = conn.clone();
    queue_with(&conn, "", QueueOptions::exclusive()).await;
    queue_with(&conn, "x", QueueOptions::exclusive()).await;
    drop(conn);
    assert!(clone.is_open());
    assert_eq!(b.queue_depth("x"), Some(0));
    drop(clone);
    assert_eq!(b.queue_depth("x"), None);
}

#[tokio::test(start_paused = true)]
async fn binding_needs_both_ends() {
    let (_b, conn) = setup();
    queue(&conn, "q").await;
    assert!(matches!(
        conn.bind_queue("q", "nope", "k", FieldTable::new()).await,
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        conn.bind_queue("nope", "amq.direct", "k", FieldTable::new())
            .await,
        Err(Error::NotFound(_))
    ));
}

#[tokio::test(start_paused = true)]
async fn delete_conditions() {
    let (b, conn) = setup();
    queue(&conn, "q").await;
    send(&conn, "q", "1").await;
    assert!(matches!(
        conn.delete_queue("q", DeleteQueueOptions::if_empty()).await,
        Err(Error::PreconditionFailed(_))
    ));
    let c = consume(&conn, "q", 0).await;
    assert!(matches!(
        conn.delete_queue("q", DeleteQueueOptions::if_unused())
            .await,
        Err(Error::PreconditionFailed(_))
    ));
    drop(c);
    exchange(&conn, "x", ExchangeKind::Direct).await;
    bind(&conn, "q", "x", "k").await;
    assert!(matches!(
        conn.delete_exchange("x", DeleteExchangeOptions::if_unused())
            .await,
        Err(Error::PreconditionFailed(_))
    ));
    // The consumer took the message (auto-ack off, then dropped: requeued).
    assert_eq!(
        conn.delete_queue("q", DeleteQueueOptions::default())
            .await
            .unwrap(),
        1
    );
    assert_eq!(b.queue_depth("q"), None);
    // The queue's bindings went with it.
    conn.delete_exchange("x", DeleteExchangeOptions::if_unused())
        .await
        .unwrap();
}

async fn routed(
    conn: &bus_local::LocalConnection,
    b: &bus_local::LocalBroker,
    queues: &[&str],
) -> Vec<usize> {
    let _ = conn;
    queues.iter().map(|q| b.queue_depth(q).unwrap()).collect()
}

#[tokio::test(start_paused = true)]
async fn direct_fanout_and_one_copy_per_queue() {
    let (b, conn) = setup();
    exchange(&conn, "d", ExchangeKind::Direct).await;
    exchange(&conn, "f", ExchangeKind::Fanout).await;
    for q in ["q1", "q2"] {
        queue(&conn, q).await;
    }
    bind(&conn, "q1", "d", "a").await;
    bind(&conn, "q1", "d", "a").await;
    bind(&conn, "q1", "d", "b").await;
    bind(&conn, "q2", "d", "b").await;
    bind(&conn, "q1", "f", "").await;
    bind(&conn, "q2", "f", "ignored").await;
    conn.publish("d", "a", Message::new("1"), PublishOptions::default())
        .await
        .unwrap();
    assert_eq!(routed(&conn, &b, &["q1", "q2"]).await, vec![1, 0]);
    conn.publish("d", "b", Message::new("2"), PublishOptions::default())
        .await
        .unwrap();
    assert_eq!(routed(&conn, &b, &["q1", "q2"]).await, vec![2, 1]);
    conn.publish("f", "zzz", Message::new("3"), PublishOptions::default())
        .await
        .unwrap();
    assert_eq!(routed(&conn, &b, &["q1", "q2"]).await, vec![3, 2]);
    conn.unbind_queue("q1", "d", "b", FieldTable::new())
        .await
        .unwrap();
    conn.publish("d", "b", Message::new("4"), PublishOptions::default())
        .await
        .unwrap();
    assert_eq!(routed(&conn, &b, &["q1", "q2"]).await, vec![3, 3]);
}

#[tokio::test(start_paused = true)]
async fn topic_patterns() {
    let (b, conn) = setup();
    exchange(&conn, "t", ExchangeKind::Topic).await;
    let cases: &[(&str, &[&str], &[&str])] = &[
        ("#", &["", "a", "a.b.c"], &[]),
        ("a.#", &["a", "a.b", "a.b.c"], &["b", "ab"]),
        ("#.a", &["a", "x.a", "x.y.a"], &["a.x"]),
        ("a.*.c", &["a.b.c", "a..c"], &["a.c", "a.b.b.c"]),
        ("*", &["a", ""][..1], &["a.b", "", "."]),
        ("a..b", &["a..b"], &["a.b", "a.x.b"]),
        ("#.#", &["", "a.b"], &[]),
        ("a.*", &["a."], &["a"]),
        ("a.#.b", &["a.b", "a.x.y.b"], &["a.x.c"]),
    ];
    for (i, (pattern, hits, misses)) in cases.iter().enumerate() {
        let q = format!("q{i}");
        queue(&conn, &q).await;
        bind(&conn, &q, "t", pattern).await;
        let mut expected = 0;
        for key in *hits {
            conn.publish("t", key, Message::new("m"), PublishOptions::default())
                .await
                .unwrap();
            expected += 1;
        }
        for key in *misses {
            conn.publish("t", key, Message::new("m"), PublishOptions::default())
                .await
                .unwrap();
        }
        // Other queues bound earlier may have taken some; this one must
        // have exactly its hits.
        let _ = expected;
        conn.purge_queue(&q).await.unwrap();
        for key in *hits {
            conn.publish("t", key, Message::new("m"), PublishOptions::default())
                .await
                .unwrap();
            assert_eq!(b.queue_depth(&q), Some(1), "{pattern} should match {key:?}");
            conn.purge_queue(&q).await.unwrap();
        }
        for key in *misses {
            conn.publish("t", key, Message::new("m"), PublishOptions::default())
                .await
                .unwrap();
            assert_eq!(
                b.queue_depth(&q),
                Some(0),
                "{pattern} should not match {key:?}"
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn headers_matching() {
    let (b, conn) = setup();
    exchange(&conn, "h", ExchangeKind::Headers).await;
    for q in ["all", "any", "allx"] {
        queue(&conn, q).await;
    }
    let args = |mode: &str| -> FieldTable {
        [
            ("x-match".to_string(), FieldValue::from(mode)),
            ("format".to_string(), FieldValue::from("pdf")),
            ("type".to_string(), FieldValue::from("report")),
        ]
        .into()
    };
    conn.bind_queue("all", "h", "", args("all")).await.unwrap();
    conn.bind_queue("any", "h", "", args("any")).await.unwrap();
    let mut allx = args("all-with-x");
    allx.insert("x-tenant".into(), FieldValue::from("t1"));
    conn.bind_queue("allx", "h", "", allx).await.unwrap();
    let publish = |headers: Vec<(&str, FieldValue)>| {
        let m = Message::new("m").with_headers(
            headers
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        );
        let conn = conn.clone();
        async move {
            conn.publish("h", "", m, PublishOptions::default())
                .await
                .unwrap()
        }
    };
    publish(vec![("format", "pdf".into()), ("type", "report".into())]).await;
    publish(vec![("format", "pdf".into())]).await;
    // Types must match: an integer is not a string.
    publish(vec![("format", FieldValue::I32(1)), ("type", 1i32.into())]).await;
    publish(vec![
        ("format", "pdf".into()),
        ("type", "report".into()),
        ("x-tenant", "t1".into()),
    ])
    .await;
    assert_eq!(
        routed(&conn, &b, &["all", "any", "allx"]).await,
        vec![2, 3, 1]
    );
    let bad: FieldTable = [("x-match".to_string(), FieldValue::from("some"))].into();
    assert!(matches!(
        conn.bind_queue("all", "h", "", bad).await,
        Err(Error::PreconditionFailed(_))
    ));
}

#[tokio::test(start_paused = true)]
async fn publish_errors() {
    let (b, conn) = setup();
    let e = conn
        .publish("nope", "k", Message::new("m"), PublishOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::NotFound(_)), "{e}");
    let e = conn
        .publish(
            "amq.direct",
            "nowhere",
            Message::new("back").with_header("h", 1i32),
            PublishOptions::mandatory(),
        )
        .await
        .unwrap_err();
    match e {
        Error::Unroutable {
            exchange,
            routing_key,
            message,
        } => {
            assert_eq!(exchange, "amq.direct");
            assert_eq!(routing_key, "nowhere");
            assert_eq!(&message.body[..], b"back");
            assert_eq!(message.properties.headers["h"], FieldValue::I32(1));
        }
        other => panic!("{other}"),
    }
    // Not mandatory: dropped silently.
    conn.publish(
        "amq.direct",
        "nowhere",
        Message::new("m"),
        PublishOptions::default(),
    )
    .await
    .unwrap();
    queue(&conn, "q").await;
    let mut m = Message::new("m");
    m.properties.expiration = Some("soon".into());
    let e = conn
        .publish("", "q", m, PublishOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::PreconditionFailed(_)), "{e}");
    assert_eq!(b.queue_depth("q"), Some(0));
    conn.declare_exchange(
        "internal",
        ExchangeKind::Fanout,
        ExchangeOptions::default().with_internal(true),
    )
    .await
    .unwrap();
    assert!(matches!(
        conn.publish("internal", "", Message::new("m"), PublishOptions::default())
            .await,
        Err(Error::AccessRefused(_))
    ));
}

#[tokio::test(start_paused = true)]
async fn cc_and_bcc_route_and_bcc_is_hidden() {
    let (_b, conn) = setup();
    for q in ["a", "b", "c"] {
        queue(&conn, q).await;
    }
    let m = Message::new("m")
        .with_header("CC", vec![FieldValue::from("b")])
        .with_header("BCC", vec![FieldValue::from("c")]);
    conn.publish("", "a", m, PublishOptions::default())
        .await
        .unwrap();
    let e = conn
        .publish(
            "",
            "a",
            Message::new("m").with_header("CC", "b"),
            PublishOptions::default(),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, Error::PreconditionFailed(_)), "{e}");
    for q in ["a", "b", "c"] {
        let mut c = consume(&conn, q, 1).await;
        let d = next(&mut c).await;
        assert_eq!(d.routing_key, "a");
        assert!(d.message.properties.headers.contains_key("CC"));
        assert!(!d.message.properties.headers.contains_key("BCC"));
    }
}

#[tokio::test(start_paused = true)]
async fn alternate_exchange_takes_unrouted_messages() {
    let (b, conn) = setup();
    exchange(&conn, "ae", ExchangeKind::Fanout).await;
    queue(&conn, "unrouted").await;
    bind(&conn, "unrouted", "ae", "").await;
    conn.declare_exchange(
        "main",
        ExchangeKind::Direct,
        ExchangeOptions::default()
            .with_arguments([("alternate-exchange".to_string(), FieldValue::from("ae"))].into()),
    )
    .await
    .unwrap();
    conn.publish("main", "k", Message::new("m"), PublishOptions::mandatory())
        .await
        .unwrap();
    assert_eq!(b.queue_depth("unrouted"), Some(1));
}

#[tokio::test(start_paused = true)]
async fn auto_delete_exchange_goes_with_its_last_binding() {
    let (_b, conn) = setup();
    conn.declare_exchange(
        "ad",
        ExchangeKind::Direct,
        ExchangeOptions::default().with_auto_delete(true),
    )
    .await
    .unwrap();
    queue(&conn, "q").await;
    bind(&conn, "q", "ad", "k").await;
    conn.unbind_queue("q", "ad", "k", FieldTable::new())
        .await
        .unwrap();
    assert!(!conn.exchange_exists("ad").await.unwrap());
}
