//! Simulated faults: the plan a broker is built with
//! ([`LocalBroker::with_faults`](crate::LocalBroker::with_faults)), the
//! state it keeps while running one, and the [`Trace`] of what happened.
//!
//! A broker without a plan holds `None` here and never reaches this module.

use std::fmt;
use std::time::Duration;

use bus_core::sync::Mutex;
use tokio::time::Instant;

/// A fault to inject at a publish (see [`FaultPlan::on_publish`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PublishFault {
    /// The broker drops the publisher's connection before it takes the
    /// message: the publish fails with the temporary
    /// [`Error::ConnectionLost`](bus_core::Error::ConnectionLost) and the
    /// message is nowhere.
    CloseConnection,
    /// The broker takes the message, then the connection drops before the
    /// confirm reaches the publisher: the publish fails with
    /// `ConnectionLost` although the message is queued, so a retry makes a
    /// duplicate.
    LoseConfirm,
    /// The broker refuses the message: the publish fails with the temporary
    /// [`Error::Nacked`](bus_core::Error::Nacked) and the message is
    /// nowhere.
    Nack,
    /// The broker restarts while the message is in flight (see
    /// [`LocalBroker::restart`](crate::LocalBroker::restart)): the publish
    /// fails with `ConnectionLost` and the message is nowhere.
    RestartBroker,
}

/// A fault to inject at an ack (see [`FaultPlan::on_ack`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckFault {
    /// The ack succeeds for the handler but never reaches the broker, whose
    /// connection to the consumer then drops: the message comes again,
    /// marked `redelivered`.
    Lose,
    /// The connection drops before the ack is sent: the ack fails with
    /// `Closed` (that delivery can never be settled) and the message
    /// comes again.
    CloseConnection,
    /// The broker restarts before the ack is sent: the ack fails with
    /// `Closed`; a persistent message of a durable queue comes
    /// again, any other is gone.
    RestartBroker,
}

/// A fault that was injected, as the [`Trace`] records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// A connection was dropped by the broker.
    CloseConnection,
    /// A publish was taken but its confirm lost.
    LoseConfirm,
    /// A publish was refused.
    NackPublish,
    /// An ack was lost (and the connection dropped).
    LoseAck,
    /// The broker restarted.
    RestartBroker,
    /// A delivery (and those behind it on the same consumer) was held back
    /// this long.
    DelayDelivery(Duration),
    /// A declaration or binding was refused with the temporary
    /// [`Error::ResourceLocked`](bus_core::Error::ResourceLocked).
    RefuseDeclaration,
}

/// How often each fault happens under a random plan
/// ([`FaultPlan::random`]): the probability at each operation of its kind,
/// from 0.0 (never) to 1.0 (always). The default is all zero.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FaultRates {
    /// At a publish or an ack: the broker drops the connection.
    pub close_connection: f64,
    /// At a publish: the message is taken, its confirm lost.
    pub lose_confirm: f64,
    /// At a publish: the broker nacks it.
    pub nack_publish: f64,
    /// At a publish or an ack: the broker restarts.
    pub restart_broker: f64,
    /// At an ack: the ack is lost.
    pub lose_ack: f64,
    /// At a delivery: it is held back by up to `max_delay`.
    pub delay_delivery: f64,
    /// The longest delivery delay.
    pub max_delay: Duration,
    /// At a declaration or binding: it is refused.
    pub refuse_declaration: f64,
}

impl FaultRates {
    /// A mix of every fault, frequent enough that a scenario of a few dozen
    /// operations usually meets several: a starting point for exploring
    /// seeds.
    #[must_use]
    pub fn mixed() -> Self {
        FaultRates {
            close_connection: 0.03,
            lose_confirm: 0.05,
            nack_publish: 0.03,
            restart_broker: 0.01,
            lose_ack: 0.05,
            delay_delivery: 0.1,
            max_delay: Duration::from_millis(50),
            refuse_declaration: 0.1,
        }
    }
}

/// What to do at the `n`th operation of a kind, counted from 1 across the
/// broker.
#[derive(Clone, Debug)]
enum Scripted {
    Publish(u64, PublishFault),
    Ack(u64, AckFault),
    Delivery(u64, Duration),
    Declare(u64),
}

/// The faults a [`LocalBroker`](crate::LocalBroker) injects: scripted at
/// given operations, drawn from a seed, or both (the script wins where it
/// says something).
///
/// A broker built with a plan, even an empty one, also makes its
/// connections recover from being dropped, as bus-amqp's do on RabbitMQ.
#[derive(Clone, Debug)]
pub struct FaultPlan {
    seed: Option<u64>,
    rates: FaultRates,
    script: Vec<Scripted>,
    reconnect_delay: Duration,
    max_faults: Option<u64>,
}

impl Default for FaultPlan {
    fn default() -> Self {
        Self::none()
    }
}

impl FaultPlan {
    /// No fault at all (until scripted); connections still recover when the
    /// application drops them through
    /// [`LocalBroker::close_connection`](crate::LocalBroker::close_connection)
    /// or [`LocalBroker::restart`](crate::LocalBroker::restart).
    #[must_use]
    pub fn none() -> Self {
        FaultPlan {
            seed: None,
            rates: FaultRates::default(),
            script: Vec::new(),
            reconnect_delay: Duration::from_millis(50),
            max_faults: None,
        }
    }

    /// Faults drawn at each operation with these rates, from a generator
    /// seeded with `seed`: the same seed and the same sequence of
    /// operations give the same faults.
    #[must_use]
    pub fn random(seed: u64, rates: FaultRates) -> Self {
        FaultPlan {
            seed: Some(seed),
            rates,
            ..Self::none()
        }
    }

    /// The seed of a random plan.
    #[must_use]
    pub fn seed(&self) -> Option<u64> {
        self.seed
    }

    /// At the `n`th publish (from 1, over every connection), inject `fault`.
    #[must_use]
    pub fn on_publish(mut self, n: u64, fault: PublishFault) -> Self {
        self.script.push(Scripted::Publish(n, fault));
        self
    }

    /// At the `n`th ack (from 1, over every consumer), inject `fault`.
    #[must_use]
    pub fn on_ack(mut self, n: u64, fault: AckFault) -> Self {
        self.script.push(Scripted::Ack(n, fault));
        self
    }

    /// Hold the `n`th delivery (from 1, over every consumer), and those
    /// behind it on the same consumer, back for `delay`.
    #[must_use]
    pub fn on_delivery(mut self, n: u64, delay: Duration) -> Self {
        self.script.push(Scripted::Delivery(n, delay));
        self
    }

    /// Refuse the `n`th declaration or binding (from 1, over every
    /// connection).
    #[must_use]
    pub fn on_declare(mut self, n: u64) -> Self {
        self.script.push(Scripted::Declare(n));
        self
    }

    /// How long a dropped connection stays down before it reconnects (on
    /// tokio's clock; 50 ms by default).
    #[must_use]
    pub fn reconnect_after(mut self, delay: Duration) -> Self {
        self.reconnect_delay = delay;
        self
    }

    /// Stops injecting random faults after this many, so a scenario is sure
    /// to make progress in the end (scripted faults are not counted).
    #[must_use]
    pub fn max_faults(mut self, n: u64) -> Self {
        self.max_faults = Some(n);
        self
    }
}

/// One line of a [`Trace`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TraceEvent {
    /// A fault was injected on this connection (`None`: on the broker).
    Fault {
        /// The connection it hit, by [`LocalConnection::id`](crate::LocalConnection::id).
        connection: Option<u64>,
        /// What happened.
        fault: Fault,
        /// The operation it hit (queue, exchange, message).
        detail: String,
    },
    /// A message was handed to a consumer.
    Delivery {
        /// The queue.
        queue: String,
        /// The consumer, by broker-wide number.
        consumer: u64,
        /// The delivery tag.
        tag: u64,
        /// Whether it was marked redelivered.
        redelivered: bool,
        /// The message id, or the start of the body when it has none.
        message: String,
    },
    /// A dropped connection came back.
    Reconnected {
        /// The connection's id before it was dropped.
        connection: u64,
        /// Its id now.
        now: u64,
        /// Counts links: 2 after the first recovery.
        generation: u64,
    },
}

/// One timed line of a [`Trace`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceEntry {
    /// When, on tokio's clock, since the broker was built.
    pub at: Duration,
    /// What.
    pub event: TraceEvent,
}

/// What a broker with a fault plan did: every fault, delivery and
/// reconnection in order. Printing it (`Display`) gives one line each.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Trace {
    /// The entries in order.
    pub entries: Vec<TraceEntry>,
}

impl Trace {
    /// The faults injected, in order.
    pub fn faults(&self) -> impl Iterator<Item = Fault> + '_ {
        self.entries.iter().filter_map(|e| match e.event {
            TraceEvent::Fault { fault, .. } => Some(fault),
            _ => None,
        })
    }
}

impl fmt::Display for Trace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for e in &self.entries {
            write!(f, "{:>10.3?} ", e.at)?;
            match &e.event {
                TraceEvent::Fault {
                    connection,
                    fault,
                    detail,
                } => {
                    write!(f, "FAULT {fault:?}")?;
                    if let Some(c) = connection {
                        write!(f, " on connection {c}")?;
                    }
                    writeln!(f, ": {detail}")?;
                }
                TraceEvent::Delivery {
                    queue,
                    consumer,
                    tag,
                    redelivered,
                    message,
                } => writeln!(
                    f,
                    "deliver {message:?} from {queue:?} to consumer {consumer} (tag {tag}{})",
                    if *redelivered { ", redelivered" } else { "" }
                )?,
                TraceEvent::Reconnected {
                    connection,
                    now,
                    generation,
                } => writeln!(
                    f,
                    "connection {connection} reconnected as {now} (generation {generation})"
                )?,
            }
        }
        Ok(())
    }
}

/// SplitMix64: small, fast, and the same on every platform.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[derive(Debug, Default)]
struct Counters {
    publishes: u64,
    acks: u64,
    deliveries: u64,
    declares: u64,
    random_faults: u64,
}

#[derive(Debug)]
struct Running {
    rng: Option<Rng>,
    counters: Counters,
    trace: Vec<TraceEntry>,
}

/// A broker's fault plan while it runs.
#[derive(Debug)]
pub(crate) struct FaultState {
    plan: FaultPlan,
    start: Instant,
    running: Mutex<Running>,
}

impl FaultState {
    pub(crate) fn new(plan: FaultPlan) -> Self {
        FaultState {
            running: Mutex::new(Running {
                rng: plan.seed.map(Rng),
                counters: Counters::default(),
                trace: Vec::new(),
            }),
            plan,
            start: Instant::now(),
        }
    }

    fn running(&self) -> std::sync::MutexGuard<'_, Running> {
        self.running.lock()
    }

    pub(crate) fn reconnect_delay(&self) -> Duration {
        self.plan.reconnect_delay
    }

    fn push(&self, r: &mut Running, event: TraceEvent) {
        r.trace.push(TraceEntry {
            at: Instant::now().saturating_duration_since(self.start),
            event,
        });
    }

    /// Records an event.
    pub(crate) fn note(&self, event: TraceEvent) {
        let mut r = self.running();
        self.push(&mut r, event);
    }

    pub(crate) fn trace(&self) -> Trace {
        Trace {
            entries: self.running().trace.clone(),
        }
    }

    /// Draws once against each rate in turn; the first hit wins. Draws
    /// nothing once the random budget is spent.
    fn draw<T: Copy>(&self, r: &mut Running, choices: &[(f64, T)]) -> Option<T> {
        if self
            .plan
            .max_faults
            .is_some_and(|max| r.counters.random_faults >= max)
        {
            return None;
        }
        let rng = r.rng.as_mut()?;
        for &(rate, choice) in choices {
            if rate > 0.0 && rng.unit() < rate {
                r.counters.random_faults += 1;
                return Some(choice);
            }
        }
        None
    }

    fn record_fault(&self, r: &mut Running, connection: Option<u64>, fault: Fault, detail: String) {
        self.push(
            r,
            TraceEvent::Fault {
                connection,
                fault,
                detail,
            },
        );
    }

    /// The fault for the publish about to happen, if any (recorded).
    pub(crate) fn on_publish(
        &self,
        connection: u64,
        detail: impl FnOnce() -> String,
    ) -> Option<PublishFault> {
        let mut r = self.running();
        r.counters.publishes += 1;
        let n = r.counters.publishes;
        let scripted = self.plan.script.iter().find_map(|s| match s {
            Scripted::Publish(at, f) if *at == n => Some(*f),
            _ => None,
        });
        let rates = &self.plan.rates;
        let fault = scripted.or_else(|| {
            self.draw(
                &mut r,
                &[
                    (rates.close_connection, PublishFault::CloseConnection),
                    (rates.lose_confirm, PublishFault::LoseConfirm),
                    (rates.nack_publish, PublishFault::Nack),
                    (rates.restart_broker, PublishFault::RestartBroker),
                ],
            )
        })?;
        let recorded = match fault {
            PublishFault::CloseConnection => Fault::CloseConnection,
            PublishFault::LoseConfirm => Fault::LoseConfirm,
            PublishFault::Nack => Fault::NackPublish,
            PublishFault::RestartBroker => Fault::RestartBroker,
        };
        self.record_fault(
            &mut r,
            Some(connection),
            recorded,
            format!("publish #{n} {}", detail()),
        );
        Some(fault)
    }

    /// The fault for the ack about to happen, if any (recorded).
    pub(crate) fn on_ack(
        &self,
        connection: Option<u64>,
        detail: impl FnOnce() -> String,
    ) -> Option<AckFault> {
        let mut r = self.running();
        r.counters.acks += 1;
        let n = r.counters.acks;
        let scripted = self.plan.script.iter().find_map(|s| match s {
            Scripted::Ack(at, f) if *at == n => Some(*f),
            _ => None,
        });
        let rates = &self.plan.rates;
        let fault = scripted.or_else(|| {
            self.draw(
                &mut r,
                &[
                    (rates.lose_ack, AckFault::Lose),
                    (rates.close_connection, AckFault::CloseConnection),
                    (rates.restart_broker, AckFault::RestartBroker),
                ],
            )
        })?;
        let recorded = match fault {
            AckFault::Lose => Fault::LoseAck,
            AckFault::CloseConnection => Fault::CloseConnection,
            AckFault::RestartBroker => Fault::RestartBroker,
        };
        self.record_fault(
            &mut r,
            connection,
            recorded,
            format!("ack #{n} {}", detail()),
        );
        Some(fault)
    }

    /// Records a delivery and says how long to hold it back, if at all.
    pub(crate) fn on_delivery(&self, event: TraceEvent) -> Option<Duration> {
        let mut r = self.running();
        r.counters.deliveries += 1;
        let n = r.counters.deliveries;
        let detail = match &event {
            TraceEvent::Delivery { message, queue, .. } => {
                format!("delivery #{n} of {message:?} from {queue:?}")
            }
            _ => String::new(),
        };
        self.push(&mut r, event);
        let scripted = self.plan.script.iter().find_map(|s| match s {
            Scripted::Delivery(at, d) if *at == n => Some(*d),
            _ => None,
        });
        let max = self.plan.rates.max_delay;
        let delay = match scripted {
            Some(d) => d,
            None => {
                self.draw(&mut r, &[(self.plan.rates.delay_delivery, ())])?;
                let rng = r.rng.as_mut()?;
                let nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX).max(1);
                Duration::from_nanos(1 + rng.next_u64() % nanos)
            }
        };
        self.record_fault(&mut r, None, Fault::DelayDelivery(delay), detail);
        Some(delay)
    }

    /// Whether to refuse the declaration about to happen (recorded).
    pub(crate) fn on_declare(&self, connection: u64, detail: impl FnOnce() -> String) -> bool {
        let mut r = self.running();
        r.counters.declares += 1;
        let n = r.counters.declares;
        let scripted = self
            .plan
            .script
            .iter()
            .any(|s| matches!(s, Scripted::Declare(at) if *at == n));
        let refuse = scripted
            || self
                .draw(&mut r, &[(self.plan.rates.refuse_declaration, ())])
                .is_some();
        if refuse {
            self.record_fault(
                &mut r,
                Some(connection),
                Fault::RefuseDeclaration,
                format!("declaration #{n} {}", detail()),
            );
        }
        refuse
    }

    /// Records a fault the application caused (closing a connection,
    /// restarting the broker).
    pub(crate) fn on_commanded(&self, connection: Option<u64>, fault: Fault, detail: String) {
        let mut r = self.running();
        self.record_fault(&mut r, connection, fault, detail);
    }
}

/// How a message is named in the trace: its id, or the start of its body.
pub(crate) fn label(message: &bus_core::Message) -> String {
    match &message.properties.message_id {
        Some(id) => id.clone(),
        None => {
            let body = &message.body[..message.body.len().min(24)];
            String::from_utf8_lossy(body).into_owned()
        }
    }
}
