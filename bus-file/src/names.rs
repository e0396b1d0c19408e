//! Names: which entity names may become folder names, how message files are
//! named so that a folder listing sorts in delivery order, and the clock the
//! names and TTLs use.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bus_core::{validate_name, Error, Result};

/// Checks a queue or exchange name for use as a path component: AMQP's
/// rules (at most 255 bytes, no NUL) plus no separator and no leading dot,
/// so a name can neither leave the root (`..`, `a/../../x`) nor hide among
/// the transport's own entries.
///
/// # Errors
/// [`Error::InvalidArgument`] naming the problem.
pub fn check_path_name(what: &str, name: &str) -> Result<()> {
    validate_name(what, name)?;
    if name.contains('/') || name.contains('\\') {
        return Err(Error::InvalidArgument(format!(
            "{what} name {name:?} contains a path separator, which the file transport refuses"
        )));
    }
    if name.starts_with('.') {
        return Err(Error::InvalidArgument(format!(
            "{what} name {name:?} starts with a dot, which the file transport refuses"
        )));
    }
    Ok(())
}

/// A process-unique identifier (pid and random bits) that keeps names
/// written by different processes from colliding.
pub(crate) fn process_tag() -> &'static str {
    static TAG: OnceLock<String> = OnceLock::new();
    TAG.get_or_init(|| {
        let r = uuid::Uuid::new_v4().as_u128() as u32;
        format!("{:08x}{:08x}", std::process::id(), r)
    })
}

/// A new unique identifier for a connection (an owner of claims).
pub(crate) fn new_owner_id() -> String {
    format!("o{}", uuid::Uuid::new_v4().simple())
}

/// Whether `s` has the shape of an owner id ([`new_owner_id`]: `o` and 32
/// lowercase hex digits). Owner ids read from disk (topology, lock, claim
/// and consumer file names) are used only when they pass, so a crafted one
/// can never be a path.
pub(crate) fn is_owner_id(s: &str) -> bool {
    s.len() == 33
        && s.starts_with('o')
        && s[1..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The owner of a consumer registration file `<owner>.<n>[.x]`, when the
/// name has that shape.
pub(crate) fn consumer_file_owner(file: &str) -> Option<(&str, bool)> {
    let (owner, rest) = file.split_once('.')?;
    let (n, exclusive) = match rest.strip_suffix(".x") {
        Some(n) => (n, true),
        None => (rest, false),
    };
    (is_owner_id(owner) && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .then_some((owner, exclusive))
}

/// Milliseconds since the Unix epoch on the transport's clock.
///
/// Anchored on the wall clock once per process, then advanced by tokio's
/// clock, so that TTLs follow a paused test clock inside a runtime and the
/// wall clock otherwise (which is what other processes compare against).
pub(crate) fn now_ms() -> i64 {
    (now_ns() / 1_000_000) as i64
}

fn now_ns() -> i128 {
    static ANCHOR: OnceLock<(i128, std::time::Instant)> = OnceLock::new();
    let (wall, instant) = *ANCHOR.get_or_init(|| {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_nanos() as i128;
        (wall, std::time::Instant::now())
    });
    let now = tokio::time::Instant::now().into_std();
    if now >= instant {
        wall + now.duration_since(instant).as_nanos() as i128
    } else {
        wall - instant.duration_since(now).as_nanos() as i128
    }
}

/// A stamp that orders this process's publishes: nanoseconds, strictly
/// increasing within the process, close to wall time across processes.
pub(crate) fn next_stamp() -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = now_ns().max(0) as u64;
    let mut prev = LAST.load(Ordering::Relaxed);
    loop {
        let next = now.max(prev + 1);
        match LAST.compare_exchange_weak(prev, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(p) => prev = p,
        }
    }
}

/// The name of a message file in a queue folder. Listing a folder and
/// sorting the names gives delivery order: priority first (higher first),
/// then publish stamp. The name also carries what the folder scans need
/// without opening the file: body length (for `x-max-length-bytes`), the
/// expiry time, and whether the message was delivered before.
///
/// `PPP-SSSSSSSSSSSSSSSSSSSS-ORIGIN-LEN[-eEXPIRY][.r]`
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct MessageName {
    /// `255 - priority`, so that higher priorities sort first.
    pub(crate) rank: u8,
    pub(crate) stamp: u64,
    pub(crate) origin: String,
    pub(crate) body_len: u64,
    pub(crate) expires_at_ms: Option<u64>,
    pub(crate) redelivered: bool,
}

impl MessageName {
    /// The file name.
    pub(crate) fn file_name(&self) -> String {
        let mut s = format!(
            "{:03}-{:020}-{}-{}",
            self.rank, self.stamp, self.origin, self.body_len
        );
        if let Some(e) = self.expires_at_ms {
            let _ = write!(s, "-e{e}");
        }
        if self.redelivered {
            s.push_str(".r");
        }
        s
    }

    /// Parses a file name; `None` for anything that is not a message name
    /// (which a scan then quarantines or ignores).
    pub(crate) fn parse(name: &str) -> Option<MessageName> {
        let (base, redelivered) = match name.strip_suffix(".r") {
            Some(b) => (b, true),
            None => (name, false),
        };
        let mut parts = base.split('-');
        let rank = parts.next()?;
        let stamp = parts.next()?;
        let origin = parts.next()?;
        let len = parts.next()?;
        let expires = match parts.next() {
            None => None,
            Some(e) => Some(e.strip_prefix('e')?.parse().ok()?),
        };
        if parts.next().is_some()
            || rank.len() != 3
            || stamp.len() != 20
            || origin.is_empty()
            || !origin.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return None;
        }
        Some(MessageName {
            rank: rank.parse().ok()?,
            stamp: stamp.parse().ok()?,
            origin: origin.to_owned(),
            body_len: len.parse().ok()?,
            expires_at_ms: expires,
            redelivered,
        })
    }

    /// The same message marked as delivered before.
    pub(crate) fn redelivered(&self) -> MessageName {
        MessageName {
            redelivered: true,
            ..self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_names_cannot_escape() {
        for bad in ["..", ".", "a/b", "../x", ".hidden", "a\\b", "a\0b"] {
            assert!(
                matches!(
                    check_path_name("queue", bad),
                    Err(Error::InvalidArgument(_))
                ),
                "{bad:?}"
            );
        }
        assert!(check_path_name("queue", &"q".repeat(256)).is_err());
        assert!(check_path_name("queue", "jobs.high-prio_1").is_ok());
        assert!(check_path_name("queue", "amq.gen-abc").is_ok());
    }

    #[test]
    fn names_round_trip_and_sort_in_delivery_order() {
        let a = MessageName {
            rank: 255,
            stamp: 5,
            origin: "00ff".into(),
            body_len: 3,
            expires_at_ms: Some(77),
            redelivered: false,
        };
        assert_eq!(MessageName::parse(&a.file_name()), Some(a.clone()));
        let r = a.redelivered();
        assert_eq!(MessageName::parse(&r.file_name()), Some(r.clone()));
        let later = MessageName {
            stamp: 6,
            expires_at_ms: None,
            ..a.clone()
        };
        let urgent = MessageName {
            rank: 250,
            stamp: 9,
            ..a.clone()
        };
        let mut v = vec![later.file_name(), r.file_name(), urgent.file_name()];
        v.sort();
        assert_eq!(
            v,
            vec![urgent.file_name(), r.file_name(), later.file_name()]
        );
        assert_eq!(MessageName::parse("garbage"), None);
        assert_eq!(MessageName::parse("255-1-x-1"), None);
    }

    #[test]
    fn stamps_increase() {
        let a = next_stamp();
        let b = next_stamp();
        assert!(b > a);
    }
}

#[cfg(test)]
mod props {
    //! File-name parsing against arbitrary names (the `message_name` fuzz
    //! target runs the same check where `cargo fuzz` is installed).
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn parse_never_panics_and_round_trips(name in "[0-9a-f.er-]{0,80}|\\PC{0,40}") {
            if let Some(m) = MessageName::parse(&name) {
                prop_assert_eq!(MessageName::parse(&m.file_name()), Some(m));
            }
            let _ = consumer_file_owner(&name);
            let _ = is_owner_id(&name);
        }

        #[test]
        fn any_message_name_round_trips(
            rank in any::<u8>(), stamp in any::<u64>(), len in any::<u64>(),
            exp in proptest::option::of(any::<u64>()), redelivered in any::<bool>(),
            origin in "[0-9a-f]{1,16}",
        ) {
            let m = MessageName { rank, stamp, origin, body_len: len, expires_at_ms: exp, redelivered };
            prop_assert_eq!(MessageName::parse(&m.file_name()), Some(m));
        }
    }
}
