//! The model, transport contract, routing and errors of the `bus` message
//! library.
//!
//! Services program against [`Connection`]; transports (the in-process
//! broker, RabbitMQ, a folder) implement it. [`routing`] is the toolkit of
//! the transports that route messages themselves: the exchange graph and
//! its one routing algorithm, the topic and headers matchers; [`engine`]
//! the dead-lettering, queue policy and delivery-tag bookkeeping of
//! transports that keep their own queues; [`sync`] the locks of every
//! transport, with their one poisoning policy. With the
//! `conformance` feature, the module `conformance` is the behaviour suite every
//! transport must pass.
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

pub mod bridge;
#[cfg(feature = "conformance")]
pub mod conformance;
mod delivery;
pub mod engine;
pub mod equivalence;
mod error;
mod message;
#[cfg(feature = "otel")]
pub mod otel;
pub mod propagation;
pub mod recovery;
pub mod routing;
pub mod rpc;
pub mod sync;
mod topology;
mod transport;
pub mod url;
mod value;
pub mod worker;

pub use delivery::{
    AckOptions, Acknowledger, Consumer, ConsumerControl, Delivery, DeliveryStream, NackOptions,
    Requeue,
};
pub use error::{Error, ErrorDetail, Result, Subject};
pub use message::{DeliveryMode, Message, Properties, SharedProperties, SharedStr};
pub use recovery::RecoveryEvent;
pub use topology::{
    is_reserved_name, validate_name, DeleteExchangeOptions, DeleteQueueOptions, ExchangeKind,
    ExchangeOptions, Overflow, QueueArguments, QueueInfo, QueueOptions, QueueType,
    DEFAULT_EXCHANGE, MAX_NAME_LEN, MAX_TTL, PREDECLARED_EXCHANGES,
};
pub use transport::{
    classic_reply_queue, Capabilities, Connection, ConnectionExt, ConsumeOptions, PublishNow,
    PublishOptions, Publisher, ReplyQueue,
};
pub use url::redact_url;
pub use value::{FieldTable, FieldValue};

pub use bytes::Bytes;
