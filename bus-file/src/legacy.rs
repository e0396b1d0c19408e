//! Legacy folder mode (being built).
