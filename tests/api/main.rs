//! Black-box tests: the real server over gRPC on TCP, one fresh database per
//! test. Conformance tests run against both stores, a real PostgreSQL and
//! an embedded SQLite file; the rest test what only PostgreSQL does. Shared
//! support code is in `support/`.

/// Instantiates conformance tests once per backend: each listed
/// `async fn name(backend: Backend)` runs as `<file>::postgres::name` and
/// `<file>::sqlite::name`.
macro_rules! conformance {
    ($($name:ident),+ $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(crate::support::Backend::Postgres).await;
                }
            )+
        }

        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(crate::support::Backend::Sqlite).await;
                }
            )+
        }
    };
}

mod auth;
mod cancellation;
mod chaos_checker;
mod cleanup;
mod client;
mod concurrency;
mod connections;
mod create_task;
mod fingerprint;
mod group_commit;
mod health;
mod in_flight;
mod json_api;
mod key_scope;
mod keyless;
mod layer_order;
mod lease_cut;
mod limits;
mod mcp;
mod metrics;
mod plans;
mod process;
mod read_tasks;
mod reflection;
mod restart;
mod status_page;
mod support;
mod telemetry;
mod tls;
mod worker;
mod worker_helper;
