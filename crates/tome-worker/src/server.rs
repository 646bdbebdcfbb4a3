//! The worker's gRPC server: `tome.v1.Worker`, `tome.v1.Peer`, health and reflection, with
//! etcd registration and graceful shutdown.
//!
//! Readiness: the server starts listening only after its models are loaded and warmed up, and
//! reports SERVING from then on. On shutdown it reports NOT_SERVING, leaves etcd (so that no
//! coordinator plans on it), refuses new shards, lets running ones finish within the grace
//! period, cancels what is left, and stops.
//!
//! With a TLS configuration it serves only over TLS; one that names a client CA (the cluster's)
//! takes calls to Worker and Peer only from callers with a certificate that CA signed: the
//! coordinators and the other workers.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tome_net::PeerHub;
use tome_proto::v1::peer_server::PeerServer;
use tome_proto::v1::worker_server::WorkerServer;
use tonic::transport::Server;
use tracing::{info, warn};

use crate::registration::EtcdRegistration;
use crate::service::WorkerService;

pub struct ServeOptions {
    pub max_message_bytes: usize,
    /// How long running shards may take to finish after shutdown begins.
    pub grace: Duration,
    pub etcd: Option<EtcdOptions>,
    /// TLS for the listener (see `tome_server::tls`); plaintext without it.
    pub tls: Option<tome_server::tls::ServerTls>,
}

pub struct EtcdOptions {
    pub access: tome_server::EtcdAccess,
    pub prefix: String,
    pub ttl: Duration,
}

/// Serves until `shutdown` resolves, then shuts down gracefully.
pub async fn serve(
    listener: TcpListener,
    service: Arc<WorkerService>,
    hub: PeerHub,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let limit = options.max_message_bytes;
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<WorkerServer<WorkerService>>().await;
    health.set_serving::<PeerServer<tome_net::PeerService>>().await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(tome_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // Only what this server serves (the descriptor set describes every tome service).
            .with_service_name("tome.v1.Worker")
            .with_service_name("tome.v1.Peer")
            .with_service_name("grpc.health.v1.Health")
            .with_service_name("grpc.reflection.v1.ServerReflection")
            .with_service_name("grpc.reflection.v1alpha.ServerReflection")
    };
    // Served as v1 and as v1alpha: grpcurl speaks v1, grpcio-reflection (Python) v1alpha.
    let (reflection_v1, reflection_v1alpha) = (reflection().build_v1()?, reflection().build_v1alpha()?);
    // In the background: a worker serves whether etcd answers now or only later.
    let registration = options.etcd.as_ref().map(|e| EtcdRegistration::start(e.access.clone(), &e.prefix, &service.info(), e.ttl));
    let worker = WorkerServer::from_arc(service.clone()).max_decoding_message_size(limit).max_encoding_message_size(limit);
    info!(address = %listener.local_addr()?, name = %service.config().name, tls = options.tls.is_some(), "serving tome.v1.Worker and tome.v1.Peer");
    let grace = options.grace;
    let drain = async move {
        shutdown.await;
        info!("shutting down: leaving the membership, finishing running shards");
        health.set_not_serving::<WorkerServer<WorkerService>>().await;
        if let Some(r) = registration {
            if let Err(e) = r.leave().await {
                warn!(error = %e, "could not leave etcd; the entry goes when its lease expires");
            }
        }
        service.stop_admitting();
        if !service.wait_idle(grace).await {
            warn!(?grace, "shards still running after the grace period; cancelling them");
            service.cancel_all();
            service.wait_idle(Duration::from_secs(10)).await;
        }
    };
    let router = Server::builder().add_service(health_service).add_service(reflection_v1).add_service(reflection_v1alpha).add_service(worker).add_service(hub.service());
    match options.tls {
        Some(tls) => router.serve_with_incoming_shutdown(tls.incoming(listener), drain).await?,
        None => router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), drain).await?,
    }
    Ok(())
}
