//! Request/reply over any transport (being built).
