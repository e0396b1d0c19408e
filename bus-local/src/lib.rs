//! In-process broker (placeholder while it is built).
