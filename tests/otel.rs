//! With feature `otel`, a plain `Connection::publish` made inside a span
//! carries that span's W3C trace context, on every transport (RabbitMQ at
//! `AMQP_ADDR` included), and a `traceparent` the caller set is kept.
#![cfg(feature = "otel")]

use bus::otel::{self, TRACEPARENT_HEADER};
use bus::{
    Connection, ConsumeOptions, DeleteQueueOptions, FieldValue, Message, PublishOptions,
    QueueOptions,
};
use futures::StreamExt;
use opentelemetry::trace::{TraceContextExt, TracerProvider};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

fn amqp_addr() -> String {
    std::env::var("AMQP_ADDR").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn traceparent(message: &Message) -> Option<String> {
    message
        .properties
        .headers
        .get(TRACEPARENT_HEADER)
        .and_then(FieldValue::as_str)
        .map(str::to_owned)
}

async fn plain_publish_carries_the_span(url: &str) {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("bus-tests")));
    let _guard = tracing::subscriber::set_default(subscriber);

    let conn = bus::connect(url)
        .await
        .unwrap_or_else(|e| panic!("connect to {}: {e}", bus::redact_url(url)));
    let q = format!("otel-publish.{}", uuid::Uuid::new_v4().simple());
    conn.declare_queue(&q, QueueOptions::default())
        .await
        .unwrap();
    let theirs = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let span = tracing::info_span!("producer");
    let trace_id = span.context().span().span_context().trace_id();
    {
        let _entered = span.enter();
        Connection::publish(
            &*conn,
            "",
            &q,
            Message::new("plain"),
            PublishOptions::default(),
        )
        .await
        .unwrap();
        let mut own = Message::new("own");
        own.properties
            .headers
            .insert(TRACEPARENT_HEADER.into(), FieldValue::String(theirs.into()));
        Connection::publish(&*conn, "", &q, own, PublishOptions::default())
            .await
            .unwrap();
    }
    // Outside any span: nothing is written.
    Connection::publish(
        &*conn,
        "",
        &q,
        Message::new("untraced"),
        PublishOptions::default(),
    )
    .await
    .unwrap();

    let mut consumer = conn.consume(&q, ConsumeOptions::auto_ack()).await.unwrap();
    let mut received = Vec::new();
    for _ in 0..3 {
        let d = tokio::time::timeout(std::time::Duration::from_secs(30), consumer.next())
            .await
            .expect("a delivery within 30 s")
            .expect("the stream goes on")
            .expect("a delivery");
        received.push(d);
    }
    let [plain, own, untraced] = <[_; 3]>::try_from(received).unwrap();
    assert_eq!(&plain.message.body[..], b"plain");
    let cx = otel::extract(&plain.message.properties.headers)
        .unwrap_or_else(|| panic!("{url}: no trace context on a plain publish"));
    assert_eq!(cx.span().span_context().trace_id(), trace_id, "{url}");
    assert_eq!(traceparent(&own.message).as_deref(), Some(theirs), "{url}");
    assert_eq!(traceparent(&untraced.message), None, "{url}");
    drop(consumer);
    conn.delete_queue(&q, DeleteQueueOptions::default())
        .await
        .unwrap();
    conn.close().await.unwrap();
}

#[tokio::test]
async fn in_memory() {
    plain_publish_carries_the_span("memory://otel-publish").await;
}

#[cfg(feature = "file")]
#[tokio::test]
async fn on_a_folder() {
    let dir = tempfile::tempdir().unwrap();
    plain_publish_carries_the_span(&format!("file://{}", dir.path().display())).await;
}

#[cfg(feature = "amqp")]
#[tokio::test]
async fn on_rabbitmq() {
    plain_publish_carries_the_span(&amqp_addr()).await;
}
