//! The gate that registers each call with its connection's [`Watch`]
//! until its answer has been sent (or abandoned), gives the call the plain
//! [`TcpConnectInfo`] the layers under it read the peer from, and answers
//! `DEADLINE_EXCEEDED` for a call that runs past the request timeout.

use std::{future::Future, time::Duration};

use tonic::{
    Status,
    body::Body,
    transport::server::{TcpConnectInfo, TlsConnectInfo},
};

use super::{
    ConnectionInfo,
    watch::{CallGuard, Watch},
};
use crate::api::{
    ServiceError,
    gate::{Gate, hold_until_sent},
    reply,
    rpc::{Method, Rpc},
};

/// See the module.
#[derive(Debug, Clone, Copy)]
pub struct TrackCalls {
    request_timeout: Duration,
}

impl TrackCalls {
    /// Calls are cut after `request_timeout`.
    pub fn new(request_timeout: Duration) -> Self {
        Self { request_timeout }
    }
}

/// The address of the peer that sent `request`, from the
/// [`TcpConnectInfo`] that [`TrackCalls`] gives each call.
pub(in crate::api) fn peer_ip<B>(request: &http::Request<B>) -> Option<std::net::IpAddr> {
    request
        .extensions()
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .map(|addr| addr.ip())
}

impl Gate for TrackCalls {
    /// The call's place on its connection (`None` off a guarded socket),
    /// and the time it may take.
    type Pass = (Option<CallGuard>, Duration);

    fn check<B>(&self, rpc: &Rpc, request: &mut http::Request<B>) -> Result<Self::Pass, Status> {
        let extensions = request.extensions();
        let info = extensions.get::<ConnectionInfo>().cloned().or_else(|| {
            extensions
                .get::<TlsConnectInfo<ConnectionInfo>>()
                .map(|tls| tls.get_ref().clone())
        });
        let guard = info.map(|info| {
            request.extensions_mut().insert(info.tcp);
            Watch::open(&info.watch, rpc.is(Method::HealthWatch))
        });
        Ok((guard, self.request_timeout))
    }

    async fn answer<E, F>(
        rpc: Rpc,
        (guard, timeout): Self::Pass,
        answer: F,
    ) -> Result<http::Response<Body>, E>
    where
        E: Send + 'static,
        F: Future<Output = Result<http::Response<Body>, E>> + Send + 'static,
    {
        let Ok(response) = tokio::time::timeout(timeout, answer).await else {
            return Ok(reply::refuse(&rpc, ServiceError::TimedOut(timeout), None).into_http());
        };
        let response = response?;
        Ok(match guard {
            Some(guard) => hold_until_sent(response, guard),
            None => response,
        })
    }
}
