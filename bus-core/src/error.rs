//! The one error type every transport reports through.

use std::fmt;
use std::ops::Deref;
use std::time::Duration;

use crate::message::Message;

/// The entity an error is about.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Subject {
    /// The queue of this name.
    Queue(String),
    /// The exchange of this name (`""`: the default exchange).
    Exchange(String),
}

impl Subject {
    /// The queue `name`.
    #[must_use]
    pub fn queue(name: impl Into<String>) -> Self {
        Subject::Queue(name.into())
    }

    /// The exchange `name`.
    #[must_use]
    pub fn exchange(name: impl Into<String>) -> Self {
        Subject::Exchange(name.into())
    }

    /// The entity's name.
    #[must_use]
    pub fn name(&self) -> &str {
        match self {
            Subject::Queue(n) | Subject::Exchange(n) => n,
        }
    }
}

/// Writes `queue 'name'` or `exchange 'name'`, as RabbitMQ names them.
impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Queue(n) => write!(f, "queue '{n}'"),
            Subject::Exchange(n) => write!(f, "exchange '{n}'"),
        }
    }
}

/// The payload of the errors AMQP reports with a reply code
/// ([`Error::NotFound`], [`Error::PreconditionFailed`],
/// [`Error::ResourceLocked`], [`Error::AccessRefused`]): the text, and, when
/// the transport knows them, the [`Subject`] (queue or exchange) and the
/// argument the error is about, so callers match on fields rather than on
/// the text.
///
/// It dereferences to the text (`detail.contains("x-message-ttl")` works)
/// and converts from a `String` or `&str`, for an error that names nothing.
///
/// ```
/// use bus_core::{Error, ErrorDetail, Subject};
/// let e = Error::queue_not_found("jobs");
/// assert_eq!(e.subject(), Some(&Subject::queue("jobs")));
/// assert!(matches!(&e, Error::NotFound(d) if d.queue() == Some("jobs")));
/// let plain = Error::PreconditionFailed("a delivery settled twice".into());
/// assert_eq!(plain.subject(), None);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ErrorDetail {
    message: String,
    subject: Option<Subject>,
    argument: Option<String>,
}

impl ErrorDetail {
    /// An error text that names no entity.
    #[must_use]
    pub fn new(message: impl Into<String>) -> Self {
        ErrorDetail {
            message: message.into(),
            subject: None,
            argument: None,
        }
    }

    /// An error text about `subject`.
    #[must_use]
    pub fn about(subject: Subject, message: impl Into<String>) -> Self {
        ErrorDetail::new(message).with_subject(subject)
    }

    /// Sets what the error is about.
    #[must_use]
    pub fn with_subject(mut self, subject: Subject) -> Self {
        self.subject = Some(subject);
        self
    }

    /// Sets the argument (or flag: `durable`, `type`) the error is about,
    /// as RabbitMQ names it (`x-message-ttl`, `x-priority`).
    #[must_use]
    pub fn with_argument(mut self, argument: impl Into<String>) -> Self {
        self.argument = Some(argument.into());
        self
    }

    /// The error's text.
    #[must_use]
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The queue or exchange the error is about, when known.
    #[must_use]
    pub fn subject(&self) -> Option<&Subject> {
        self.subject.as_ref()
    }

    /// The name of the queue the error is about, when it is about one.
    #[must_use]
    pub fn queue(&self) -> Option<&str> {
        match &self.subject {
            Some(Subject::Queue(n)) => Some(n),
            _ => None,
        }
    }

    /// The name of the exchange the error is about, when it is about one.
    #[must_use]
    pub fn exchange(&self) -> Option<&str> {
        match &self.subject {
            Some(Subject::Exchange(n)) => Some(n),
            _ => None,
        }
    }

    /// The argument (or flag) the error is about, when known.
    #[must_use]
    pub fn argument(&self) -> Option<&str> {
        self.argument.as_deref()
    }
}

impl Deref for ErrorDetail {
    type Target = str;
    fn deref(&self) -> &str {
        &self.message
    }
}

/// Writes the text.
impl fmt::Display for ErrorDetail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Compares the text.
impl PartialEq<str> for ErrorDetail {
    fn eq(&self, other: &str) -> bool {
        self.message == other
    }
}

/// Compares the text.
impl PartialEq<&str> for ErrorDetail {
    fn eq(&self, other: &&str) -> bool {
        self.message == *other
    }
}

impl From<String> for ErrorDetail {
    fn from(message: String) -> Self {
        ErrorDetail::new(message)
    }
}

impl From<&str> for ErrorDetail {
    fn from(message: &str) -> Self {
        ErrorDetail::new(message)
    }
}

/// A specialised `Result` whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, in the terms AMQP uses to report it.
///
/// Every transport maps its own failures into these variants, so code written
/// against the transport contract can match on them whatever runs underneath.
/// [`Error::is_temporary`] tells a retry or reconnect policy whether trying
/// again later can succeed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An exchange or queue that the operation names does not exist
    /// (AMQP `NOT_FOUND`, 404).
    #[error("not found: {0}")]
    NotFound(ErrorDetail),

    /// The entity exists with other settings, an argument or property has
    /// the wrong type or value (a queue argument, a consumer's `x-priority`,
    /// a message's `expiration`), or the operation's condition does not hold
    /// (`if_unused`, `if_empty`, a delivery settled twice) (AMQP
    /// `PRECONDITION_FAILED`, 406).
    #[error("precondition failed: {0}")]
    PreconditionFailed(ErrorDetail),

    /// The queue is exclusive to another connection (declaring, inspecting,
    /// deleting, purging, binding or consuming it is refused), or a
    /// redeclaration's exclusive flag differs from the queue's (AMQP
    /// `RESOURCE_LOCKED`, 405).
    ///
    /// An exclusive *consumer* is a different matter: see
    /// [`Error::AccessRefused`].
    #[error("resource locked: {0}")]
    ResourceLocked(ErrorDetail),

    /// The operation is not allowed (AMQP `ACCESS_REFUSED`, 403): a new name
    /// in the reserved `amq.` namespace; declaring, deleting or binding to
    /// the default exchange `""`; deleting a pre-declared exchange;
    /// publishing to an internal exchange; consuming from a queue that has
    /// an exclusive consumer, or asking for an exclusive consumer on a
    /// queue that has consumers (RabbitMQ: "in exclusive use"); or
    /// credentials that do not allow it.
    #[error("access refused: {0}")]
    AccessRefused(ErrorDetail),

    /// The input was refused before anything was changed: a name or routing
    /// key longer than 255 bytes, a name with a NUL character (see
    /// [`validate_name`](crate::validate_name)) or one that could escape a
    /// folder, a value out of range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// A mandatory publish matched no queue (AMQP `basic.return` with
    /// `NO_ROUTE`, 312). The message is handed back.
    #[error(
        "unroutable: no queue bound to exchange {exchange:?} matches routing key {routing_key:?}"
    )]
    Unroutable {
        /// The exchange the message was published to.
        exchange: String,
        /// The routing key it was published with.
        routing_key: String,
        /// The message, returned to the caller untouched.
        message: Box<Message>,
    },

    /// The transport refused to take responsibility for a published message
    /// (a negative publisher confirm, e.g. a full queue with
    /// `x-overflow = reject-publish`).
    #[error("publish refused by the transport: {0}")]
    Nacked(String),

    /// The connection, channel or consumer was closed by its owner, or the
    /// entity it used was deleted; or a delivery is settled after its
    /// channel or connection was lost (the broker requeued it and delivers
    /// it again). Not temporary: the handle is finished.
    #[error("closed: {0}")]
    Closed(String),

    /// The link to the transport was lost (broker restart, network cut,
    /// connection closed by the server). Work that was in flight has an
    /// unknown outcome and may be retried.
    #[error("connection lost: {0}")]
    ConnectionLost(String),

    /// An operation did not finish within its deadline.
    #[error("timed out after {0:?}")]
    Timeout(Duration),

    /// The broker is holding back publishers for now (RabbitMQ's
    /// `connection.blocked` under a memory or disk alarm), and the
    /// operation's deadline passed while it was. Nothing was sent; trying
    /// again once the broker lifts the block can succeed.
    #[error("blocked by the broker: {0}")]
    Blocked(String),

    /// The transport does not offer this operation or option; its
    /// [`Capabilities`](crate::Capabilities) say so too.
    #[error("not supported: {0}")]
    NotSupported(String),

    /// A body or envelope could not be encoded or decoded.
    #[error("codec error: {0}")]
    Codec(String),

    /// A remote service answered a request with an error.
    #[error("remote error: {message}")]
    Remote {
        /// The error text the remote side sent.
        message: String,
    },

    /// A file-system or socket operation failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),

    /// Any other failure of a specific transport, with its own error as the
    /// source.
    #[error("{transport} error: {source}")]
    Backend {
        /// The transport that failed (`"amqp"`, `"file"`, ...).
        transport: &'static str,
        /// Whether trying again later can succeed.
        temporary: bool,
        /// The transport's own error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
}

impl Error {
    /// Whether the same operation may succeed if tried again later, on this
    /// connection once it recovers or on a new one.
    ///
    /// Temporary: lost connections, time-outs, a broker's block on
    /// publishers, refused publishes (a full queue
    /// may drain), locked resources (the connection owning an exclusive
    /// queue may go away), I/O errors that the OS reports as transient, and
    /// backend errors marked so. Everything else describes the request
    /// itself and fails again unchanged.
    #[must_use]
    pub fn is_temporary(&self) -> bool {
        match self {
            Error::ConnectionLost(_)
            | Error::Timeout(_)
            | Error::Blocked(_)
            | Error::Nacked(_)
            | Error::ResourceLocked(_) => true,
            Error::Io(e) => matches!(
                e.kind(),
                std::io::ErrorKind::Interrupted
                    | std::io::ErrorKind::WouldBlock
                    | std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::BrokenPipe
            ),
            Error::Backend { temporary, .. } => *temporary,
            _ => false,
        }
    }

    /// `NotFound` about the queue `name`: "no queue 'name'".
    #[must_use]
    pub fn queue_not_found(name: &str) -> Self {
        Error::NotFound(ErrorDetail::about(
            Subject::queue(name),
            format!("no queue '{name}'"),
        ))
    }

    /// `NotFound` about the exchange `name`: "no exchange 'name'".
    #[must_use]
    pub fn exchange_not_found(name: &str) -> Self {
        Error::NotFound(ErrorDetail::about(
            Subject::exchange(name),
            format!("no exchange '{name}'"),
        ))
    }

    /// `ResourceLocked` about the queue `name`, in RabbitMQ's words: it is
    /// exclusive to another connection, or the exclusive flag of a
    /// redeclaration differs from the queue's.
    #[must_use]
    pub fn queue_locked(name: &str) -> Self {
        Error::ResourceLocked(ErrorDetail::about(
            Subject::queue(name),
            format!(
                "cannot obtain exclusive access to locked queue '{name}': it is exclusive to \
                 another connection, or the exclusive flag differs from its declaration"
            ),
        ))
    }

    /// `PreconditionFailed` for a redeclaration of `subject` whose
    /// `argument` (or flag: `durable`, `type`) differs, in RabbitMQ's words:
    /// "inequivalent arg 'x-message-ttl' for queue 'q': received 100 but
    /// current is 200".
    #[must_use]
    pub fn inequivalent_argument(
        subject: Subject,
        argument: &str,
        received: &str,
        current: &str,
    ) -> Self {
        Error::PreconditionFailed(
            ErrorDetail::about(
                subject.clone(),
                format!(
                    "inequivalent arg '{argument}' for {subject}: received {received} but current is {current}"
                ),
            )
            .with_argument(argument),
        )
    }

    /// The detail of the errors that carry one (those with an AMQP reply
    /// code: `NotFound`, `PreconditionFailed`, `ResourceLocked`,
    /// `AccessRefused`).
    #[must_use]
    pub fn detail(&self) -> Option<&ErrorDetail> {
        match self {
            Error::NotFound(d)
            | Error::PreconditionFailed(d)
            | Error::ResourceLocked(d)
            | Error::AccessRefused(d) => Some(d),
            _ => None,
        }
    }

    /// The queue or exchange the error is about, when the transport said.
    #[must_use]
    pub fn subject(&self) -> Option<&Subject> {
        self.detail().and_then(ErrorDetail::subject)
    }

    /// The argument (or flag) the error is about, when the transport said.
    #[must_use]
    pub fn argument(&self) -> Option<&str> {
        self.detail().and_then(ErrorDetail::argument)
    }

    /// Wraps a transport's own error.
    pub fn backend<E>(transport: &'static str, temporary: bool, source: E) -> Self
    where
        E: Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    {
        Error::Backend {
            transport,
            temporary,
            source: source.into(),
        }
    }

    /// The AMQP reply code this error corresponds to, when there is one.
    #[must_use]
    pub fn amqp_reply_code(&self) -> Option<u16> {
        Some(match self {
            Error::NotFound(_) => 404,
            Error::PreconditionFailed(_) => 406,
            Error::ResourceLocked(_) => 405,
            Error::AccessRefused(_) => 403,
            Error::Unroutable { .. } => 312,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_errors_are_the_retryable_ones() {
        assert!(Error::ConnectionLost("reset".into()).is_temporary());
        assert!(Error::Timeout(Duration::from_secs(1)).is_temporary());
        assert!(Error::Blocked("memory alarm".into()).is_temporary());
        assert!(!Error::NotFound("queue 'q'".into()).is_temporary());
        assert!(!Error::PreconditionFailed("x".into()).is_temporary());
        assert!(Error::backend("amqp", true, "socket").is_temporary());
        assert!(!Error::backend("amqp", false, "bad frame").is_temporary());
        assert!(
            Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset)).is_temporary()
        );
        assert!(!Error::Io(std::io::Error::from(std::io::ErrorKind::NotFound)).is_temporary());
    }

    #[test]
    fn reply_codes_mirror_amqp() {
        assert_eq!(
            Error::NotFound(ErrorDetail::default()).amqp_reply_code(),
            Some(404)
        );
        assert_eq!(
            Error::PreconditionFailed(ErrorDetail::default()).amqp_reply_code(),
            Some(406)
        );
        assert_eq!(Error::Codec(String::new()).amqp_reply_code(), None);
    }
}
