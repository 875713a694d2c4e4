//! The HTTP routes of the JSON API and the RPC each one is: the one table
//! that says which `POST /v1/tasks` is `CreateTask`, and where a path's
//! and a query's parameters go in the RPC's request message.

use super::super::rpc::Method;

/// An HTTP route: its method, its path pattern and the RPC it calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// `GET` or `POST`.
    pub http_method: &'static str,
    /// The path, `{task_id}` standing for a task id.
    pub pattern: &'static str,
    /// The RPC the route calls.
    pub rpc: Method,
    /// Whether the request message is the JSON body (else the path and
    /// the query fill it).
    pub body: bool,
    /// The query parameters the route takes, named as the request
    /// message's fields are.
    pub query: &'static [&'static str],
}

/// Every route of the JSON API.
pub const ROUTES: [Route; 5] = [
    Route {
        http_method: "POST",
        pattern: "/v1/tasks",
        rpc: Method::CreateTask,
        body: true,
        query: &[],
    },
    Route {
        http_method: "GET",
        pattern: "/v1/tasks",
        rpc: Method::ListTasks,
        body: false,
        query: &["agent_id", "page_size", "page_token"],
    },
    Route {
        http_method: "GET",
        pattern: "/v1/tasks/{task_id}",
        rpc: Method::GetTask,
        body: false,
        query: &[],
    },
    Route {
        http_method: "POST",
        pattern: "/v1/tasks/{task_id}:wait",
        rpc: Method::WaitTask,
        body: false,
        query: &["timeout"],
    },
    Route {
        http_method: "POST",
        pattern: "/v1/tasks/{task_id}:cancel",
        rpc: Method::CancelTask,
        body: false,
        query: &[],
    },
];

/// What a request's method and path matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Matched {
    /// A route, with the task id its path holds, if it has one.
    Route(Route, Option<String>),
    /// The path is a route's, the method is not: the methods it allows.
    WrongMethod(Vec<&'static str>),
    /// No route has the path.
    NoRoute,
}

/// The route `method` and `path` call.
pub(super) fn find(method: &str, path: &str) -> Matched {
    let mut allowed = Vec::new();
    for route in ROUTES {
        let Some(task_id) = matches(route.pattern, path) else {
            continue;
        };
        if route.http_method == method {
            return Matched::Route(route, task_id);
        }
        allowed.push(route.http_method);
    }
    if allowed.is_empty() {
        Matched::NoRoute
    } else {
        Matched::WrongMethod(allowed)
    }
}

/// `Some(task id)` when `path` fits `pattern` (`Some(None)` for a pattern
/// without one). A task id is one non-empty path segment without `:`.
fn matches(pattern: &str, path: &str) -> Option<Option<String>> {
    let Some((before, after)) = pattern.split_once("{task_id}") else {
        return (pattern == path).then_some(None);
    };
    let id = path.strip_prefix(before)?.strip_suffix(after)?;
    let plain = !id.is_empty() && !id.contains(['/', ':']);
    plain.then(|| Some(id.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_path_finds_its_route_and_task_id() {
        let found = |method, path| match find(method, path) {
            Matched::Route(route, id) => Some((route.rpc, id)),
            _ => None,
        };
        assert_eq!(found("POST", "/v1/tasks"), Some((Method::CreateTask, None)));
        assert_eq!(found("GET", "/v1/tasks"), Some((Method::ListTasks, None)));
        assert_eq!(
            found("GET", "/v1/tasks/abc"),
            Some((Method::GetTask, Some("abc".into())))
        );
        assert_eq!(
            found("POST", "/v1/tasks/abc:wait"),
            Some((Method::WaitTask, Some("abc".into())))
        );
        assert_eq!(
            found("POST", "/v1/tasks/abc:cancel"),
            Some((Method::CancelTask, Some("abc".into())))
        );
        assert_eq!(found("GET", "/v1/tasks/abc:nope"), None);
        assert_eq!(found("GET", "/v1/tasks/a/b"), None);
        assert_eq!(found("GET", "/v1/tasks/"), None);
    }

    #[test]
    fn a_known_path_with_another_method_says_which_it_allows() {
        assert_eq!(
            find("DELETE", "/v1/tasks/abc"),
            Matched::WrongMethod(vec!["GET"])
        );
        assert_eq!(
            find("PUT", "/v1/tasks"),
            Matched::WrongMethod(vec!["POST", "GET"])
        );
        assert_eq!(find("GET", "/v2/tasks"), Matched::NoRoute);
    }
}
