//! RabbitMQ transport for the `bus` message library, through lapin.
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

mod connection;
mod consume;
mod convert;
mod events;
mod journal;
mod link;
mod options;
mod publish;
mod url;

pub use connection::AmqpConnection;
pub use events::RecoveryEvent;
pub use options::{AmqpOptions, ReconnectPolicy, ReplyMode};
pub use url::{redact_url, AmqpUrl, BrokerHost};
