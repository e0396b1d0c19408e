//! Routing, for the transports that route messages themselves (the
//! in-process and folder transports; RabbitMQ routes on its own). Services
//! never need this module: it is the toolkit a transport builds its broker
//! from, so that every such transport routes exactly as RabbitMQ does.
//!
//! [`ExchangeGraph`] holds exchanges with their bindings indexed by kind
//! and routes a message through them: bindings to queues and to other
//! exchanges (`exchange.bind`), alternate exchanges, and the `CC`/`BCC`
//! keys of sender-selected distribution ([`sender_routes`]), each exchange
//! at most once, each queue once. [`delete_exchange`] and [`auto_delete`]
//! apply the deletion rules over a [`BindingStore`], which the graph
//! implements and a transport keeping its topology in another form
//! implements over its own storage. [`alternate_exchange`] and
//! [`check_sender_routes`] refuse what RabbitMQ refuses.
//!
//! [`TopicMatcher`] indexes topic bindings so that matching a routing key
//! costs in proportion to the key's words, not the number of bindings;
//! [`topic_matches`] is the definition it follows. [`headers_match`] decides
//! a headers-exchange binding and [`validate_headers_binding`] refuses the
//! binding arguments RabbitMQ refuses. All of them were checked against
//! RabbitMQ 3.10 itself; the unit tests hold the tables it produced, and
//! the conformance suite runs the same cases on RabbitMQ.

mod graph;
mod headers;
mod topic;

pub use graph::{
    alternate_exchange, auto_delete, check_binding_arguments, check_sender_routes, delete_exchange,
    sender_routes, strip_bcc, BindingStore, Destination, Exchange, ExchangeGraph, NameHasher,
    NameMap, ALTERNATE_EXCHANGE,
};
pub use headers::{headers_match, validate_headers_binding};
pub use topic::{topic_matches, TopicMatcher};
