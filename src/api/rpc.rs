//! The RPC a call is for, parsed once from its HTTP/2 path
//! (`/package.Service/Method`) by the outermost layer and read by every
//! layer under it (see `stack.rs`), so that no layer compares path strings.
//! Service names are the generated servers' own (`SERVICE_NAME`); method
//! names are checked against the descriptors the server serves.

use http::uri::PathAndQuery;
use tonic_health::pb::health_server;
use tonic_reflection::pb::{v1 as reflection_v1, v1alpha as reflection_v1alpha};

use crate::proto::tasks_v1::{admin_server, task_service_server, worker_service_server};

/// A service the server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Service {
    /// `tasks.v1.TaskService`, for agents.
    Tasks,
    /// `tasks.v1.WorkerService`, for workers.
    Workers,
    /// `tasks.v1.Admin`.
    Admin,
    /// `grpc.health.v1.Health`.
    Health,
    /// `grpc.reflection.v1.ServerReflection`.
    Reflection,
    /// `grpc.reflection.v1alpha.ServerReflection`, for older clients.
    ReflectionV1Alpha,
}

impl Service {
    /// Every service the server answers.
    pub const ALL: [Self; 6] = [
        Self::Tasks,
        Self::Workers,
        Self::Admin,
        Self::Health,
        Self::Reflection,
        Self::ReflectionV1Alpha,
    ];

    /// The full name, as in the path, the metric labels and health.
    pub fn name(self) -> &'static str {
        match self {
            Self::Tasks => task_service_server::SERVICE_NAME,
            Self::Workers => worker_service_server::SERVICE_NAME,
            Self::Admin => admin_server::SERVICE_NAME,
            Self::Health => health_server::SERVICE_NAME,
            Self::Reflection => reflection_v1::server_reflection_server::SERVICE_NAME,
            Self::ReflectionV1Alpha => reflection_v1alpha::server_reflection_server::SERVICE_NAME,
        }
    }
}

/// The package of oncely's own services, `tasks.v1`.
fn api_package() -> &'static str {
    let name = task_service_server::SERVICE_NAME;
    name.rsplit_once('.').map_or(name, |(package, _)| package)
}

/// How a method streams, named as `grpc_type` labels name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Streaming {
    /// One message each way.
    Unary,
    /// A stream of answers to one request.
    ServerStream,
    /// Streams both ways.
    Bidi,
}

impl Streaming {
    /// `unary`, `server_stream` or `bidi_stream`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Unary => "unary",
            Self::ServerStream => "server_stream",
            Self::Bidi => "bidi_stream",
        }
    }
}

/// A method the server has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// `TaskService/CreateTask`, the one that needs an idempotency key.
    CreateTask,
    /// `TaskService/GetTask`.
    GetTask,
    /// `TaskService/ListTasks`.
    ListTasks,
    /// `TaskService/WaitTask`.
    WaitTask,
    /// `TaskService/CancelTask`.
    CancelTask,
    /// `WorkerService/LeaseTasks`, whose answer is never shed.
    LeaseTasks,
    /// `WorkerService/RenewLease`.
    RenewLease,
    /// `WorkerService/CompleteTask`.
    CompleteTask,
    /// `WorkerService/FailTask`.
    FailTask,
    /// `Admin/Cleanup`.
    Cleanup,
    /// `Health/Check`.
    HealthCheck,
    /// `Health/Watch`, an endless stream by design.
    HealthWatch,
    /// `ServerReflection/ServerReflectionInfo` of reflection v1.
    Reflect,
    /// `ServerReflection/ServerReflectionInfo` of reflection v1alpha.
    ReflectV1Alpha,
}

impl Method {
    /// Every method the server has.
    pub const ALL: [Self; 14] = [
        Self::CreateTask,
        Self::GetTask,
        Self::ListTasks,
        Self::WaitTask,
        Self::CancelTask,
        Self::LeaseTasks,
        Self::RenewLease,
        Self::CompleteTask,
        Self::FailTask,
        Self::Cleanup,
        Self::HealthCheck,
        Self::HealthWatch,
        Self::Reflect,
        Self::ReflectV1Alpha,
    ];

    /// The service that has it.
    pub fn service(self) -> Service {
        match self {
            Self::CreateTask
            | Self::GetTask
            | Self::ListTasks
            | Self::WaitTask
            | Self::CancelTask => Service::Tasks,
            Self::LeaseTasks | Self::RenewLease | Self::CompleteTask | Self::FailTask => {
                Service::Workers
            }
            Self::Cleanup => Service::Admin,
            Self::HealthCheck | Self::HealthWatch => Service::Health,
            Self::Reflect => Service::Reflection,
            Self::ReflectV1Alpha => Service::ReflectionV1Alpha,
        }
    }

    /// Its name within its service, as in the path (the descriptors'
    /// spelling; a test holds them to it).
    pub fn name(self) -> &'static str {
        match self {
            Self::CreateTask => "CreateTask",
            Self::GetTask => "GetTask",
            Self::ListTasks => "ListTasks",
            Self::WaitTask => "WaitTask",
            Self::CancelTask => "CancelTask",
            Self::LeaseTasks => "LeaseTasks",
            Self::RenewLease => "RenewLease",
            Self::CompleteTask => "CompleteTask",
            Self::FailTask => "FailTask",
            Self::Cleanup => "Cleanup",
            Self::HealthCheck => "Check",
            Self::HealthWatch => "Watch",
            Self::Reflect | Self::ReflectV1Alpha => "ServerReflectionInfo",
        }
    }

    /// How it streams.
    pub fn streaming(self) -> Streaming {
        match self {
            Self::HealthWatch => Streaming::ServerStream,
            Self::Reflect | Self::ReflectV1Alpha => Streaming::Bidi,
            _ => Streaming::Unary,
        }
    }
}

/// The service and the method a path asks for, as sent, whether or not the
/// server has them: after any leading slashes, up to the next slash, and
/// the rest. The one reading of a path: [`Rpc::parse`] decides from it what
/// the server has, and each call's span is named by it.
pub fn asked(path: &str) -> (&str, &str) {
    let trimmed = path.trim_start_matches('/');
    trimmed.split_once('/').unwrap_or((trimmed, ""))
}

/// What a call is for, in its request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rpc {
    /// The service the path names, if the server has it.
    service: Option<Service>,
    /// The method, if that service has it.
    method: Option<Method>,
    /// Whether the path is in oncely's own package, known service or not.
    api: bool,
    /// The path as sent, for the log line of a refusal.
    path: PathAndQuery,
}

impl Rpc {
    /// Parses `path`. A method is known only on a path of exactly the form
    /// `/Service/Method`; the service is read after any leading slashes, so
    /// that no spelling of a path dodges the checks of its service.
    pub fn parse(path: PathAndQuery) -> Self {
        let text = path.path();
        let trimmed = text.trim_start_matches('/');
        let (service_name, method_name) = asked(text);
        let service = Service::ALL.into_iter().find(|s| s.name() == service_name);
        let exact = text.len() == trimmed.len() + 1;
        let method = service.filter(|_| exact).and_then(|service| {
            Method::ALL
                .into_iter()
                .find(|m| m.service() == service && m.name() == method_name)
        });
        let api = text.starts_with('/')
            && trimmed
                .strip_prefix(api_package())
                .is_some_and(|rest| rest.starts_with('.'));
        Self {
            service,
            method,
            api,
            path,
        }
    }

    /// The request's `Rpc`: the one the outermost layer put in its
    /// extensions, or (for a layer used on its own) parsed and put there now.
    pub fn of<B>(request: &mut http::Request<B>) -> Self {
        if let Some(rpc) = request.extensions().get::<Self>() {
            return rpc.clone();
        }
        let path = request
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let rpc = Self::parse(path);
        request.extensions_mut().insert(rpc.clone());
        rpc
    }

    /// The service called, if the server has it.
    pub fn service(&self) -> Option<Service> {
        self.service
    }

    /// The method called, if the server has it.
    pub fn method(&self) -> Option<Method> {
        self.method
    }

    /// Whether the call is to `method`.
    pub fn is(&self, method: Method) -> bool {
        self.method == Some(method)
    }

    /// Whether the path is in oncely's own package (`tasks.v1`), whether or
    /// not the server has its service: every such call is rate limited.
    pub fn is_api(&self) -> bool {
        self.api
    }

    /// The path as sent.
    pub fn path(&self) -> &str {
        self.path.path()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use prost::Message;

    use super::*;

    fn parse(path: &'static str) -> Rpc {
        Rpc::parse(PathAndQuery::from_static(path))
    }

    /// Every method of `set`'s files in `package`: service, method, type.
    fn described(set: &[u8], package: &str) -> BTreeSet<(String, String, &'static str)> {
        let set = prost_types::FileDescriptorSet::decode(set).unwrap();
        let mut methods = BTreeSet::new();
        for file in set.file.iter().filter(|f| f.package() == package) {
            for service in &file.service {
                for method in &service.method {
                    let streaming = match (method.client_streaming(), method.server_streaming()) {
                        (false, false) => "unary",
                        (false, true) => "server_stream",
                        (true, true) => "bidi_stream",
                        (true, false) => "client_stream",
                    };
                    methods.insert((
                        format!("{package}.{}", service.name()),
                        method.name().to_owned(),
                        streaming,
                    ));
                }
            }
        }
        methods
    }

    #[test]
    fn the_methods_are_those_the_descriptors_describe() {
        let mut served = described(crate::proto::FILE_DESCRIPTOR_SET, "tasks.v1");
        served.extend(described(
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            "grpc.health.v1",
        ));
        served.extend(described(
            reflection_v1::FILE_DESCRIPTOR_SET,
            "grpc.reflection.v1",
        ));
        served.extend(described(
            reflection_v1alpha::FILE_DESCRIPTOR_SET,
            "grpc.reflection.v1alpha",
        ));
        let known: BTreeSet<_> = Method::ALL
            .into_iter()
            .map(|m| {
                (
                    m.service().name().to_owned(),
                    m.name().to_owned(),
                    m.streaming().label(),
                )
            })
            .collect();
        assert_eq!(known, served);
    }

    #[test]
    fn a_path_is_parsed_into_its_service_and_method() {
        let create = parse("/tasks.v1.TaskService/CreateTask");
        assert_eq!(create.method(), Some(Method::CreateTask));
        assert_eq!(create.service(), Some(Service::Tasks));
        assert!(create.is_api());
        assert_eq!(create.path(), "/tasks.v1.TaskService/CreateTask");

        let watch = parse("/grpc.health.v1.Health/Watch");
        assert!(watch.is(Method::HealthWatch));
        assert!(!watch.is_api());
    }

    #[test]
    fn unknown_paths_keep_what_can_be_told() {
        let missing = parse("/tasks.v1.Admin/Nothing");
        assert_eq!(
            (missing.service(), missing.method()),
            (Some(Service::Admin), None)
        );
        assert!(missing.is_api());

        let slashes = parse("//tasks.v1.Admin/Cleanup");
        assert_eq!(
            (slashes.service(), slashes.method()),
            (Some(Service::Admin), None)
        );

        let made_up = parse("/tasks.v1.Made/Up");
        assert_eq!((made_up.service(), made_up.method()), (None, None));
        assert!(made_up.is_api());

        for path in ["/made.Up/Path", "/tasks.v10.TaskService/CreateTask", "/"] {
            let other = Rpc::parse(PathAndQuery::from_static(path));
            assert_eq!((other.service(), other.method()), (None, None), "{path}");
            assert!(!other.is_api(), "{path}");
        }
    }

    #[test]
    fn the_outermost_layers_value_is_the_one_read() {
        let mut request = http::Request::new(());
        *request.uri_mut() = "/tasks.v1.TaskService/GetTask".parse().unwrap();
        let first = Rpc::of(&mut request);
        *request.uri_mut() = "/tasks.v1.TaskService/CreateTask".parse().unwrap();
        assert_eq!(Rpc::of(&mut request), first);
    }
}
