//! `tome serve coordinator` and `tome serve worker`: the two processes of a cluster.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tome_coordinator::{Cluster, Coordinator, EtcdMembership, Membership, StaticMembership};
use tome_model::ModelDir;
use tome_net::{PeerHub, PeerLimits};
use tome_server::tls::{self, ClientTlsFiles, Exposure};
use tome_worker::{EtcdOptions, ServeOptions, WorkerConfig, WorkerService};

use crate::args::{CoordinatorArgs, OpsArgs, ServeCommand, ServerTlsArgs, WorkerArgs};
use crate::embedded::{config, load_models, shutdown_signal};

pub async fn serve(command: ServeCommand) -> anyhow::Result<()> {
    match command {
        ServeCommand::Coordinator(a) => coordinator(a).await,
        ServeCommand::Worker(a) => worker(a).await,
    }
}

/// The TLS a server listening on `listen` serves with, or `None` for plaintext, which beyond
/// loopback is refused unless `--insecure-plaintext` says so (and then logged as a warning).
/// `protocol`: what it speaks inside TLS. Called first thing, so a server that may not start
/// says so before it loads its models.
pub fn listener_tls(listen: std::net::SocketAddr, args: &ServerTlsArgs, protocol: tls::Protocol) -> anyhow::Result<Option<tls::ServerTls>> {
    let config = tls::server_config(&args.files(), protocol)?;
    match tls::check_listen(listen, config.is_some(), args.insecure_plaintext)? {
        Exposure::InsecurePlaintext => tracing::warn!(
            %listen,
            "INSECURE: serving plaintext beyond loopback (--insecure-plaintext): anyone who reaches this port can call every service on it, unauthenticated and unencrypted"
        ),
        Exposure::LoopbackPlaintext => tracing::info!(%listen, "plaintext on loopback: only this machine can call"),
        Exposure::Tls => tracing::info!(%listen, mutual = args.tls_client_ca.is_some(), "serving TLS"),
    }
    Ok(config)
}

/// The TLS a server calls workers with: the cluster CA (`ca`) and `identity` (certificate and
/// key), which workers check against the same CA. Both follow their files.
fn cluster_client_tls(ca: Option<&std::path::Path>, identity: (Option<&std::path::Path>, Option<&std::path::Path>)) -> anyhow::Result<Option<tls::ClientTls>> {
    let Some(ca) = ca else { return Ok(None) };
    let (Some(cert), Some(key)) = identity else {
        bail!("calling workers over TLS (--tls-ca {}) needs a certificate the cluster CA signed: workers take calls only from cluster members", ca.display());
    };
    Ok(tls::follow_client(&ClientTlsFiles { ca: Some(ca.to_path_buf()), cert: Some(cert.to_path_buf()), key: Some(key.to_path_buf()) })?)
}

/// Binds the server's address and says where it listens on stdout (one line, `tome listening
/// on ADDR`), which scripts and tests read when the port is 0 (any free port).
pub async fn bind(addr: std::net::SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("listening on {addr}"))?;
    println!("tome listening on {}", listener.local_addr()?);
    Ok(listener)
}

/// What a server process is, for its metrics.
pub enum Role<'a> {
    /// A coordinator (or the embedded default), with the callers its API keys name.
    Coordinator {
        api_keys: Option<&'a tome_server::auth::ApiKeys>,
    },
    Worker,
}

/// The build this process runs: `tome_build_info`, always 1, labelled with the version and the
/// features built in.
pub const BUILD_INFO: &str = "tome_build_info";

/// Serves Prometheus metrics over HTTP (`GET /metrics`) on `--metrics-listen`, when given: the
/// role's series (each present, at zero, from start), [`BUILD_INFO`] and the process's own
/// (`process_*`: CPU seconds, resident memory, open files, start time), and says where on stdout (`tome metrics on ADDR`) before the server's own `tome listening on`
/// line, so port 0 works here too. The listener is bound before this returns: a taken port is
/// an error at start-up, not a log line later. With the server's `--tls-*` files it speaks
/// HTTPS with the server's certificate (and, with `--tls-client-ca`, takes only scrapers whose
/// certificate that CA signed); beyond loopback it is plaintext only with
/// `--insecure-plaintext`, like the server's own listener.
pub async fn install_metrics(ops: &OpsArgs, server_tls: &ServerTlsArgs, role: Role<'_>) -> anyhow::Result<()> {
    let Some(addr) = ops.metrics_listen else { return Ok(()) };
    let tls = tls::ServerTls::load(&server_tls.files(), tls::Protocol::Http1)?;
    if tls::check_listen(addr, tls.is_some(), server_tls.insecure_plaintext)? == Exposure::InsecurePlaintext {
        tracing::warn!(%addr, "INSECURE: serving metrics in plaintext beyond loopback (--insecure-plaintext)");
    }
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("serving metrics on {addr}"))?;
    // Durations are histograms, which add up across replicas (summaries do not).
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets_for_metric(metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        .context("the metrics' histogram buckets")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    match role {
        Role::Coordinator { api_keys } => {
            tome_coordinator::metrics::describe();
            let anonymous = tome_server::auth::Caller::anonymous();
            let callers: Vec<&str> = match api_keys {
                Some(keys) => keys.callers().map(|c| c.name()).collect(),
                None => vec![anonymous.name()],
            };
            tome_coordinator::metrics::start_at_zero(&callers);
        }
        Role::Worker => {
            tome_worker::metrics::describe();
            tome_worker::metrics::start_at_zero();
        }
    }
    metrics::describe_gauge!(BUILD_INFO, "The build this process runs (always 1): its version and features.");
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION"), "nccl" => cfg!(feature = "nccl").to_string()).set(1.0);
    let process = metrics_process::Collector::default();
    process.describe();
    println!("tome metrics on {}", listener.local_addr()?);
    // Histograms drain their buckets on upkeep; the crate leaves scheduling it to the caller.
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    let render = move || {
        process.collect();
        std::future::ready(handle.render())
    };
    let app = axum::Router::new().route("/metrics", axum::routing::get(render));
    tokio::spawn(async move {
        let served = match tls {
            Some(tls) => axum::serve(tls.listener(listener), app).await,
            None => axum::serve(listener, app).await,
        };
        if let Err(e) = served {
            tracing::error!(error = %e, "the metrics server stopped");
        }
    });
    Ok(())
}

/// The buckets (upper bounds, seconds) of every `*_seconds` histogram: from a short document's
/// tokenization to a book's run on few ranks.
pub const SECONDS_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0];

async fn coordinator(args: CoordinatorArgs) -> anyhow::Result<()> {
    let server_tls = listener_tls(args.listen, &args.tls, tls::Protocol::GrpcAndHttp1)?;
    // Towards workers: the cluster identity, or the public one when it is a cluster certificate.
    let identity = match &args.cluster_tls_cert {
        Some(cert) => (Some(cert.as_path()), args.cluster_tls_key.as_deref()),
        None => (args.tls.tls_cert.as_deref(), args.tls.tls_key.as_deref()),
    };
    let worker_tls = cluster_client_tls(args.tls_ca.as_deref(), identity)?;
    let api_keys = args.api_keys.keys()?;
    install_metrics(&args.ops, &args.tls, Role::Coordinator { api_keys: api_keys.as_deref() }).await?;
    let probe_every = Duration::from_millis(args.probe_ms.max(50));
    let membership: Arc<dyn Membership> = if let Some(etcd) = args.membership.etcd_access()? {
        let endpoints = etcd.endpoints().join(",");
        let m = EtcdMembership::start(etcd, &args.membership.etcd_prefix, probe_every, worker_tls.clone()).await.with_context(|| format!("connecting to etcd at {endpoints}"))?;
        Arc::new(m)
    } else {
        Arc::new(StaticMembership::start(args.workers.clone(), probe_every, worker_tls.clone()))
    };
    let limits = config(&args.embedded);
    let cluster = Arc::new(Cluster::new(membership, limits.limits.max_message_bytes, limits.hidden_rows_per_message).with_attempts(args.job_attempts).with_tls(worker_tls));
    let coordinator = Arc::new(Coordinator::with_cluster(load_models(&args.embedded)?, limits, cluster)?);
    let listener = bind(args.listen).await?;
    let grace = Duration::from_secs(args.ops.grace_seconds);
    tome_coordinator::serve(listener, coordinator, grace, server_tls, api_keys, shutdown_signal()).await.map_err(|e| anyhow::anyhow!(e))
}

async fn worker(args: WorkerArgs) -> anyhow::Result<()> {
    let server_tls = listener_tls(args.listen, &args.tls, tls::Protocol::Grpc)?;
    // Worker and Peer are for cluster members only: over TLS, callers need a cluster certificate.
    if server_tls.is_some() && args.tls.tls_client_ca.is_none() {
        bail!("a worker serving TLS needs --tls-client-ca, the cluster CA: Worker and Peer take calls only from cluster members");
    }
    let peer_tls = cluster_client_tls(args.tls_ca.as_deref().or(args.tls.tls_client_ca.as_deref()), (args.tls.tls_cert.as_deref(), args.tls.tls_key.as_deref()))?;
    install_metrics(&args.ops, &args.tls, Role::Worker).await?;
    let models: Vec<Arc<ModelDir>> =
        args.models.iter().map(|p| ModelDir::open(p).map(Arc::new).with_context(|| format!("loading the model at {}", p.display()))).collect::<anyhow::Result<_>>()?;
    if models.is_empty() {
        bail!("a worker needs at least one --model");
    }
    crate::embedded::check_device(args.device)?;
    let warm = models.clone();
    tokio::task::spawn_blocking(move || tome_worker::warm_up(&warm)).await.context("warming up")??;
    let listener = bind(args.listen).await?;
    let bound = listener.local_addr()?;
    let advertise = args.advertise.clone().unwrap_or_else(|| bound.to_string());
    let name = args.name.clone().unwrap_or_else(|| advertise.clone());
    let limits = PeerLimits {
        queue_depth: args.peer_queue_depth,
        max_frame_bytes: args.max_message_bytes,
        recv_timeout: Duration::from_secs(args.peer_recv_timeout_seconds),
        rendezvous_timeout: Duration::from_secs(args.peer_rendezvous_timeout_seconds),
        ..PeerLimits::default()
    };
    let hub = PeerHub::with_tls(tokio::runtime::Handle::current(), limits, peer_tls);
    let args_device = args.device;
    let config =
        WorkerConfig { name: name.clone(), advertise: advertise.clone(), max_shards: args.max_shards.max(1), memory_budget_bytes: args.memory_budget_bytes, device: args.device };
    let gpus = tome_worker::transport::NcclGpus::detect();
    tracing::info!(gpus = gpus.count(), "GPUs for ranks that talk over NCCL");
    // Each model's GPU memory, measured before any job (GPU ranks only): what coordinators plan
    // each GPU with.
    let measured = models.clone();
    let footprints = tokio::task::spawn_blocking(move || tome_worker::measure_footprints(&measured, args_device)).await.context("measuring GPU memory")??;
    let service = Arc::new(WorkerService::new(models, hub.clone(), config, gpus).with_footprints(footprints));
    let etcd =
        args.membership.etcd_access()?.map(|access| EtcdOptions { access, prefix: args.membership.etcd_prefix.clone(), ttl: Duration::from_secs(args.etcd_ttl_seconds.max(1)) });
    let options = ServeOptions { max_message_bytes: args.max_message_bytes, grace: Duration::from_secs(args.ops.grace_seconds), etcd, tls: server_tls };
    tracing::info!(%name, %advertise, "worker serving");
    tome_worker::serve(listener, service, hub, options, shutdown_signal()).await.map_err(|e| anyhow::anyhow!(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calling_workers_over_tls_needs_an_identity_they_accept() {
        let ca = std::path::Path::new("/nonexistent/ca.pem");
        let Err(err) = cluster_client_tls(Some(ca), (None, None)) else { panic!("calling workers over TLS without an identity was accepted") };
        assert!(err.to_string().contains("needs a certificate the cluster CA signed"), "{err}");
        assert!(cluster_client_tls(None, (None, None)).unwrap().is_none(), "no cluster CA: plaintext to workers");
    }
}
