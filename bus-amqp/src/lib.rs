//! RabbitMQ transport (being built).
