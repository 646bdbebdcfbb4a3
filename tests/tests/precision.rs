//! The compute precision as a request option, end to end: `ProcessOptions.precision` (gRPC),
//! `dtype` (HTTP), `--dtype` (CLI) and `ShardRequest.precision` (a worker). bf16 runs differ
//! from f32 within the model's stated bound (crates/tome-model/tests/bf16.rs holds every model
//! to its own; a precision an architecture lacks is refused there by name), an unknown value is
//! refused naming the field, f16 (a GPU precision) is refused by CPU ranks by name, the server
//! keeps serving, and Info lists each model's precisions on CPUs and GPUs and the CPU's bf16
//! kernel.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use tome_e2e::*;
use tome_proto::v1 as pb;
use tome_proto::v1::tome_client::TomeClient;
use tome_proto::v1::worker_client::WorkerClient;
use tonic::Code;

/// The bf16 kernels a server may report.
const KERNELS: [&str; 3] = ["avx512_bf16", "avx512_fma", "portable"];

/// GPT-2 fixture's bound on |bf16 − f32| over its hidden states (crates/tome-model/tests/bf16.rs).
const GPT2_BF16_BOUND: f32 = 4e-2;

/// bf16 hidden states against f32 ones: different bits, within GPT-2's bound.
fn assert_bf16_of(bf16: &[f32], f32: &[f32]) {
    assert_eq!(bf16.len(), f32.len());
    assert!(bf16.iter().zip(f32).any(|(a, b)| a.to_bits() != b.to_bits()), "bf16 gave the f32 bits");
    let d = max_diff(bf16, f32);
    assert!(d <= GPT2_BF16_BOUND, "bf16 is {d} from f32");
}

fn fixture(name: &str) -> PathBuf {
    repo().join("crates/tome-model/tests/fixtures").join(name)
}

fn logs(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tome-precision-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{name}.log"))
}

/// GPT-2's fixture ids as a request for its hidden states, in `precision`.
fn gpt2_request(precision: i32) -> pb::ProcessRequest {
    let ids: Vec<i64> = read_npy_i64(&fixture("gpt2-tiny").join("input_ids.npy"));
    let options = pb::ProcessOptions { outputs: vec![pb::Output::HiddenStates as i32], precision, ..Default::default() };
    pb::ProcessRequest { model: "gpt2-tiny".into(), input: Some(pb::process_request::Input::TokenIds(pb::TokenIds { ids })), options: Some(options) }
}

fn read_npy_i64(path: &std::path::Path) -> Vec<i64> {
    let bytes = std::fs::read(path).unwrap();
    npyz::NpyFile::new(&bytes[..]).unwrap().into_vec().unwrap()
}

/// A POST of JSON by hand: the status code and the body.
fn post(host_port: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(host_port).unwrap();
    write!(s, "POST {path} HTTP/1.1\r\nHost: {host_port}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let code = raw.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (code, serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}")))
}

fn assert_refused(err: &tonic::Status, code: Code, needles: &[&str]) {
    assert_eq!(err.code(), code, "{}", err.message());
    for n in needles {
        assert!(err.message().contains(n), "{:?} should mention {n:?}", err.message());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bf16_runs_on_every_route_unknown_precisions_are_refused_and_info_lists_them() {
    let bert = fixture("bert-tiny");
    let server = start_server(&fixture("gpt2-tiny"), &["--model", bert.to_str().unwrap()]).await;
    let mut client = TomeClient::connect(server.addr.clone()).await.unwrap();

    // Info: what each model runs in and this CPU's bf16 kernel.
    let info = client.info(pb::InfoRequest {}).await.unwrap().into_inner();
    assert!(KERNELS.contains(&info.bf16_kernel.as_str()), "bf16_kernel {:?}", info.bf16_kernel);
    assert_eq!(info.models.len(), 2);
    for m in &info.models {
        assert_eq!(m.precisions, ["f32", "bf16"], "{}", m.name);
        assert_eq!(m.gpu_precisions, ["f32", "bf16", "f16"], "{}", m.name);
    }

    // gRPC: bf16 runs; an unknown value names the field.
    let bf16 = process_call(&mut client, gpt2_request(pb::Precision::Bf16 as i32)).await.unwrap();
    assert_eq!(bf16.kinds.last(), Some(&"done"));
    let err = process_call(&mut client, gpt2_request(7)).await.err().expect("precision 7 was accepted");
    assert_refused(&err, Code::InvalidArgument, &["options.precision", "7"]);
    // f16 is a GPU precision: this server's ranks are CPUs.
    let err = process_call(&mut client, gpt2_request(pb::Precision::F16 as i32)).await.err().expect("f16 ran on CPU ranks");
    assert_refused(&err, Code::InvalidArgument, &["f16 on GPU ranks only", "--device cuda"]);
    // The server keeps serving; f32 asked for is the unspecified default, bit for bit.
    let unspecified = process_call(&mut client, gpt2_request(pb::Precision::Unspecified as i32)).await.unwrap();
    let f32 = process_call(&mut client, gpt2_request(pb::Precision::F32 as i32)).await.unwrap();
    assert_eq!(unspecified.kinds.last(), Some(&"done"));
    assert!(!f32.hidden.is_empty() && f32.hidden.iter().zip(&unspecified.hidden).all(|(a, b)| a.to_bits() == b.to_bits()));
    assert_bf16_of(&bf16.hidden, &f32.hidden);

    // HTTP: `dtype` on both routes; a bad name is a 400 naming the field (bf16 embeddings over
    // HTTP: the MiniLM test below).
    let at = server.host_port.as_str();
    for (path, body, says) in [
        ("/v1/embed", r#"{"text": "x", "model": "gpt2-tiny", "options": {"dtype": "f64"}}"#, "options.dtype"),
        ("/v1/embeddings", r#"{"input": "x", "model": "gpt2-tiny", "dtype": "f64"}"#, "dtype"),
    ] {
        let (code, answer) = post(at, path, body);
        assert_eq!(code, 400, "{body}: {answer}");
        assert_eq!(answer["error"]["type"], "invalid_request_error", "{body}: {answer}");
        assert!(answer["error"]["message"].as_str().unwrap().contains(says), "{body}: {answer}");
    }
    let answer = http_get(at, "/info");
    let info: serde_json::Value = answer.split_once("\r\n\r\n").and_then(|(_, body)| serde_json::from_str(body).ok()).unwrap_or_else(|| panic!("{answer}"));
    assert!(KERNELS.contains(&info["bf16_kernel"].as_str().unwrap()), "{info}");
    assert!(info["models"].as_array().unwrap().iter().all(|m| m["precisions"] == serde_json::json!(["f32", "bf16"])), "{info}");
    assert!(info["models"].as_array().unwrap().iter().all(|m| m["gpu_precisions"] == serde_json::json!(["f32", "bf16", "f16"])), "{info}");

    // The CLI: `--dtype` against this server, clap's refusal of an unknown one, and `tome info`.
    let out = std::env::temp_dir().join(format!("tome-precision-cli-{}", std::process::id()));
    let run = |dtype: &str| {
        Command::new(tome_bin())
            .args(["process", "--coordinator", &server.addr, "--model-name", "gpt2-tiny", "--emit", "hidden-states", "--quiet", "--dtype", dtype, "--ids"])
            .arg(fixture("gpt2-tiny").join("input_ids.npy"))
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap()
    };
    let ran = run("bf16");
    assert!(ran.status.success(), "{}", String::from_utf8_lossy(&ran.stderr));
    assert_bf16_of(&read_npy(&out.join("last_hidden_state.npy")), &f32.hidden);
    let unknown = run("f64");
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    assert!(!unknown.status.success() && stderr.contains("unknown dtype `f64`; one of f32, bf16, f16"), "{stderr}");
    let ok = run("f32");
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(max_diff(&read_npy(&out.join("last_hidden_state.npy")), &f32.hidden) <= 1e-6, "--dtype f32 is the f32 path");
    let info = Command::new(tome_bin()).args(["info", "--coordinator", &server.addr]).output().unwrap();
    let printed: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&info.stdout)));
    assert!(KERNELS.contains(&printed["bf16_kernel"].as_str().unwrap()), "{printed}");
    assert_eq!(printed["models"][0]["precisions"], serde_json::json!(["f32", "bf16"]), "{printed}");
    std::fs::remove_dir_all(&out).ok();

    assert!(client.info(pb::InfoRequest {}).await.is_ok(), "the server keeps serving");
    assert!(!server.log_text().contains("panicked"), "{}", server.log_text());
}

/// A one-rank RunShard of GPT-2's fixture ids on the worker at `addr`, in `precision`.
fn gpt2_shard(addr: &str, job: &str, layers: usize, precision: i32) -> pb::ShardRequest {
    let ids: Vec<u32> = read_npy_i64(&fixture("gpt2-tiny").join("input_ids.npy")).into_iter().map(|i| i as u32).collect();
    let n = ids.len() as u64;
    let u32s = |v: &[u32]| pb::Tensor { shape: vec![v.len() as u64], dtype: pb::ElementType::U32 as i32, data: v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let dense = pb::AttentionOverride { kind: pb::AttentionKind::Dense as i32, ..Default::default() };
    pb::ShardRequest {
        plan: Some(pb::JobPlan {
            job_id: job.into(),
            tokens: n,
            shards: vec![pb::RankRanges { ranges: vec![pb::Span { start: 0, end: n }] }],
            rank_addresses: vec![addr.into()],
            transport: pb::Transport::PeerStreams as i32,
            secret: vec![7; 32],
            ..Default::default()
        }),
        model: "gpt2-tiny".into(),
        token_ids: Some(u32s(&ids)),
        position_ids: Some(u32s(&(0..n as u32).collect::<Vec<_>>())),
        layers: vec![dense; layers],
        hidden_states: true,
        rows_per_message: 64,
        precision,
        ..Default::default()
    }
}

async fn run_shard(worker: &mut WorkerClient<tonic::transport::Channel>, req: pb::ShardRequest) -> Result<(), tonic::Status> {
    let mut stream = worker.run_shard(req).await?.into_inner();
    while stream.message().await?.is_some() {}
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_runs_the_precision_its_shards_ask_for_and_a_cluster_carries_it() {
    let model = fixture("gpt2-tiny");
    let w = start_worker(&model, &[], logs("worker")).await;
    let mut worker = WorkerClient::connect(w.addr.clone()).await.unwrap();
    let info = worker.info(pb::WorkerInfoRequest {}).await.unwrap().into_inner();
    assert!(KERNELS.contains(&info.bf16_kernel.as_str()), "bf16_kernel {:?}", info.bf16_kernel);
    assert_eq!(info.models[0].precisions, ["f32", "bf16"]);
    let layers = info.models[0].layer_attention.len();

    // RunShard: an unknown value is refused naming the field before the rank starts (no peers
    // are needed to refuse); bf16 and f32 run.
    run_shard(&mut worker, gpt2_shard(&w.host_port, "p-bf16", layers, pb::Precision::Bf16 as i32)).await.unwrap();
    let err = run_shard(&mut worker, gpt2_shard(&w.host_port, "p-unknown", layers, 7)).await.unwrap_err();
    assert_refused(&err, Code::InvalidArgument, &["precision", "7"]);
    let err = run_shard(&mut worker, gpt2_shard(&w.host_port, "p-f16", layers, pb::Precision::F16 as i32)).await.unwrap_err();
    assert_refused(&err, Code::InvalidArgument, &["f16 on GPU ranks only"]);
    run_shard(&mut worker, gpt2_shard(&w.host_port, "p-f32", layers, pb::Precision::F32 as i32)).await.unwrap();

    // A coordinator over that worker: bf16 travels in the worker's plan.
    let c = start_coordinator(&model, &["--workers", &w.host_port, "--probe-ms", "200"], logs("coordinator")).await;
    let mut client = TomeClient::connect(c.addr.clone()).await.unwrap();
    let until = Instant::now() + Duration::from_secs(30);
    while client.info(pb::InfoRequest {}).await.unwrap().into_inner().workers.is_empty() {
        assert!(Instant::now() < until, "the worker never went live");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let bf16 = process_call(&mut client, gpt2_request(pb::Precision::Bf16 as i32)).await.unwrap();
    let f32 = process_call(&mut client, gpt2_request(pb::Precision::F32 as i32)).await.unwrap();
    assert_eq!(f32.kinds.last(), Some(&"done"));
    assert_bf16_of(&bf16.hidden, &f32.hidden);
    assert!(!w.log_text().contains("panicked") && !c.log_text().contains("panicked"));
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bf16_embeddings_of_a_bert_model_are_within_cosine_0_999_of_f32_on_any_ranks() {
    let Some(model) = minilm() else { return };
    let server = start_server(&model, &[]).await;
    let mut client = TomeClient::connect(server.addr.clone()).await.unwrap();
    let info = client.info(pb::InfoRequest {}).await.unwrap().into_inner();
    assert!(info.models[0].precisions.iter().any(|p| p == "bf16"), "{:?}", info.models[0].precisions);
    let text = TEXT.repeat(3);
    let request = |precision: pb::Precision, ranks: u32| {
        let options =
            pb::ProcessOptions { precision: precision as i32, ranks, chunks: Some(pb::ChunkSpec { spec: Some(pb::chunk_spec::Spec::TokensPerChunk(32)) }), ..Default::default() };
        text_request(text.as_bytes(), options)
    };
    let exact = process_call(&mut client, request(pb::Precision::F32, 1)).await.unwrap();
    for ranks in [1, 2, 3] {
        let bf16 = process_call(&mut client, request(pb::Precision::Bf16, ranks)).await.unwrap();
        assert_eq!(bf16.chunks.len(), exact.chunks.len());
        let c = cosine(&bf16.document, &exact.document);
        assert!(c >= 0.999, "{ranks} ranks: document cosine {c}");
        for (i, (a, b)) in bf16.chunks.iter().zip(&exact.chunks).enumerate() {
            let c = cosine(a, b);
            assert!(c >= 0.999, "{ranks} ranks: chunk {i} cosine {c}");
        }
        assert!(bf16.document.iter().zip(&exact.document).any(|(a, b)| a.to_bits() != b.to_bits()), "bf16 is a different computation, not the f32 one");
    }
    // The OpenAI route's `dtype`.
    let embedding = |dtype: &str| -> Vec<f32> {
        let body = serde_json::json!({ "input": text, "model": info.models[0].name, "dtype": dtype }).to_string();
        let (code, answer) = post(&server.host_port, "/v1/embeddings", &body);
        assert_eq!(code, 200, "{answer}");
        answer["data"][0]["embedding"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect()
    };
    let (bf16, exact) = (embedding("bf16"), embedding("f32"));
    assert!(cosine(&bf16, &exact) >= 0.999 && bf16 != exact, "HTTP bf16: cosine {}", cosine(&bf16, &exact));
}
