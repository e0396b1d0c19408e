//! Small helpers the cases share: receiving under a bound, declaring fresh
//! entities, checking a queue's exact contents, cleaning up.

use std::time::Duration;

use futures::StreamExt;

use super::{fresh_name, Harness};
use crate::{
    Connection, ConnectionExt, ConsumeOptions, Consumer, DeleteExchangeOptions, DeleteQueueOptions,
    Delivery, Error, ExchangeKind, ExchangeOptions, Message, PublishOptions, QueueOptions,
};

/// The longest any case waits for one event (a delivery, an expiry, a queue
/// going away) before failing. Generous, because on a real broker it is only
/// reached when the behaviour is broken.
pub const WAIT: Duration = Duration::from_secs(10);

/// Asserts that an expression failed with the given [`Error`] pattern,
/// naming the operation in the panic message otherwise.
macro_rules! expect_err {
    ($what:expr, $result:expr, $pattern:pat) => {
        match $result {
            Err(e @ $pattern) => e,
            Err(other) => panic!(
                "{}: expected {}, got error {other:?}",
                $what,
                stringify!($pattern)
            ),
            Ok(v) => panic!(
                "{}: expected {}, got success {v:?}",
                $what,
                stringify!($pattern)
            ),
        }
    };
}
pub(crate) use expect_err;

/// Prints the not-applicable line and returns `true` when `supported` is
/// false, so a case reads `if not_applicable(..) { return; }`.
pub(crate) fn not_applicable(h: &dyn Harness, supported: bool, case: &str, reason: &str) -> bool {
    if !supported {
        println!(
            "not applicable: {case} on {}: {reason}",
            h.capabilities().name
        );
    }
    !supported
}

/// The next delivery of `consumer`, failing the case if none comes within
/// [`WAIT`], the stream ends or yields an error.
pub(crate) async fn recv(consumer: &mut Consumer, what: &str) -> Delivery {
    match tokio::time::timeout(WAIT, consumer.next()).await {
        Ok(Some(Ok(d))) => d,
        Ok(Some(Err(e))) => panic!("{what}: consumer on {:?} failed: {e:?}", consumer.queue()),
        Ok(None) => panic!("{what}: consumer on {:?} ended", consumer.queue()),
        Err(_) => panic!(
            "{what}: no delivery on {:?} within {WAIT:?}",
            consumer.queue()
        ),
    }
}

/// Receives `n` deliveries and returns their bodies as text.
pub(crate) async fn recv_bodies(consumer: &mut Consumer, n: usize, what: &str) -> Vec<String> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let d = recv(consumer, &format!("{what} (delivery {} of {n})", i + 1)).await;
        out.push(body(&d));
    }
    out
}

/// A delivery's body as text, for comparisons and messages.
pub(crate) fn body(d: &Delivery) -> String {
    String::from_utf8_lossy(&d.message.body).into_owned()
}

/// Publishes a message whose body is `text`, failing the case on error.
pub(crate) async fn publish_text(conn: &dyn Connection, exchange: &str, key: &str, text: &str) {
    publish(conn, exchange, key, Message::new(text.to_owned())).await;
}

/// Publishes a message (confirmed), failing the case on error.
pub(crate) async fn publish(conn: &dyn Connection, exchange: &str, key: &str, message: Message) {
    if let Err(e) = conn
        .publish(exchange, key, message, PublishOptions::default())
        .await
    {
        panic!("publish to exchange {exchange:?} with key {key:?} failed: {e:?}");
    }
}

/// Declares a fresh queue with `options` and returns its name.
pub(crate) async fn queue_with(
    conn: &dyn Connection,
    prefix: &str,
    options: QueueOptions,
) -> String {
    let name = fresh_name(prefix);
    let info = conn
        .declare_queue(&name, options)
        .await
        .unwrap_or_else(|e| panic!("declare queue {name:?}: {e:?}"));
    assert_eq!(info.name, name, "a named declaration reports its own name");
    name
}

/// Declares a fresh plain queue and returns its name.
pub(crate) async fn queue(conn: &dyn Connection, prefix: &str) -> String {
    queue_with(conn, prefix, QueueOptions::default()).await
}

/// Declares a fresh exchange of `kind` and returns its name.
pub(crate) async fn exchange(conn: &dyn Connection, prefix: &str, kind: ExchangeKind) -> String {
    let name = fresh_name(prefix);
    conn.declare_exchange(&name, kind.clone(), ExchangeOptions::default())
        .await
        .unwrap_or_else(|e| panic!("declare {kind} exchange {name:?}: {e:?}"));
    name
}

/// Binds, failing the case on error.
pub(crate) async fn bind(conn: &dyn Connection, queue: &str, exchange: &str, key: &str) {
    bind_with(conn, queue, exchange, key, crate::FieldTable::new()).await;
}

/// Binds with arguments, failing the case on error.
pub(crate) async fn bind_with(
    conn: &dyn Connection,
    queue: &str,
    exchange: &str,
    key: &str,
    arguments: crate::FieldTable,
) {
    conn.bind_queue(queue, exchange, key, arguments.clone())
        .await
        .unwrap_or_else(|e| {
            panic!("bind {queue:?} to {exchange:?} with {key:?} {arguments:?}: {e:?}")
        });
}

/// Starts a consumer, failing the case on error.
pub(crate) async fn consume(
    conn: &dyn Connection,
    queue: &str,
    options: ConsumeOptions,
) -> Consumer {
    conn.consume(queue, options)
        .await
        .unwrap_or_else(|e| panic!("consume from {queue:?}: {e:?}"))
}

/// Asserts that `queue` holds exactly `expected` (bodies, in this order) and
/// nothing else, consuming them.
///
/// Nothing else: after the expected bodies a marker is published to the
/// queue through the default exchange, and it must be the very next delivery.
/// This needs no message count and no waiting for something not to happen.
pub(crate) async fn expect_bodies(conn: &dyn Connection, queue: &str, expected: &[&str]) {
    expect_bodies_of(conn, queue, expected, "").await;
}

/// [`expect_bodies`], with `label` (what the queue stands for) leading every
/// failure message.
pub(crate) async fn expect_bodies_of(
    conn: &dyn Connection,
    queue: &str,
    expected: &[&str],
    label: &str,
) {
    let mut consumer = consume(conn, queue, ConsumeOptions::auto_ack()).await;
    let what = format!(
        "{label}{}queue {queue:?} should hold exactly {expected:?}",
        if label.is_empty() { "" } else { ": " }
    );
    let got = recv_bodies(&mut consumer, expected.len(), &what).await;
    assert_eq!(got, expected, "{what}");
    let marker = fresh_name("marker");
    publish_text(conn, "", queue, &marker).await;
    let next = recv(&mut consumer, &format!("{what}; the marker behind them")).await;
    assert_eq!(
        body(&next),
        marker,
        "{what}, but after them it also held {:?}",
        body(&next)
    );
    consumer
        .cancel()
        .await
        .unwrap_or_else(|e| panic!("cancel consumer on {queue:?}: {e:?}"));
}

/// Asserts the ready-message count of a queue (a passive declaration).
pub(crate) async fn expect_depth(conn: &dyn Connection, queue: &str, expected: u32, what: &str) {
    let info = conn
        .inspect_queue(queue)
        .await
        .unwrap_or_else(|e| panic!("{what}: inspect queue {queue:?}: {e:?}"));
    assert_eq!(
        info.message_count, expected,
        "{what}: ready messages in {queue:?}"
    );
}

/// Waits until a queue no longer exists, checking every `every` (a check may
/// count as use of the queue, so it must be spaced out for expiry), failing
/// after [`WAIT`].
pub(crate) async fn until_queue_gone(
    conn: &dyn Connection,
    queue: &str,
    every: Duration,
    what: &str,
) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match conn.inspect_queue(queue).await {
            Err(Error::NotFound(_)) => return,
            // Another connection's exclusive queue answers "locked" while it
            // still exists.
            Ok(_) | Err(Error::ResourceLocked(_)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(every).await
            }
            Ok(info) => panic!("{what}: queue {queue:?} still exists after {WAIT:?}: {info:?}"),
            Err(e @ Error::ResourceLocked(_)) => {
                panic!("{what}: queue {queue:?} still exists after {WAIT:?}: {e:?}")
            }
            Err(e) => panic!("{what}: inspect queue {queue:?}: {e:?}"),
        }
    }
}

/// Deletes what a case created. Failures are reported: a case that cannot
/// clean up has found a bug too.
pub(crate) async fn cleanup(conn: &dyn Connection, queues: &[&str], exchanges: &[&str]) {
    for q in queues {
        conn.delete_queue(q, DeleteQueueOptions::default())
            .await
            .unwrap_or_else(|e| panic!("cleanup: delete queue {q:?}: {e:?}"));
    }
    for x in exchanges {
        conn.delete_exchange(x, DeleteExchangeOptions::default())
            .await
            .unwrap_or_else(|e| panic!("cleanup: delete exchange {x:?}: {e:?}"));
    }
}

/// Waits until an exchange no longer exists, checking every `every`,
/// failing after [`WAIT`].
pub(crate) async fn until_exchange_gone(
    conn: &dyn Connection,
    exchange: &str,
    every: Duration,
    what: &str,
) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match conn.exchange_exists(exchange).await {
            Ok(false) => return,
            Ok(true) if tokio::time::Instant::now() < deadline => tokio::time::sleep(every).await,
            Ok(true) => panic!("{what}: exchange {exchange:?} still exists after {WAIT:?}"),
            Err(e) => panic!("{what}: check exchange {exchange:?}: {e:?}"),
        }
    }
}
