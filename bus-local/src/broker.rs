//! The broker: topology (exchanges, queues, bindings) and the paths between
//! them (publish, dead-lettering, timers, deletion).
//!
//! Locking: the topology sits under one `RwLock`, held only to look up,
//! route or change topology, never while a queue is locked; each queue has
//! its own mutex, taken after the topology lock is released. So publishes
//! to unrelated queues only share a read lock for routing, and no lock is
//! ever held across an `.await`.

use std::cmp::Ordering as CmpOrdering;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use bus_core::routing::{
    check_sender_routes, strip_bcc, Destination, Exchange, ExchangeGraph, NameMap,
};
use bus_core::{
    is_reserved_name, validate_name, ConsumeOptions, Consumer, DeleteQueueOptions, Error,
    ErrorDetail, ExchangeKind, ExchangeOptions, FieldTable, FieldValue, Message, QueueArguments,
    QueueInfo, QueueOptions, QueueType, Result, Subject,
};
use tokio::runtime::Handle;
use tokio::time::Instant;

use crate::connection::ConnInner;
use crate::consumer::{Activity, ConsumerShared, Control, DeliveryStream, Settler};
use bus_core::engine::dead_letter::cycles_into;
use bus_core::sync::{Mutex, MutexGuard, RwLock};

use crate::dead_letter::DeadLetter;
use crate::declaration::{
    check_exchange_redeclare, check_queue_flags, check_queue_type, queue_arguments,
};
use crate::faults::{Fault, FaultState};
use crate::queue::{Effects, Envelope, NewConsumer, Now, Queue, QueueState, Settle};

/// The queues a publish reaches.
enum Targets {
    One(QueueRef),
    Many(Vec<QueueRef>),
}

impl Targets {
    fn as_slice(&self) -> &[QueueRef] {
        match self {
            Targets::One(q) => std::slice::from_ref(q),
            Targets::Many(list) => list,
        }
    }
}

/// A queue as the exchange graph holds it: identified, and ordered, by its
/// creation sequence, so a message reaching several queues enters them in
/// the order they were declared.
#[derive(Clone)]
pub(crate) struct QueueRef(pub(crate) Arc<Queue>);

impl PartialEq for QueueRef {
    fn eq(&self, other: &Self) -> bool {
        self.0.seq == other.0.seq
    }
}

impl Eq for QueueRef {}

impl PartialOrd for QueueRef {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}

impl Ord for QueueRef {
    fn cmp(&self, other: &Self) -> CmpOrdering {
        self.0.seq.cmp(&other.0.seq)
    }
}

struct Topology {
    exchanges: ExchangeGraph<QueueRef>,
    queues: NameMap<Arc<Queue>>,
}

impl Topology {
    /// The queues `envelope` reaches through its exchange, in queue
    /// creation order, each once. `None` if the exchange does not exist.
    fn route(&self, envelope: &Envelope) -> Option<Vec<QueueRef>> {
        let mut out = Vec::new();
        self.exchanges
            .route(
                &envelope.exchange,
                envelope.routing_keys(),
                &envelope.message.properties.headers,
                |name| self.queues.get(name).cloned().map(QueueRef),
                &mut out,
            )
            .then_some(out)
    }
}

/// The shared state behind a [`LocalBroker`](crate::LocalBroker).
pub(crate) struct BrokerInner {
    pub(crate) name: Option<String>,
    topology: RwLock<Topology>,
    ids: AtomicU64,
    pub(crate) activity: Arc<Activity>,
    /// The runtime timers were last started on, for code that runs outside
    /// one (drops).
    runtime: Mutex<Option<Handle>>,
    recording: AtomicBool,
    records: Mutex<HashMap<String, Vec<(String, Message)>>>,
    /// The fault plan, if the broker has one: `None` keeps every path as
    /// it is without faults.
    pub(crate) faults: Option<Arc<FaultState>>,
    /// Every connection opened, for a restart to drop them all.
    connections: Mutex<Vec<Weak<ConnInner>>>,
}

fn random_suffix() -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let bits = uuid::Uuid::new_v4().as_u128();
    // 22 characters of 6 bits, like RabbitMQ's `amq.gen-` names.
    (0..22)
        .map(|i| char::from(ALPHABET[((bits >> (i * 6)) & 63) as usize]))
        .collect()
}

/// RabbitMQ's refusal of any explicit operation on the default exchange,
/// saying which one was attempted.
fn default_exchange_refused(operation: &str) -> Error {
    Error::AccessRefused(ErrorDetail::about(
        Subject::exchange(""),
        format!("{operation}: operation not permitted on the default exchange"),
    ))
}

fn check_routing_key(exchange: &str, key: &str) -> Result<()> {
    if key.len() > bus_core::MAX_NAME_LEN {
        let start: String = key.chars().take(32).collect();
        return Err(Error::InvalidArgument(format!(
            "routing key {start:?}... for exchange '{exchange}' is {} bytes long; at most {} are allowed",
            key.len(),
            bus_core::MAX_NAME_LEN
        )));
    }
    Ok(())
}

/// The checks binding and unbinding exchanges share, before any lookup.
fn check_exchange_binding_names(
    operation: &str,
    destination: &str,
    source: &str,
    key: &str,
) -> Result<()> {
    validate_name("exchange", destination)?;
    validate_name("exchange", source)?;
    check_routing_key(source, key)?;
    if destination.is_empty() || source.is_empty() {
        return Err(default_exchange_refused(&format!(
            "{operation} exchange '{destination}' to exchange '{source}'"
        )));
    }
    Ok(())
}

/// The checks binding and unbinding share, before any lookup.
fn check_binding_names(operation: &str, queue: &str, exchange: &str, key: &str) -> Result<()> {
    validate_name("queue", queue)?;
    validate_name("exchange", exchange)?;
    check_routing_key(exchange, key)?;
    if exchange.is_empty() {
        return Err(default_exchange_refused(&format!(
            "{operation} queue '{queue}'"
        )));
    }
    Ok(())
}

impl BrokerInner {
    pub(crate) fn new(name: Option<String>, faults: Option<FaultState>) -> Self {
        let topology = Topology {
            exchanges: ExchangeGraph::with_predeclared(),
            queues: NameMap::default(),
        };
        BrokerInner {
            name,
            topology: RwLock::new(topology),
            ids: AtomicU64::new(1),
            activity: Arc::default(),
            runtime: Mutex::new(None),
            recording: AtomicBool::new(false),
            records: Mutex::new(HashMap::new()),
            faults: faults.map(Arc::new),
            connections: Mutex::new(Vec::new()),
        }
    }

    /// Keeps track of a new connection, for [`BrokerInner::restart`].
    pub(crate) fn register_connection(&self, conn: &Arc<ConnInner>) {
        let mut list = self.connections.lock();
        list.retain(|c| c.strong_count() > 0);
        list.push(Arc::downgrade(conn));
    }

    /// The broker restarts: every connection drops; durable exchanges,
    /// durable queues (neither exclusive nor auto-delete), the bindings
    /// between them and the persistent messages of those queues survive;
    /// everything else is gone. Recovering connections come back after
    /// their reconnection delay.
    pub(crate) fn restart(self: &Arc<Self>) {
        if let Some(faults) = &self.faults {
            faults.on_commanded(None, Fault::RestartBroker, "every connection drops".into());
        }
        let connections: Vec<Arc<ConnInner>> = {
            let list = self.connections.lock();
            list.iter().filter_map(Weak::upgrade).collect()
        };
        let mut to_recover = Vec::new();
        for conn in &connections {
            if conn.drop_link("the broker restarted") {
                to_recover.push(conn);
            }
        }
        let (doomed_queues, kept_queues): (Vec<_>, Vec<_>) = {
            let topo = self.read();
            topo.queues
                .values()
                .cloned()
                .partition(|q| !q.durable || q.auto_delete || q.owner.is_some())
        };
        for queue in &doomed_queues {
            self.remove_queue(queue);
        }
        self.write().exchanges.retain_exchanges(|_, x| x.durable);
        for queue in &kept_queues {
            let mut st = queue.lock();
            // A quorum queue keeps every message, whatever its delivery
            // mode, as RabbitMQ's always writes them to disk.
            if queue.args.queue_type != Some(QueueType::Quorum) {
                Queue::drop_transient(&mut st);
            }
            self.complete(queue, st, Effects::default());
        }
        for conn in to_recover {
            conn.schedule_recovery();
        }
    }

    pub(crate) fn next_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Topology> {
        self.topology.read()
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Topology> {
        self.topology.write()
    }

    // ---- finishing queue operations ------------------------------------

    /// Ends an operation on a locked queue: arms its timer, releases the
    /// lock, then does what the operation left for the broker.
    fn complete(
        self: &Arc<Self>,
        queue: &Arc<Queue>,
        mut st: MutexGuard<'_, QueueState>,
        fx: Effects,
    ) {
        self.schedule(queue, &mut st);
        drop(st);
        if fx.dead.is_empty() && !fx.delete {
            return;
        }
        let mut work = VecDeque::new();
        self.absorb(queue, fx, &mut work);
        while let Some(dead) = work.pop_front() {
            self.route_dead_letter(dead, &mut work);
        }
    }

    fn absorb(self: &Arc<Self>, queue: &Arc<Queue>, fx: Effects, work: &mut VecDeque<DeadLetter>) {
        if !fx.dead.is_empty() {
            work.extend(fx.dead);
        }
        if fx.delete {
            self.remove_queue(queue);
        }
    }

    fn route_dead_letter(self: &Arc<Self>, dead: DeadLetter, work: &mut VecDeque<DeadLetter>) {
        let env = dead.envelope;
        self.record(&env.exchange, env.routing_key(), &env.message);
        let targets = self.read().route(&env);
        // A missing dead-letter exchange drops the message, as in RabbitMQ.
        let Some(mut targets) = targets else { return };
        targets.retain(|q| !cycles_into(dead.reason, &q.0.name, &env.message.properties.headers));
        let env = Arc::new(env);
        let mut now = Now::default();
        for QueueRef(queue) in targets {
            let mut fx = Effects::default();
            let mut st = queue.lock();
            queue.publish(&mut st, &env, None, &mut now, &mut fx);
            self.schedule(&queue, &mut st);
            drop(st);
            self.absorb(&queue, fx, work);
        }
    }

    // ---- timers ----------------------------------------------------------

    /// Makes sure a timer task wakes the queue at its next deadline (a
    /// message expiring, or the queue itself under `x-expires`). Timers run
    /// on tokio's clock, so a paused test clock drives them.
    fn schedule(self: &Arc<Self>, queue: &Arc<Queue>, st: &mut QueueState) {
        if st.deleted {
            return;
        }
        let Some(deadline) = queue.next_deadline(st) else {
            return;
        };
        // An armed timer already in the past belongs to a runtime that is
        // gone (a named broker outlives a test's runtime) or is about to
        // run: arming again is harmless, the generation retires the stale
        // one.
        if st
            .timer
            .is_some_and(|armed| armed <= deadline && armed > Instant::now())
        {
            return;
        }
        let mut runtime = self.runtime.lock();
        let handle = match Handle::try_current() {
            Ok(h) => {
                *runtime = Some(h.clone());
                h
            }
            Err(_) => match runtime.as_ref() {
                Some(h) => h.clone(),
                // No runtime yet: the next call on the queue arms it.
                None => return,
            },
        };
        drop(runtime);
        st.timer_gen += 1;
        st.timer = Some(deadline);
        let generation = st.timer_gen;
        let broker = Arc::downgrade(self);
        let weak_queue = Arc::downgrade(queue);
        handle.spawn(async move {
            tokio::time::sleep_until(deadline).await;
            if let (Some(broker), Some(queue)) = (broker.upgrade(), weak_queue.upgrade()) {
                broker.on_timer(&queue, generation);
            }
        });
    }

    fn on_timer(self: &Arc<Self>, queue: &Arc<Queue>, generation: u64) {
        let mut st = queue.lock();
        if st.timer_gen != generation || st.deleted {
            return;
        }
        st.timer = None;
        let mut fx = Effects::default();
        queue.tick(&mut st, &mut Now::default(), &mut fx);
        self.complete(queue, st, fx);
    }

    // ---- lookups ---------------------------------------------------------

    /// The queue of that name, unless it is gone or its `x-expires` has
    /// passed (then it is deleted now, whether or not its timer ran).
    fn lookup_queue(self: &Arc<Self>, name: &str) -> Option<Arc<Queue>> {
        let queue = self.read().queues.get(name).cloned()?;
        if queue.args.expires.is_some() {
            let expired = queue.idle_expired(&queue.lock(), Instant::now());
            if expired {
                self.remove_queue(&queue);
                return None;
            }
        }
        Some(queue)
    }

    fn check_owner(queue: &Queue, conn: u64) -> Result<()> {
        match queue.owner {
            Some(owner) if owner != conn => Err(Error::queue_locked(&queue.name)),
            _ => Ok(()),
        }
    }

    /// Brings a queue up to date (expired messages out, consumers fed) and
    /// reads its counts.
    fn queue_info(self: &Arc<Self>, queue: &Arc<Queue>, touch: bool) -> QueueInfo {
        let mut now = Now::default();
        let mut st = queue.lock();
        if touch {
            Queue::touch(&mut st, now.get());
        }
        let mut fx = Effects::default();
        queue.tick(&mut st, &mut now, &mut fx);
        let info = QueueInfo {
            name: queue.name.clone(),
            message_count: u32::try_from(Queue::ready_count(&st)).unwrap_or(u32::MAX),
            consumer_count: u32::try_from(Queue::consumer_count(&st)).unwrap_or(u32::MAX),
        };
        self.complete(queue, st, fx);
        info
    }

    pub(crate) fn queue_depth(self: &Arc<Self>, name: &str) -> Option<usize> {
        let queue = self.lookup_queue(name)?;
        let info = self.queue_info(&queue, false);
        Some(info.message_count as usize)
    }

    pub(crate) fn unacked_count(self: &Arc<Self>, name: &str) -> Option<usize> {
        let queue = self.lookup_queue(name)?;
        let st = queue.lock();
        Some(Queue::unacked_count(&st))
    }

    // ---- exchanges -------------------------------------------------------

    pub(crate) fn declare_exchange(
        &self,
        name: &str,
        kind: &ExchangeKind,
        options: &ExchangeOptions,
    ) -> Result<()> {
        validate_name("exchange", name)?;
        // As RabbitMQ, the type is checked first, and not at all by a
        // passive declaration.
        if !options.passive {
            kind.require_built_in("local")?;
        }
        if name.is_empty() {
            return Err(default_exchange_refused("declare exchange ''"));
        }
        if options.passive {
            return match self.read().exchanges.get(name).is_some() {
                true => Ok(()),
                false => Err(Error::exchange_not_found(name)),
            };
        }
        let exchange = Exchange::declared(name, kind.clone(), options)?;
        let mut topo = self.write();
        if let Some(x) = topo.exchanges.get(name) {
            return check_exchange_redeclare(name, x, &exchange);
        }
        if is_reserved_name(name) {
            return Err(Error::AccessRefused(ErrorDetail::about(
                Subject::exchange(name),
                format!("exchange name '{name}' contains reserved prefix 'amq.*'"),
            )));
        }
        topo.exchanges.insert(name, exchange);
        Ok(())
    }

    pub(crate) fn delete_exchange(&self, name: &str, if_unused: bool) -> Result<()> {
        validate_name("exchange", name)?;
        if name.is_empty() {
            return Err(default_exchange_refused("delete exchange ''"));
        }
        if is_reserved_name(name) {
            return Err(Error::AccessRefused(ErrorDetail::about(
                Subject::exchange(name),
                format!("deletion of system exchange '{name}' not allowed"),
            )));
        }
        let mut topo = self.write();
        let Some(x) = topo.exchanges.get(name) else {
            return Ok(());
        };
        if if_unused && x.binding_count() > 0 {
            return Err(Error::PreconditionFailed(ErrorDetail::about(
                Subject::exchange(name),
                format!("exchange '{name}' in use"),
            )));
        }
        topo.exchanges.delete_exchange(name);
        Ok(())
    }

    // ---- queues ----------------------------------------------------------

    /// Declares or checks a queue. Returns its counts, and the queue when
    /// this call created it exclusive (the connection must track it).
    pub(crate) fn declare_queue(
        self: &Arc<Self>,
        conn: u64,
        name: &str,
        options: &QueueOptions,
    ) -> Result<(QueueInfo, Option<Arc<Queue>>)> {
        validate_name("queue", name)?;
        if options.passive {
            let queue = self
                .lookup_queue(name)
                .ok_or_else(|| Error::queue_not_found(name))?;
            Self::check_owner(&queue, conn)?;
            return Ok((self.queue_info(&queue, true), None));
        }
        let args = queue_arguments(name, options)?;
        if !name.is_empty() && is_reserved_name(name) {
            return Err(Error::AccessRefused(ErrorDetail::about(
                Subject::queue(name),
                format!("queue name '{name}' contains reserved prefix 'amq.*'"),
            )));
        }
        let owner = options.exclusive.then_some(conn);
        if !name.is_empty() {
            if let Some(queue) = self.lookup_queue(name) {
                return self.redeclare(&queue, options, owner, &args);
            }
        }
        check_queue_type(name, options, &args)?;
        let now = Instant::now();
        let mut topo = self.write();
        let name = if name.is_empty() {
            loop {
                // Under a fault plan names must not depend on chance, so
                // that a seed replays the same trace.
                let candidate = match self.faults {
                    None => format!("amq.gen-{}", random_suffix()),
                    Some(_) => format!("amq.gen-sim{}", self.next_id()),
                };
                if !topo.queues.contains_key(&candidate) {
                    break candidate;
                }
            }
        } else {
            if let Some(queue) = topo.queues.get(name).cloned() {
                // Declared by someone else since the lookup.
                drop(topo);
                return self.redeclare(&queue, options, owner, &args);
            }
            name.to_owned()
        };
        let queue = Arc::new(Queue::new(
            name.clone(),
            self.next_id(),
            options.durable,
            options.auto_delete,
            owner,
            args,
            now,
        ));
        topo.queues.insert(name.clone(), queue.clone());
        drop(topo);
        let st = queue.lock();
        self.complete(&queue, st, Effects::default());
        let info = QueueInfo {
            name,
            message_count: 0,
            consumer_count: 0,
        };
        Ok((info, owner.map(|_| queue)))
    }

    fn redeclare(
        self: &Arc<Self>,
        queue: &Arc<Queue>,
        options: &QueueOptions,
        owner: Option<u64>,
        args: &QueueArguments,
    ) -> Result<(QueueInfo, Option<Arc<Queue>>)> {
        check_queue_flags(queue, options)?;
        if queue.owner != owner {
            return Err(Error::queue_locked(&queue.name));
        }
        bus_core::equivalence::check_queue_arguments(&queue.name, &queue.args, args)?;
        Ok((self.queue_info(queue, true), None))
    }

    pub(crate) fn delete_queue(
        self: &Arc<Self>,
        conn: u64,
        name: &str,
        options: DeleteQueueOptions,
    ) -> Result<u32> {
        validate_name("queue", name)?;
        let Some(queue) = self.lookup_queue(name) else {
            return Ok(0);
        };
        Self::check_owner(&queue, conn)?;
        {
            let st = queue.lock();
            if options.if_unused && Queue::consumer_count(&st) > 0 {
                return Err(Error::PreconditionFailed(ErrorDetail::about(
                    Subject::queue(name),
                    format!("queue '{name}' in use"),
                )));
            }
            if options.if_empty && Queue::ready_count(&st) > 0 {
                return Err(Error::PreconditionFailed(ErrorDetail::about(
                    Subject::queue(name),
                    format!("queue '{name}' not empty"),
                )));
            }
        }
        Ok(u32::try_from(self.remove_queue(&queue)).unwrap_or(u32::MAX))
    }

    /// Deletes a queue: out of the topology and every exchange (auto-delete
    /// exchanges left without bindings go too), messages dropped, consumers
    /// ended. Returns the ready count; 0 if it was gone already.
    pub(crate) fn remove_queue(&self, queue: &Arc<Queue>) -> usize {
        {
            let mut topo = self.write();
            match topo.queues.get(&queue.name) {
                Some(q) if Arc::ptr_eq(q, queue) => {
                    topo.queues.remove(&queue.name);
                }
                _ => return 0,
            }
            topo.exchanges.remove_queue(&QueueRef(queue.clone()));
        }
        let mut st = queue.lock();
        Queue::mark_deleted(&mut st)
    }

    pub(crate) fn purge_queue(self: &Arc<Self>, conn: u64, name: &str) -> Result<u32> {
        validate_name("queue", name)?;
        let queue = self
            .lookup_queue(name)
            .ok_or_else(|| Error::queue_not_found(name))?;
        Self::check_owner(&queue, conn)?;
        let mut st = queue.lock();
        let n = Queue::purge(&mut st);
        self.complete(&queue, st, Effects::default());
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }

    // ---- bindings --------------------------------------------------------

    pub(crate) fn bind(
        self: &Arc<Self>,
        conn: u64,
        queue: &str,
        exchange: &str,
        key: &str,
        arguments: FieldTable,
    ) -> Result<()> {
        check_binding_names("bind", queue, exchange, key)?;
        let q = self
            .lookup_queue(queue)
            .ok_or_else(|| Error::queue_not_found(queue))?;
        Self::check_owner(&q, conn)?;
        let mut topo = self.write();
        if !topo.queues.get(queue).is_some_and(|x| Arc::ptr_eq(x, &q)) {
            return Err(Error::queue_not_found(queue));
        }
        topo.exchanges
            .bind(exchange, key, Destination::Queue(QueueRef(q)), arguments)?;
        Ok(())
    }

    pub(crate) fn unbind(
        &self,
        queue: &str,
        exchange: &str,
        key: &str,
        arguments: FieldTable,
    ) -> Result<()> {
        check_binding_names("unbind", queue, exchange, key)?;
        // A missing queue, exchange or binding is not an error in RabbitMQ.
        let mut topo = self.write();
        let Some(q) = topo.queues.get(queue).cloned() else {
            return Ok(());
        };
        let queue = Destination::Queue(QueueRef(q));
        topo.exchanges.unbind(exchange, key, &queue, &arguments);
        Ok(())
    }

    /// Binds exchange `destination` to exchange `source`.
    pub(crate) fn bind_exchange(
        &self,
        destination: &str,
        source: &str,
        key: &str,
        arguments: FieldTable,
    ) -> Result<()> {
        check_exchange_binding_names("bind", destination, source, key)?;
        let destination = Destination::Exchange(destination.to_owned());
        self.write()
            .exchanges
            .bind(source, key, destination, arguments)?;
        Ok(())
    }

    /// Removes an exchange-to-exchange binding; a missing one is no error.
    pub(crate) fn unbind_exchange(
        &self,
        destination: &str,
        source: &str,
        key: &str,
        arguments: FieldTable,
    ) -> Result<()> {
        check_exchange_binding_names("unbind", destination, source, key)?;
        let destination = Destination::Exchange(destination.to_owned());
        self.write()
            .exchanges
            .unbind(source, key, &destination, &arguments);
        Ok(())
    }

    // ---- publishing ------------------------------------------------------

    fn record(&self, exchange: &str, routing_key: &str, message: &Message) {
        if !self.recording.load(Ordering::Acquire) {
            return;
        }
        let mut records = self.records.lock();
        if let Some(list) = records.get_mut(exchange) {
            list.push((routing_key.to_owned(), message.clone()));
        }
    }

    pub(crate) fn record_exchange(&self, exchange: &str) {
        let mut records = self.records.lock();
        records.entry(exchange.to_owned()).or_default();
        self.recording.store(true, Ordering::Release);
    }

    pub(crate) fn published(&self, exchange: &str) -> Vec<(String, Message)> {
        let records = self.records.lock();
        records.get(exchange).cloned().unwrap_or_default()
    }

    /// Publishes `message`, as published to `exchange` with `routing_key`,
    /// wrapped by [`Envelope::published`].
    pub(crate) fn publish(
        self: &Arc<Self>,
        mut envelope: Arc<Envelope>,
        mandatory: bool,
    ) -> Result<()> {
        let exchange = envelope.exchange.as_str();
        let routing_key = envelope.routing_key();
        validate_name("exchange", exchange)?;
        check_routing_key(exchange, routing_key)?;
        let message = &envelope.message;
        let targets = {
            let topo = self.read();
            if exchange.is_empty() && envelope.cc.is_empty() {
                // The common send-to-queue: one key, at most one queue, no
                // list to build, sort or free.
                match topo.queues.get(routing_key) {
                    Some(q) => Targets::One(QueueRef(q.clone())),
                    None => Targets::Many(Vec::new()),
                }
            } else {
                topo.exchanges.check_publish(exchange)?;
                Targets::Many(
                    topo.route(&envelope)
                        .ok_or_else(|| Error::exchange_not_found(exchange))?,
                )
            }
        };
        let message_ttl = message.ttl()?;
        check_sender_routes(&message.properties.headers)?;
        self.record(exchange, routing_key, message);
        let targets = targets.as_slice();
        if targets.is_empty() {
            if mandatory {
                let exchange = exchange.to_owned();
                let routing_key = routing_key.to_owned();
                let message = Arc::try_unwrap(envelope)
                    .map_or_else(|shared| shared.message.clone(), |env| env.message);
                return Err(Error::Unroutable {
                    exchange,
                    routing_key,
                    message: Box::new(message),
                });
            }
            return Ok(());
        }
        // BCC routes but is never seen by consumers. The envelope is not
        // shared yet, so this changes it in place (checked here first:
        // `make_mut` is an atomic operation, on every publish otherwise).
        if message.properties.headers.contains_key("BCC") {
            strip_bcc(&mut Arc::make_mut(&mut envelope).message);
        }
        let mut now = Now::default();
        let mut refused = None;
        let mut work = VecDeque::new();
        for QueueRef(queue) in targets {
            let mut fx = Effects::default();
            let mut st = queue.lock();
            if !queue.publish(&mut st, &envelope, message_ttl, &mut now, &mut fx)
                && refused.is_none()
            {
                refused = Some(queue.name.clone());
            }
            self.schedule(queue, &mut st);
            drop(st);
            self.absorb(queue, fx, &mut work);
        }
        while let Some(dead) = work.pop_front() {
            self.route_dead_letter(dead, &mut work);
        }
        match refused {
            Some(queue) => Err(Error::Nacked(format!(
                "queue '{queue}' is full and refuses new messages (x-overflow)"
            ))),
            None => Ok(()),
        }
    }

    // ---- consumers -------------------------------------------------------

    pub(crate) fn consume(
        self: &Arc<Self>,
        conn: &Arc<ConnInner>,
        queue: &str,
        options: ConsumeOptions,
        first_tag: u64,
    ) -> Result<Consumer> {
        validate_name("queue", queue)?;
        let q = self
            .lookup_queue(queue)
            .ok_or_else(|| Error::queue_not_found(queue))?;
        Self::check_owner(&q, conn.id())?;
        let priority = match options.arguments.get("x-priority") {
            None => 0,
            Some(v) => v.as_i64().ok_or_else(|| {
                Error::PreconditionFailed(
                    ErrorDetail::about(
                        Subject::queue(queue),
                        format!(
                        "invalid arg 'x-priority' for a consumer of queue '{queue}': expected an \
                     integer, got {} {v}",
                        v.type_name()
                    ),
                    )
                    .with_argument("x-priority"),
                )
            })?,
        };
        if let Some(FieldValue::String(_)) = options.arguments.get("x-stream-offset") {
            return Err(Error::NotSupported(format!(
                "consumer argument 'x-stream-offset' on queue '{queue}': the in-process broker \
                 has no stream queues"
            )));
        }
        let tag = options
            .consumer_tag
            .clone()
            .unwrap_or_else(|| match self.faults {
                None => format!("amq.ctag-{}", random_suffix()),
                Some(_) => format!("amq.ctag-sim{}", self.next_id()),
            });
        let shared = Arc::new(ConsumerShared::new(
            self.next_id(),
            Arc::downgrade(&q),
            Arc::downgrade(conn),
            self.activity.clone(),
            self.faults.clone(),
        ));
        let acker: Option<Arc<dyn bus_core::Acknowledger>> = if options.auto_ack {
            None
        } else {
            Some(Arc::new(Settler {
                shared: shared.clone(),
                broker: Arc::downgrade(self),
            }))
        };
        let mut now = Now::default();
        let mut fx = Effects::default();
        let mut st = q.lock();
        if st.deleted {
            return Err(Error::queue_not_found(queue));
        }
        q.add_consumer(
            &mut st,
            NewConsumer {
                shared: shared.clone(),
                prefetch: options.prefetch,
                auto_ack: options.auto_ack,
                exclusive: options.exclusive,
                priority,
                first_tag,
            },
            &mut now,
            &mut fx,
        )?;
        conn.register_consumer(shared.clone());
        self.complete(&q, st, fx);
        let control = Arc::new(Control {
            shared: shared.clone(),
            broker: Arc::downgrade(self),
        });
        let stream = DeliveryStream {
            shared,
            broker: self.clone(),
            acker,
        };
        Ok(Consumer::new(
            tag,
            queue.to_owned(),
            Box::pin(stream),
            control,
        ))
    }

    pub(crate) fn settle(
        self: &Arc<Self>,
        consumer: &ConsumerShared,
        tag: u64,
        multiple: bool,
        how: Settle,
    ) -> Result<()> {
        // The queue is gone: its messages went with it, nothing to settle.
        let Some(queue) = consumer.queue.upgrade() else {
            return Ok(());
        };
        let mut st = queue.lock();
        if st.deleted {
            return Ok(());
        }
        let mut fx = Effects::default();
        queue.settle(
            &mut st,
            consumer.id,
            tag,
            multiple,
            how,
            &mut Now::default(),
            &mut fx,
        )?;
        self.complete(&queue, st, fx);
        Ok(())
    }

    pub(crate) fn cancel_consumer(self: &Arc<Self>, consumer: &ConsumerShared) {
        if let Some(queue) = consumer.queue.upgrade() {
            let mut st = queue.lock();
            let mut fx = Effects::default();
            queue.cancel_consumer(&mut st, consumer.id, &mut Now::default(), &mut fx);
            self.complete(&queue, st, fx);
        } else {
            consumer.end(false);
        }
    }

    /// Removes a consumer for good (stream dropped or connection closed):
    /// its unsettled deliveries are requeued.
    pub(crate) fn drop_consumer(self: &Arc<Self>, consumer: &ConsumerShared) {
        if let Some(conn) = consumer.conn.upgrade() {
            conn.unregister_consumer(consumer.id);
        }
        consumer.end(true);
        if let Some(queue) = consumer.queue.upgrade() {
            let mut st = queue.lock();
            let mut fx = Effects::default();
            queue.remove_consumer(&mut st, consumer.id, &mut Now::default(), &mut fx);
            self.complete(&queue, st, fx);
        }
    }
}
