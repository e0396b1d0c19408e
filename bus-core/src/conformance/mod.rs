//! The behaviour suite every transport must pass (`conformance` feature).
//!
//! Each case is a public async function taking a [`Harness`] that panics with
//! a message naming what went wrong; together they pin the behaviours of the
//! library's message semantics (RabbitMQ 3.10 is the reference: every case
//! holds on a real broker). The [`conformance_tests!`](crate::conformance_tests)
//! macro expands the suite into one test per case for a transport, invoked
//! from the transport crate's `tests/conformance.rs` (its documentation
//! shows a complete harness).
//!
//! Every case works on fresh names ([`fresh_name`]) and deletes what it
//! created when it passes, so cases can run concurrently against one broker.
//! A case the transport cannot offer (its [`Capabilities`] say so) prints
//! `not applicable: <case> on <transport>: <reason>` and returns.
//!
//! Cases never sleep in the hope that something has happened: they wait on
//! the event itself under a bound ([`WAIT`]), or publish a marker
//! behind what must not arrive and check that the marker comes first. Time
//! based cases (TTL, expiry) use tokio's clock, so a paused clock runs them
//! instantly and a real one in a fraction of a second.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use futures::future::BoxFuture;
use tokio::sync::broadcast;

use crate::{Capabilities, Connection, RecoveryEvent};

pub mod dead_letter;
pub mod delivery;
pub mod exchanges;
pub mod lifetimes;
pub mod properties;
pub mod recovery;
pub mod routing;
pub mod rpc;
pub mod topology;
pub mod worker;

mod support;

pub use support::WAIT;

/// How the suite opens connections to the transport under test.
#[async_trait]
pub trait Harness: Send + Sync + 'static {
    /// Opens a new connection to the one broker this harness stands for.
    /// Each call is a separate connection (for exclusivity and consumer-loss
    /// cases).
    async fn connect(&self) -> Arc<dyn Connection>;

    /// What the transport supports; cases it cannot pass are reported as not
    /// applicable by name.
    fn capabilities(&self) -> Capabilities;

    /// A `user_id` property value the transport accepts from this harness's
    /// connections. RabbitMQ refuses any but the connection's own user name;
    /// the default is RabbitMQ's default user, `guest`.
    fn user_id(&self) -> String {
        "guest".to_owned()
    }

    /// Opens a new connection that the broker can be made to drop (see
    /// [`DroppableConnection`]), one that recovers (`recover`) or one that
    /// stays lost, as a process that died. The default, `None`, makes the
    /// [`recovery`] cases not applicable.
    async fn connect_droppable(&self, recover: bool) -> Option<DroppableConnection> {
        let _ = recover;
        None
    }
}

/// A connection with the means to have the broker drop it: on RabbitMQ
/// `rabbitmqctl close_connection`, on the in-process broker a simulated
/// fault.
pub struct DroppableConnection {
    /// The connection.
    pub connection: Arc<dyn Connection>,
    /// Its recovery events, from before the first drop.
    pub events: broadcast::Receiver<RecoveryEvent>,
    drop_it: Box<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>,
}

impl fmt::Debug for DroppableConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DroppableConnection")
            .field("connection", &self.connection.capabilities().name)
            .finish_non_exhaustive()
    }
}

impl DroppableConnection {
    /// `drop_it` makes the broker drop `connection`, resolving once the
    /// broker has done so (the client may not have noticed yet).
    pub fn new(
        connection: Arc<dyn Connection>,
        events: broadcast::Receiver<RecoveryEvent>,
        drop_it: impl Fn() -> BoxFuture<'static, ()> + Send + Sync + 'static,
    ) -> Self {
        DroppableConnection {
            connection,
            events,
            drop_it: Box::new(drop_it),
        }
    }

    /// Has the broker drop the connection.
    pub async fn drop_from_broker(&self) {
        (self.drop_it)().await;
    }
}

/// A name no other test uses: `prefix` and a random suffix.
#[must_use]
pub fn fresh_name(prefix: &str) -> String {
    format!("bus-test.{prefix}.{}", uuid::Uuid::new_v4().simple())
}

/// Expands the conformance suite into one test per case for a transport.
///
/// `conformance_tests!(<harness expression>, <one or more attributes>)`
/// generates, at the place it is invoked, one `async fn <case>()` per case of
/// [`conformance`](crate::conformance) carrying the given attributes. Each
/// test evaluates the harness expression afresh (a value implementing
/// [`Harness`](crate::conformance::Harness)) and runs the case on it. The
/// request/reply cases come along at the end.
///
/// The invoking crate needs `bus-core` with the `conformance` feature and
/// whatever the attributes name (usually `tokio` with `macros` and `rt`).
///
/// ```no_run
/// use std::sync::Arc;
///
/// use bus_core::conformance::Harness;
/// use bus_core::{Capabilities, Connection};
///
/// /// Connections to the transport under test.
/// struct MyHarness;
///
/// #[async_trait::async_trait]
/// impl Harness for MyHarness {
///     async fn connect(&self) -> Arc<dyn Connection> {
///         unimplemented!("open a new connection to the transport under test")
///     }
///
///     fn capabilities(&self) -> Capabilities {
///         Capabilities::default()
///     }
/// }
///
/// bus_core::conformance_tests!(MyHarness, #[tokio::test(start_paused = true)]);
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! conformance_tests {
    ($harness:expr, $(#[$meta:meta])+) => {
        $crate::__conformance_cases!(
            { $harness } [$(#[$meta])+]
            // Topology
            topology::predeclared_exchanges_exist,
            topology::predeclared_exchanges_redeclare_with_their_settings,
            topology::predeclared_exchanges_cannot_be_deleted,
            topology::default_exchange_cannot_be_declared,
            topology::default_exchange_cannot_be_deleted,
            topology::default_exchange_cannot_be_bound,
            topology::exchange_redeclare_same_settings_is_noop,
            topology::exchange_redeclare_other_kind_fails,
            topology::exchange_redeclare_other_durability_fails,
            topology::unknown_exchange_kinds_are_refused,
            topology::errors_name_their_queue_exchange_and_argument,
            topology::queue_redeclare_same_settings_is_noop,
            topology::queue_redeclare_other_settings_fails,
            topology::passive_declare_missing_is_not_found,
            topology::passive_declare_ignores_settings,
            topology::server_named_queues_are_unique,
            topology::reserved_names_are_refused,
            topology::overlong_names_are_refused,
            topology::wrong_argument_types_are_refused,
            topology::bind_to_missing_queue_or_exchange_is_not_found,
            topology::binding_twice_is_one_binding,
            topology::unbind_stops_routing,
            topology::unbind_of_missing_binding_succeeds,
            topology::exchange_delete_removes_its_bindings,
            topology::exchange_delete_if_unused,
            topology::delete_of_missing_entities_succeeds,
            topology::queue_delete_if_unused_and_if_empty,
            topology::queue_delete_ends_its_consumers,
            topology::purge_removes_ready_messages_only,
            topology::counts_report_ready_messages_and_consumers,
            topology::quorum_queues_are_durable_only,
            // Routing
            routing::default_exchange_routes_by_queue_name,
            routing::direct_routes_on_exact_key,
            routing::fanout_ignores_the_routing_key,
            routing::topic_hash_matches_every_key,
            routing::topic_hash_suffix_matches_zero_words,
            routing::topic_hash_prefix_matches_zero_words,
            routing::topic_star_matches_exactly_one_word,
            routing::topic_empty_key,
            routing::topic_empty_words,
            routing::topic_double_hash,
            routing::topic_many_patterns_against_many_keys,
            routing::headers_all_needs_every_argument,
            routing::headers_any_needs_one_argument,
            routing::headers_ignore_x_arguments,
            routing::headers_with_x_match_x_arguments,
            routing::headers_value_types_must_match,
            routing::headers_numbers_compare_by_value,
            routing::headers_void_matches_presence,
            routing::headers_ignore_the_routing_key,
            routing::one_copy_per_queue,
            routing::copies_are_independent,
            routing::unroutable_is_dropped,
            routing::mandatory_unroutable_is_returned,
            routing::mandatory_routed_succeeds,
            routing::publish_to_missing_exchange_is_not_found,
            // Sender-selected distribution, alternate and exchange-to-exchange routing
            exchanges::cc_and_bcc_route_on_a_direct_exchange,
            exchanges::cc_and_bcc_route_on_a_topic_exchange,
            exchanges::cc_and_bcc_route_through_the_default_exchange,
            exchanges::alternate_exchanges_chain,
            exchanges::alternate_exchange_loops_end,
            exchanges::alternate_exchange_must_be_a_string,
            exchanges::alternate_exchange_skipped_when_an_exchange_binding_matches,
            exchanges::exchange_bindings_route_through_exchanges,
            exchanges::exchange_bindings_deliver_once_per_queue,
            exchanges::exchange_binding_loops_end,
            exchanges::exchange_bind_to_missing_or_default_exchange,
            exchanges::exchange_unbind_stops_routing,
            exchanges::exchange_delete_removes_exchange_bindings,
            exchanges::internal_exchange_takes_dead_letters,
            exchanges::auto_delete_exchange_goes_with_its_last_queue,
            // Delivery
            delivery::one_consumer_sees_publish_order,
            delivery::delivery_reports_exchange_key_and_redelivery,
            delivery::competing_consumers_share_a_queue,
            delivery::prefetch_limits_unacked_deliveries,
            delivery::prefetch_zero_is_unlimited,
            delivery::ack_removes_the_message,
            delivery::ack_multiple_settles_earlier_deliveries,
            delivery::settling_twice_is_refused,
            delivery::nack_requeue_returns_to_original_position,
            delivery::nack_multiple_requeue_keeps_order,
            delivery::reject_without_requeue_drops,
            delivery::cancel_stops_deliveries_and_keeps_settling,
            delivery::auto_ack_counts_as_acked,
            delivery::exclusive_consumer_locks_the_queue,
            delivery::priority_queue_orders_by_priority,
            delivery::single_active_consumer_hands_over,
            // Lifetimes and consumer loss
            lifetimes::dropped_consumer_requeues_unacked,
            lifetimes::closed_connection_requeues_unacked,
            lifetimes::dropped_connection_requeues_unacked,
            lifetimes::closed_connection_refuses_work,
            lifetimes::exclusive_queue_is_locked_to_its_connection,
            lifetimes::exclusive_queue_dies_with_its_connection,
            lifetimes::auto_delete_queue_dies_with_its_last_consumer,
            lifetimes::queue_expires_when_unused,
            // Dead-lettering, TTL, max length
            dead_letter::rejected_message_is_dead_lettered_with_x_death,
            dead_letter::dead_letter_routing_key_replaces_the_key,
            dead_letter::x_death_counts_repeated_deaths,
            dead_letter::first_death_headers,
            dead_letter::x_death_records_every_field,
            dead_letter::x_death_keeps_the_first_time_of_a_repeated_death,
            dead_letter::x_death_counts_grow_over_two_cycles,
            dead_letter::x_death_from_a_publisher_is_handled_as_rabbitmq_does,
            dead_letter::queue_ttl_expires_messages,
            dead_letter::message_ttl_expires_messages,
            dead_letter::expired_message_is_never_delivered,
            dead_letter::max_length_drops_the_oldest,
            dead_letter::max_length_bytes_drops_the_oldest,
            dead_letter::max_length_dead_letters_the_oldest,
            dead_letter::reject_publish_nacks_the_new_message,
            dead_letter::reject_publish_dlx_nacks_and_dead_letters,
            dead_letter::delivery_limit_dead_letters_a_message_requeued_past_it,
            dead_letter::delivery_limit_counts_closed_connections_and_drops_without_a_dead_letter_exchange,
            dead_letter::delivery_limit_is_never_ignored,
            // Properties and bodies
            properties::every_property_round_trips,
            properties::every_header_type_round_trips,
            properties::empty_body_round_trips,
            properties::large_body_round_trips,
            properties::persistent_message_in_durable_queue,
            properties::invalid_expiration_is_refused,
            // Recovery after the broker drops a connection
            recovery::lost_connection_requeues_and_resumes,
            recovery::lost_connection_declares_exchange_bindings_again,
            recovery::lost_connection_without_recovery_hands_its_messages_over,
            recovery::lost_connection_never_falsely_confirms_publishes_in_flight,
            // The worker runtime
            worker::worker_success_acks,
            worker::worker_transient_then_success,
            worker::worker_retries_exhausted_go_to_poison_queue,
            worker::worker_permanent_failure_poisons_at_once,
            worker::worker_refused_poison_falls_back_without_looping,
            worker::worker_refused_delay_poisons_without_looping,
            worker::worker_undecodable_body_poisons_at_once,
            worker::worker_panic_is_transient,
            worker::worker_delayed_publish_has_no_head_of_line_blocking,
            worker::delay_queue_and_exchange_expire_when_idle,
            worker::delayed_publish_after_an_idle_delay_queue_is_delivered,
            worker::worker_delayed_retry_after_its_delay_queue_expired,
            worker::worker_delayed_retry_after_its_delay_queue_was_deleted,
            worker::worker_attempts_survive_a_restart,
            worker::worker_shutdown_drains_and_requeues,
            worker::worker_unsettled_delivery_dropped_is_requeued,
        );
        $crate::__rpc_conformance_tests!($harness, $(#[$meta])+);
    };
}

/// Generates one test per `module::case`. The harness and the attribute
/// list travel to [`__conformance_case!`](crate::__conformance_case) as one
/// token tree each, so every case gets the whole list without recursion
/// (a recursion per case would hit the compiler's recursion limit as the
/// suite grows).
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_cases {
    ($harness:tt $attributes:tt $($module:ident :: $case:ident),* $(,)?) => {
        $( $crate::__conformance_case!($harness $attributes $module $case); )*
    };
}

/// One test of [`__conformance_cases!`](crate::__conformance_cases).
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_case {
    ({ $harness:expr } [$(#[$meta:meta])+] $module:ident $case:ident) => {
        $(#[$meta])+
        async fn $case() {
            let harness = $harness;
            $crate::conformance::$module::$case(&harness).await;
        }
    };
}

/// Expands the request/reply cases of the suite; called by
/// [`conformance_tests!`](crate::conformance_tests) with the same arguments.
#[doc(hidden)]
#[macro_export]
macro_rules! __rpc_conformance_tests {
    (@cases $harness:tt [$(#[$meta:meta])+] $(,)?) => {};
    (@cases $harness:tt [$(#[$meta:meta])+] $test:ident => $case:ident $(, $($rest:tt)*)?) => {
        $(#[$meta])+
        async fn $test() {
            let harness = $harness;
            $crate::conformance::rpc::$case(&harness).await;
        }
        $crate::__rpc_conformance_tests!(@cases $harness [$(#[$meta])+] $($($rest)*)?);
    };
    ($harness:expr, $(#[$meta:meta])+) => {
        $crate::__rpc_conformance_tests!(
            @cases { $harness } [$(#[$meta])+]
            rpc_round_trip => round_trip,
            rpc_concurrent_calls_are_matched => concurrent_calls_are_matched,
            rpc_timeout_at_configured_time => timeout_at_configured_time,
            rpc_late_reply_is_dropped_and_counted => late_reply_is_dropped_and_counted,
            rpc_remote_error => remote_error,
            rpc_error_reply_is_readable_by_legacy_clients => error_reply_is_readable_by_legacy_clients,
            rpc_undecodable_request => undecodable_request,
            rpc_server_killed_mid_request_is_served_by_another => server_killed_mid_request_is_served_by_another,
            rpc_two_servers_share_the_load => two_servers_share_the_load,
            rpc_no_server_is_unroutable => no_server_is_unroutable,
            rpc_connection_lost_fails_calls_in_flight => connection_lost_fails_calls_in_flight,
            rpc_graceful_shutdown_finishes_in_flight => graceful_shutdown_finishes_in_flight,
            rpc_request_without_reply_to_is_handled => request_without_reply_to_is_handled,
            rpc_legacy_server_is_callable => legacy_server_is_callable,
            rpc_legacy_client_is_served => legacy_client_is_served,
            rpc_blocking_client_and_server => blocking_client_and_server,
        );
    };
}
