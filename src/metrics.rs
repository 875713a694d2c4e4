//! Prometheus metrics, in the text format on their own HTTP listener
//! (`METRICS_ADDR`, see `startup`).
//!
//! RPC metrics carry the names dashboards already use for gRPC servers
//! (go-grpc-prometheus): `grpc_server_started_total`,
//! `grpc_server_handled_total` and the `grpc_server_handling_seconds`
//! histogram. oncely's own are prefixed `oncely_`. Every series that would
//! otherwise appear only after its first event is created at zero when the
//! metrics are first used, so that rates and alerts work from the start.
//!
//! One set per process ([`metrics`]): the binary serves one server, and
//! tests that read figures run the binary.

use std::sync::{LazyLock, atomic::AtomicU64};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// The labels of `grpc_server_started_total` and
/// `grpc_server_handling_seconds`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    /// `unary`, `client_stream`, `server_stream` or `bidi_stream`.
    pub grpc_type: &'static str,
    /// The full service name, such as `tasks.v1.TaskService`.
    pub grpc_service: &'static str,
    /// The method name, such as `CreateTask`.
    pub grpc_method: &'static str,
}

/// The labels of `grpc_server_handled_total`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandledLabels {
    /// As [`RpcLabels`].
    pub grpc_type: &'static str,
    /// As [`RpcLabels`].
    pub grpc_service: &'static str,
    /// As [`RpcLabels`].
    pub grpc_method: &'static str,
    /// The status code as go-grpc-prometheus spells it: `OK`,
    /// `InvalidArgument`, `Unavailable`...
    pub grpc_code: &'static str,
}

/// The labels of `oncely_create_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CreateLabels {
    /// `created`, `replayed`, `mismatch`, `in_progress`, `invalid`,
    /// `unavailable`, or another refusal's name (`permission_denied`...).
    pub outcome: &'static str,
    /// `header` (an `idempotency-key`) or `fingerprint` (keyless).
    pub key_source: &'static str,
}

/// A label set of one `status`, `state` or `job`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    /// The task status: `queued`, `running`, `succeeded`, `failed`,
    /// `cancelled`.
    pub status: &'static str,
}

/// The labels of `oncely_db_connections`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    /// `in_use` or `idle`.
    pub state: &'static str,
}

/// The labels of `oncely_group_commit_batch_size`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabels {
    /// What the batch did: `claims`, `completions` or `leases`.
    pub job: &'static str,
}

/// The create outcomes pre-created for each key source.
pub const CREATE_OUTCOMES: [&str; 6] = [
    "created",
    "replayed",
    "mismatch",
    "in_progress",
    "invalid",
    "unavailable",
];

/// Every gRPC status code, as go-grpc-prometheus names them.
const GRPC_CODES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

/// The name of a gRPC status code's number, as go-grpc-prometheus spells it.
pub fn grpc_code_name(code: i32) -> &'static str {
    usize::try_from(code)
        .ok()
        .and_then(|c| GRPC_CODES.get(c))
        .copied()
        .unwrap_or("Unknown")
}

/// Buckets of `grpc_server_handling_seconds`: Prometheus's defaults, with
/// two below 5 ms, where most calls answer.
const HANDLING_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Buckets of the attempt number of each lease.
const ATTEMPT_BUCKETS: [f64; 6] = [1.0, 2.0, 3.0, 5.0, 10.0, 20.0];

/// Buckets of the group-commit batch sizes.
const BATCH_BUCKETS: [f64; 9] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// Every metric the server keeps.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// `grpc_server_started_total`.
    pub rpc_started: Family<RpcLabels, Counter>,
    /// `grpc_server_handled_total`.
    pub rpc_handled: Family<HandledLabels, Counter>,
    /// `grpc_server_handling_seconds`.
    pub rpc_seconds: Family<RpcLabels, Histogram>,
    /// `oncely_create_requests_total`.
    pub creates: Family<CreateLabels, Counter>,
    /// `oncely_tasks`: tasks by status, as last read from the database.
    pub tasks: Family<StatusLabels, Gauge>,
    /// `oncely_oldest_queued_task_age_seconds`.
    pub oldest_queued_age: Gauge<f64, AtomicU64>,
    /// `oncely_lease_grants_total`.
    pub lease_grants: Counter,
    /// `oncely_lease_polls_waiting`: LeaseTasks long polls waiting for a
    /// task now, having found none (idle workers).
    pub lease_polls_waiting: Gauge,
    /// `oncely_lease_expiries_total`: leases that ran out before their
    /// task was completed or failed (found when the task is leased again or
    /// ends FAILED).
    pub lease_expiries: Counter,
    /// `oncely_lease_attempt`: the attempt number of each lease granted.
    pub lease_attempts: Histogram,
    /// `oncely_cleanup_deleted_records_total`.
    pub cleanup_deleted: Counter,
    /// `oncely_db_connections`: the pool's connections by state.
    pub db_connections: Family<StateLabels, Gauge>,
    /// `oncely_replay_cache_hits_total`.
    pub cache_hits: Counter,
    /// `oncely_database_history_changes_total`.
    pub history_changes: Counter,
    /// `oncely_replay_cache_misses_total`.
    pub cache_misses: Counter,
    /// `oncely_group_commit_batch_size`.
    pub batch_sizes: Family<JobLabels, Histogram>,
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &METRICS
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::default();
        let rpc_started = Family::<RpcLabels, Counter>::default();
        let rpc_handled = Family::<HandledLabels, Counter>::default();
        let rpc_seconds = Family::<RpcLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(HANDLING_BUCKETS)) as fn() -> Histogram,
        );
        registry.register(
            "grpc_server_started",
            "Total number of RPCs started on the server",
            rpc_started.clone(),
        );
        registry.register(
            "grpc_server_handled",
            "Total number of RPCs completed on the server, regardless of success or failure",
            rpc_handled.clone(),
        );
        registry.register(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server",
            rpc_seconds.clone(),
        );
        let creates = Family::<CreateLabels, Counter>::default();
        registry.register(
            "oncely_create_requests",
            "CreateTask calls by outcome and by where their key came from",
            creates.clone(),
        );
        let tasks = Family::<StatusLabels, Gauge>::default();
        registry.register(
            "oncely_tasks",
            "Tasks by status, as last read from the database (every METRICS_QUEUE_INTERVAL)",
            tasks.clone(),
        );
        let oldest_queued_age = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "oncely_oldest_queued_task_age_seconds",
            "Age of the oldest queued task, as last read from the database; 0 when none is queued",
            oldest_queued_age.clone(),
        );
        let lease_grants = Counter::default();
        registry.register(
            "oncely_lease_grants",
            "Leases granted to workers",
            lease_grants.clone(),
        );
        let lease_polls_waiting = Gauge::default();
        registry.register(
            "oncely_lease_polls_waiting",
            "LeaseTasks long polls waiting for a task now, having found none",
            lease_polls_waiting.clone(),
        );
        let lease_expiries = Counter::default();
        registry.register(
            "oncely_lease_expiries",
            "Leases that ran out before their task was completed or failed",
            lease_expiries.clone(),
        );
        let lease_attempts = Histogram::new(ATTEMPT_BUCKETS);
        registry.register(
            "oncely_lease_attempt",
            "The attempt number of each lease granted (1 for a task's first)",
            lease_attempts.clone(),
        );
        let cleanup_deleted = Counter::default();
        registry.register(
            "oncely_cleanup_deleted_records",
            "Idempotency records deleted by cleanup",
            cleanup_deleted.clone(),
        );
        let db_connections = Family::<StateLabels, Gauge>::default();
        registry.register(
            "oncely_db_connections",
            "The database pool's connections, in use and idle",
            db_connections.clone(),
        );
        let cache_hits = Counter::default();
        registry.register(
            "oncely_replay_cache_hits",
            "Creates whose record was found in the in-memory replay cache",
            cache_hits.clone(),
        );
        let history_changes = Counter::default();
        registry.register(
            "oncely_database_history_changes",
            "Times the database was seen on another timeline or system, or with its WAL gone back (a failover, a restore): the replay cache was dropped",
            history_changes.clone(),
        );
        let cache_misses = Counter::default();
        registry.register(
            "oncely_replay_cache_misses",
            "Creates whose record the replay cache did not hold (every create when it is off)",
            cache_misses.clone(),
        );
        let batch_sizes = Family::<JobLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(BATCH_BUCKETS)) as fn() -> Histogram,
        );
        registry.register(
            "oncely_group_commit_batch_size",
            "Requests sent to PostgreSQL together in one statement, by job",
            batch_sizes.clone(),
        );
        let metrics = Self {
            registry,
            rpc_started,
            rpc_handled,
            rpc_seconds,
            creates,
            tasks,
            oldest_queued_age,
            lease_grants,
            lease_polls_waiting,
            lease_expiries,
            lease_attempts,
            cleanup_deleted,
            db_connections,
            cache_hits,
            history_changes,
            cache_misses,
            batch_sizes,
        };
        metrics.precreate();
        metrics
    }

    /// Creates at zero the series that would otherwise appear only after
    /// their first event.
    fn precreate(&self) {
        for key_source in ["header", "fingerprint"] {
            for outcome in CREATE_OUTCOMES {
                let _ = self.creates.get_or_create(&CreateLabels {
                    outcome,
                    key_source,
                });
            }
        }
        for state in ["in_use", "idle"] {
            let _ = self.db_connections.get_or_create(&StateLabels { state });
        }
        for job in ["claims", "completions", "leases"] {
            let _ = self.batch_sizes.get_or_create(&JobLabels { job });
        }
    }

    /// Creates at zero the RPC series of one method (the API layer knows
    /// the methods, and calls this for each when it is built).
    pub fn precreate_rpc(&self, labels: RpcLabels) {
        let _ = self.rpc_started.get_or_create(&labels);
        let _ = self.rpc_seconds.get_or_create(&labels);
        for grpc_code in GRPC_CODES {
            let _ = self.rpc_handled.get_or_create(&HandledLabels {
                grpc_type: labels.grpc_type,
                grpc_service: labels.grpc_service,
                grpc_method: labels.grpc_method,
                grpc_code,
            });
        }
    }

    /// Every metric in the Prometheus text format (version 0.0.4).
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry);
        text
    }

    /// Counts one CreateTask by its outcome.
    pub fn count_create(&self, outcome: &'static str, key_source: &'static str) {
        self.creates
            .get_or_create(&CreateLabels {
                outcome,
                key_source,
            })
            .inc();
    }

    /// Records a group-commit batch of `size` requests.
    pub fn observe_batch(&self, job: &'static str, size: usize) {
        self.batch_sizes
            .get_or_create(&JobLabels { job })
            .observe(size as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_named_as_go_grpc_prometheus_names_them() {
        assert_eq!(grpc_code_name(0), "OK");
        assert_eq!(grpc_code_name(1), "Canceled");
        assert_eq!(grpc_code_name(14), "Unavailable");
        assert_eq!(grpc_code_name(16), "Unauthenticated");
        assert_eq!(grpc_code_name(99), "Unknown");
    }
}
