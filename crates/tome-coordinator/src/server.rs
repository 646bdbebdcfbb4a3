//! The coordinator's gRPC server: `tome.v1.Tome`, standard health (`grpc.health.v1`) that
//! reflects readiness, and reflection, with configured message limits and graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tome_proto::v1::tome_server::TomeServer;
use tonic::transport::Server;
use tracing::info;

use crate::service::Coordinator;

/// Serves until `shutdown` resolves; then reports NOT_SERVING, stops accepting calls and lets
/// in-flight streams finish.
pub async fn serve(
    addr: SocketAddr,
    coordinator: Arc<Coordinator>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let limit = coordinator.config().limits.max_message_bytes;
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<TomeServer<Coordinator>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tome_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let tome = TomeServer::from_arc(coordinator).max_decoding_message_size(limit).max_encoding_message_size(limit);
    info!(%addr, "serving tome.v1.Tome");
    let shutdown = async move {
        shutdown.await;
        health.set_not_serving::<TomeServer<Coordinator>>().await;
        info!("shutting down");
    };
    Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(tome)
        .serve_with_shutdown(addr, shutdown)
        .await?;
    Ok(())
}
