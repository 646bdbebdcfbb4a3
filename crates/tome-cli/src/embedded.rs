//! The embedded default: a coordinator whose ranks are threads of this process.

use std::sync::Arc;

use anyhow::Context;
use tome_coordinator::{serve, Coordinator, CoordinatorConfig, Limits};
use tome_model::gpu::DeviceSpec;
use tome_model::ModelDir;

use crate::args::{EmbeddedArgs, RunArgs};

pub fn coordinator(args: &EmbeddedArgs) -> anyhow::Result<Coordinator> {
    check_device(args.device)?;
    Ok(Coordinator::new(load_models(args)?, config(args))?)
}

/// Opens each GPU `device` names once, compiling tome's kernels for it, so that a missing GPU,
/// driver, NVRTC or cuBLAS stops the process at start with the reason, never a job later.
pub fn check_device(device: DeviceSpec) -> anyhow::Result<()> {
    let indices: Vec<usize> = match device {
        DeviceSpec::Cpu => return Ok(()),
        DeviceSpec::Cuda(index) => vec![index],
        DeviceSpec::AllCuda => {
            let count = tome_gpu::gpus().with_context(|| format!("--device {device}"))?.len();
            (0..count.max(1)).collect()
        }
    };
    for index in indices {
        let rank = tome_model::gpu::GpuRank::lease(index).with_context(|| format!("--device {device}"))?;
        let gpu = rank.info();
        tracing::info!(device = %device, index, name = %gpu.name, memory_bytes = gpu.memory_bytes, arch = %gpu.arch(), "ranks compute on this GPU");
    }
    Ok(())
}

pub fn load_models(args: &EmbeddedArgs) -> anyhow::Result<Vec<ModelDir>> {
    args.models
        .iter()
        .map(|p| ModelDir::open(p).with_context(|| format!("loading the model at {} (scripts/fetch_data.sh fetches the default)", p.display())))
        .collect::<anyhow::Result<Vec<_>>>()
}

pub fn config(args: &EmbeddedArgs) -> CoordinatorConfig {
    CoordinatorConfig {
        default_ranks: args.ranks,
        limits: Limits {
            max_document_tokens: args.max_document_tokens,
            max_document_bytes: args.max_document_bytes,
            max_ranks: args.max_ranks,
            max_concurrent_jobs: args.max_concurrent_jobs,
            max_jobs_per_caller: args.max_jobs_per_caller,
            max_tokens_in_flight: args.max_tokens_in_flight,
            max_queued_requests: args.max_queued_requests,
            max_queued_tokens: args.max_queued_tokens,
            max_message_bytes: args.max_message_bytes,
        },
        device: args.device,
        ..CoordinatorConfig::default()
    }
}

/// Serves until Ctrl-C or SIGTERM.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let tls = crate::serve::listener_tls(args.listen, &args.tls, tome_server::tls::Protocol::GrpcAndHttp1)?;
    let api_keys = args.api_keys.keys()?;
    crate::serve::install_metrics(&args.ops, &args.tls, crate::serve::Role::Coordinator { api_keys: api_keys.as_deref() }).await?;
    let coordinator = Arc::new(coordinator(&args.embedded)?);
    let listener = crate::serve::bind(args.listen).await?;
    tracing::info!(models = args.embedded.models.len(), ranks = args.embedded.ranks, "serving the embedded default");
    let grace = std::time::Duration::from_secs(args.ops.grace_seconds);
    serve(listener, coordinator, grace, tls, api_keys, shutdown_signal()).await.map_err(|e| anyhow::anyhow!(e))
}

pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
