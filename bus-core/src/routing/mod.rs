//! Routing shared by the transports that route messages themselves.
//!
//! [`TopicMatcher`] indexes topic bindings so that matching a routing key
//! costs in proportion to the key's words, not the number of bindings;
//! [`topic_matches`] is the definition it follows. [`headers_match`] decides
//! a headers-exchange binding and [`validate_headers_binding`] refuses the
//! binding arguments RabbitMQ refuses. All of them were checked against
//! RabbitMQ 3.10 itself; the unit tests hold the tables it produced.

mod headers;
mod topic;

pub use headers::{headers_match, validate_headers_binding};
pub use topic::{topic_matches, TopicMatcher};
