//! Black-box tests: the real server over gRPC on TCP, against a real
//! PostgreSQL, one fresh database per test.

/// Instantiates conformance tests once per backend: each listed
/// `async fn name(backend: Backend)` runs as `<file>::postgres::name` and
/// `<file>::sqlite::name`.
macro_rules! conformance {
    ($($name:ident),+ $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(crate::helpers::Backend::Postgres).await;
                }
            )+
        }

        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(crate::helpers::Backend::Sqlite).await;
                }
            )+
        }
    };
}

mod cancellation;
mod cleanup;
mod client;
mod concurrency;
mod create_task;
mod fingerprint;
mod health;
mod helpers;
mod in_flight;
mod keyless;
mod process;
mod read_tasks;
mod reflection;
mod restart;
mod test_db;
