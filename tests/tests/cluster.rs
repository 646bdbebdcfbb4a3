//! The cluster end to end: `tome serve worker` and `tome serve coordinator` as real processes on
//! 127.0.0.1 ports, with a static worker list and with a real etcd. A document spread over 1, 2
//! and 4 workers gives the embedded default's outputs; bytes between ranks are the plan's count
//! plus little framing; the trace context reaches the workers; a cancelled job frees its
//! workers; requests over the limits are refused with the right code while the cluster keeps
//! serving; jobs whose workers are killed mid-job run again on the live ones, to the same output.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tome_e2e::*;
use tome_proto::v1 as pb;
use tome_proto::v1::tome_client::TomeClient;
use tome_proto::v1::worker_client::WorkerClient;
use tonic::transport::Channel;
use tonic::Code;

fn logs(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tome-cluster-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{name}.log"))
}

/// Window attention over a document past the learned positions, with chunks.
fn options(ranks: u32, layout: pb::Layout) -> pb::ProcessOptions {
    pb::ProcessOptions {
        attention: Some(pb::AttentionOverride { kind: pb::AttentionKind::Window as i32, window: 128, ..Default::default() }),
        position_extension: pb::PositionExtension::Tile as i32,
        chunks: Some(pb::ChunkSpec { spec: Some(pb::chunk_spec::Spec::TokensPerChunk(300)) }),
        ranks,
        layout: layout as i32,
        ..Default::default()
    }
}

fn request(text: &str, options: pb::ProcessOptions) -> pb::ProcessRequest {
    pb::ProcessRequest { model: String::new(), input: Some(pb::process_request::Input::Text(text.as_bytes().to_vec())), options: Some(options) }
}

/// The live workers a coordinator reports, waiting until there are `n`.
async fn wait_for_workers(client: &mut TomeClient<Channel>, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let info = client.info(pb::InfoRequest {}).await.unwrap().into_inner();
        assert_eq!(info.backend, "cluster");
        if info.workers.len() == n {
            return info.workers;
        }
        assert!(Instant::now() < deadline, "the coordinator saw {:?}, not {n} workers", info.workers);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn shards_running(worker: &Server) -> u32 {
    let mut client = WorkerClient::connect(worker.addr.clone()).await.unwrap();
    client.info(pb::WorkerInfoRequest {}).await.unwrap().into_inner().shards_running
}

/// Waits until no worker runs a shard.
async fn wait_idle(workers: &[&Server]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    for w in workers {
        while shards_running(w).await > 0 {
            assert!(Instant::now() < deadline, "worker {} still runs shards", w.host_port);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn assert_same(got: &Processed, want: &Processed, what: &str) {
    assert!(max_diff(&got.document, &want.document) <= 1e-5, "{what}: document");
    assert_eq!(got.chunks.len(), want.chunks.len(), "{what}: chunks");
    for (a, b) in got.chunks.iter().zip(&want.chunks) {
        assert!(max_diff(a, b) <= 1e-5, "{what}: chunk");
    }
}

/// The value of an unlabelled sample in a Prometheus text page.
fn metric_value(page: &str, name: &str) -> Option<f64> {
    page.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Waits (up to 10 s) until the server's `/metrics` shows `name` at `at_least` or more.
async fn wait_for_metric(addr: &str, name: &str, at_least: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let value = metric_value(&http_get(addr, "/metrics"), name);
        if value.is_some_and(|v| v >= at_least) {
            return;
        }
        assert!(Instant::now() < deadline, "{addr}: {name} is {value:?}, wanted at least {at_least}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn embedded_reference(model: &Path, text: &str, ranks: u32, layout: pb::Layout) -> Processed {
    let server = start_server(model, &[]).await;
    let mut client = TomeClient::connect(server.addr.clone()).await.unwrap();
    process_call(&mut client, request(text, options(ranks, layout))).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_over_1_2_and_4_workers_matches_the_embedded_default() {
    let Some(model) = minilm() else { return };
    let text = TEXT.repeat(30);
    let reference = embedded_reference(&model, &text, 4, pb::Layout::Contiguous).await;
    let reference_zigzag = embedded_reference(&model, &text, 4, pb::Layout::Zigzag).await;
    let mut workers = Vec::new();
    for i in 0..4 {
        workers.push(start_worker(&model, &["--metrics-listen", "127.0.0.1:0"], logs(&format!("match-w{i}"))).await);
    }
    for n in [1, 2, 4] {
        let list: Vec<&str> = workers[..n].iter().map(|w| w.host_port.as_str()).collect();
        let list = list.join(",");
        let extra = ["--workers", &list, "--probe-ms", "200", "--metrics-listen", "127.0.0.1:0"];
        let coordinator = start_coordinator(&model, if n == 4 { &extra } else { &extra[..4] }, logs(&format!("match-c{n}"))).await;
        let mut client = TomeClient::connect(coordinator.addr.clone()).await.unwrap();
        wait_for_workers(&mut client, n).await;
        for ranks in [1, n as u32, 4] {
            let got = process_call(&mut client, request(&text, options(ranks, pb::Layout::Contiguous))).await.unwrap_or_else(|e| panic!("{ranks} ranks on {n} workers: {e:?}"));
            assert_eq!(got.kinds.first(), Some(&"accepted"));
            assert_eq!(got.kinds.last(), Some(&"done"));
            assert_same(&got, &reference, &format!("{ranks} ranks on {n} workers"));
        }
        // The same plan moves the same bytes between ranks wherever they run; framing is small.
        let mut traced = tonic::Request::new(request(&text, options(4, pb::Layout::Zigzag)));
        let trace_id = format!("4bf92f3577b34da6a3ce929d0e0e47{n:02}");
        traced.metadata_mut().insert("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01").parse().unwrap());
        let got = process_call(&mut client, traced).await.unwrap_or_else(|e| panic!("zigzag on {n} workers: {e:?}"));
        assert_same(&got, &reference_zigzag, &format!("zigzag on {n} workers"));
        let (done, want) = (got.done.unwrap(), reference_zigzag.done.unwrap());
        assert_eq!(done.bytes_exchanged, want.bytes_exchanged, "bytes between ranks on {n} workers");
        assert!(done.wire_bytes_exchanged >= done.bytes_exchanged);
        let framing = (done.wire_bytes_exchanged - done.bytes_exchanged) as f64 / done.bytes_exchanged as f64;
        assert!(framing < 0.02, "framing {framing} on {n} workers");
        // The caller's trace reached every worker that ran a rank, and their peer streams. A
        // worker logs a span as it closes, which may be just after the caller's last event.
        for w in &workers[..n] {
            let deadline = Instant::now() + Duration::from_secs(10);
            let traced = |what: &str| w.log_text().lines().any(|l| l.contains(&trace_id) && l.contains(what));
            while !(traced("shard done") && traced("peer stream closed")) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert!(traced("shard done"), "worker {}: no shard span of trace {trace_id}", w.host_port);
            assert!(traced("peer stream closed"), "worker {}: no peer stream span of trace {trace_id}", w.host_port);
        }
        if n == 4 {
            let metrics_addr = coordinator.metrics.as_deref().expect("the coordinator says where it serves metrics");
            let coordinator_metrics = http_get(metrics_addr, "/metrics");
            for name in ["tome_jobs_total", "tome_stage_seconds", "tome_tokens_total", "tome_jobs_in_flight", "tome_queue_depth"] {
                assert!(coordinator_metrics.contains(name), "coordinator metrics lack {name}");
            }
            // Durations are histograms with the documented buckets, which add up across replicas.
            assert!(coordinator_metrics.lines().any(|l| l.starts_with("tome_stage_seconds_bucket{") && l.contains(r#"le="0.005""#)), "{coordinator_metrics}");
            // Each of its 4 jobs ran alone, so each one's end left the coordinator idle and it
            // handed its freed heap back to the kernel (the last release may still be running).
            wait_for_metric(metrics_addr, "tome_heap_releases_total", 3.0).await;
        }
    }
    // Every server says what it serves, and only that.
    let names = reflection_services(&workers[0].addr).await;
    for want in ["tome.v1.Worker", "tome.v1.Peer", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == want), "{want} missing from the worker's {names:?}");
    }
    assert!(!names.iter().any(|n| n == "tome.v1.Tome"), "a worker does not serve tome.v1.Tome: {names:?}");
    let metrics = http_get(workers[0].metrics.as_deref().expect("the worker says where it serves metrics"), "/metrics");
    for name in ["tome_peer_bytes_sent_total", "tome_worker_shards_total", "tome_worker_shard_seconds", "tome_worker_shards_running"] {
        assert!(metrics.contains(name), "worker metrics lack {name}");
    }
    // The worker went idle after each job's last shard, and handed its freed heap back.
    wait_for_metric(workers[0].metrics.as_deref().unwrap_or_default(), "tome_heap_releases_total", 1.0).await;
}

/// The first ~30,000 tokens of a book: a job that runs for seconds.
fn long_text() -> Option<String> {
    let path = repo().join("data/books/plrabn12.txt");
    let text = std::fs::read_to_string(&path).ok()?;
    Some(text[..text.len().min(140_000)].to_string())
}

/// Starts a Process call and waits for its first progress event; the stream goes on.
async fn start_long_job(client: &mut TomeClient<Channel>, text: &str, ranks: u32) -> tonic::Streaming<pb::ProcessEvent> {
    let mut stream = client.process(request(text, options(ranks, pb::Layout::Contiguous))).await.unwrap().into_inner();
    loop {
        match stream.message().await.unwrap().and_then(|e| e.event) {
            Some(pb::process_event::Event::Progress(_)) => return stream,
            Some(_) => {}
            None => panic!("the job ended before its first layer"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_jobs_free_the_workers_and_requests_over_the_limits_are_refused_while_serving() {
    let Some(model) = minilm() else { return };
    let Some(long) = long_text() else { return };
    let w1 = start_worker(&model, &["--max-shards", "2"], logs("limits-w1")).await;
    // A worker that offers too little memory for a long document's ranks.
    let small = start_worker(&model, &["--memory-budget-bytes", "100000000"], logs("limits-small")).await;
    let w2 = start_worker(&model, &["--max-shards", "2"], logs("limits-w2")).await;
    let list = format!("{},{}", w1.host_port, w2.host_port);
    // No queue: what cannot run now is refused for now.
    let extra = ["--workers", &list, "--probe-ms", "200", "--max-concurrent-jobs", "1", "--max-queued-requests", "0", "--max-document-tokens", "40000"];
    let coordinator = start_coordinator(&model, &extra, logs("limits-c")).await;
    let mut client = TomeClient::connect(coordinator.addr.clone()).await.unwrap();
    wait_for_workers(&mut client, 2).await;

    // A caller that goes away mid-job: every rank stops and both workers are free again.
    let stream = start_long_job(&mut client, &long, 4).await;
    assert_eq!(shards_running(&w1).await + shards_running(&w2).await, 4);
    // While it runs, a second job is over the concurrent-jobs limit, with no queue to wait in.
    let busy = process_call(&mut client, request(TEXT, options(1, pb::Layout::Contiguous))).await.err().unwrap();
    assert_eq!(busy.code(), Code::ResourceExhausted, "{busy:?}");
    assert!(busy.metadata().get("retry-after").is_some(), "refused for now: {busy:?}");
    drop(stream);
    wait_idle(&[&w1, &w2]).await;
    assert!(w1.log_text().contains("cancelled") || w2.log_text().contains("cancelled"), "no worker logged the cancellation");

    // A deadline shorter than the job: DEADLINE_EXCEEDED, and the workers are freed.
    let mut hurried = tonic::Request::new(request(&long, options(4, pb::Layout::Contiguous)));
    hurried.set_timeout(Duration::from_millis(1500));
    let late = process_call(&mut client, hurried).await.err().unwrap();
    assert!(matches!(late.code(), Code::DeadlineExceeded | Code::Cancelled), "{late:?}");
    wait_idle(&[&w1, &w2]).await;

    // Over the limits: the right code, and the cluster keeps serving.
    let too_many_ranks = process_call(&mut client, request(TEXT, options(9, pb::Layout::Contiguous))).await.err().unwrap();
    assert_eq!(too_many_ranks.code(), Code::ResourceExhausted);
    let too_long = process_call(&mut client, request(&long.repeat(2), options(2, pb::Layout::Contiguous))).await.err().unwrap();
    assert_eq!(too_long.code(), Code::ResourceExhausted, "{too_long:?}");
    let too_many_shards = process_call(&mut client, request(TEXT, options(6, pb::Layout::Contiguous))).await.err().unwrap();
    assert_eq!(too_many_shards.code(), Code::ResourceExhausted, "{too_many_shards:?}");
    let bad = process_call(&mut client, request("", options(2, pb::Layout::Contiguous))).await.err().unwrap();
    assert_eq!(bad.code(), Code::InvalidArgument);
    let ok = process_call(&mut client, request(&TEXT.repeat(10), options(4, pb::Layout::Contiguous))).await.unwrap();
    assert_eq!(ok.kinds.last(), Some(&"done"));

    // A coordinator whose only worker has too small a memory budget refuses, naming the worker.
    let list = small.host_port.clone();
    let tight = start_coordinator(&model, &["--workers", &list, "--probe-ms", "200"], logs("limits-tight")).await;
    let mut tight_client = TomeClient::connect(tight.addr.clone()).await.unwrap();
    wait_for_workers(&mut tight_client, 1).await;
    let refused = process_call(&mut tight_client, request(&long, options(2, pb::Layout::Contiguous))).await.err().unwrap();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(refused.message().contains(&small.host_port), "{}", refused.message());
    let fits = process_call(&mut tight_client, request(TEXT, options(2, pb::Layout::Contiguous))).await.unwrap();
    assert_eq!(fits.kinds.last(), Some(&"done"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_outlive_workers_killed_at_any_point_and_give_the_fault_free_output() {
    let Some(model) = minilm() else { return };
    let Some(long) = long_text() else { return };
    // Workers restart at their own address, as a Kubernetes pod behind a stable name would.
    let ports: Vec<String> = (0..3).map(|_| format!("127.0.0.1:{}", free_port())).collect();
    let mut workers = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        workers.push(start_worker_at(&model, &[], logs(&format!("fault-w{i}")), port.clone()).await);
    }
    let list = ports.join(",");
    let coordinator = start_coordinator(&model, &["--workers", &list, "--probe-ms", "200", "--job-attempts", "3"], logs("fault-c")).await;
    let mut client = TomeClient::connect(coordinator.addr.clone()).await.unwrap();
    wait_for_workers(&mut client, 3).await;
    let started = Instant::now();
    let want = process_call(&mut client, request(&long, options(3, pb::Layout::Contiguous))).await.unwrap();
    let fault_free = started.elapsed();
    // Kill points spread over the job's run (a fixed sequence, so failures reproduce).
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for job in 0..10 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let at = fault_free.mul_f64(0.05 + 0.9 * (seed % 1000) as f64 / 1000.0);
        let victim = job % 3;
        let pid = workers[victim].child.id();
        let killer = tokio::spawn(async move {
            tokio::time::sleep(at).await;
            // SAFETY: kill(2) on a child of this test.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        });
        let got =
            process_call(&mut client, request(&long, options(3, pb::Layout::Contiguous))).await.unwrap_or_else(|e| panic!("job {job}, worker {victim} killed at {at:?}: {e:?}"));
        killer.await.unwrap();
        assert_eq!(got.document, want.document, "job {job}: the document embedding is the fault-free run's");
        assert_eq!(got.chunks, want.chunks, "job {job}: the chunk embeddings are the fault-free run's");
        let progress = got.kinds.iter().filter(|k| **k == "progress").count();
        assert!(progress <= 6, "job {job}: progress reported again after a rerun ({progress} events for 6 layers)");
        assert_eq!(got.kinds.last(), Some(&"done"));
        let _ = workers[victim].child.wait();
        workers[victim] = start_worker_at(&model, &[], logs(&format!("fault-w{victim}-{job}")), ports[victim].clone()).await;
        wait_for_workers(&mut client, 3).await;
    }
    let reruns = coordinator.log_text().matches("workers were lost mid-job").count();
    assert!(reruns >= 5, "only {reruns} of 10 kills landed mid-job");
}

/// Reads a job's stream to its end: Ok(()) on Done, the status otherwise.
async fn finish(mut stream: tonic::Streaming<pb::ProcessEvent>) -> Result<(), tonic::Status> {
    while let Some(ev) = stream.message().await? {
        if let Some(pb::process_event::Event::Done(_)) = ev.event {
            return Ok(());
        }
    }
    Err(tonic::Status::internal("the stream ended without Done"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_jobs_in_flight_finish_within_the_grace_period_and_cancels_them_after() {
    let Some(model) = minilm() else { return };
    let Some(long) = long_text() else { return };
    let w1 = start_worker(&model, &[], logs("drain-w1")).await;
    let w2 = start_worker(&model, &[], logs("drain-w2")).await;
    let list = format!("{},{}", w1.host_port, w2.host_port);
    for (grace, finishes) in [("60", true), ("1", false)] {
        let mut coordinator = start_coordinator(&model, &["--workers", &list, "--probe-ms", "200", "--grace-seconds", grace], logs(&format!("drain-c{grace}"))).await;
        let mut client = TomeClient::connect(coordinator.addr.clone()).await.unwrap();
        wait_for_workers(&mut client, 2).await;
        let stream = start_long_job(&mut client, &long, 2).await;
        coordinator.terminate();
        let ended = finish(stream).await;
        if finishes {
            assert!(ended.is_ok(), "grace {grace}: {ended:?}");
        } else {
            assert_eq!(ended.unwrap_err().code(), Code::Unavailable, "grace {grace}");
        }
        assert_eq!(coordinator.wait_exit(Duration::from_secs(30)), Some(0), "grace {grace}: exit");
        wait_idle(&[&w1, &w2]).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_causal_model_scores_every_token_across_workers_as_transformers_does() {
    let gpt2 = repo().join("crates/tome-model/tests/fixtures/gpt2-tiny");
    let ids: Vec<i64> = {
        let bytes = std::fs::read(gpt2.join("input_ids.npy")).unwrap();
        npyz::NpyFile::new(&bytes[..]).unwrap().into_vec().unwrap()
    };
    let golden = read_npy(&gpt2.join("logprobs.npy"));
    let w1 = start_worker(&gpt2, &[], logs("gpt2-w1")).await;
    let w2 = start_worker(&gpt2, &[], logs("gpt2-w2")).await;
    let list = format!("{},{}", w1.host_port, w2.host_port);
    let coordinator = start_coordinator(&gpt2, &["--workers", &list, "--probe-ms", "200"], logs("gpt2-c")).await;
    let mut client = TomeClient::connect(coordinator.addr.clone()).await.unwrap();
    wait_for_workers(&mut client, 2).await;
    for (ranks, layout) in [(1, pb::Layout::Contiguous), (4, pb::Layout::Zigzag), (3, pb::Layout::Contiguous)] {
        let options = pb::ProcessOptions { outputs: vec![pb::Output::LogProbs as i32], ranks, layout: layout as i32, ..Default::default() };
        let req = pb::ProcessRequest { model: String::new(), input: Some(pb::process_request::Input::TokenIds(pb::TokenIds { ids: ids.clone() })), options: Some(options) };
        let got = process_call(&mut client, req).await.unwrap_or_else(|e| panic!("{ranks} ranks: {e:?}"));
        assert!(max_diff(&got.log_probs, &golden) <= 1e-4, "{ranks} ranks {layout:?}");
        let want = (-golden.iter().map(|&x| x as f64).sum::<f64>() / golden.len() as f64).exp();
        let ppl = got.done.unwrap().perplexity.unwrap();
        assert!((ppl - want).abs() < 1e-3 * want, "perplexity {ppl} vs {want}");
    }
    // Info says which models score tokens.
    let info = client.info(pb::InfoRequest {}).await.unwrap().into_inner();
    assert!(info.models[0].causal);
}

/// Reformer (LSH over peer streams, padding on the last rank), Switch (expert capacity across
/// ranks) and Transformer-XL (segment memories passed worker to worker; the segment length and
/// a chosen layer travel with the shard) across workers equal transformers' goldens.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_architecture_runs_across_workers_as_transformers_does() {
    let fixtures = repo().join("crates/tome-model/tests/fixtures");
    let ids = |name: &str| -> Vec<i64> {
        let bytes = std::fs::read(fixtures.join(name).join("input_ids.npy")).unwrap();
        npyz::NpyFile::new(&bytes[..]).unwrap().into_vec().unwrap()
    };
    let models: Vec<String> = ["transfo-xl-tiny", "reformer-tiny", "switch-tiny", "bert-tiny"].iter().map(|m| fixtures.join(m).display().to_string()).collect();
    let models = PathBuf::from(models.join(","));
    let w1 = start_worker(&models, &[], logs("arch-w1")).await;
    let w2 = start_worker(&models, &[], logs("arch-w2")).await;
    let list = format!("{},{}", w1.host_port, w2.host_port);
    let coordinator = start_coordinator(&models, &["--workers", &list, "--probe-ms", "200"], logs("arch-c")).await;
    let mut client = TomeClient::connect(coordinator.addr.clone()).await.unwrap();
    wait_for_workers(&mut client, 2).await;
    let hidden = |model: &str, ranks: u32, tokens: Vec<i64>, segment_len: u32, hidden_layer: Option<u32>| pb::ProcessRequest {
        model: model.into(),
        input: Some(pb::process_request::Input::TokenIds(pb::TokenIds { ids: tokens })),
        options: Some(pb::ProcessOptions { outputs: vec![pb::Output::HiddenStates as i32], ranks, segment_len, hidden_layer, ..Default::default() }),
    };
    let cases = [
        ("transfo-xl-tiny", 3, ids("transfo-xl-tiny"), 8, None, "last_hidden_state.npy", None),
        ("transfo-xl-tiny", 2, ids("transfo-xl-tiny"), 16, None, "last_hidden_state_seg16.npy", None),
        ("reformer-tiny", 3, ids("reformer-tiny")[..60].to_vec(), 0, None, "last_hidden_state_first60.npy", None),
        ("switch-tiny", 4, ids("switch-tiny"), 0, None, "last_hidden_state.npy", None),
        ("bert-tiny", 2, ids("bert-tiny"), 0, Some(1), "hidden_states.npy", Some(1)),
    ];
    for (model, ranks, tokens, segment_len, layer, golden, golden_row) in cases {
        let got = process_call(&mut client, hidden(model, ranks, tokens, segment_len, layer)).await.unwrap_or_else(|e| panic!("{model}: {e:?}"));
        let mut want = read_npy(&fixtures.join(model).join(golden));
        if let Some(row) = golden_row {
            let per = want.len() / 3;
            want = want[row * per..(row + 1) * per].to_vec();
        }
        assert!(max_diff(&got.hidden, &want) <= 1e-4, "{model} on {ranks} ranks ({golden})");
    }
    // Architecture-defined attention keeps tokens in order: zigzag is refused with the reason.
    let mut zigzag = hidden("switch-tiny", 2, ids("switch-tiny"), 0, None);
    zigzag.options.as_mut().unwrap().layout = pb::Layout::Zigzag as i32;
    let Err(err) = process_call(&mut client, zigzag).await else { panic!("zigzag was accepted") };
    assert!(err.message().contains("contiguous"), "{err:?}");
    // Log-probs need the last layer; a segment length needs a segment-recurrent model.
    let Err(err) = process_call(&mut client, hidden("bert-tiny", 1, ids("bert-tiny"), 8, None)).await else { panic!("a segment length for BERT was accepted") };
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    // The coordinator chose the transport from where the ranks ran: workers without GPUs talk
    // over peer streams.
    assert!(coordinator.log_text().lines().any(|l| l.contains("cluster job done") && l.contains("transport=\"peer-streams\"")), "{}", coordinator.log_text());
    // A worker runs a rank on the transport its plan names, and refuses NCCL, saying why, when
    // it has no GPU for it; a transport it does not know is the request's fault.
    let mut worker = WorkerClient::connect(w1.addr.clone()).await.unwrap();
    assert_eq!(worker.info(pb::WorkerInfoRequest {}).await.unwrap().into_inner().nccl_gpus, 0);
    let shard = |transport: i32| {
        let ids: Vec<u8> = (0..8u32).flat_map(|i| (i + 5).to_le_bytes()).collect();
        let positions: Vec<u8> = (0..8u32).flat_map(|i| i.to_le_bytes()).collect();
        let u32s = |data: Vec<u8>| Some(pb::Tensor { shape: vec![8], dtype: pb::ElementType::U32 as i32, data });
        let ranges = |start, end| pb::RankRanges { ranges: vec![pb::Span { start, end }] };
        let plan = pb::JobPlan {
            job_id: format!("transport-{transport}"),
            tokens: 16,
            shards: vec![ranges(0, 8), ranges(8, 16)],
            rank_addresses: vec![w1.host_port.clone(), w2.host_port.clone()],
            transport,
            secret: vec![7; 32],
            ..Default::default()
        };
        let layers = vec![pb::AttentionOverride { kind: pb::AttentionKind::Dense as i32, ..Default::default() }; 2];
        pb::ShardRequest { plan: Some(plan), model: "bert-tiny".into(), token_ids: u32s(ids), position_ids: u32s(positions), layers, ..Default::default() }
    };
    let Err(err) = worker.run_shard(shard(pb::Transport::Nccl as i32)).await else { panic!("an NCCL rank ran on a worker without GPUs") };
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("talk over NCCL") && err.message().contains("has no GPU for it"), "{err:?}");
    let Err(err) = worker.run_shard(shard(9)).await else { panic!("an unknown transport was accepted") };
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("unknown transport 9"), "{err:?}");
}
