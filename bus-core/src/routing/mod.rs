//! Routing shared by the transports that route messages themselves.
//!
//! [`TopicMatcher`] indexes topic bindings so that matching a routing key
//! costs in proportion to the key's words, not the number of bindings;
//! [`headers_match`] decides a headers-exchange binding.

mod headers;
mod topic;

pub use headers::headers_match;
pub use topic::{topic_matches, TopicMatcher};
