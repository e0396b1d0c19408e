//! The topology operations (exchanges, queues, bindings), synchronous, for
//! the blocking pool.

use bus_core::equivalence::{self, ExchangeSettings};
use bus_core::routing::{
    alternate_exchange, auto_delete, check_binding_arguments, delete_exchange, BindingStore,
};
use bus_core::{
    is_reserved_name, DeleteQueueOptions, Error, ErrorDetail, ExchangeKind, ExchangeOptions,
    FieldTable, FieldValue, QueueArguments, QueueInfo, QueueOptions, QueueType, Result, Subject,
    DEFAULT_EXCHANGE,
};

use super::snapshot::{exchange_kind, predeclared};
use super::Inner;
use crate::fsys;
use crate::names::check_path_name;
use crate::topology::{BindingRecord, ExchangeBindingRecord, ExchangeRecord, QueueRecord};

/// Checks a redeclaration of the queue `name` against its record, as
/// RabbitMQ does: flags, then the arguments it compares, naming the first
/// that differs.
fn check_queue_redeclare(
    name: &str,
    existing: &QueueRecord,
    options: &QueueOptions,
    wanted: &QueueArguments,
) -> Result<()> {
    equivalence::check_queue_flags(name, existing.durable, existing.auto_delete, options)?;
    // The record holds arguments this transport normalised and accepted.
    let have = QueueArguments::from_table(&existing.arguments)?;
    equivalence::check_queue_arguments(name, &have, wanted)
}

/// The topology operations, synchronous: each runs whole on the blocking
/// pool ([`blocking`](super::blocking)), since it takes the topology
/// `flock`, which another process may hold for as long as it likes.
impl Inner {
    /// The binding a bind or unbind names, after the checks both make: the
    /// connection is open, the names are safe path components, and the
    /// exchange is not the default one (which takes no explicit bindings).
    fn binding_record(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<BindingRecord> {
        self.check_open()?;
        check_path_name("queue", queue)?;
        if exchange == DEFAULT_EXCHANGE {
            return Err(Error::AccessRefused(ErrorDetail::about(
                Subject::exchange(""),
                "operation not permitted on the default exchange",
            )));
        }
        check_path_name("exchange", exchange)?;
        Ok(BindingRecord {
            exchange: exchange.to_owned(),
            queue: queue.to_owned(),
            routing_key: routing_key.to_owned(),
            arguments,
        })
    }

    pub(super) fn declare_exchange_sync(
        &self,
        name: &str,
        kind: ExchangeKind,
        options: ExchangeOptions,
    ) -> Result<()> {
        tracing::debug!(exchange = name, ?kind, "declare exchange");
        let inner = self;
        inner.check_open()?;
        // As RabbitMQ, the type is checked first, and not at all by a
        // passive declaration.
        if !options.passive {
            kind.require_built_in("file")?;
        }
        if name == DEFAULT_EXCHANGE {
            return Err(Error::AccessRefused(ErrorDetail::about(
                Subject::exchange(""),
                "operation not permitted on the default exchange",
            )));
        }
        check_path_name("exchange", name)?;
        if let Some(k) = predeclared(name) {
            if options.passive {
                return Ok(());
            }
            let predeclared = ExchangeSettings {
                kind: &k,
                durable: true,
                auto_delete: false,
                internal: false,
                alternate: None,
            };
            return equivalence::check_exchange(
                name,
                &predeclared,
                &ExchangeSettings::declared(&kind, &options),
            );
        }
        if options.passive {
            return if inner.snapshot()?.topo.exchanges.contains_key(name) {
                Ok(())
            } else {
                Err(Error::exchange_not_found(name))
            };
        }
        if is_reserved_name(name) {
            return Err(Error::AccessRefused(ErrorDetail::about(
                Subject::exchange(name),
                format!("exchange name {name:?} contains reserved prefix 'amq.*'"),
            )));
        }
        alternate_exchange(name, &options.arguments)?;
        let rec = ExchangeRecord {
            kind,
            durable: options.durable,
            auto_delete: options.auto_delete,
            internal: options.internal,
            arguments: options.arguments,
        };
        inner.modify(|t| match t.exchanges.get(name) {
            Some(existing) => {
                let have = ExchangeSettings {
                    kind: &existing.kind,
                    durable: existing.durable,
                    auto_delete: existing.auto_delete,
                    internal: existing.internal,
                    alternate: existing
                        .arguments
                        .get("alternate-exchange")
                        .and_then(FieldValue::as_str),
                };
                let want = ExchangeSettings {
                    kind: &rec.kind,
                    durable: rec.durable,
                    auto_delete: rec.auto_delete,
                    internal: rec.internal,
                    alternate: rec
                        .arguments
                        .get("alternate-exchange")
                        .and_then(FieldValue::as_str),
                };
                equivalence::check_exchange(name, &have, &want).map(|()| ((), false))
            }
            None => {
                t.exchanges.insert(name.to_owned(), rec);
                Ok(((), true))
            }
        })
    }

    pub(super) fn delete_exchange_sync(&self, name: &str, if_unused: bool) -> Result<()> {
        let inner = self;
        inner.check_open()?;
        if name == DEFAULT_EXCHANGE {
            return Err(Error::AccessRefused(ErrorDetail::about(
                Subject::exchange(""),
                "operation not permitted on the default exchange",
            )));
        }
        check_path_name("exchange", name)?;
        if is_reserved_name(name) {
            return Err(Error::AccessRefused(ErrorDetail::about(
                Subject::exchange(name),
                format!("exchange name {name:?} contains reserved prefix 'amq.*'"),
            )));
        }
        inner.modify(|t| {
            if !t.exchanges.contains_key(name) {
                return Ok(((), false));
            }
            if if_unused && t.has_bindings_from(name) {
                return Err(Error::PreconditionFailed(ErrorDetail::about(
                    Subject::exchange(name),
                    format!("exchange {name:?} in use"),
                )));
            }
            delete_exchange(t, name);
            Ok(((), true))
        })
    }

    pub(super) fn declare_queue_sync(
        &self,
        name: &str,
        options: QueueOptions,
    ) -> Result<QueueInfo> {
        tracing::debug!(queue = name, durable = options.durable, "declare queue");
        let inner = self;
        inner.check_open()?;
        if options.passive {
            check_path_name("queue", name)?;
            let snap = inner.snapshot()?;
            let q = snap
                .topo
                .queues
                .get(name)
                .ok_or_else(|| Error::queue_not_found(name))?;
            if let Some(o) = &q.exclusive_owner {
                if *o != inner.owner && inner.owner_alive(o) {
                    return Err(Error::queue_locked(name));
                }
            }
            return inner.counts(name);
        }
        let name = if name.is_empty() {
            format!("amq.gen-{}", uuid::Uuid::new_v4().simple())
        } else {
            check_path_name("queue", name)?;
            if is_reserved_name(name) {
                return Err(Error::AccessRefused(ErrorDetail::about(
                    Subject::queue(name),
                    format!("queue name {name:?} contains reserved prefix 'amq.*'"),
                )));
            }
            name.to_owned()
        };
        let args = options.arguments.normalized()?;
        if args.expires.is_some() {
            return Err(Error::NotSupported(
                "x-expires (queue expiry) is not offered by the file transport".into(),
            ));
        }
        if args.delivery_limit.is_some() {
            // Checked before the queue type, so that a quorum queue with a
            // limit hears about the limit: never ignored in silence.
            return Err(Error::NotSupported(
                "x-delivery-limit (a quorum queue's delivery limit) is not offered by the file \
                 transport: it does not count redeliveries, so the limit would never end a \
                 redelivery loop; use the in-process broker or RabbitMQ for it"
                    .into(),
            ));
        }
        match args.queue_type {
            None | Some(QueueType::Classic) => {}
            Some(other) => {
                return Err(Error::NotSupported(format!(
                    "x-queue-type {:?} is not offered by the file transport",
                    other.as_str()
                )))
            }
        }
        let rec = QueueRecord {
            id: uuid::Uuid::new_v4().simple().to_string(),
            durable: options.durable,
            exclusive_owner: options.exclusive.then(|| inner.owner.clone()),
            auto_delete: options.auto_delete,
            arguments: args.to_table(),
        };
        let layout = inner.layout.clone();
        inner.modify(|t| {
            if let Some(existing) = t.queues.get(&name) {
                match &existing.exclusive_owner {
                    Some(o) if *o != inner.owner && inner.owner_alive(o) => {
                        return Err(Error::queue_locked(&name))
                    }
                    Some(o) if *o != inner.owner => {
                        // Its owner died before anyone reaped it.
                        t.remove_queue(&name);
                        layout.remove_queue_dir(&name)?;
                    }
                    _ => {
                        check_queue_redeclare(&name, existing, &options, &args)?;
                        return Ok(((), false));
                    }
                }
            }
            // A folder without a topology entry is left from a crash.
            layout.remove_queue_dir(&name)?;
            layout.create_queue(&name)?;
            t.queues.insert(name.clone(), rec);
            Ok(((), true))
        })?;
        inner.counts(&name)
    }

    pub(super) fn delete_queue_sync(&self, name: &str, options: DeleteQueueOptions) -> Result<u32> {
        let inner = self;
        inner.check_open()?;
        check_path_name("queue", name)?;
        let deleted = inner.modify(|t| {
            let Some(q) = t.queues.get(name) else {
                return Ok((None, false));
            };
            if let Some(o) = &q.exclusive_owner {
                if *o != inner.owner && inner.owner_alive(o) {
                    return Err(Error::queue_locked(name));
                }
            }
            let info = inner.counts(name)?;
            if options.if_unused && info.consumer_count > 0 {
                return Err(Error::PreconditionFailed(ErrorDetail::about(
                    Subject::queue(name),
                    format!("queue {name:?} in use"),
                )));
            }
            if options.if_empty && info.message_count > 0 {
                return Err(Error::PreconditionFailed(ErrorDetail::about(
                    Subject::queue(name),
                    format!("queue {name:?} not empty"),
                )));
            }
            t.remove_queue(name);
            inner.layout.remove_queue_dir(name)?;
            Ok((Some(info.message_count), true))
        })?;
        match deleted {
            Some(n) => {
                inner.queue_gone(name);
                Ok(n)
            }
            None => Ok(0),
        }
    }

    pub(super) fn purge_queue_sync(&self, name: &str) -> Result<u32> {
        let inner = self;
        inner.check_open()?;
        check_path_name("queue", name)?;
        let snap = inner.snapshot()?;
        let q = snap
            .topo
            .queues
            .get(name)
            .ok_or_else(|| Error::queue_not_found(name))?;
        inner.check_exclusive(name, q)?;
        let ready = inner.layout.ready(name);
        let mut n = 0u32;
        for (file, _) in inner.layout.list_messages(&ready)? {
            match inner.layout.fs.remove_file(&ready.join(file)) {
                Ok(()) => n += 1,
                Err(e) if fsys::is_not_found(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(n)
    }

    pub(super) fn bind_queue_sync(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<()> {
        let inner = self;
        let b = inner.binding_record(queue, exchange, routing_key, arguments)?;
        inner.modify(|t| {
            let q = t
                .queues
                .get(queue)
                .ok_or_else(|| Error::queue_not_found(queue))?;
            inner.check_exclusive(queue, q)?;
            let kind =
                exchange_kind(t, exchange).ok_or_else(|| Error::exchange_not_found(exchange))?;
            check_binding_arguments(&kind, &b.arguments)?;
            if t.bindings.contains(&b) {
                return Ok(((), false));
            }
            t.bindings.push(b);
            Ok(((), true))
        })
    }

    pub(super) fn unbind_queue_sync(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<()> {
        let inner = self;
        let b = inner.binding_record(queue, exchange, routing_key, arguments)?;
        inner.modify(|t| {
            if let Some(q) = t.queues.get(queue) {
                inner.check_exclusive(queue, q)?;
            }
            let before = t.bindings.len();
            t.bindings.retain(|x| *x != b);
            if t.bindings.len() == before {
                return Ok(((), false));
            }
            auto_delete(t, [exchange.to_owned()]);
            Ok(((), true))
        })
    }

    pub(super) fn bind_exchange_sync(&self, b: ExchangeBindingRecord) -> Result<()> {
        let b = self.exchange_binding_record(b)?;
        self.modify(|t| {
            for name in [&b.destination, &b.source] {
                if exchange_kind(t, name).is_none() {
                    return Err(Error::exchange_not_found(name));
                }
            }
            let kind = exchange_kind(t, &b.source).expect("checked above");
            check_binding_arguments(&kind, &b.arguments)?;
            if t.exchange_bindings.contains(&b) {
                return Ok(((), false));
            }
            t.exchange_bindings.push(b);
            Ok(((), true))
        })
    }

    pub(super) fn unbind_exchange_sync(&self, b: ExchangeBindingRecord) -> Result<()> {
        let b = self.exchange_binding_record(b)?;
        self.modify(|t| {
            let before = t.exchange_bindings.len();
            t.exchange_bindings.retain(|x| *x != b);
            if t.exchange_bindings.len() == before {
                return Ok(((), false));
            }
            auto_delete(t, [b.source.clone()]);
            Ok(((), true))
        })
    }

    /// The checks binding and unbinding exchanges make first: the
    /// connection is open, the names are safe path components, and neither
    /// is the default exchange.
    fn exchange_binding_record(&self, b: ExchangeBindingRecord) -> Result<ExchangeBindingRecord> {
        self.check_open()?;
        for name in [&b.destination, &b.source] {
            if name == DEFAULT_EXCHANGE {
                return Err(Error::AccessRefused(ErrorDetail::about(
                    Subject::exchange(""),
                    "operation not permitted on the default exchange",
                )));
            }
            check_path_name("exchange", name)?;
        }
        Ok(b)
    }
}
