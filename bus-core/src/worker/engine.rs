//! The consume-handle-settle loop every serving component runs: the worker
//! runtime and the RPC server alike.
//!
//! It takes deliveries from one consumer, runs at most `concurrency`
//! handlers at once (one task each), and stops on request: it cancels the
//! consumer, requeues what the transport had sent but nobody started, lets
//! the handlers in hand finish within a deadline, and abandons the rest
//! (their deliveries, dropped unsettled, go back to the queue).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::StreamExt;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::delivery::{Consumer, Delivery};
use crate::error::{Error, Result};
use crate::message::Message;
use crate::transport::Connection;
use crate::Requeue;

/// Handles one delivery, settling it before it resolves.
pub(crate) type Process = Arc<dyn Fn(Delivery) -> BoxFuture<'static, ()> + Send + Sync>;

/// When to stop, and how long handlers in hand may take to finish.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Stop {
    pub(crate) requested: bool,
    /// `None`: wait for every handler in hand, however long it takes.
    pub(crate) deadline: Option<Duration>,
}

/// What the loop did when it stopped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Drained {
    /// Deliveries the transport had sent but no handler had started,
    /// requeued once the consumer was cancelled.
    pub(crate) requeued: u64,
    /// Handlers still running at the deadline: stopped, their deliveries
    /// requeued.
    pub(crate) abandoned: u64,
    /// Handlers that finished during the drain.
    pub(crate) finished: u64,
}

/// Runs the loop until a stop is requested (then `Ok`) or the consumer ends
/// or fails (then the error, after the handlers in hand have finished).
pub(crate) async fn run(
    mut consumer: Consumer,
    concurrency: usize,
    process: Process,
    mut stop: watch::Receiver<Stop>,
) -> (Result<()>, Drained) {
    let permits = Arc::new(Semaphore::new(concurrency));
    let mut handling = JoinSet::new();
    // `wait_for` also returns when the sender is gone: that stops too.
    let ended = loop {
        while handling.try_join_next().is_some() {}
        let permit = tokio::select! {
            biased;
            _ = stop.wait_for(|s| s.requested) => break Ok(()),
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break Ok(()),
            },
        };
        let next = tokio::select! {
            biased;
            _ = stop.wait_for(|s| s.requested) => break Ok(()),
            next = consumer.next() => next,
        };
        match next {
            Some(Ok(delivery)) => {
                let handled = process(delivery);
                handling.spawn(async move {
                    handled.await;
                    drop(permit);
                });
            }
            Some(Err(e)) => break Err(e),
            None => {
                break Err(Error::ConnectionLost(format!(
                    "the consumer of queue {:?} ended: its connection was closed or lost, or the queue deleted",
                    consumer.queue()
                )))
            }
        }
    };
    // Handlers already done before the stop are not part of the drain.
    while handling.try_join_next().is_some() {}
    let mut drained = Drained::default();
    if ended.is_ok() {
        match consumer.cancel().await {
            // Deliveries sent before the cancel went through go back to the
            // queue for another consumer.
            Ok(()) => {
                while let Some(Ok(delivery)) = consumer.next().await {
                    match delivery.nack(Requeue::Yes).await {
                        Ok(()) => drained.requeued += 1,
                        Err(e) => {
                            tracing::warn!(error = %e, "could not requeue a delivery while stopping");
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not cancel a consumer while stopping"),
        }
    }
    let deadline = stop.borrow().deadline;
    // The consumer stays alive until the deliveries in hand are settled:
    // dropping it would requeue them.
    let finish = async {
        while handling.join_next().await.is_some() {
            drained.finished += 1;
        }
    };
    match deadline {
        None => finish.await,
        Some(deadline) => {
            if tokio::time::timeout(deadline, finish).await.is_err() {
                drained.abandoned = handling.len() as u64;
                // Aborting drops each handler's delivery unsettled, which
                // requeues it.
                handling.shutdown().await;
            }
        }
    }
    drop(consumer);
    (ended, drained)
}

/// Spawns `future` on the current runtime, or fails with a clear error when
/// there is none.
pub(crate) fn spawn_on_current<F>(
    what: &str,
    future: F,
) -> Result<tokio::task::JoinHandle<F::Output>>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
        Error::NotSupported(format!("{what} must be started inside a tokio runtime"))
    })?;
    Ok(runtime.spawn(future))
}

/// The OpenTelemetry `messaging.system` of a connection's transport.
pub(crate) fn system(conn: &dyn Connection) -> &'static str {
    match conn.capabilities().name {
        "amqp" => "rabbitmq",
        other => other,
    }
}

/// The span one delivery is processed in, with the OpenTelemetry messaging
/// attributes; with feature `otel`, its parent is the trace the message
/// carries, if any.
pub(crate) fn process_span(
    system: &'static str,
    queue: &str,
    delivery: &Delivery,
    routing_key: &str,
    attempt: Option<u32>,
) -> tracing::Span {
    let props = &delivery.message.properties;
    let span = tracing::info_span!(
        "process",
        messaging.system = system,
        messaging.destination.name = %queue,
        messaging.operation = "process",
        messaging.message.id = props.message_id.as_deref(),
        messaging.message.conversation_id = props.correlation_id.as_deref(),
        messaging.rabbitmq.destination.routing_key = %routing_key,
        attempt = tracing::field::Empty,
    );
    if let Some(attempt) = attempt {
        // OpenTelemetry has no unsigned integers: an i64 stays a number.
        span.record("attempt", i64::from(attempt));
    }
    #[cfg(feature = "otel")]
    crate::otel::set_parent(&span, &props.headers);
    span
}

/// With feature `otel`, writes the current span's trace context into
/// `message`'s headers; without it, does nothing.
pub(crate) fn trace(message: &mut Message) {
    #[cfg(feature = "otel")]
    crate::otel::inject(message);
    #[cfg(not(feature = "otel"))]
    let _ = message;
}
