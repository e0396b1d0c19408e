//! Folder transport (being built).
