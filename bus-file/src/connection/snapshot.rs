//! The routing view of one topology version, cached until the topology
//! file changes, and changes to the topology under the root's lock.

use std::sync::Arc;

use bus_core::routing::{alternate_exchange, sender_routes, Destination, Exchange, ExchangeGraph};
use bus_core::{Error, ExchangeKind, FieldTable, Result, PREDECLARED_EXCHANGES};

use super::Inner;
use crate::fsys::FileLock;
use crate::sync::Mutex;
use crate::topology::{self, FileStamp, Topology};

/// The snapshot of the latest topology version read, with the stamp of the
/// file it was read from.
#[derive(Debug, Default)]
pub(super) struct SnapshotCache {
    cache: Mutex<Option<(Option<FileStamp>, Arc<Snapshot>)>>,
}

/// The routing view of one topology version: its exchanges and bindings
/// indexed once in the exchange graph, for every publish until the
/// topology changes.
#[derive(Debug)]
pub(crate) struct Snapshot {
    pub(crate) topo: Topology,
    pub(super) graph: ExchangeGraph<String>,
}

impl Snapshot {
    fn new(topo: Topology) -> Self {
        let mut graph = ExchangeGraph::with_predeclared();
        for (name, x) in &topo.exchanges {
            // A file written before alternate exchanges were checked may
            // hold one that is not a string: ignored, as it was then.
            let alternate = alternate_exchange(name, &x.arguments).ok().flatten();
            graph.insert(
                name,
                Exchange::new(
                    x.kind.clone(),
                    x.durable,
                    x.auto_delete,
                    x.internal,
                    alternate,
                ),
            );
        }
        for b in &topo.bindings {
            if let Some(x) = graph.get_mut(&b.exchange) {
                x.bind(
                    &b.routing_key,
                    Destination::Queue(b.queue.clone()),
                    b.arguments.clone(),
                );
            }
        }
        for b in &topo.exchange_bindings {
            if let Some(x) = graph.get_mut(&b.source) {
                x.bind(
                    &b.routing_key,
                    Destination::Exchange(b.destination.clone()),
                    b.arguments.clone(),
                );
            }
        }
        Snapshot { topo, graph }
    }

    /// The queues a message goes to, each once, in name order.
    pub(super) fn route(
        &self,
        exchange: &str,
        routing_key: &str,
        headers: &FieldTable,
    ) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let keys = std::iter::once(routing_key).chain(sender_routes(headers));
        let queues = &self.topo.queues;
        let found = self.graph.route(
            exchange,
            keys,
            headers,
            |q| queues.contains_key(q).then(|| q.to_owned()),
            &mut out,
        );
        if !found {
            return Err(Error::exchange_not_found(exchange));
        }
        Ok(out)
    }
}

pub(super) fn exchange_kind(topo: &Topology, name: &str) -> Option<ExchangeKind> {
    predeclared(name).or_else(|| topo.exchanges.get(name).map(|x| x.kind.clone()))
}

pub(super) fn predeclared(name: &str) -> Option<ExchangeKind> {
    PREDECLARED_EXCHANGES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, k)| k.clone())
}

impl Inner {
    /// The current topology, re-read only when the file changed.
    pub(crate) fn snapshot(&self) -> Result<Arc<Snapshot>> {
        let stamp = topology::stamp(&self.layout.fs)?;
        let mut cache = self.snapshots.cache.lock();
        if let Some((s, snap)) = cache.as_ref() {
            if *s == stamp {
                return Ok(snap.clone());
            }
        }
        let snap = Arc::new(Snapshot::new(topology::read(&self.layout.fs)?));
        *cache = Some((stamp, snap.clone()));
        Ok(snap)
    }

    /// Changes the topology under the root's lock: `f` sees the latest
    /// version and returns its result and whether it changed anything.
    pub(crate) fn modify<T>(
        &self,
        f: impl FnOnce(&mut Topology) -> Result<(T, bool)>,
    ) -> Result<T> {
        let _lock = FileLock::lock(&self.layout.fs, &self.layout.topology_lock())?;
        let mut t = topology::read(&self.layout.fs)?;
        let (out, changed) = f(&mut t)?;
        if changed {
            t.generation += 1;
            topology::write(&self.layout.fs, &t)?;
            *self.snapshots.cache.lock() = None;
        }
        Ok(out)
    }
}
