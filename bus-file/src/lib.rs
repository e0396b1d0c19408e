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
//! | `topology` | exchanges, queues, bindings: one binary file (magic `BUST`, version, generation, records, CRC-32), replaced atomically (write to `tmp/`, fsync, rename, fsync the root) |
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
//! dead-letters it (a new message with `x-death`, as RabbitMQ writes it).
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
//! (the `notify` crate; at once within one process) and list their folder
//! again every rescan interval, so a lost or overflowed event delays a
//! delivery by at most that interval.
//!
//! # Capabilities
//!
//! See [`capabilities`]: everything the conformance suite checks except
//! queue expiry (`x-expires`, refused with `NotSupported`), quorum and
//! stream queues (refused), RabbitMQ's direct reply-to (replies use an
//! exclusive queue). Exclusive queues, consumer counts, exclusive and
//! single-active consumers hold across processes (consumer registrations
//! under the topology lock, the single active consumer by an `flock`);
//! a single active consumer in another process takes over within one rescan
//! interval. Max-length is checked by counting the folder at publish, so
//! publishers racing in several processes can overshoot it briefly.
//! Non-durable queues live as long as the folder: there is no broker whose
//! restart would drop them.
//!
//! # Security
//!
//! Queue and exchange names become path components only after
//! [`check_path_name`]: separators, a leading dot (so `.` and `..`), NUL and
//! names over 255 bytes are refused with
//! [`bus_core::Error::InvalidArgument`]. Folders are created `0700` and files
//! `0600`. Files are opened with `O_NOFOLLOW` and must be regular files, so a
//! symlink planted in a queue is never followed out of the root: it is
//! quarantined like any file that does not parse, with the reason beside it,
//! and the queue goes on.
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
mod topology;

pub use connection::{FileConnection, FileOptions, DEFAULT_MAX_MESSAGE_SIZE};
pub use envelope::{Envelope, ENVELOPE_VERSION};
pub use layout::FORMAT_VERSION;
pub use names::check_path_name;

use bus_core::Capabilities;

/// What the folder transport offers, as its connections report it.
#[must_use]
pub fn capabilities() -> Capabilities {
    Capabilities {
        queue_expiry: false,
        quorum_queues: false,
        direct_reply: false,
        ..Capabilities::all("file")
    }
}
