//! The folder transport of the `bus` message library: AMQP semantics over a
//! directory, shared by every process on the host that opens it, crash-safe,
//! with no broker. Also the bridge to the legacy folder integration
//! ([`legacy`]).
//!
//! ```no_run
//! # async fn demo() -> bus_core::Result<()> {
//! use bus_core::{ConnectionExt, Message, QueueOptions, Connection};
//! let conn = bus_file::FileConnection::open("/var/lib/my-service/bus").await?;
//! conn.declare_queue("jobs", QueueOptions::durable()).await?;
//! // Resolves once the message file and its folder entry are on disk.
//! conn.send_to_queue("jobs", Message::new(&b"work"[..]).persistent()).await?;
//! # Ok(()) }
//! ```
//!
//! # On-disk format, version 1
//!
//! The root's `FORMAT` file holds `bus-file on-disk format 1`; a library
//! that reads another version refuses to open the root
//! ([`bus_core::Error::NotSupported`]). Under the root:
//!
//! | path | what |
//! |---|---|
//! | `FORMAT` | the format version |
//! | `topology` | exchanges, queues, bindings: one binary file (magic `BUST`, version, generation, records, CRC-32), replaced atomically (write to `tmp/`, fsync, rename, fsync the root); version 1 without exchange-to-exchange bindings, version 2 (written only when there are some) with them after the queue bindings |
//! | `topology.lock` | `flock`ed by whoever changes the topology, so changes from several processes are serialised |
//! | `owners/<owner>.lock` | one per open connection, `flock`ed for its whole life: the proof that it is alive |
//! | `tmp/` | messages being written (`<owner>.<n>`); never read as messages |
//! | `queues/<queue>/ready/` | messages ready for delivery, one file each |
//! | `queues/<queue>/claims/<owner>/` | messages delivered to a connection and not yet settled |
//! | `queues/<queue>/consumers/<owner>.<n>[.x]` | one per consumer (`.x`: exclusive), for consumer counts, exclusivity and auto-delete |
//! | `queues/<queue>/single-active-consumer.lock` | `flock`ed by the connection whose consumer is active |
//! | `quarantine/` | files that were not valid messages, each with a `.reason` file |
//! | `trash/` | deleted queues, renamed aside before removal |
//!
//! **Message files** hold an [`Envelope`] (magic `BUSM`, envelope version,
//! lengths, exchange, routing key, publish time, every property, the body,
//! CRC-32; see [`envelope`]). Their names sort in delivery order:
//! `RRR-SSSSSSSSSSSSSSSSSSSS-ORIGIN-LEN[-eEXPIRY][.r]`, with `RRR` = 255 −
//! priority (priority queues) or 255, `S` a per-process strictly increasing
//! nanosecond stamp, `ORIGIN` the publishing process, `LEN` the body length,
//! `EXPIRY` the millisecond time the message expires, and `.r` marking a
//! message delivered before.
//!
//! **Maildir discipline.** A publish writes the envelope once under
//! `tmp/`, then renames (one queue) or hard-links (several) it into each
//! queue's `ready/`: a reader sees the whole message or nothing. A consumer
//! claims a message by renaming it into its own claim folder: of several
//! consumers, threads or processes, exactly one rename succeeds. Ack
//! removes the file; nack with requeue renames it back under its original
//! name plus `.r`, so it keeps its place and is `redelivered`; reject
//! dead-letters it (a new message with `x-death`, as RabbitMQ writes it, by
//! [`bus_core::engine`]: the in-process broker writes it the same way; an
//! expiry or max-length cycle back into a queue is dropped, as in RabbitMQ).
//!
//! **Durability.** A persistent message bound for a durable queue is on
//! disk, its data and its folder entry, before its publish resolves.
//! Concurrent publishers share the flush (group commit), so durable
//! throughput grows with concurrency: on Linux one `syncfs(2)` of the root's
//! file system covers a whole batch (it also flushes unrelated dirty data on
//! that file system, so a batch may wait longer while another program writes
//! heavily there); elsewhere each file is fsynced and the folder fsyncs are
//! shared. Transient messages are not flushed: they survive a process
//! crash, not a power cut.
//!
//! **Liveness.** Each connection holds an `flock` on its owner file; the
//! kernel releases it when the process dies, however it dies. Every
//! connection's background pass (each [`FileOptions::rescan_interval`])
//! tries those locks: one it can take belongs to a dead connection, whose
//! claims go back to their queues marked redelivered. No timeout guesses.
//!
//! **Watching.** Consumers learn of new messages through file-system events
//! (at once within one process; on Linux an inotify watch asking only for
//! names arriving in `ready/`, so claiming wakes nobody; elsewhere the
//! `notify` crate) and list their folder again every rescan interval, so a
//! lost or overflowed event delays a delivery by at most that interval.
//!
//! **Delivery in batches.** A consumer's dispatcher claims and reads ready
//! messages on the blocking pool, up to the consumer's free prefetch, a
//! batch per hop, through the queue's folders opened once per pass; an ack
//! unlinks its file in the open claim folder where it is called (one
//! system call, cheaper than a hop to the pool; a `multiple` ack of many
//! goes to the pool).
//!
//! # Capabilities
//!
//! See [`capabilities`]: everything the conformance suite checks except
//! queue expiry (`x-expires`, refused with `NotSupported`), quorum and
//! stream queues (refused), a quorum queue's delivery limit
//! (`x-delivery-limit`, refused with `NotSupported` on any queue: the
//! transport keeps no delivery count, so a crash loop never ends by it;
//! `Capabilities::delivery_limit` is false), exchange types of broker plugins
//! ([`bus_core::ExchangeKind::Custom`], refused with `NotSupported`; the
//! topology file reserves kind tag 4, followed by the type's name, for
//! them), RabbitMQ's direct reply-to (replies use an exclusive queue). Exclusive queues, consumer counts, exclusive and
//! single-active consumers hold across processes (consumer registrations
//! under the topology lock, the single active consumer by an `flock`);
//! a single active consumer in another process takes over within one rescan
//! interval. Max-length is checked by counting the folder at publish, so
//! publishers racing in several processes can overshoot it briefly.
//! Non-durable queues live as long as the folder: there is no broker whose
//! restart would drop them.
//!
//! # Security and threat model
//!
//! **Who is trusted.** The folder transport trusts the user that runs it
//! and nobody else: everyone who can write under the root can read, forge,
//! reorder and delete every message and the topology, so the root must be
//! writable by that user alone. On open, the root and its folders (those
//! of the root and of each queue) must be owned by the current user and
//! not writable by group or others, or the open fails with
//! [`bus_core::Error::AccessRefused`] saying which folder and why.
//! [`FileOptions::shared_group`] lets the members of the root's group in
//! (group-writable folders, owned by any member): each of them is then as
//! trusted as the user, since each can do all of the above.
//!
//! **What is defended against** is a writer confined to the folders (a
//! bug, a misbehaving peer, a hostile co-tenant of a shared group or of a
//! legacy folder) trying to reach *outside* them, to make the transport
//! hang, or to exhaust its memory:
//!
//! * Queue and exchange names become path components only after
//!   [`check_path_name`] (separators, a leading dot so `.` and `..`, NUL,
//!   over 255 bytes are refused with [`bus_core::Error::InvalidArgument`]).
//!   Every name read from disk passes the same check before use: a
//!   topology file naming an invalid queue, exchange, binding or owner is
//!   refused whole as corrupt ("corrupt topology: ..."), and nothing acts on
//!   it; owner ids, claim folders, consumer registrations and queue folders
//!   that do not have the shape the transport writes are ignored.
//! * The root is opened once and every operation below it walks with
//!   `openat(O_NOFOLLOW | O_DIRECTORY)` component by component, and
//!   renames, links and deletes with `renameat` / `unlinkat` relative to
//!   those descriptors: a symlink anywhere below the root (a queue, its
//!   `ready/` or `claims/<owner>/` folder, `tmp/`) is an error, never
//!   followed. A symlink or FIFO named like a message is quarantined.
//!   Delivery walks to a queue's folders once per dispatching pass and
//!   works relative to them for that pass (a folder swapped meanwhile is
//!   not followed either: the descriptors keep the folders they opened).
//! * A message file must have one name (`st_nlink == 1`; a hard link to a
//!   file elsewhere is quarantined), and is read only after `fstat` shows a
//!   size between the body length its name claims and that plus 1 MiB, and
//!   a body no larger than [`FileOptions::max_message_size`]: a sparse or
//!   lying file is quarantined unread. Numbers parsed from names are summed
//!   with saturation.
//! * File-system work of topology operations runs on tokio's blocking
//!   pool, so a `topology.lock` held by another process delays only the
//!   operation that waits for it, and a `tokio::time::timeout` around it
//!   returns on time.
//! * Consumer registration is the creation of one empty file, so a full
//!   disk cannot leave a half-registered consumer, and consuming (renames
//!   and deletes) works on a full disk: a queue that filled it can be
//!   drained.
//!
//! **Not defended against:** a writer under the root can still forge,
//! delete or corrupt messages (checksums catch accidents, not forgers) and
//! replace the topology with another valid one. Folders are created `0700`
//! and files `0600`.
//!
//! **Legacy folders** ([`legacy`]) are written by other programs, possibly
//! as other users, and are trusted only for the content of the inputs they
//! drop: an input folder is opened once and walked the same way (no
//! symlink below it is followed; symlinks and other non-files are not
//! taken); `.bus/claims/` entries count only when shaped like owner ids
//! and are listed without following symlinks; an input that is a hard link,
//! larger than [`legacy::Inbox::with_max_size`], or whose name is not UTF-8
//! moves to the failed folder with its reason beside it. A
//! [`legacy::ResultWriter`] holds its folder open, so a symlink swapped in
//! for it later does not redirect results.
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

mod codec;
mod commit;
mod connection;
mod consumer;
pub mod envelope;
mod fsys;
mod janitor;
mod layout;
pub mod legacy;
mod names;
mod sync;
mod topology;
mod watch;

pub use connection::{FileConnection, FileOptions, DEFAULT_MAX_MESSAGE_SIZE};
pub use envelope::{Envelope, ENVELOPE_VERSION};
pub use layout::FORMAT_VERSION;
pub use names::check_path_name;

use bus_core::Capabilities;

/// Entry points of the fuzz targets in `bus-file/fuzz`; not part of the
/// API, no stability promised.
#[doc(hidden)]
pub mod fuzzing {
    /// Decodes `bytes` as a topology file; what decodes must encode and
    /// decode back to the same topology. Panics on a violation.
    pub fn topology_decode(bytes: &[u8]) {
        if let Ok(t) = crate::topology::Topology::decode(bytes) {
            let again = crate::topology::Topology::decode(&t.encode());
            assert_eq!(again.ok(), Some(t), "a decoded topology round-trips");
        }
    }

    /// Parses `name` as a message file name; what parses must round-trip.
    /// Panics on a violation.
    pub fn message_name(name: &str) {
        if let Some(m) = crate::names::MessageName::parse(name) {
            let again = crate::names::MessageName::parse(&m.file_name());
            assert_eq!(again, Some(m), "a parsed name round-trips");
        }
        let _ = crate::names::consumer_file_owner(name);
    }
}

/// What the folder transport offers, as its connections report it.
#[must_use]
pub fn capabilities() -> Capabilities {
    let mut caps = Capabilities::all("file");
    caps.queue_expiry = false;
    caps.quorum_queues = false;
    caps.delivery_limit = false;
    caps.plugin_exchange_kinds = false;
    caps.direct_reply = false;
    caps.recovery = false;
    caps
}
