//! The toolkit for transports that keep their own queues (the in-process
//! broker, the folder transport): the parts of RabbitMQ's queue semantics
//! that do not depend on how messages are stored, written once so that every
//! such transport behaves alike.
//!
//! A transport keeps its storage, its clock and its way of waking consumers;
//! it asks this module what RabbitMQ would decide:
//! - [`dead_letter`]: the message a dead-lettering produces (`x-death`,
//!   `x-first-death-*`, `original-expiration`, the dead-letter routing key)
//!   and the cycle rule that drops it.
//! - [`delivery_limit`]: a quorum queue's delivery count (`x-delivery-count`)
//!   and what its `x-delivery-limit` does to a message returned once too
//!   often.
//! - [`policy`]: overflow (`drop-head`, `reject-publish`,
//!   `reject-publish-dlx`), TTL and priority decisions.
//! - [`unacked`]: delivery-tag bookkeeping for one consumer (ack and nack of
//!   a tag, `multiple`, unknown tags).
//!
//! Transports that speak to a real broker (RabbitMQ) need none of this.

pub mod dead_letter;
pub mod delivery_limit;
pub mod policy;
pub mod unacked;
