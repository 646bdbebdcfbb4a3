//! The service as operators run it: requests queue rather than being refused, health follows
//! readiness, metrics are there from the start and count every outcome, logs come as JSON and
//! traces go to an OTLP collector continuing the caller's trace, and `--threads` sizes the
//! compute.

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::trace::v1::Span;
use tome_e2e::*;
use tome_proto::v1 as pb;
use tome_proto::v1::tome_client::TomeClient;
use tome_proto::v1::worker_client::WorkerClient;
use tonic::Code;

const SERVING: i32 = 1;
const NOT_SERVING: i32 = 2;

/// The value of the series `name{labels}` (labels as the page writes them, in order), if the page
/// has it.
fn series(page: &str, name_and_labels: &str) -> Option<f64> {
    page.lines().find_map(|l| l.strip_prefix(name_and_labels).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}

/// Polls the metrics page until `check` holds (or panics after `limit`, showing the page).
fn wait_metrics(addr: &str, limit: Duration, what: &str, check: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let page = http_get(addr, "/metrics");
        if check(&page) {
            return page;
        }
        assert!(Instant::now() < deadline, "{what}: {page}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_beyond_the_running_jobs_wait_and_every_outcome_is_counted_from_the_start() {
    let Some(model) = minilm() else { return };
    let server = start_server(&model, &["--metrics-listen", "127.0.0.1:0", "--max-concurrent-jobs", "1", "--max-queued-requests", "1"]).await;
    let metrics = server.metrics.clone().expect("metrics address");

    // Before the first request, every series is there at zero, with the build and the process.
    let page = http_get(&metrics, "/metrics");
    for (name, want) in [
        (r#"tome_jobs_total{outcome="ok",caller="anonymous"}"#, Some(0.0)),
        (r#"tome_jobs_total{outcome="failed",caller="anonymous"}"#, Some(0.0)),
        (r#"tome_tokens_total{caller="anonymous"}"#, Some(0.0)),
        (r#"tome_requests_refused_total{reason="busy"}"#, Some(0.0)),
        (r#"tome_requests_refused_total{reason="unauthenticated"}"#, Some(0.0)),
        (r#"tome_requests_refused_total{reason="too_large"}"#, Some(0.0)),
        ("tome_jobs_in_flight", Some(0.0)),
        ("tome_queue_depth", Some(0.0)),
        ("tome_queue_tokens", Some(0.0)),
        ("tome_queue_wait_seconds_count", Some(0.0)),
        (r#"tome_stage_seconds_count{stage="total"}"#, Some(0.0)),
        (r#"tome_stage_seconds_bucket{stage="total",le="+Inf"}"#, Some(0.0)),
        ("process_resident_memory_bytes", None),
        ("process_cpu_seconds_total", None),
        ("process_start_time_seconds", None),
        ("process_open_fds", None),
    ] {
        let got = series(&page, name).unwrap_or_else(|| panic!("{name} is missing before the first request: {page}"));
        if let Some(want) = want {
            assert_eq!(got, want, "{name}");
        }
    }
    assert!(page.lines().any(|l| l.starts_with("tome_build_info{") && l.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))) && l.ends_with(" 1")), "{page}");
    assert!(!page.contains("tome_worker_shards_total"), "a coordinator exports no worker series: {page}");

    // One job runs (its hidden states unread, so it holds its place); the next request waits.
    let mut client = TomeClient::connect(server.addr.clone()).await.unwrap();
    let holding = pb::ProcessOptions {
        outputs: vec![pb::Output::HiddenStates as i32],
        attention: Some(pb::AttentionOverride { kind: pb::AttentionKind::Window as i32, window: 64, ..Default::default() }),
        position_extension: pb::PositionExtension::Tile as i32,
        ranks: 1,
        ..Default::default()
    };
    let held = client.process(text_request(TEXT.repeat(1000).as_bytes(), holding)).await.unwrap();
    wait_metrics(&metrics, Duration::from_secs(60), "the first job runs", |p| series(p, "tome_jobs_in_flight") == Some(1.0));
    let mut second_client = client.clone();
    let waiting = tokio::spawn(async move { process_call(&mut second_client, text_request(TEXT.as_bytes(), Default::default())).await });
    wait_metrics(&metrics, Duration::from_secs(30), "the second request waits", |p| series(p, "tome_queue_depth") == Some(1.0));
    // The queue holds one: a third request is refused for now, saying why and when to retry.
    let Err(full) = process_call(&mut client, text_request(TEXT.as_bytes(), Default::default())).await else { panic!("a third request got past a full queue") };
    assert_eq!(full.code(), Code::ResourceExhausted, "{full:?}");
    assert_eq!(full.metadata().get("retry-after").and_then(|v| v.to_str().ok()), Some("1"), "{full:?}");
    assert!(full.message().contains("--max-queued-requests"), "{full:?}");
    assert!(!waiting.is_finished(), "the second request runs only once the first has ended");
    // The caller of the first job leaves: its place goes to the request waiting.
    drop(held);
    let second = tokio::time::timeout(Duration::from_secs(120), waiting).await.expect("the waiting request ran").unwrap().unwrap();
    assert_eq!(second.kinds.last(), Some(&"done"));

    let page =
        wait_metrics(&metrics, Duration::from_secs(30), "the outcomes are counted", |p| series(p, r#"tome_jobs_total{outcome="cancelled",caller="anonymous"}"#) == Some(1.0));
    assert_eq!(series(&page, r#"tome_jobs_total{outcome="ok",caller="anonymous"}"#), Some(1.0), "{page}");
    assert_eq!(series(&page, r#"tome_requests_refused_total{reason="busy"}"#), Some(1.0), "{page}");
    assert_eq!(series(&page, "tome_queue_wait_seconds_count"), Some(2.0), "both jobs that ran waited (one for no time): {page}");
    assert!(series(&page, "tome_queue_wait_seconds_sum").unwrap() > 0.0, "{page}");
    assert_eq!(series(&page, "tome_queue_depth"), Some(0.0), "{page}");

    // Refusals for good are counted by their reason too.
    let huge = pb::ProcessOptions { ranks: 1000, ..Default::default() };
    assert_eq!(process_call(&mut client, text_request(TEXT.as_bytes(), huge)).await.err().map(|e| e.code()), Some(Code::ResourceExhausted));
    let unknown = pb::ProcessRequest { model: "no-such-model".into(), ..text_request(TEXT.as_bytes(), Default::default()) };
    assert_eq!(process_call(&mut client, unknown).await.err().map(|e| e.code()), Some(Code::NotFound));
    let page = http_get(&metrics, "/metrics");
    assert_eq!(series(&page, r#"tome_requests_refused_total{reason="too_large"}"#), Some(1.0), "{page}");
    assert_eq!(series(&page, r#"tome_requests_refused_total{reason="unknown_model"}"#), Some(1.0), "{page}");
}

#[tokio::test(flavor = "multi_thread")]
async fn health_follows_readiness_a_coordinator_without_a_live_worker_is_not_serving() {
    let Some(model) = minilm() else { return };
    let dir = std::env::temp_dir().join(format!("tome-readiness-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let worker_at = format!("127.0.0.1:{}", free_port());
    let mut coordinator = Command::new(tome_bin())
        .args(["serve", "coordinator", "--model", model.to_str().unwrap(), "--workers", &worker_at, "--probe-ms", "100", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = coordinator.stdout.take().unwrap();
    let listening = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout).lines().map_while(Result::ok).find_map(|l| l.strip_prefix("tome listening on ").map(str::to_string))
    });
    let host_port = tokio::time::timeout(Duration::from_secs(60), listening).await.unwrap().unwrap().expect("the coordinator listens");
    let addr = format!("http://{host_port}");
    let status = |want: i32| {
        let addr = addr.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let (tome, whole) = (health(&addr, "tome.v1.Tome").await, health(&addr, "").await);
                if tome == Some(want) && whole == Some(want) {
                    return;
                }
                assert!(Instant::now() < deadline, "health: tome.v1.Tome {tome:?}, server {whole:?}; wanted {want}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let http_health = || http_get(&host_port, "/health");
    status(NOT_SERVING).await;
    assert!(http_health().starts_with("HTTP/1.1 503"), "{}", http_health());
    let worker = start_worker_at(&model, &[], dir.join("worker.log"), worker_at.clone()).await;
    status(SERVING).await;
    assert!(http_health().starts_with("HTTP/1.1 200"), "{}", http_health());
    drop(worker);
    status(NOT_SERVING).await;
    let _ = coordinator.kill();
    let _ = coordinator.wait();
    std::fs::remove_dir_all(dir).ok();
}

/// An OTLP collector that keeps the spans it is sent.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(&self, request: tonic::Request<ExportTraceServiceRequest>) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans = request.into_inner().resource_spans.into_iter().flat_map(|r| r.scope_spans).flat_map(|s| s.spans);
        self.spans.lock().unwrap().extend(spans);
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn logs_come_as_json_and_spans_go_to_the_otlp_collector_in_the_callers_trace() {
    let Some(model) = minilm() else { return };
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector_at = listener.local_addr().unwrap();
    let serving = collector.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder().add_service(TraceServiceServer::new(serving)).serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)).await
    });
    let log = std::env::temp_dir().join(format!("tome-json-log-{}", std::process::id()));
    let model_arg = model.to_string_lossy();
    let endpoint = format!("http://{collector_at}");
    let args = ["--log", "info", "--log-format", "json", "--otlp-endpoint", &endpoint, "run", "--model", &model_arg, "--ranks", "2"];
    let mut server = spawn_serving(&args, "tome.v1.Tome", Some(log.clone())).await;
    let mut client = TomeClient::connect(server.addr.clone()).await.unwrap();
    let (trace_id, parent_span) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let mut call = tonic::Request::new(text_request(TEXT.as_bytes(), Default::default()));
    call.metadata_mut().insert("traceparent", format!("00-{trace_id}-{parent_span}-01").parse().unwrap());
    assert_eq!(process_call(&mut client, call).await.unwrap().kinds.last(), Some(&"done"));
    // A graceful shutdown sends the spans still buffered.
    server.terminate();
    assert_eq!(server.wait_exit(Duration::from_secs(60)), Some(0));

    let spans = collector.spans.lock().unwrap().clone();
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let process = spans.iter().find(|s| s.name == "process").unwrap_or_else(|| panic!("no `process` span among {:?}", spans.iter().map(|s| &s.name).collect::<Vec<_>>()));
    assert_eq!(hex(&process.trace_id), trace_id, "the job's span is in the caller's trace");
    assert_eq!(hex(&process.parent_span_id), parent_span, "and the child of the caller's span");

    let text = server.log_text();
    let lines: Vec<serde_json::Value> =
        text.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("a log line that is not JSON ({e}): {l}"))).collect();
    assert!(lines.iter().any(|l| l["fields"]["message"] == "serving tome.v1.Tome" && l["level"] == "INFO"), "{text}");
    assert!(lines.iter().any(|l| l["span"]["trace_id"] == trace_id), "log lines inside the job carry its trace id: {text}");
    std::fs::remove_file(log).ok();
}

#[tokio::test(flavor = "multi_thread")]
async fn threads_size_the_compute_of_a_worker() {
    let Some(model) = minilm() else { return };
    let log = std::env::temp_dir().join(format!("tome-threads-{}", std::process::id()));
    let worker = start_worker(&model, &["--threads", "3"], log.clone()).await;
    let mut client = WorkerClient::connect(worker.addr.clone()).await.unwrap();
    let info = client.info(pb::WorkerInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.device, "cpu, 3 threads");
    std::fs::remove_file(log).ok();
}
