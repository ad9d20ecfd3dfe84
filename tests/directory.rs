//! Smoke test of the shared test harness; the full directory suite builds on it.

mod common;

use common::db::{Backend, TestDb};
use letterbox::directory::Directory;

#[tokio::test]
async fn harness_creates_databases_on_every_enabled_backend() {
    let tmp = tempfile::tempdir().unwrap();
    for backend in [Backend::Sqlite, Backend::Postgres, Backend::MySql] {
        let Some(db) = TestDb::new(backend, tmp.path()).await else {
            continue;
        };
        let dir = Directory::connect(&db.url, 2, std::time::Duration::ZERO)
            .await
            .unwrap();
        dir.migrate().await.unwrap();
        dir.check_migrated().await.unwrap();
        assert_eq!(dir.domain_add("Example.ORG").await.unwrap(), "example.org");
        dir.close().await;
    }
}
