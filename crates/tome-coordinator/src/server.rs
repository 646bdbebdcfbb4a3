//! The coordinator's gRPC server: `tome.v1.Tome`, standard health (`grpc.health.v1`) that
//! reflects readiness, and reflection, with configured message limits and graceful shutdown:
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
use tracing::{info, warn};

use crate::service::Coordinator;

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
    health.set_serving::<TomeServer<Coordinator>>().await;
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
    let tome = InterceptedService::new(tome, RequireApiKey(api_keys));
    let shutdown = async move {
        shutdown.await;
        health.set_not_serving::<TomeServer<Coordinator>>().await;
        coordinator.stop_admitting();
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
