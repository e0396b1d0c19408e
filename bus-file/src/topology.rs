//! The shared topology (exchanges, queues, bindings) in the `topology` file
//! of the root, changed only under the `topology.lock` flock and replaced
//! atomically, so every process reads a whole, consistent version.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;

use bus_core::routing::{auto_delete, BindingStore};
use bus_core::{ExchangeKind, FieldTable};

use crate::codec::{crc32, DecodeError, Reader, Writer};
use crate::fsys;
use crate::names::{check_path_name, is_owner_id};

const MAGIC: &[u8; 4] = b"BUST";
/// The format without exchange-to-exchange bindings: written whenever there
/// are none, so that a library that only knows it keeps reading the file.
const VERSION: u8 = 1;
/// Version 1 followed by the exchange-to-exchange bindings.
const VERSION_E2E: u8 = 2;

/// A declared exchange.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ExchangeRecord {
    pub(crate) kind: ExchangeKind,
    pub(crate) durable: bool,
    pub(crate) auto_delete: bool,
    pub(crate) internal: bool,
    pub(crate) arguments: FieldTable,
}

/// A declared queue.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct QueueRecord {
    /// Tells a queue from a later one of the same name.
    pub(crate) id: String,
    pub(crate) durable: bool,
    /// The owner id of the connection an exclusive queue belongs to.
    pub(crate) exclusive_owner: Option<String>,
    pub(crate) auto_delete: bool,
    /// The `x-` arguments as a table (`QueueArguments::to_table`).
    pub(crate) arguments: FieldTable,
}

/// A binding of a queue to an exchange.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct BindingRecord {
    pub(crate) exchange: String,
    pub(crate) queue: String,
    pub(crate) routing_key: String,
    pub(crate) arguments: FieldTable,
}

/// A binding of an exchange to another (`exchange.bind`).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ExchangeBindingRecord {
    pub(crate) destination: String,
    pub(crate) source: String,
    pub(crate) routing_key: String,
    pub(crate) arguments: FieldTable,
}

/// The whole topology.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Topology {
    pub(crate) generation: u64,
    pub(crate) exchanges: BTreeMap<String, ExchangeRecord>,
    pub(crate) queues: BTreeMap<String, QueueRecord>,
    pub(crate) bindings: Vec<BindingRecord>,
    pub(crate) exchange_bindings: Vec<ExchangeBindingRecord>,
}

/// The kind's tag in the file; a custom kind (tag 4) is followed by its name.
/// The folder transport refuses custom kinds, so none is written today; the
/// tag keeps the encoding total.
fn write_kind(w: &mut Writer, k: &ExchangeKind) {
    match k {
        ExchangeKind::Direct => w.u8(0),
        ExchangeKind::Fanout => w.u8(1),
        ExchangeKind::Topic => w.u8(2),
        ExchangeKind::Headers => w.u8(3),
        ExchangeKind::Custom(name) => {
            w.u8(4);
            w.str(name);
        }
    }
}

impl Topology {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.buf.extend_from_slice(MAGIC);
        let e2e = !self.exchange_bindings.is_empty();
        w.u8(if e2e { VERSION_E2E } else { VERSION });
        w.u64(self.generation);
        w.u32(self.exchanges.len() as u32);
        for (name, x) in &self.exchanges {
            w.str(name);
            write_kind(&mut w, &x.kind);
            w.bool(x.durable);
            w.bool(x.auto_delete);
            w.bool(x.internal);
            w.table(&x.arguments);
        }
        w.u32(self.queues.len() as u32);
        for (name, q) in &self.queues {
            w.str(name);
            w.str(&q.id);
            w.bool(q.durable);
            w.opt_str(q.exclusive_owner.as_deref());
            w.bool(q.auto_delete);
            w.table(&q.arguments);
        }
        w.u32(self.bindings.len() as u32);
        for b in &self.bindings {
            w.str(&b.exchange);
            w.str(&b.queue);
            w.str(&b.routing_key);
            w.table(&b.arguments);
        }
        if e2e {
            w.u32(self.exchange_bindings.len() as u32);
            for b in &self.exchange_bindings {
                w.str(&b.destination);
                w.str(&b.source);
                w.str(&b.routing_key);
                w.table(&b.arguments);
            }
        }
        let crc = crc32(&w.buf);
        w.u32(crc);
        w.buf
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Topology, DecodeError> {
        if bytes.len() < 9 || &bytes[..4] != MAGIC {
            return Err(DecodeError("not a topology file".into()));
        }
        let version = bytes[4];
        if version != VERSION && version != VERSION_E2E {
            return Err(DecodeError(format!(
                "topology version {} is not supported",
                bytes[4]
            )));
        }
        let (content, crc) = bytes.split_at(bytes.len() - 4);
        if crc32(content) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
            return Err(DecodeError("topology checksum mismatch".into()));
        }
        let mut r = Reader::new(&content[5..]);
        let mut t = Topology {
            generation: r.u64()?,
            ..Topology::default()
        };
        for _ in 0..r.u32()? {
            let name = r.string()?;
            let kind = match r.u8()? {
                0 => ExchangeKind::Direct,
                1 => ExchangeKind::Fanout,
                2 => ExchangeKind::Topic,
                3 => ExchangeKind::Headers,
                4 => ExchangeKind::Custom(r.string()?),
                b => return Err(DecodeError(format!("unknown exchange kind {b}"))),
            };
            let x = ExchangeRecord {
                kind,
                durable: r.bool()?,
                auto_delete: r.bool()?,
                internal: r.bool()?,
                arguments: r.table(0)?,
            };
            t.exchanges.insert(name, x);
        }
        for _ in 0..r.u32()? {
            let name = r.string()?;
            let q = QueueRecord {
                id: r.string()?,
                durable: r.bool()?,
                exclusive_owner: r.opt_string()?,
                auto_delete: r.bool()?,
                arguments: r.table(0)?,
            };
            t.queues.insert(name, q);
        }
        for _ in 0..r.u32()? {
            t.bindings.push(BindingRecord {
                exchange: r.string()?,
                queue: r.string()?,
                routing_key: r.string()?,
                arguments: r.table(0)?,
            });
        }
        if version == VERSION_E2E {
            for _ in 0..r.u32()? {
                t.exchange_bindings.push(ExchangeBindingRecord {
                    destination: r.string()?,
                    source: r.string()?,
                    routing_key: r.string()?,
                    arguments: r.table(0)?,
                });
            }
        }
        if r.remaining() != 0 {
            return Err(DecodeError("trailing bytes in topology".into()));
        }
        t.validate()?;
        Ok(t)
    }

    /// Checks every name the file holds as the API checks names, since
    /// they become path components: a topology that names an invalid queue,
    /// exchange or owner is corrupt (or crafted), and is refused whole
    /// before anything acts on it.
    fn validate(&self) -> Result<(), DecodeError> {
        let corrupt = |what: &str, e: bus_core::Error| {
            DecodeError(format!("corrupt topology: invalid {what}: {e}"))
        };
        let names = self.exchanges.keys().chain(self.queues.keys());
        let names = names.chain(self.bindings.iter().flat_map(|b| [&b.queue, &b.exchange]));
        let names = names.chain(
            self.exchange_bindings
                .iter()
                .flat_map(|b| [&b.destination, &b.source]),
        );
        if names.into_iter().any(String::is_empty) {
            return Err(DecodeError("corrupt topology: an empty name".into()));
        }
        for name in self.exchanges.keys() {
            check_path_name("exchange", name).map_err(|e| corrupt("exchange", e))?;
        }
        for (name, q) in &self.queues {
            check_path_name("queue", name).map_err(|e| corrupt("queue", e))?;
            if q.id.is_empty() || !q.id.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(DecodeError(format!(
                    "corrupt topology: queue {name:?} has an invalid id {:?}",
                    q.id
                )));
            }
            if let Some(o) = &q.exclusive_owner {
                if !is_owner_id(o) {
                    return Err(DecodeError(format!(
                        "corrupt topology: queue {name:?} names an invalid owner {o:?}"
                    )));
                }
            }
        }
        for b in &self.bindings {
            check_path_name("queue", &b.queue).map_err(|e| corrupt("binding queue", e))?;
            check_path_name("exchange", &b.exchange).map_err(|e| corrupt("binding exchange", e))?;
        }
        for b in &self.exchange_bindings {
            for name in [&b.destination, &b.source] {
                check_path_name("exchange", name).map_err(|e| corrupt("binding exchange", e))?;
            }
        }
        Ok(())
    }

    /// Removes a queue and its bindings, then auto-delete exchanges left
    /// without bindings. Returns whether the queue was there.
    pub(crate) fn remove_queue(&mut self, name: &str) -> bool {
        let had = self.queues.remove(name).is_some();
        let sources: Vec<String> = self
            .bindings
            .iter()
            .filter(|b| b.queue == name)
            .map(|b| b.exchange.clone())
            .collect();
        self.bindings.retain(|b| b.queue != name);
        auto_delete(self, sources);
        had
    }
}

/// The records as the topology rules of `bus_core::routing` see them.
impl BindingStore for Topology {
    fn is_auto_delete(&self, name: &str) -> bool {
        self.exchanges.get(name).is_some_and(|x| x.auto_delete)
    }

    fn has_bindings_from(&self, name: &str) -> bool {
        self.bindings.iter().any(|b| b.exchange == name)
            || self.exchange_bindings.iter().any(|b| b.source == name)
    }

    fn remove_exchange(&mut self, name: &str) -> bool {
        if self.exchanges.remove(name).is_none() {
            return false;
        }
        self.bindings.retain(|b| b.exchange != name);
        self.exchange_bindings.retain(|b| b.source != name);
        true
    }

    fn remove_bindings_to_exchange(&mut self, name: &str) -> Vec<String> {
        let sources = self
            .exchange_bindings
            .iter()
            .filter(|b| b.destination == name)
            .map(|b| b.source.clone())
            .collect();
        self.exchange_bindings.retain(|b| b.destination != name);
        sources
    }
}

/// Identifies one version of the topology file without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FileStamp {
    ino: u64,
    mtime_ns: i64,
    ctime_ns: i64,
    size: u64,
}

/// The largest topology file read: far beyond any real topology, it
/// bounds what a crafted file can make a reader allocate.
pub(crate) const MAX_TOPOLOGY_BYTES: u64 = 64 << 20;

/// Stats the topology file; `None` when there is none yet.
pub(crate) fn stamp(root: &fsys::Root) -> io::Result<Option<FileStamp>> {
    match root.stat(Path::new("topology")) {
        Ok(m) => Ok(Some(FileStamp {
            ino: m.st_ino,
            mtime_ns: m
                .st_mtime
                .saturating_mul(1_000_000_000)
                .saturating_add(m.st_mtime_nsec as i64),
            ctime_ns: m
                .st_ctime
                .saturating_mul(1_000_000_000)
                .saturating_add(m.st_ctime_nsec as i64),
            size: m.st_size as u64,
        })),
        Err(e) if fsys::is_not_found(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Reads the topology file; an empty topology when there is none yet. A
/// file that does not decode, or names something invalid, is an
/// `InvalidData` error saying so: nothing acts on it.
pub(crate) fn read(root: &fsys::Root) -> io::Result<Topology> {
    let path = Path::new("topology");
    match root.read_checked(path, 0, MAX_TOPOLOGY_BYTES, false) {
        Ok(bytes) => Topology::decode(&bytes).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", root.display_path(path).display()),
            )
        }),
        Err(e) if fsys::is_not_found(&e) => Ok(Topology::default()),
        Err(e) => Err(e),
    }
}

/// Replaces the topology file durably (the caller holds the lock).
pub(crate) fn write(root: &fsys::Root, t: &Topology) -> io::Result<()> {
    let tmp = Path::new("tmp").join(format!("topology.{}", crate::names::process_tag()));
    root.write_atomic(
        &tmp,
        Path::new("topology"),
        &t.encode(),
        fsys::FILE_MODE,
        true,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topology_round_trips() {
        let mut t = Topology {
            generation: 7,
            ..Topology::default()
        };
        t.exchanges.insert(
            "x".into(),
            ExchangeRecord {
                kind: ExchangeKind::Topic,
                durable: true,
                auto_delete: false,
                internal: false,
                arguments: FieldTable::new(),
            },
        );
        t.exchanges.insert(
            "plugin".into(),
            ExchangeRecord {
                kind: ExchangeKind::custom("x-consistent-hash"),
                durable: false,
                auto_delete: false,
                internal: false,
                arguments: FieldTable::new(),
            },
        );
        t.queues.insert(
            "q".into(),
            QueueRecord {
                id: "1".into(),
                durable: false,
                exclusive_owner: Some(format!("o{}", "ab".repeat(16))),
                auto_delete: true,
                arguments: [("x-max-length".to_string(), 5i64.into())].into(),
            },
        );
        t.bindings.push(BindingRecord {
            exchange: "x".into(),
            queue: "q".into(),
            routing_key: "a.#".into(),
            arguments: FieldTable::new(),
        });
        assert_eq!(Topology::decode(&t.encode()).unwrap(), t);
        assert_eq!(t.encode()[4], VERSION, "no exchange bindings: version 1");
        let mut bad = t.encode();
        bad[10] ^= 1;
        assert!(Topology::decode(&bad).is_err());
        t.exchange_bindings.push(ExchangeBindingRecord {
            destination: "x".into(),
            source: "amq.fanout".into(),
            routing_key: "k".into(),
            arguments: [("x-match".to_string(), "any".into())].into(),
        });
        assert_eq!(t.encode()[4], VERSION_E2E);
        assert_eq!(Topology::decode(&t.encode()).unwrap(), t);
    }

    /// A file written before exchange-to-exchange bindings existed (version
    /// 1, bytes as that version wrote them) still reads.
    #[test]
    fn a_version_1_file_reads() {
        let mut v1 = MAGIC.to_vec();
        v1.push(1);
        v1.extend_from_slice(&3u64.to_le_bytes());
        v1.extend_from_slice(&0u32.to_le_bytes());
        v1.extend_from_slice(&0u32.to_le_bytes());
        v1.extend_from_slice(&0u32.to_le_bytes());
        let crc = crc32(&v1);
        v1.extend_from_slice(&crc.to_le_bytes());
        let t = Topology::decode(&v1).unwrap();
        assert_eq!(t.generation, 3);
        assert!(t.exchanges.is_empty() && t.bindings.is_empty() && t.exchange_bindings.is_empty());
        assert_eq!(t.encode(), v1);
    }
}

#[cfg(test)]
mod props {
    //! The decoder against arbitrary bytes, in place of a fuzz run where
    //! `cargo fuzz` is not installed (the `topology_decode` fuzz target
    //! runs the same check).
    use super::*;
    use proptest::prelude::*;

    /// Bytes with a valid magic, version and checksum around `body`, so the
    /// decoder's inner parsing and validation are reached.
    fn framed(version: u8, body: &[u8]) -> Vec<u8> {
        let mut v = MAGIC.to_vec();
        v.push(version);
        v.extend_from_slice(body);
        let crc = crc32(&v);
        v.extend_from_slice(&crc.to_le_bytes());
        v
    }

    proptest! {
        #[test]
        fn decode_never_panics_and_what_it_accepts_round_trips(
            body in proptest::collection::vec(any::<u8>(), 0..600),
            raw in proptest::collection::vec(any::<u8>(), 0..64),
            e2e in any::<bool>(),
        ) {
            let _ = Topology::decode(&raw);
            let version = if e2e { VERSION_E2E } else { VERSION };
            if let Ok(t) = Topology::decode(&framed(version, &body)) {
                prop_assert_eq!(Topology::decode(&t.encode()).expect("re-decodes"), t);
            }
        }

        #[test]
        fn names_from_disk_are_checked(name in "[ -~]{0,20}") {
            let mut t = Topology::default();
            t.queues.insert(name.clone(), QueueRecord {
                id: "1".into(),
                durable: false,
                exclusive_owner: None,
                auto_delete: false,
                arguments: FieldTable::new(),
            });
            let decoded = Topology::decode(&t.encode());
            let valid = !name.is_empty() && check_path_name("queue", &name).is_ok();
            prop_assert_eq!(decoded.is_ok(), valid, "{:?}", name);
        }
    }
}
