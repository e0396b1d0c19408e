//! Routing: the default, direct, fanout, topic and headers exchanges, one
//! copy per queue, unroutable and mandatory messages.

use super::support::{
    bind, bind_with, cleanup, consume, exchange, expect_bodies, expect_bodies_of, expect_err,
    not_applicable, publish, publish_text, queue, recv,
};
use super::{fresh_name, Harness};
use crate::{
    Bytes, Connection, ConsumeOptions, Error, ExchangeKind, FieldTable, FieldValue, Message,
    PublishOptions, Requeue,
};

/// Binds one fresh queue per pattern to a fresh exchange of `kind`,
/// publishes one message per key (its body is the key), and checks that each
/// queue holds exactly the keys expected for its pattern, in publish order.
async fn check_routes(
    conn: &dyn Connection,
    kind: ExchangeKind,
    keys: &[&str],
    expected: &[(&str, &[&str])],
) {
    let x = exchange(conn, "routes", kind.clone()).await;
    let mut queues = Vec::new();
    for (pattern, _) in expected {
        let q = queue(conn, "routes").await;
        bind(conn, &q, &x, pattern).await;
        queues.push(q);
    }
    for key in keys {
        publish_text(conn, &x, key, key).await;
    }
    for (q, (pattern, want)) in queues.iter().zip(expected) {
        let label = format!("{kind} binding {pattern:?}");
        expect_bodies_of(conn, q, &in_publish_order(want, keys), &label).await;
    }
    let names: Vec<&str> = queues.iter().map(String::as_str).collect();
    cleanup(conn, &names, &[&x]).await;
}

/// Sorts `bodies` into the order of `order` (the publish order).
fn in_publish_order<'a>(bodies: &[&'a str], order: &[&str]) -> Vec<&'a str> {
    let mut v = bodies.to_vec();
    v.sort_by_key(|b| order.iter().position(|k| k == b));
    v
}

/// A table from `(name, value)` pairs.
fn table(entries: &[(&str, FieldValue)]) -> FieldTable {
    entries
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

/// Binds one fresh queue per binding (named for the failure message) with
/// its arguments to a fresh headers exchange, publishes each named message
/// with its headers (the body is its name, the routing key varies), and
/// checks that each queue holds exactly the expected messages.
async fn check_headers(
    conn: &dyn Connection,
    messages: &[(&str, FieldTable)],
    bindings: &[(&str, FieldTable, &[&str])],
) {
    let x = exchange(conn, "headers", ExchangeKind::Headers).await;
    let mut queues = Vec::new();
    for (_, args, _) in bindings {
        let q = queue(conn, "headers").await;
        bind_with(conn, &q, &x, "", args.clone()).await;
        queues.push(q);
    }
    for (i, (name, headers)) in messages.iter().enumerate() {
        let msg = Message::new(name.to_string()).with_headers(headers.clone());
        publish(conn, &x, &format!("key-{i}"), msg).await;
    }
    let order: Vec<&str> = messages.iter().map(|(n, _)| *n).collect();
    for (q, (label, args, want)) in queues.iter().zip(bindings) {
        let label = format!("headers binding {label} {args:?}");
        expect_bodies_of(conn, q, &in_publish_order(want, &order), &label).await;
    }
    let names: Vec<&str> = queues.iter().map(String::as_str).collect();
    cleanup(conn, &names, &[&x]).await;
}

fn headers_supported(h: &dyn Harness, case: &str) -> bool {
    !not_applicable(
        h,
        h.capabilities().headers_exchange,
        case,
        "no headers exchange",
    )
}

/// The default exchange delivers to the queue whose name is the routing
/// key, and to no other.
pub async fn default_exchange_routes_by_queue_name(h: &dyn Harness) {
    let conn = h.connect().await;
    let a = queue(&*conn, "default-a").await;
    let b = queue(&*conn, "default-b").await;
    publish_text(&*conn, "", &a, "for a").await;
    publish_text(&*conn, "", &fresh_name("nobody"), "for nobody").await;
    publish_text(&*conn, "", &b, "for b").await;
    expect_bodies(&*conn, &a, &["for a"]).await;
    expect_bodies(&*conn, &b, &["for b"]).await;
    cleanup(&*conn, &[&a, &b], &[]).await;
}

/// A direct exchange routes on exact, case-sensitive routing-key equality,
/// to every queue bound with that key.
pub async fn direct_routes_on_exact_key(h: &dyn Harness) {
    let conn = h.connect().await;
    check_routes(
        &*conn,
        ExchangeKind::Direct,
        &["a.b", "A.b", "a", "a.b.c", "", "a.*", "#"],
        &[
            ("a.b", &["a.b"]),
            ("a.b", &["a.b"]),
            ("A.b", &["A.b"]),
            ("a", &["a"]),
            ("", &[""]),
            ("a.*", &["a.*"]),
            ("#", &["#"]),
        ],
    )
    .await;
}

/// A fanout exchange delivers to every bound queue whatever the routing key
/// and binding key.
pub async fn fanout_ignores_the_routing_key(h: &dyn Harness) {
    let conn = h.connect().await;
    let keys = ["x", "y", ""];
    check_routes(
        &*conn,
        ExchangeKind::Fanout,
        &keys,
        &[("x", &keys), ("", &keys), ("#", &keys)],
    )
    .await;
}

/// Topic: `#` matches every key, the empty one included.
pub async fn topic_hash_matches_every_key(h: &dyn Harness) {
    let conn = h.connect().await;
    let keys = ["", "a", "a.b", "a.b.c", ".", "a..b"];
    check_routes(&*conn, ExchangeKind::Topic, &keys, &[("#", &keys)]).await;
}

/// Topic: `a.#` matches `a` itself (`#` matching zero words) and every key
/// whose first word is `a`, but not `ab` or `b.a`.
pub async fn topic_hash_suffix_matches_zero_words(h: &dyn Harness) {
    let conn = h.connect().await;
    check_routes(
        &*conn,
        ExchangeKind::Topic,
        &["a", "a.b", "a.b.c", "a.", "ab", "b.a", ""],
        &[("a.#", &["a", "a.b", "a.b.c", "a."])],
    )
    .await;
}

/// Topic: `#.a` matches `a` itself and every key whose last word is `a`.
pub async fn topic_hash_prefix_matches_zero_words(h: &dyn Harness) {
    let conn = h.connect().await;
    check_routes(
        &*conn,
        ExchangeKind::Topic,
        &["a", "b.a", "c.b.a", ".a", "a.b", "ba", ""],
        &[("#.a", &["a", "b.a", "c.b.a", ".a"])],
    )
    .await;
}

/// Topic: `*` matches exactly one word: `a.*.c` matches `a.b.c` but not
/// `a.c` or `a.b.b.c`; `a.*` does not match `a`.
pub async fn topic_star_matches_exactly_one_word(h: &dyn Harness) {
    let conn = h.connect().await;
    check_routes(
        &*conn,
        ExchangeKind::Topic,
        &["a.b.c", "a.c", "a.b.b.c", "a", "a.b", "a."],
        &[
            ("a.*.c", &["a.b.c"]),
            ("a.*", &["a.c", "a.b", "a."]),
            ("*.*.*", &["a.b.c"]),
        ],
    )
    .await;
}

/// Topic: the empty key has no words: `*` and `#.*` do not match it, `#`
/// and the empty pattern do; the empty pattern matches nothing else.
pub async fn topic_empty_key(h: &dyn Harness) {
    let conn = h.connect().await;
    check_routes(
        &*conn,
        ExchangeKind::Topic,
        &["", "a", "ab", "."],
        &[
            ("*", &["a", "ab"]),
            ("#.*", &["a", "ab", "."]),
            ("", &[""]),
            ("#", &["", "a", "ab", "."]),
        ],
    )
    .await;
}

/// Topic: words may be empty: `a..b` is three words, the middle one empty,
/// matched by `a.*.b` and by `a..b` exactly; `.` is two empty words.
pub async fn topic_empty_words(h: &dyn Harness) {
    let conn = h.connect().await;
    check_routes(
        &*conn,
        ExchangeKind::Topic,
        &["a..b", "a.x.b", "a.b", ".", "..", "a.", ".a"],
        &[
            ("a..b", &["a..b"]),
            ("a.*.b", &["a..b", "a.x.b"]),
            ("*.*", &["a.b", ".", "a.", ".a"]),
            ("*.*.*", &["a..b", "a.x.b", ".."]),
            (".a", &[".a"]),
            ("a.", &["a."]),
        ],
    )
    .await;
}

/// Topic: `#.#` matches everything `#` does, and `a.#.#.c` what `a.#.c`
/// does.
pub async fn topic_double_hash(h: &dyn Harness) {
    let conn = h.connect().await;
    let keys = ["", "a", "a.c", "a.b.c", "a.b.b.c", "b.c"];
    check_routes(
        &*conn,
        ExchangeKind::Topic,
        &keys,
        &[
            ("#.#", &keys),
            ("a.#.#.c", &["a.c", "a.b.c", "a.b.b.c"]),
            ("a.#.c", &["a.c", "a.b.c", "a.b.b.c"]),
        ],
    )
    .await;
}

/// Topic: many patterns against many keys on one exchange, each queue
/// receiving exactly the keys RabbitMQ routes to its pattern.
pub async fn topic_many_patterns_against_many_keys(h: &dyn Harness) {
    let conn = h.connect().await;
    let keys = [
        "", "a", "b", "a.b", "b.a", "a.c", "a.b.c", "a.b.b.c", "a..b", "a.x.b", "ab", ".", "a.",
        ".a", "a.b.c.d", "x.b.y", "a.a", "..", "x.a.y",
    ];
    // Recorded from RabbitMQ 3.10.
    let expected: &[(&str, &[&str])] = &[
        ("#", &keys),
        (
            "a.#",
            &[
                "a", "a.b", "a.c", "a.b.c", "a.b.b.c", "a..b", "a.x.b", "a.", "a.b.c.d", "a.a",
            ],
        ),
        ("#.a", &["a", "b.a", ".a", "a.a"]),
        ("a.*.c", &["a.b.c"]),
        ("*", &["a", "b", "ab"]),
        ("", &[""]),
        ("a..b", &["a..b"]),
        ("a.*.b", &["a..b", "a.x.b"]),
        ("#.#", &keys),
        ("a.#.c", &["a.c", "a.b.c", "a.b.b.c"]),
        ("*.b.#", &["a.b", "a.b.c", "a.b.b.c", "a.b.c.d", "x.b.y"]),
        ("#.b.*", &["b.a", "a.b.c", "a.b.b.c", "x.b.y"]),
        ("a.b.c", &["a.b.c"]),
        ("*.*", &["a.b", "b.a", "a.c", ".", "a.", ".a", "a.a"]),
        ("#.*", &keys[1..]),
        ("*.#", &keys[1..]),
        ("a.#.#.c", &["a.c", "a.b.c", "a.b.b.c"]),
        (
            "#.a.#",
            &[
                "a", "a.b", "b.a", "a.c", "a.b.c", "a.b.b.c", "a..b", "a.x.b", "a.", ".a",
                "a.b.c.d", "a.a", "x.a.y",
            ],
        ),
        ("*.*.*", &["a.b.c", "a..b", "a.x.b", "x.b.y", "..", "x.a.y"]),
        ("a.*", &["a.b", "a.c", "a.", "a.a"]),
        (".a", &[".a"]),
        ("a.", &["a."]),
    ];
    check_routes(&*conn, ExchangeKind::Topic, &keys, expected).await;
}

/// The headers messages the headers cases publish, by name.
fn header_messages() -> Vec<(&'static str, FieldTable)> {
    let s = |v: &str| FieldValue::from(v);
    vec![
        ("none", table(&[])),
        ("a1", table(&[("a", FieldValue::I32(1))])),
        ("a2", table(&[("a", FieldValue::I32(2))])),
        ("bx", table(&[("b", s("x"))])),
        ("a1-bx", table(&[("a", FieldValue::I32(1)), ("b", s("x"))])),
        (
            "a1-bx-c3",
            table(&[
                ("a", FieldValue::I32(1)),
                ("b", s("x")),
                ("c", FieldValue::I32(3)),
            ]),
        ),
        ("xfoo", table(&[("x-foo", s("bar"))])),
        (
            "xfoo-a1",
            table(&[("x-foo", s("bar")), ("a", FieldValue::I32(1))]),
        ),
        ("a-str1", table(&[("a", s("1"))])),
        ("a-true", table(&[("a", FieldValue::Bool(true))])),
        ("a-void", table(&[("a", FieldValue::Void)])),
    ]
}

/// Headers: `x-match = all` (also the default when absent) routes a message
/// only if every binding argument is present in its headers with an equal
/// value; extra headers do not matter.
pub async fn headers_all_needs_every_argument(h: &dyn Harness) {
    if !headers_supported(h, "headers_all_needs_every_argument") {
        return;
    }
    let conn = h.connect().await;
    check_headers(
        &*conn,
        &header_messages(),
        &[
            (
                "all a=1 b=x",
                table(&[
                    ("x-match", "all".into()),
                    ("a", FieldValue::I32(1)),
                    ("b", "x".into()),
                ]),
                &["a1-bx", "a1-bx-c3"],
            ),
            (
                "default a=1",
                table(&[("a", FieldValue::I32(1))]),
                &["a1", "a1-bx", "a1-bx-c3", "xfoo-a1"],
            ),
        ],
    )
    .await;
}

/// Headers: `x-match = any` routes a message if at least one binding
/// argument is present with an equal value.
pub async fn headers_any_needs_one_argument(h: &dyn Harness) {
    if !headers_supported(h, "headers_any_needs_one_argument") {
        return;
    }
    let conn = h.connect().await;
    check_headers(
        &*conn,
        &header_messages(),
        &[(
            "any a=1 b=x",
            table(&[
                ("x-match", "any".into()),
                ("a", FieldValue::I32(1)),
                ("b", "x".into()),
            ]),
            &["a1", "bx", "a1-bx", "a1-bx-c3", "xfoo-a1"],
        )],
    )
    .await;
}

/// Headers: under `all` and `any`, binding arguments whose names start with
/// `x-` take no part: `all` with nothing else matches every message, `any`
/// with nothing else matches none.
pub async fn headers_ignore_x_arguments(h: &dyn Harness) {
    if !headers_supported(h, "headers_ignore_x_arguments") {
        return;
    }
    let conn = h.connect().await;
    let messages = header_messages();
    let every: Vec<&str> = messages.iter().map(|(n, _)| *n).collect();
    check_headers(
        &*conn,
        &messages,
        &[
            (
                "all x-foo=bar a=1",
                table(&[
                    ("x-match", "all".into()),
                    ("x-foo", "bar".into()),
                    ("a", FieldValue::I32(1)),
                ]),
                &["a1", "a1-bx", "a1-bx-c3", "xfoo-a1"],
            ),
            (
                "any x-foo=bar",
                table(&[("x-match", "any".into()), ("x-foo", "bar".into())]),
                &[],
            ),
            (
                "all, nothing else",
                table(&[("x-match", "all".into())]),
                &every,
            ),
            (
                "any, nothing else",
                table(&[("x-match", "any".into())]),
                &[],
            ),
        ],
    )
    .await;
}

/// Headers: `all-with-x` and `any-with-x` (RabbitMQ 3.10) match the `x-`
/// arguments too.
pub async fn headers_with_x_match_x_arguments(h: &dyn Harness) {
    if !headers_supported(h, "headers_with_x_match_x_arguments") {
        return;
    }
    let conn = h.connect().await;
    check_headers(
        &*conn,
        &header_messages(),
        &[
            (
                "all-with-x x-foo=bar",
                table(&[("x-match", "all-with-x".into()), ("x-foo", "bar".into())]),
                &["xfoo", "xfoo-a1"],
            ),
            (
                "all-with-x x-foo=bar a=1",
                table(&[
                    ("x-match", "all-with-x".into()),
                    ("x-foo", "bar".into()),
                    ("a", FieldValue::I32(1)),
                ]),
                &["xfoo-a1"],
            ),
            (
                "any-with-x x-foo=bar a=2",
                table(&[
                    ("x-match", "any-with-x".into()),
                    ("x-foo", "bar".into()),
                    ("a", FieldValue::I32(2)),
                ]),
                &["a2", "xfoo", "xfoo-a1"],
            ),
        ],
    )
    .await;
}

/// Headers: a value matches only a value of the same kind: the string `"1"`
/// is not the integer `1`, and `true` is neither.
pub async fn headers_value_types_must_match(h: &dyn Harness) {
    if !headers_supported(h, "headers_value_types_must_match") {
        return;
    }
    let conn = h.connect().await;
    check_headers(
        &*conn,
        &header_messages(),
        &[
            ("a=\"1\"", table(&[("a", "1".into())]), &["a-str1"]),
            (
                "a=true",
                table(&[("a", FieldValue::Bool(true))]),
                &["a-true"],
            ),
            (
                "a=1",
                table(&[("a", FieldValue::I32(1))]),
                &["a1", "a1-bx", "a1-bx-c3", "xfoo-a1"],
            ),
        ],
    )
    .await;
}

/// Headers: numbers compare by value whatever their width or type, as
/// RabbitMQ compares them: an `I64` 1 binding matches `I32`, `U8`, `I16`
/// and `F64` ones, a timestamp 5 matches the integer 5, an `F32` 1.5 the
/// `F64` 1.5; a string and a byte array with the same content match.
pub async fn headers_numbers_compare_by_value(h: &dyn Harness) {
    if !headers_supported(h, "headers_numbers_compare_by_value") {
        return;
    }
    let conn = h.connect().await;
    let one = |name, v| (name, table(&[("a", v)]));
    let messages = vec![
        one("i32-1", FieldValue::I32(1)),
        one("u8-1", FieldValue::U8(1)),
        one("i16-1", FieldValue::I16(1)),
        one("i64-1", FieldValue::I64(1)),
        one("f64-1", FieldValue::F64(1.0)),
        one("i32-2", FieldValue::I32(2)),
        one("i8-minus1", FieldValue::I8(-1)),
        one("ts-5", FieldValue::Timestamp(5)),
        one("f64-1.5", FieldValue::F64(1.5)),
        one("str-abc", FieldValue::from("abc")),
        one("bytes-abc", FieldValue::Bytes(Bytes::from_static(b"abc"))),
        one("str-1", FieldValue::from("1")),
    ];
    check_headers(
        &*conn,
        &messages,
        &[
            (
                "a=I64 1",
                table(&[("a", FieldValue::I64(1))]),
                &["i32-1", "u8-1", "i16-1", "i64-1", "f64-1"],
            ),
            (
                "a=U8 1",
                table(&[("a", FieldValue::U8(1))]),
                &["i32-1", "u8-1", "i16-1", "i64-1", "f64-1"],
            ),
            (
                "a=I32 -1",
                table(&[("a", FieldValue::I32(-1))]),
                &["i8-minus1"],
            ),
            ("a=I32 5", table(&[("a", FieldValue::I32(5))]), &["ts-5"]),
            (
                "a=F32 1.5",
                table(&[("a", FieldValue::F32(1.5))]),
                &["f64-1.5"],
            ),
            (
                "a=bytes abc",
                table(&[("a", FieldValue::Bytes(Bytes::from_static(b"abc")))]),
                &["str-abc", "bytes-abc"],
            ),
        ],
    )
    .await;
}

/// Headers: a void binding argument matches the presence of the header,
/// whatever its value; a void header does not equal a value.
pub async fn headers_void_matches_presence(h: &dyn Harness) {
    if !headers_supported(h, "headers_void_matches_presence") {
        return;
    }
    let conn = h.connect().await;
    check_headers(
        &*conn,
        &header_messages(),
        &[
            (
                "a=void",
                table(&[("a", FieldValue::Void)]),
                &[
                    "a1", "a2", "a1-bx", "a1-bx-c3", "xfoo-a1", "a-str1", "a-true", "a-void",
                ],
            ),
            (
                "any a=void b=x",
                table(&[
                    ("x-match", "any".into()),
                    ("a", FieldValue::Void),
                    ("b", "x".into()),
                ]),
                &[
                    "a1", "a2", "bx", "a1-bx", "a1-bx-c3", "xfoo-a1", "a-str1", "a-true", "a-void",
                ],
            ),
            ("a=2", table(&[("a", FieldValue::I32(2))]), &["a2"]),
        ],
    )
    .await;
}

/// Headers: the routing key and the binding key take no part.
pub async fn headers_ignore_the_routing_key(h: &dyn Harness) {
    if !headers_supported(h, "headers_ignore_the_routing_key") {
        return;
    }
    let conn = h.connect().await;
    let x = exchange(&*conn, "headers-key", ExchangeKind::Headers).await;
    let q = queue(&*conn, "headers-key").await;
    bind_with(
        &*conn,
        &q,
        &x,
        "binding-key",
        table(&[("a", FieldValue::I32(1))]),
    )
    .await;
    for (key, a) in [
        ("binding-key", 1),
        ("other", 1),
        ("binding-key", 2),
        ("", 1),
    ] {
        let msg = Message::new(format!("{key}/{a}")).with_header("a", FieldValue::I32(a));
        publish(&*conn, &x, key, msg).await;
    }
    expect_bodies(&*conn, &q, &["binding-key/1", "other/1", "/1"]).await;
    cleanup(&*conn, &[&q], &[&x]).await;
}

/// A message that several bindings of one queue match is delivered to that
/// queue once.
pub async fn one_copy_per_queue(h: &dyn Harness) {
    let conn = h.connect().await;
    let x = exchange(&*conn, "one-copy", ExchangeKind::Topic).await;
    let q = queue(&*conn, "one-copy").await;
    for pattern in ["a.*", "*.b", "#", "a.b"] {
        bind(&*conn, &q, &x, pattern).await;
    }
    publish_text(&*conn, &x, "a.b", "once").await;
    expect_bodies(&*conn, &q, &["once"]).await;
    if h.capabilities().headers_exchange {
        let hx = exchange(&*conn, "one-copy-headers", ExchangeKind::Headers).await;
        bind_with(&*conn, &q, &hx, "", table(&[("a", FieldValue::I32(1))])).await;
        bind_with(&*conn, &q, &hx, "", table(&[("b", "x".into())])).await;
        let msg = Message::new("headers once")
            .with_header("a", FieldValue::I32(1))
            .with_header("b", "x");
        publish(&*conn, &hx, "", msg).await;
        expect_bodies(&*conn, &q, &["headers once"]).await;
        cleanup(&*conn, &[], &[&hx]).await;
    }
    cleanup(&*conn, &[&q], &[&x]).await;
}

/// A message routed to several queues is an independent copy in each:
/// settling it in one queue leaves the others' copies untouched.
pub async fn copies_are_independent(h: &dyn Harness) {
    let conn = h.connect().await;
    let x = exchange(&*conn, "copies", ExchangeKind::Fanout).await;
    let acked = queue(&*conn, "copies-acked").await;
    let dropped = queue(&*conn, "copies-dropped").await;
    let kept = queue(&*conn, "copies-kept").await;
    for q in [&acked, &dropped, &kept] {
        bind(&*conn, q, &x, "").await;
    }
    let msg = Message::new("copy")
        .with_header("h", "v")
        .with_message_id("m-1");
    publish(&*conn, &x, "k", msg.clone()).await;
    let mut c = consume(&*conn, &acked, ConsumeOptions::prefetch(1)).await;
    let d = recv(&mut c, "copy in the first queue").await;
    assert_eq!(d.message, msg, "each copy is the published message");
    d.ack().await.expect("ack");
    let mut c2 = consume(&*conn, &dropped, ConsumeOptions::prefetch(1)).await;
    let d2 = recv(&mut c2, "copy in the second queue").await;
    assert_eq!(d2.message, msg);
    d2.nack(Requeue::No).await.expect("nack without requeue");
    drop((c, c2));
    expect_bodies(&*conn, &kept, &["copy"]).await;
    expect_bodies(&*conn, &acked, &[]).await;
    expect_bodies(&*conn, &dropped, &[]).await;
    cleanup(&*conn, &[&acked, &dropped, &kept], &[&x]).await;
}

/// A message no binding matches is dropped: the publish succeeds, and no
/// queue sees it later, even one bound afterwards.
pub async fn unroutable_is_dropped(h: &dyn Harness) {
    let conn = h.connect().await;
    let x = exchange(&*conn, "unroutable", ExchangeKind::Direct).await;
    let q = queue(&*conn, "unroutable").await;
    publish_text(&*conn, &x, "k", "dropped").await;
    bind(&*conn, &q, &x, "k").await;
    publish_text(&*conn, &x, "k", "routed").await;
    expect_bodies(&*conn, &q, &["routed"]).await;
    cleanup(&*conn, &[&q], &[&x]).await;
}

/// A mandatory message that no queue takes fails with
/// [`Error::Unroutable`], naming the exchange and key and handing the
/// message back unchanged; the connection stays usable.
pub async fn mandatory_unroutable_is_returned(h: &dyn Harness) {
    if not_applicable(
        h,
        h.capabilities().mandatory,
        "mandatory_unroutable_is_returned",
        "mandatory publishes are not reported",
    ) {
        return;
    }
    let conn = h.connect().await;
    let x = exchange(&*conn, "mandatory", ExchangeKind::Direct).await;
    let q = queue(&*conn, "mandatory").await;
    bind(&*conn, &q, &x, "bound").await;
    let msg = Message::new("come back")
        .with_content_type("text/plain")
        .with_header("h", FieldValue::I64(7))
        .with_correlation_id("c-1");
    let err = expect_err!(
        "mandatory publish with an unbound key",
        conn.publish(&x, "unbound", msg.clone(), PublishOptions::mandatory())
            .await,
        Error::Unroutable { .. }
    );
    match err {
        Error::Unroutable {
            exchange,
            routing_key,
            message,
        } => {
            assert_eq!(exchange, x);
            assert_eq!(routing_key, "unbound");
            assert_eq!(*message, msg, "the returned message is the one published");
        }
        _ => unreachable!(),
    }
    let missing = fresh_name("no-such-queue");
    expect_err!(
        "mandatory publish through the default exchange to a missing queue",
        conn.publish("", &missing, msg.clone(), PublishOptions::mandatory())
            .await,
        Error::Unroutable { .. }
    );
    publish_text(&*conn, &x, "bound", "after").await;
    expect_bodies(&*conn, &q, &["after"]).await;
    cleanup(&*conn, &[&q], &[&x]).await;
}

/// A mandatory message that a queue takes is published normally.
pub async fn mandatory_routed_succeeds(h: &dyn Harness) {
    let conn = h.connect().await;
    let q = queue(&*conn, "mandatory-routed").await;
    conn.publish("", &q, Message::new("taken"), PublishOptions::mandatory())
        .await
        .expect("a routable mandatory publish succeeds");
    expect_bodies(&*conn, &q, &["taken"]).await;
    cleanup(&*conn, &[&q], &[]).await;
}

/// Publishing to an exchange that does not exist is `NotFound` (mandatory
/// or not), creates nothing, and leaves the connection usable.
pub async fn publish_to_missing_exchange_is_not_found(h: &dyn Harness) {
    let conn = h.connect().await;
    let missing = fresh_name("missing-exchange");
    for options in [PublishOptions::default(), PublishOptions::mandatory()] {
        expect_err!(
            format!("publish to a missing exchange with {options:?}"),
            conn.publish(&missing, "k", Message::new("lost"), options.clone())
                .await,
            Error::NotFound(_)
        );
    }
    assert!(
        !crate::ConnectionExt::exchange_exists(&*conn, &missing)
            .await
            .expect("passive declare"),
        "publishing does not create the exchange"
    );
    let q = queue(&*conn, "after-not-found").await;
    publish_text(&*conn, "", &q, "still works").await;
    expect_bodies(&*conn, &q, &["still works"]).await;
    cleanup(&*conn, &[&q], &[]).await;
}
