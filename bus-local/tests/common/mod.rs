#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use bus_core::{
    Connection, ConsumeOptions, Consumer, Delivery, ExchangeKind, ExchangeOptions, FieldTable,
    Message, QueueOptions,
};
use bus_local::{LocalBroker, LocalConnection};
use futures::StreamExt;

pub fn setup() -> (LocalBroker, LocalConnection) {
    let broker = LocalBroker::new();
    let conn = broker.connect();
    (broker, conn)
}

/// The next delivery; fails the test if none comes within a (virtual)
/// second.
pub async fn next(c: &mut Consumer) -> Delivery {
    tokio::time::timeout(Duration::from_secs(1), c.next())
        .await
        .expect("a delivery within a second")
        .expect("the stream is open")
        .expect("no error")
}

/// Asserts that no delivery arrives within a (virtual) second.
pub async fn nothing(c: &mut Consumer) {
    if let Ok(Some(d)) = tokio::time::timeout(Duration::from_secs(1), c.next()).await {
        panic!(
            "unexpected delivery {:?}",
            d.map(|d| d.message.body.clone())
        );
    }
}

/// Asserts the stream has ended.
pub async fn ended(c: &mut Consumer) {
    let r = tokio::time::timeout(Duration::from_secs(1), c.next())
        .await
        .expect("the stream ends");
    assert!(r.is_none(), "the stream ended");
}

pub fn body(d: &Delivery) -> String {
    String::from_utf8(d.message.body.to_vec()).unwrap()
}

pub async fn queue(conn: &LocalConnection, name: &str) {
    conn.declare_queue(name, QueueOptions::default())
        .await
        .unwrap();
}

pub async fn queue_with(conn: &LocalConnection, name: &str, options: QueueOptions) {
    conn.declare_queue(name, options).await.unwrap();
}

pub async fn exchange(conn: &LocalConnection, name: &str, kind: ExchangeKind) {
    conn.declare_exchange(name, kind, ExchangeOptions::default())
        .await
        .unwrap();
}

pub async fn bind(conn: &LocalConnection, queue: &str, exchange: &str, key: &str) {
    conn.bind_queue(queue, exchange, key, FieldTable::new())
        .await
        .unwrap();
}

pub async fn send(conn: &LocalConnection, queue: &str, body: &str) {
    conn.publish("", queue, Message::new(body.to_owned()), Default::default())
        .await
        .unwrap();
}

pub async fn consume(conn: &LocalConnection, queue: &str, prefetch: u16) -> Consumer {
    conn.consume(queue, ConsumeOptions::prefetch(prefetch))
        .await
        .unwrap()
}
