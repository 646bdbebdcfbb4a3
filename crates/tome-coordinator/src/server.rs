//! The coordinator's gRPC server: `tome.v1.Tome`, standard health (`grpc.health.v1`) that
//! reflects readiness (SERVING only while jobs can run here: admitting, and with a cluster, while
//! a worker is live; checked every [`READINESS_CHECK`]), and reflection, with configured message limits and graceful shutdown:
//! on the signal it reports NOT_SERVING, refuses new jobs, lets jobs in flight finish within
//! the grace period, cancels the rest, and stops. With a TLS configuration it serves only over
//! TLS (and, when that names a client CA, only to callers with a certificate it signed). With
//! API keys, `tome.v1.Tome` answers only calls that carry one (health and reflection stay open,
//! for probes). The HTTP routes (`crate::http`) share the port: HTTP/2 requests reach gRPC,
//! HTTP/1.1 ones the JSON routes.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tome_proto::v1::tome_server::TomeServer;
use tome_server::auth::{ApiKeys, RequireApiKey};
use tome_server::tls::ServerTls;
use tonic::service::interceptor::InterceptedService;
use tonic_health::ServingStatus;
use tracing::{info, warn};

use crate::service::Coordinator;

/// How often health follows the coordinator's readiness.
pub const READINESS_CHECK: Duration = Duration::from_millis(500);

/// Keeps the health of `tome.v1.Tome` and of the server as a whole (the empty service name) at
/// the coordinator's readiness.
async fn follow_readiness(health: tonic_health::server::HealthReporter, coordinator: Arc<Coordinator>) {
    let mut serving = None;
    let mut every = tokio::time::interval(READINESS_CHECK);
    loop {
        every.tick().await;
        let ready = coordinator.is_ready();
        if serving == Some(ready) {
            continue;
        }
        let status = if ready { ServingStatus::Serving } else { ServingStatus::NotServing };
        health.set_service_status("", status).await;
        health.set_service_status(<TomeServer<Coordinator> as tonic::server::NamedService>::NAME, status).await;
        info!(ready, "readiness changed");
        serving = Some(ready);
    }
}

/// Serves until `shutdown` resolves, then shuts down gracefully within `grace`; over TLS when
/// `tls` is given (see `tome_server::tls`).
pub async fn serve(
    listener: TcpListener,
    coordinator: Arc<Coordinator>,
    grace: Duration,
    tls: Option<ServerTls>,
    api_keys: Option<Arc<ApiKeys>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let limit = coordinator.config().limits.max_message_bytes;
    let (health, health_service) = tonic_health::server::health_reporter();
    let readiness = tokio::spawn(follow_readiness(health.clone(), coordinator.clone()));
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(tome_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // Only what this server serves (the descriptor set describes every tome service).
            .with_service_name("tome.v1.Tome")
            .with_service_name("grpc.health.v1.Health")
            .with_service_name("grpc.reflection.v1.ServerReflection")
            .with_service_name("grpc.reflection.v1alpha.ServerReflection")
    };
    // Served as v1 and as v1alpha: grpcurl speaks v1, grpcio-reflection (Python) v1alpha.
    let (reflection_v1, reflection_v1alpha) = (reflection().build_v1()?, reflection().build_v1alpha()?);
    let tome = TomeServer::from_arc(coordinator.clone()).max_decoding_message_size(limit).max_encoding_message_size(limit);
    info!(addr = %listener.local_addr()?, tls = tls.is_some(), api_keys = api_keys.is_some(), "serving tome.v1.Tome");
    let http = crate::http::router(coordinator.clone(), api_keys.clone());
    let mut require_key = RequireApiKey(api_keys);
    let tome = InterceptedService::new(tome, move |request| {
        tonic::service::Interceptor::call(&mut require_key, request).inspect_err(|_| crate::metrics::refused_for(crate::metrics::RefusalReason::Unauthenticated))
    });
    let shutdown = async move {
        shutdown.await;
        coordinator.stop_admitting();
        readiness.abort();
        health.set_service_status("", ServingStatus::NotServing).await;
        health.set_not_serving::<TomeServer<Coordinator>>().await;
        info!(jobs = coordinator.jobs_in_flight(), "shutting down: finishing the jobs in flight");
        if !coordinator.wait_idle(grace).await {
            warn!(?grace, "jobs still in flight after the grace period; cancelling them");
            coordinator.cancel_all();
            coordinator.wait_idle(Duration::from_secs(10)).await;
        }
    };
    let grpc = tonic::service::Routes::new(health_service).add_service(reflection_v1).add_service(reflection_v1alpha).add_service(tome);
    let app = grpc.into_axum_router().merge(http);
    match tls {
        Some(tls) => axum::serve(tls.listener(listener), app).with_graceful_shutdown(shutdown).await?,
        None => axum::serve(listener, app).with_graceful_shutdown(shutdown).await?,
    }
    Ok(())
}
