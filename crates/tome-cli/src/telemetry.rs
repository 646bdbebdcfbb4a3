//! Where the process's logs and traces go: log lines on stderr (text or JSON, `--log-format`)
//! through the `--log` filter, and, with `--otlp-endpoint`, the same spans exported over
//! OTLP/gRPC to a collector.

use anyhow::Context;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::args::LogFormat;

/// The exporter of a process that exports traces; [`Telemetry::shutdown`] sends what is left.
pub struct Telemetry {
    traces: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Installs the process's subscriber. With an OTLP endpoint it must run inside the tokio
    /// runtime the exporter's channel lives on.
    pub fn install(filter: EnvFilter, format: LogFormat, otlp_endpoint: Option<&str>) -> anyhow::Result<Self> {
        let stderr = std::io::stderr;
        let logs = match format {
            LogFormat::Text => tracing_subscriber::fmt::layer().with_writer(stderr).with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).boxed(),
            LogFormat::Json => tracing_subscriber::fmt::layer().json().with_current_span(true).with_span_list(false).with_writer(stderr).boxed(),
        };
        let traces = otlp_endpoint.map(otlp_provider).transpose()?;
        let export = traces.as_ref().map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("tome")));
        tracing_subscriber::registry().with(filter).with(logs).with(export).try_init().context("installing the log subscriber")?;
        Ok(Telemetry { traces })
    }

    /// Exports the spans still buffered and stops the exporter.
    pub fn shutdown(self) {
        if let Some(provider) = self.traces {
            if let Err(e) = provider.shutdown() {
                eprintln!("warning: exporting the last trace spans: {e}");
            }
        }
    }
}

fn otlp_provider(endpoint: &str) -> anyhow::Result<SdkTracerProvider> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .with_context(|| format!("--otlp-endpoint {endpoint}: cannot export traces there"))?;
    let resource = opentelemetry_sdk::Resource::builder().with_service_name("tome").build();
    Ok(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build())
}
