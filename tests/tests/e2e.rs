//! The `tome` binary end to end: `tome run` as a real server process on a 127.0.0.1 port, a real
//! gRPC client, health, bad input with the right status codes (and the server still serving),
//! and `tome process` (embedded and against the server) giving the same outputs on any number of
//! ranks, including the token-id conformance path.

use std::path::{Path, PathBuf};
use std::process::Command;

use tome_e2e::*;
use tome_model::ModelType;
use tome_proto::v1 as pb;
use tome_proto::v1::tome_client::TomeClient;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_processes_documents_identically_on_any_number_of_ranks_and_refuses_bad_input() {
    let Some(model) = minilm() else { return };
    let server = start_server(&model, &["--max-document-tokens", "20000"]).await;
    let mut client = TomeClient::connect(server.addr.clone()).await.unwrap();

    let info = client.info(pb::InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.models[0].name, "all-MiniLM-L6-v2");
    assert_eq!(info.models[0].max_positions, 512);

    // A document of ~1,600 tokens: past the learned positions, so window attention + tiling.
    let text = TEXT.repeat(30);
    let options = |ranks: u32| pb::ProcessOptions {
        attention: Some(pb::AttentionOverride { kind: pb::AttentionKind::Window as i32, window: 128, ..Default::default() }),
        position_extension: pb::PositionExtension::Tile as i32,
        chunks: Some(pb::ChunkSpec { spec: Some(pb::chunk_spec::Spec::TokensPerChunk(300)) }),
        normalize: Some(true),
        ranks,
        ..Default::default()
    };
    let (doc1, chunks1, kinds) = process(&mut client, text_request(text.as_bytes(), options(1))).await.unwrap();
    assert_eq!(kinds.first(), Some(&"accepted"));
    assert_eq!(kinds.last(), Some(&"done"));
    assert_eq!(kinds.iter().filter(|k| **k == "progress").count(), 6, "one progress event per layer");
    assert_eq!(doc1.len(), 384);
    assert!(chunks1.len() >= 5);
    for ranks in [2, 4] {
        let (doc, chunks, _) = process(&mut client, text_request(text.as_bytes(), options(ranks))).await.unwrap();
        assert!(max_diff(&doc, &doc1) <= 1e-5, "{ranks} ranks");
        for (a, b) in chunks.iter().zip(&chunks1) {
            assert!(max_diff(a, b) <= 1e-5, "{ranks} ranks, chunk");
        }
    }

    // The upload form: the request first, then the text in pieces (one split inside a UTF-8
    // character) gives the same outputs; an upload must start with its request and stay within
    // the byte limit.
    let bytes = format!("{text}€").into_bytes();
    let euro = bytes.len() - 2;
    let opening = pb::ProcessRequest { input: None, ..text_request(b"", options(2)) };
    let parts = vec![
        pb::UploadChunk { part: Some(pb::upload_chunk::Part::Request(opening.clone())) },
        pb::UploadChunk { part: Some(pb::upload_chunk::Part::Text(bytes[..100].to_vec())) },
        pb::UploadChunk { part: Some(pb::upload_chunk::Part::Text(bytes[100..euro].to_vec())) },
        pb::UploadChunk { part: Some(pb::upload_chunk::Part::Text(bytes[euro..].to_vec())) },
    ];
    let mut stream = client.process_upload(tokio_stream::iter(parts)).await.unwrap().into_inner();
    let (mut uploaded, mut whole) = (None, None);
    while let Some(ev) = stream.message().await.unwrap() {
        if let Some(pb::process_event::Event::Document(d)) = ev.event {
            uploaded = d.embedding;
        }
    }
    let mut direct = client.process(text_request(&bytes, options(2))).await.unwrap().into_inner();
    while let Some(ev) = direct.message().await.unwrap() {
        if let Some(pb::process_event::Event::Document(d)) = ev.event {
            whole = d.embedding;
        }
    }
    assert_eq!(uploaded.unwrap().data, whole.unwrap().data, "an upload equals the same text in one message");
    let headless = vec![pb::UploadChunk { part: Some(pb::upload_chunk::Part::Text(b"text first".to_vec())) }];
    let err = client.process_upload(tokio_stream::iter(headless)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let huge = vec![
        pb::UploadChunk { part: Some(pb::upload_chunk::Part::Request(opening)) },
        pb::UploadChunk { part: Some(pb::upload_chunk::Part::Text(vec![b'a'; 40 << 20])) },
        pb::UploadChunk { part: Some(pb::upload_chunk::Part::Text(vec![b'a'; 30 << 20])) },
    ];
    let err = client.process_upload(tokio_stream::iter(huge)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");

    // The CLI against this server writes the same document embedding.
    let out = std::env::temp_dir().join(format!("tome-e2e-{}", std::process::id()));
    let file = out.join("doc.txt");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(&file, &text).unwrap();
    let status = Command::new(tome_bin())
        .args(["process", "--coordinator", &server.addr, "--attention", "window:128", "--positions", "tile", "--normalize", "--ranks", "3", "--quiet", "--out"])
        .arg(out.join("remote"))
        .arg(&file)
        .status()
        .unwrap();
    assert!(status.success());
    assert!(max_diff(&read_npy(&out.join("remote/document_embedding.npy")), &doc1) <= 1e-5);

    // Bad input: the right code, a message that says what to fix, and the server keeps serving.
    let bad: Vec<(pb::ProcessRequest, Code, &str)> = vec![
        (text_request(b"\xff\xfe not utf-8", Default::default()), Code::InvalidArgument, "UTF-8"),
        (text_request(b"   ", Default::default()), Code::InvalidArgument, "empty"),
        (text_request(text.as_bytes(), Default::default()), Code::InvalidArgument, "learned 512 positions"),
        (text_request(b"short", pb::ProcessOptions { pooling: 42, ..Default::default() }), Code::InvalidArgument, "unknown value 42"),
        (
            text_request(
                b"short",
                pb::ProcessOptions {
                    chunks: Some(pb::ChunkSpec { spec: Some(pb::chunk_spec::Spec::Spans(pb::TokenSpans { spans: vec![pb::Span { start: 1, end: 99 }] })) }),
                    ..Default::default()
                },
            ),
            Code::InvalidArgument,
            "outside the document",
        ),
        (text_request(b"short", pb::ProcessOptions { ranks: 9, ..Default::default() }), Code::ResourceExhausted, "at most 8"),
        (text_request(TEXT.repeat(400).as_bytes(), Default::default()), Code::ResourceExhausted, "at most 20000"),
        (pb::ProcessRequest { model: "nope".into(), ..text_request(b"short", Default::default()) }, Code::NotFound, "nope"),
        (pb::ProcessRequest { input: None, ..text_request(b"", Default::default()) }, Code::InvalidArgument, "no input"),
    ];
    for (req, code, needle) in bad {
        let err = process(&mut client, req).await.unwrap_err();
        assert_eq!(err.code(), code, "{}", err.message());
        assert!(err.message().contains(needle), "{:?} should mention {needle:?}", err.message());
    }
    assert!(client.info(pb::InfoRequest {}).await.is_ok(), "the server keeps serving");
    // A text far over the token limit is refused once counting passes the limit, without being
    // tokenized whole: the count it reports is a small part of its ~2.9 million tokens.
    let huge = TEXT.repeat(52_000);
    let err = process(&mut client, text_request(huge.as_bytes(), Default::default())).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    let counted: usize = err.message().split_whitespace().nth(5).and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{}", err.message()));
    assert!(counted > 20_000 && counted < 1_000_000, "{}", err.message());
    assert_reflection_lists_services(&server.addr).await;
    let tok = client.tokenize(pb::TokenizeRequest { model: String::new(), text: b"Hello world".to_vec() }).await.unwrap().into_inner();
    assert_eq!(tok.ids.first(), Some(&101));
    assert_eq!(tok.offsets[1].start, 0);
    std::fs::remove_dir_all(&out).ok();
}

#[test]
fn token_id_conformance_path_writes_hidden_states_and_log_probs_on_any_number_of_ranks() {
    let fixture = repo().join("crates/tome-model/tests/fixtures/bert-tiny");
    let golden = read_npy(&fixture.join("last_hidden_state.npy"));
    for ranks in ["1", "3"] {
        let out = std::env::temp_dir().join(format!("tome-e2e-ids-{}-{ranks}", std::process::id()));
        let status = Command::new(tome_bin())
            .args(["process", "--emit", "hidden-states", "--quiet", "--ranks", ranks, "--ids"])
            .arg(fixture.join("input_ids.npy"))
            .arg("--model")
            .arg(&fixture)
            .arg("--out")
            .arg(&out)
            .status()
            .unwrap();
        assert!(status.success());
        let got = read_npy(&out.join("last_hidden_state.npy"));
        assert!(max_diff(&got, &golden) <= 1e-4, "{ranks} ranks");
        std::fs::remove_dir_all(&out).ok();
    }
    // Causal language models (GPT-2, Llama): hidden states and per-token log-probs, on any
    // number of ranks and either layout, equal to transformers'.
    for (model, ranks, layout) in [("gpt2-tiny", "1", "contiguous"), ("gpt2-tiny", "3", "zigzag"), ("llama-tiny", "4", "contiguous"), ("llama-tiny", "2", "zigzag")] {
        let gpt2 = repo().join("crates/tome-model/tests/fixtures").join(model);
        let (golden, golden_lp) = (read_npy(&gpt2.join("last_hidden_state.npy")), read_npy(&gpt2.join("logprobs.npy")));
        let out = std::env::temp_dir().join(format!("tome-e2e-{model}-{}-{ranks}", std::process::id()));
        let run = Command::new(tome_bin())
            .args(["process", "--emit", "hidden-states,logprobs", "--quiet", "--ranks", ranks, "--layout", layout, "--ids"])
            .arg(gpt2.join("input_ids.npy"))
            .arg("--model")
            .arg(&gpt2)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
        assert!(max_diff(&read_npy(&out.join("last_hidden_state.npy")), &golden) <= 1e-4, "{model} {ranks} ranks {layout}");
        assert!(max_diff(&read_npy(&out.join("logprobs.npy")), &golden_lp) <= 1e-4, "{model} {ranks} ranks {layout}: log-probs");
        let summary: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
        let want = (-golden_lp.iter().map(|&x| x as f64).sum::<f64>() / golden_lp.len() as f64).exp();
        assert!((summary["perplexity"].as_f64().unwrap() - want).abs() < 1e-3 * want, "{summary}");
        std::fs::remove_dir_all(&out).ok();
    }
    // An encoder does not score tokens: a clear error.
    let run =
        Command::new(tome_bin()).args(["process", "--emit", "logprobs", "--quiet", "--ids"]).arg(fixture.join("input_ids.npy")).arg("--model").arg(&fixture).output().unwrap();
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("causal"), "{}", String::from_utf8_lossy(&run.stderr));

    // A missing model directory is a clear error, not a crash.
    let out = Command::new(tome_bin()).args(["process", "--model", "/nonexistent/model", "--quiet", "--ids"]).arg(fixture.join("input_ids.npy")).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// `tome process --ids` for every `model_type` the registry lists, as a user checks their own
/// checkpoint: each loads through the binary and gives transformers' hidden states on several
/// ranks (a type without a fixture fails here, so the registry, README and fixtures agree);
/// and `--hidden-layer`, which writes that layer's hidden states.
#[test]
fn token_id_conformance_path_serves_every_registered_model_type_and_a_chosen_layer() {
    let fixtures = repo().join("crates/tome-model/tests/fixtures");
    let run = |dir: &Path, extra: &[&str], file: &str| -> Vec<f32> {
        let out = std::env::temp_dir().join(format!("tome-e2e-arch-{}-{}", dir.file_name().unwrap().to_string_lossy(), std::process::id()));
        let run = Command::new(tome_bin())
            .args(["process", "--emit", "hidden-states", "--quiet", "--ids"])
            .arg(dir.join("input_ids.npy"))
            .arg("--model")
            .arg(dir)
            .args(extra)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        assert!(run.status.success(), "{}: {}", dir.display(), String::from_utf8_lossy(&run.stderr));
        let got = read_npy(&out.join(file));
        std::fs::remove_dir_all(&out).ok();
        got
    };
    let model_type = |dir: &Path| -> String {
        let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        cfg["model_type"].as_str().unwrap().to_string()
    };
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let mut fixture_dirs: Vec<PathBuf> = std::fs::read_dir(&fixtures).unwrap().map(|e| e.unwrap().path()).filter(|p| p.join("config.json").is_file()).collect();
    fixture_dirs.sort();
    for &t in ModelType::ALL {
        assert!(readme.contains(&format!("`{}`", t.name())), "README.md does not list model_type `{}`", t.name());
        // transformers' CamembertModel is RobertaModel's code under another name: RoBERTa's
        // fixture, renamed, must give RoBERTa's golden. (XLM-RoBERTa has its own fixture, of
        // bge-m3's long-position shape.)
        let renamed = matches!(t, ModelType::Camembert).then(|| {
            let dir = std::env::temp_dir().join(format!("tome-e2e-{}-{}", t.name(), std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            for f in ["model.safetensors", "input_ids.npy", "last_hidden_state.npy"] {
                std::fs::copy(fixtures.join("roberta-tiny").join(f), dir.join(f)).unwrap();
            }
            let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixtures.join("roberta-tiny/config.json")).unwrap()).unwrap();
            cfg["model_type"] = t.name().into();
            std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
            dir
        });
        let dirs: Vec<PathBuf> = match &renamed {
            Some(dir) => vec![dir.clone()],
            None => fixture_dirs.iter().filter(|d| model_type(d) == t.name()).cloned().collect(),
        };
        assert!(!dirs.is_empty(), "no fixture of model_type `{}` under {}", t.name(), fixtures.display());
        for dir in dirs {
            let extra: &[&str] = match dir.file_name().unwrap().to_str().unwrap() {
                "longformer-tiny" => &["--ranks", "3", "--global-tokens", "0,17,33"],
                "transfo-xl-tiny" => &["--ranks", "3", "--segment-len", "8"],
                "compressive-tiny" => &["--ranks", "2", "--segment-len", "8"],
                "gpt-neo-tiny" | "llama-tiny" | "gpt2-tiny" | "mpnet-tiny" | "modernbert-tiny" => &["--ranks", "3", "--layout", "zigzag"],
                _ => &["--ranks", "2"],
            };
            let golden = read_npy(&dir.join("last_hidden_state.npy"));
            let got = run(&dir, extra, "last_hidden_state.npy");
            assert!(max_diff(&got, &golden) <= 1e-4, "{} ({}): {}", dir.display(), t.name(), max_diff(&got, &golden));
        }
        if let Some(dir) = renamed {
            std::fs::remove_dir_all(dir).ok();
        }
    }
    // GPT-2's second layer, before the final norm only the last layer gets.
    let all = read_npy(&fixtures.join("gpt2-tiny/hidden_states.npy"));
    let per = all.len() / 4;
    let got = run(&fixtures.join("gpt2-tiny"), &["--ranks", "2", "--hidden-layer", "2"], "hidden_states_layer2.npy");
    assert!(max_diff(&got, &all[2 * per..3 * per]) <= 1e-4);
}

/// grpcurl-style discovery: the reflection service lists the public API and health.
async fn assert_reflection_lists_services(addr: &str) {
    let names = reflection_services(addr).await;
    for want in ["tome.v1.Tome", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
    }
    assert!(!names.iter().any(|n| n == "tome.v1.Worker"), "the embedded server does not serve tome.v1.Worker: {names:?}");
    assert_eq!(reflection_services_v1alpha(addr).await, names, "reflection v1alpha lists what v1 does");
}

#[test]
fn benchmark_suite_smoke_mode_measures_every_case() {
    let out = std::env::temp_dir().join(format!("tome-bench-smoke-{}.json", std::process::id()));
    let status = Command::new(tome_bin()).args(["bench", "suite", "--smoke", "--out"]).arg(&out).status().unwrap();
    assert!(status.success());
    let records: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let cases: std::collections::BTreeSet<&str> = records.iter().map(|r| r["case"].as_str().unwrap()).collect();
    for want in [
        "fma-peak",
        "dense",
        "dense-causal",
        "longformer",
        "bigbird",
        "reformer-lsh",
        "performer",
        "scaling-window",
        "scaling-blocksparse",
        "scaling-favor",
        "scaling-recurrent",
        "scaling-compressive",
    ] {
        assert!(cases.contains(want), "{want} missing from {cases:?}");
    }
    for r in &records {
        assert!(r["seconds"].as_f64().unwrap() > 0.0, "{r}");
    }
    assert!(records[0]["gflops"].as_f64().unwrap() > 1.0, "the FMA peak is measured");
    for r in records.iter().filter(|r| r["case"].as_str().is_some_and(|c| c.starts_with("dense"))) {
        assert!(r["fma_peak_gflops"].as_f64().is_some_and(|p| p > 1.0), "a dense case measures the peak around its runs: {r}");
    }
    std::fs::remove_file(&out).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_api_keys_only_callers_that_send_one_are_served() {
    let Some(model) = minilm() else { return };
    let dir = std::env::temp_dir().join(format!("tome-api-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let keys = dir.join("keys");
    std::fs::write(&keys, "# the platform team\nteam-a team-a-0123456789abcdef\nteam-b team-b-0123456789abcdef\n").unwrap();
    let server = start_server(&model, &["--api-keys-file", keys.to_str().unwrap(), "--metrics-listen", "127.0.0.1:0", "--max-jobs-per-caller", "1"]).await;
    let mut client = TomeClient::connect(server.addr.clone()).await.unwrap();
    let request = |key: Option<&str>| keyed(text_request(TEXT.as_bytes(), Default::default()), key);
    fn keyed(request: pb::ProcessRequest, key: Option<&str>) -> tonic::Request<pb::ProcessRequest> {
        let mut r = tonic::Request::new(request);
        if let Some(k) = key {
            r.metadata_mut().insert("authorization", format!("Bearer {k}").parse().unwrap());
        }
        r
    }
    for key in [None, Some("team-c-0123456789abcdef")] {
        let Err(err) = process_call(&mut client, request(key)).await else { panic!("served without a valid key: {key:?}") };
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    }
    let got = process_call(&mut client, request(Some("team-b-0123456789abcdef"))).await.unwrap();
    assert_eq!(got.kinds.last(), Some(&"done"));
    // Metrics tell callers apart by their key's name, and never show a key.
    let page = http_get(server.metrics.as_deref().expect("metrics address"), "/metrics");
    assert!(page.lines().any(|l| l.starts_with("tome_jobs_total{") && l.contains(r#"caller="team-b""#) && l.contains(r#"outcome="ok""#)), "{page}");
    assert!(page.lines().any(|l| l.starts_with("tome_tokens_total{") && l.contains(r#"caller="team-b""#)), "{page}");
    assert!(!page.contains("0123456789abcdef"), "a key in the metrics: {page}");
    // One job at a time per caller here: while team-a's job streams its hidden states (unread,
    // so it holds its place), team-a's next waits and team-b's runs.
    let options = pb::ProcessOptions {
        outputs: vec![pb::Output::HiddenStates as i32],
        attention: Some(pb::AttentionOverride { kind: pb::AttentionKind::Window as i32, window: 64, ..Default::default() }),
        position_extension: pb::PositionExtension::Tile as i32,
        ranks: 1,
        ..Default::default()
    };
    let held = client.process(keyed(text_request(TEXT.repeat(1000).as_bytes(), options), Some("team-a-0123456789abcdef"))).await.unwrap();
    let mut waiting_client = client.clone();
    let team_a_next = tokio::spawn(async move { process_call(&mut waiting_client, request(Some("team-a-0123456789abcdef"))).await });
    assert_eq!(process_call(&mut client, request(Some("team-b-0123456789abcdef"))).await.unwrap().kinds.last(), Some(&"done"));
    assert!(!team_a_next.is_finished(), "a caller ran two jobs at once");
    drop(held);
    let team_a_next = tokio::time::timeout(std::time::Duration::from_secs(120), team_a_next).await.expect("team-a's next ran once its first ended");
    assert_eq!(team_a_next.unwrap().unwrap().kinds.last(), Some(&"done"));
    // Probes need no key; the CLI sends its --api-key.
    assert_eq!(health(&server.addr, "tome.v1.Tome").await, Some(1));
    let info = |key: &str| Command::new(tome_bin()).args(["info", "--coordinator", &server.host_port, "--api-key", key]).output().unwrap();
    assert!(info("team-a-0123456789abcdef").status.success());
    // A reader that closes its end early (`tome info | head -1`) ends tome quietly, never with
    // a panic.
    let mut piped = Command::new(tome_bin())
        .args(["info", "--coordinator", &server.host_port, "--api-key", "team-a-0123456789abcdef"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(piped.stdout.take());
    let closed = piped.wait_with_output().unwrap();
    assert!(!String::from_utf8_lossy(&closed.stderr).contains("panicked"), "{}", String::from_utf8_lossy(&closed.stderr));
    // A log filter that does not parse is an error, not a quiet `info`.
    let bad = Command::new(tome_bin()).args(["--log", "info,[[", "info", "--coordinator", &server.host_port]).output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--log"), "{}", String::from_utf8_lossy(&bad.stderr));
    let refused = info("team-x-0123456789abcdef");
    assert!(!refused.status.success() && String::from_utf8_lossy(&refused.stderr).contains("API key"), "{}", String::from_utf8_lossy(&refused.stderr));
    std::fs::remove_dir_all(dir).ok();
}

/// An HTTP/1.1 request by hand: the status code and the body.
fn http(host_port: &str, method: &str, path: &str, body: Option<&str>, key: Option<&str>) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(host_port).unwrap();
    let auth = key.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
    let body = body.unwrap_or("");
    write!(s, "{method} {path} HTTP/1.1\r\nHost: {host_port}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
        .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let code = raw.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (code, body)
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

/// Installs OpenAI's Python client from PyPI (once, under target/), returning the directory to
/// put on PYTHONPATH.
fn openai_python() -> PathBuf {
    let dir = repo().join("target/python-openai");
    if !dir.join("openai").is_dir() {
        let out = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "--target"])
            .arg(&dir)
            .arg("openai")
            .output()
            .expect("python3 (scripts/prereqs.sh python installs it)");
        assert!(out.status.success(), "pip install openai: {}", String::from_utf8_lossy(&out.stderr));
    }
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_routes_answer_as_grpc_does_and_openais_client_works_unchanged() {
    let Some(model) = minilm() else { return };
    let dir = std::env::temp_dir().join(format!("tome-http-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let keys = dir.join("keys");
    let key = "ops-0123456789abcdef";
    std::fs::write(&keys, format!("ops {key}\n")).unwrap();
    let server = start_server(&model, &["--api-keys-file", keys.to_str().unwrap(), "--max-document-bytes", "4000"]).await;
    let at = server.host_port.as_str();

    // The reference: gRPC's document embeddings of the same texts.
    let mut client = TomeClient::connect(server.addr.clone()).await.unwrap();
    let grpc = |text: &str| {
        let options = pb::ProcessOptions { outputs: vec![pb::Output::DocumentEmbedding as i32], ..Default::default() };
        let mut r = tonic::Request::new(text_request(text.as_bytes(), options));
        r.metadata_mut().insert("authorization", format!("Bearer {key}").parse().unwrap());
        r
    };
    let (first, second) = (TEXT, "Paradise Lost begins with the fall, in media res.");
    let want = [process_call(&mut client, grpc(first)).await.unwrap(), process_call(&mut client, grpc(second)).await.unwrap()];

    // Open routes: health and the API's description.
    let (code, body) = http(at, "GET", "/health", None, None);
    assert_eq!((code, json(&body)["status"].as_str()), (200, Some("SERVING")));
    let (code, body) = http(at, "GET", "/openapi.json", None, None);
    assert!(code == 200 && json(&body)["paths"]["/v1/embeddings"].is_object(), "{body}");
    // The rest needs a key, as gRPC does; refusals carry OpenAI's error body.
    let request = serde_json::json!({ "input": first, "model": "" }).to_string();
    let (code, body) = http(at, "POST", "/v1/embeddings", Some(&request), None);
    assert_eq!((code, json(&body)["error"]["type"].as_str()), (401, Some("authentication_error")), "{body}");
    let (code, body) = http(at, "GET", "/info", None, Some(key));
    assert_eq!(code, 200, "{body}");
    let model_name = json(&body)["models"][0]["name"].as_str().unwrap().to_string();

    // OpenAI's embeddings: one string, a list, floats or base64, as gRPC computes them.
    let (code, body) = http(at, "POST", "/v1/embeddings", Some(&request), Some(key));
    assert_eq!(code, 200, "{body}");
    let one = json(&body);
    assert_eq!(one["object"], "list");
    assert!(max_diff(&floats(&one["data"][0]["embedding"]), &want[0].document) <= 1e-6);
    assert_eq!(one["usage"]["prompt_tokens"].as_u64(), want[0].done.as_ref().map(|d| d.tokens));
    let list = serde_json::json!({ "input": [first, second], "model": model_name, "encoding_format": "base64" }).to_string();
    let (code, body) = http(at, "POST", "/v1/embeddings", Some(&list), Some(key));
    assert_eq!(code, 200, "{body}");
    let both = json(&body);
    for (i, want) in want.iter().enumerate() {
        assert_eq!(both["data"][i]["index"].as_u64(), Some(i as u64));
        let bytes = base64_decode(both["data"][i]["embedding"].as_str().unwrap());
        let got: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        assert!(max_diff(&got, &want.document) <= 1e-6, "input {i}");
    }
    for (body, status, says) in [
        (serde_json::json!({ "input": first, "dimensions": 7 }).to_string(), 400, "384"),
        (serde_json::json!({ "input": first, "model": "no-such-model" }).to_string(), 404, "no-such-model"),
        (serde_json::json!({ "input": [] }).to_string(), 400, "1 to 2048"),
        (serde_json::json!({ "input": first, "encoding_format": "int8" }).to_string(), 400, "encoding_format"),
        ("{not json".to_string(), 400, "request body"),
        // Larger than the server takes: a document over --max-document-bytes, a body over twice it.
        (serde_json::json!({ "input": "x".repeat(5000) }).to_string(), 413, "4000"),
        (serde_json::json!({ "input": "x".repeat(100_000) }).to_string(), 413, "larger than this server takes"),
    ] {
        let (code, answer) = http(at, "POST", "/v1/embeddings", Some(&body), Some(key));
        assert_eq!(code, status, "{body}: {answer}");
        assert!(json(&answer)["error"]["message"].as_str().unwrap().contains(says), "{body}: {answer}");
    }

    // tome's own route: the document's embedding and its chunks', with their spans.
    let options = serde_json::json!({ "chunk_tokens": 64, "attention": "window:128", "positions": "tile" });
    let embed = serde_json::json!({ "text": first.repeat(12), "options": options }).to_string();
    let (code, body) = http(at, "POST", "/v1/embed", Some(&embed), Some(key));
    assert_eq!(code, 200, "{body}");
    let got = json(&body);
    assert_eq!(got["document_embedding"].as_array().unwrap().len(), 384);
    let chunks = got["chunks"].as_array().unwrap();
    assert!(chunks.len() > 1 && chunks[0]["tokens"][1].as_u64() == Some(64), "{body}");
    let (code, body) = http(at, "POST", "/v1/embed", Some(r#"{"text": "x", "options": {"attention": "sparse"}}"#), Some(key));
    assert!(code == 400 && body.contains("options.attention"), "{body}");

    // OpenAI's own Python client, unchanged, from PyPI.
    let script = r#"
import json, sys
from openai import OpenAI, AuthenticationError
url, key, model, a, b = sys.argv[1:]
r = OpenAI(base_url=url, api_key=key).embeddings.create(model=model, input=[a, b])
out = {"embeddings": [d.embedding for d in r.data], "tokens": r.usage.prompt_tokens}
try:
    OpenAI(base_url=url, api_key="not-a-key-0123456789", max_retries=0).embeddings.create(model=model, input=a)
except AuthenticationError:
    out["refused"] = True
print(json.dumps(out))
"#;
    let out = Command::new("python3").env("PYTHONPATH", openai_python()).args(["-c", script, &format!("http://{at}/v1"), key, &model_name, first, second]).output().unwrap();
    assert!(out.status.success(), "the openai client: {}", String::from_utf8_lossy(&out.stderr));
    let got = json(String::from_utf8_lossy(&out.stdout).trim());
    for (i, want) in want.iter().enumerate() {
        assert!(max_diff(&floats(&got["embeddings"][i]), &want.document) <= 1e-6, "the openai client's embedding {i}");
    }
    let tokens: u64 = want.iter().filter_map(|w| w.done.as_ref().map(|d| d.tokens)).sum();
    assert_eq!(got["tokens"].as_u64(), Some(tokens));
    assert_eq!(got["refused"], true, "a wrong key is refused through the client too");
    std::fs::remove_dir_all(&dir).ok();
}

/// Standard base64 (with padding), as OpenAI's `encoding_format: base64` sends.
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let digits: Vec<u8> = text.bytes().filter(|&c| c != b'=').map(value).collect();
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for group in digits.chunks(4) {
        let n = group.iter().enumerate().fold(0u32, |n, (i, &d)| n | (u32::from(d) << (18 - 6 * i)));
        out.extend(&n.to_be_bytes()[1..group.len()]);
    }
    out
}
