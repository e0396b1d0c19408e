//! Publishing: routing, queue admission (length limits and overflow),
//! writing a message into its queues, the group commit, dead-lettering.

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bus_core::engine::dead_letter::{cycles_into, dead_letter, DeadLetter, Death, Reason};
use bus_core::engine::policy::{self, Admission, Depth, Limits};
use bus_core::routing::{check_sender_routes, strip_bcc};
use bus_core::{Error, Message, QueueArguments, Result};

use super::{blocking, off_runtime, Inner};
use crate::commit::Committer;
use crate::consumer::Claim;
use crate::envelope::Envelope;
use crate::fsys;
use crate::names::{self, MessageName};
use crate::sync::Mutex;

/// The publishing side of a connection.
#[derive(Debug, Default)]
pub(super) struct Publishing {
    /// The file work of this connection's publishes, first come first
    /// served: messages reach their queues in the order their publishes
    /// were called, as on one AMQP channel, even with many in flight. The
    /// durable flush happens after, so concurrent publishes still share
    /// one group commit. A publish's work is queued when its future is
    /// first polled and runs even if the future is dropped later (as a
    /// publish already sent to a broker still arrives).
    writes: Arc<Mutex<Writes>>,
    /// Numbers the temporary files this connection writes.
    tmp_seq: AtomicU64,
    /// The group commit durable publishes wait on.
    committer: Arc<Committer>,
}

type Job = Box<dyn FnOnce() + Send>;

/// Publishes' file work in call order, and whether a task of the blocking
/// pool is running it: one task runs every job queued while it runs, so a
/// burst of concurrent publishes costs one hop to the pool, not one each
/// (and no hand-off between them).
#[derive(Default)]
struct Writes {
    jobs: VecDeque<Job>,
    running: bool,
}

impl std::fmt::Debug for Writes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writes")
            .field("jobs", &self.jobs.len())
            .field("running", &self.running)
            .finish()
    }
}

impl Publishing {
    /// Runs `job` on the blocking pool after every job submitted before it.
    fn submit(&self, job: Job) {
        let start = {
            let mut w = self.writes.lock();
            w.jobs.push_back(job);
            !std::mem::replace(&mut w.running, true)
        };
        if start {
            let writes = self.writes.clone();
            drop(tokio::task::spawn_blocking(move || run_writes(&writes)));
        }
    }
}

/// Runs queued publish jobs until none is left.
fn run_writes(writes: &Mutex<Writes>) {
    loop {
        let job = {
            let mut w = writes.lock();
            match w.jobs.pop_front() {
                Some(job) => job,
                None => {
                    w.running = false;
                    return;
                }
            }
        };
        // A job that panics drops its reply (its publish fails); the jobs
        // after it still run.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
    }
}

/// What a publish did on disk, for the rest of it to finish: the copies
/// it meant to write (queue, file name, arguments), which of them were
/// written, and the queues that refused it.
struct Prepared {
    envelope: Envelope,
    copies: Vec<(String, String, QueueArguments)>,
    written: Vec<usize>,
    durable: bool,
    expiring: bool,
    refused: Vec<(String, QueueArguments, bool)>,
}

/// Writes the envelope under its name into each queue folder, one file per
/// queue (written under `tmp/`, then renamed in: the one step that makes it
/// visible, whole). Not hard links: a message file has exactly one name, so
/// a reader can refuse any file with more (a hard link planted from
/// elsewhere). Returns the indexes of the destinations it reached (a queue
/// deleted meanwhile is skipped).
fn write_copies(
    root: &fsys::Root,
    tmp: &Path,
    bytes: &[u8],
    durable: bool,
    dests: &[PathBuf],
) -> io::Result<Vec<usize>> {
    let mut reached = Vec::with_capacity(dests.len());
    for (i, dest) in dests.iter().enumerate() {
        let mut tmp = tmp.as_os_str().to_owned();
        tmp.push(format!(".{i}"));
        let tmp = PathBuf::from(tmp);
        let mut f = root.create_new(&tmp, fsys::FILE_MODE)?;
        let written = f
            .write_all(bytes)
            .and_then(|()| if durable { f.sync_all() } else { Ok(()) });
        drop(f);
        match written.and_then(|()| root.rename(&tmp, dest)) {
            Ok(()) => reached.push(i),
            Err(e) => {
                let _ = root.remove_file(&tmp);
                if !fsys::is_not_found(&e) {
                    return Err(e);
                }
            }
        }
    }
    Ok(reached)
}

/// The depth of a queue from its listed ready names. Lengths come from file
/// names anyone with write access can craft: the sum saturates (a queue
/// "holding" u64::MAX bytes is full).
fn depth_of(ready: &[(String, MessageName)]) -> Depth {
    Depth {
        messages: ready.len() as u64,
        bytes: ready
            .iter()
            .fold(0u64, |acc, (_, m)| acc.saturating_add(m.body_len)),
    }
}

/// The dead letter of the message in `envelope` leaving `queue` for
/// `reason`, or `None` when the queue drops it (no dead-letter exchange).
fn dead_letter_of(
    envelope: &Envelope,
    queue: &str,
    reason: Reason,
    args: &QueueArguments,
) -> Option<DeadLetter> {
    let death = Death::new(reason, queue, &envelope.exchange, &envelope.routing_key);
    dead_letter(&envelope.message, &death, args)
}

impl Inner {
    /// Settles a claimed message negatively without requeue: dead-letters
    /// it when the queue has a dead-letter exchange, else drops it.
    pub(crate) fn dead_letter_or_drop<'a>(
        &'a self,
        queue: &'a str,
        args: &'a QueueArguments,
        claim: &'a Claim,
        reason: Reason,
    ) -> Pin<Box<dyn Future<Output = Result<()>> + Send + 'a>> {
        // Boxed and typed as `dyn Send`: dead-lettering publishes, and
        // publishing can dead-letter (max-length), a cycle the compiler
        // cannot see through otherwise.
        Box::pin(async move {
            if let Some(dl) = dead_letter_of(&claim.envelope, queue, reason, args) {
                match self.publish_dead_letter(&claim.envelope, dl).await {
                    // RabbitMQ drops what it cannot dead-letter to a missing
                    // exchange; so does this transport.
                    Ok(()) | Err(Error::NotFound(_)) | Err(Error::Nacked(_)) => {}
                    Err(e) => {
                        let (me, q, c) = (self.arc()?, queue.to_owned(), claim.clone());
                        off_runtime(move || me.requeue(&q, &c));
                        return Err(e);
                    }
                }
            }
            // One unlink in the open claim folder: cheaper done here than
            // a hop to the blocking pool.
            Ok(claim.remove()?)
        })
    }

    fn admission(&self, queue: &str, args: &QueueArguments, body_len: u64) -> Result<Admission> {
        let limits = Limits::of(args);
        if !limits.checks_admission() {
            return Ok(Admission::Accept);
        }
        let ready = self.layout.list_messages(&self.layout.ready(queue))?;
        Ok(limits.admit(depth_of(&ready), body_len))
    }

    /// Drops (or dead-letters, reason `maxlen`) the oldest ready messages
    /// of a `drop-head` queue until it is within its limits.
    async fn enforce_drop_head(&self, queue: &str, args: &QueueArguments) -> Result<()> {
        if !Limits::of(args).drops_head() {
            return Ok(());
        }
        let (me, q, a) = (self.arc()?, queue.to_owned(), args.clone());
        let claims = blocking(move || me.drop_head_claims(&q, &a)).await?;
        for claim in claims {
            self.dead_letter_or_drop(queue, args, &claim, Reason::MaxLen)
                .await?;
        }
        Ok(())
    }

    /// Claims the oldest ready messages of a `drop-head` queue beyond its
    /// limits, for [`Inner::enforce_drop_head`] to drop or dead-letter.
    fn drop_head_claims(&self, queue: &str, args: &QueueArguments) -> Result<Vec<Claim>> {
        let mut ready = self.layout.list_messages(&self.layout.ready(queue))?;
        ready.sort_by(|a, b| a.0.cmp(&b.0));
        let limits = Limits::of(args);
        let mut depth = depth_of(&ready);
        let mut oldest = Vec::new();
        for (file, name) in ready {
            if !limits.must_drop_head(depth) {
                break;
            }
            depth.messages -= 1;
            depth.bytes = depth.bytes.saturating_sub(name.body_len);
            oldest.push((file, name));
        }
        self.claim_files(queue, oldest)
    }

    /// Publishes a dead letter of a message that was in `envelope` to its
    /// dead-letter exchange, with the dead-letter routing key or the
    /// message's own; queues it would close a cycle into are left out.
    /// Behind a `dyn Send` box, for the recursion of dead-lettering a
    /// refused publish.
    fn publish_dead_letter<'a>(
        &'a self,
        envelope: &'a Envelope,
        dl: DeadLetter,
    ) -> Pin<Box<dyn Future<Output = Result<()>> + Send + 'a>> {
        Box::pin(async move {
            let routing_key = dl.routing_key.as_deref().unwrap_or(&envelope.routing_key);
            self.publish_routed(
                &dl.exchange,
                routing_key,
                dl.message,
                false,
                Some(dl.reason),
            )
            .await
        })
    }

    /// Publishes a message: routes it, writes one copy of it into every
    /// queue it goes to, and (for a persistent message bound for a durable
    /// queue) waits for the group commit.
    pub(crate) async fn publish_message(
        &self,
        exchange: &str,
        routing_key: &str,
        message: Message,
        mandatory: bool,
    ) -> Result<()> {
        self.publish_routed(exchange, routing_key, message, mandatory, None)
            .await
    }

    /// [`Inner::publish_message`]; a dead letter (`dead`: why it died)
    /// skips the queues it would close a cycle into.
    async fn publish_routed(
        &self,
        exchange: &str,
        routing_key: &str,
        message: Message,
        mandatory: bool,
        dead: Option<Reason>,
    ) -> Result<()> {
        let msg_ttl = message.ttl()?;
        if message.body.len() as u64 > self.options.max_message_size {
            return Err(Error::PreconditionFailed(
                format!(
                    "message size {} is larger than the configured maximum {}",
                    message.body.len(),
                    self.options.max_message_size
                )
                .into(),
            ));
        }
        crate::envelope::check_overhead(exchange, routing_key, &message.properties)?;
        let me = self.arc()?;
        let (x, rk) = (exchange.to_owned(), routing_key.to_owned());
        // Routing, admission and the writes run whole on the blocking pool,
        // one publish of this connection at a time, in call order. One that
        // may need a flush (a persistent message, when persistent ones are
        // synced) is counted as writing meanwhile, so the group commit waits
        // for it; the others never join a batch, and no batch waits for them.
        let writing = (message.is_persistent() && self.options.sync_persistent)
            .then(|| self.publishing.committer.writing());
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.publishing.submit(Box::new(move || {
            let _ = tx.send(me.prepare_publish(&x, &rk, message, mandatory, msg_ttl, dead));
        }));
        let prepared = rx
            .await
            .map_err(|_| Error::backend("file", false, "the publish's file work failed"))?;
        let Some(Prepared {
            envelope,
            copies,
            written,
            durable,
            expiring,
            refused,
        }) = prepared?
        else {
            return Ok(());
        };
        match writing {
            // `durable` implies a persistent message and synced ones, so a
            // publish that needs the flush is one counted as writing.
            Some(writing) if durable && !written.is_empty() => {
                let dirs = written
                    .iter()
                    .map(|&i| self.layout.ready(&copies[i].0))
                    .collect();
                self.publishing
                    .committer
                    .sync_dirs(self.layout.fs.clone(), dirs, writing)
                    .await?;
            }
            writing => drop(writing),
        }
        for &i in &written {
            let (q, f, args) = &copies[i];
            self.announce(q, f);
            self.enforce_drop_head(q, args).await?;
        }
        if expiring {
            self.janitor_wake.notify_one();
        }
        if refused.is_empty() {
            return Ok(());
        }
        for (q, args, dead_letter) in &refused {
            if !*dead_letter {
                continue;
            }
            if let Some(dl) = dead_letter_of(&envelope, q, Reason::MaxLen, args) {
                let _ = self.publish_dead_letter(&envelope, dl).await;
            }
        }
        Err(Error::Nacked(format!(
            "queue {:?} is full (x-overflow reject-publish)",
            refused[0].0
        )))
    }

    /// The file work of a publish: routes it, checks every target queue's
    /// limits, and writes one copy of the message into each queue that
    /// takes it. `None` when it goes nowhere (and is not mandatory).
    fn prepare_publish(
        &self,
        exchange: &str,
        routing_key: &str,
        message: Message,
        mandatory: bool,
        msg_ttl: Option<std::time::Duration>,
        dead: Option<Reason>,
    ) -> Result<Option<Prepared>> {
        let snap = self.snapshot()?;
        if dead.is_none() {
            // A dead letter may go to an internal exchange, as in RabbitMQ,
            // and carries headers its first publish was checked for.
            snap.graph.check_publish(exchange)?;
            check_sender_routes(&message.properties.headers)?;
        }
        let mut targets = snap.route(exchange, routing_key, &message.properties.headers)?;
        if let Some(reason) = dead {
            targets.retain(|q| !cycles_into(reason, q, &message.properties.headers));
        }
        if targets.is_empty() {
            if mandatory {
                return Err(Error::Unroutable {
                    exchange: exchange.to_owned(),
                    routing_key: routing_key.to_owned(),
                    message: Box::new(message),
                });
            }
            return Ok(None);
        }
        // BCC routes but is never delivered.
        let mut message = message;
        strip_bcc(&mut message);
        let now = names::now_ms();
        let stamp = names::next_stamp();
        let body_len = message.body.len() as u64;
        let persistent = message.is_persistent();
        let priority = message.properties.priority;
        let envelope = Envelope {
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
            published_at_ms: now,
            message,
        };

        let mut copies = Vec::new();
        let mut refused = Vec::new();
        let mut durable = false;
        let mut expiring = false;
        for q in &targets {
            let Some(rec) = snap.topo.queues.get(q) else {
                continue;
            };
            let args = QueueArguments::from_table(&rec.arguments)?;
            match self.admission(q, &args, body_len)? {
                Admission::Accept => {}
                Admission::Refuse { dead_letter } => {
                    refused.push((q.clone(), args, dead_letter));
                    continue;
                }
            }
            let ttl = policy::message_ttl(args.message_ttl, msg_ttl);
            let expires_at_ms =
                ttl.map(|t| (now.max(0) as u64).saturating_add(t.as_millis() as u64));
            expiring |= expires_at_ms.is_some();
            let rank = 255 - policy::priority_level(args.max_priority, priority);
            let name = MessageName {
                rank,
                stamp,
                origin: names::process_tag().to_owned(),
                body_len,
                expires_at_ms,
                redelivered: false,
            };
            durable |= persistent && rec.durable && self.options.sync_persistent;
            copies.push((q.clone(), name.file_name(), args));
        }

        let written = if copies.is_empty() {
            Vec::new()
        } else {
            let bytes = envelope.encode();
            let tmp = self.layout.tmp().join(format!(
                "{}.{}",
                self.owner,
                self.publishing.tmp_seq.fetch_add(1, Ordering::Relaxed)
            ));
            let dests: Vec<PathBuf> = copies
                .iter()
                .map(|(q, f, _)| self.layout.ready(q).join(f))
                .collect();
            // Where the group commit flushes the whole file system once
            // per batch, that flush covers the files' data too.
            let fsync_files = durable && !crate::commit::SYNCS_FILE_SYSTEM;
            write_copies(&self.layout.fs, &tmp, &bytes, fsync_files, &dests)?
        };
        Ok(Some(Prepared {
            envelope,
            copies,
            written,
            durable,
            expiring,
            refused,
        }))
    }
}
