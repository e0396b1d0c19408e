//! The shared conformance suite on the folder transport: one test per case,
//! each on a fresh root folder, on tokio's paused clock (the transport's
//! TTLs follow it).

use std::sync::Arc;

use async_trait::async_trait;
use bus_core::conformance::Harness;
use bus_core::{Capabilities, Connection};
use bus_file::FileConnection;

/// A fresh root per case; every connection of the case opens it.
struct FileHarness {
    dir: tempfile::TempDir,
}

impl FileHarness {
    fn new() -> Self {
        FileHarness {
            dir: tempfile::tempdir().expect("a temporary folder"),
        }
    }
}

#[async_trait]
impl Harness for FileHarness {
    async fn connect(&self) -> Arc<dyn Connection> {
        Arc::new(
            FileConnection::open(self.dir.path())
                .await
                .expect("open the folder transport"),
        )
    }

    fn capabilities(&self) -> Capabilities {
        bus_file::capabilities()
    }
}

bus_core::conformance_tests!(FileHarness::new(), #[tokio::test(start_paused = true)]);
