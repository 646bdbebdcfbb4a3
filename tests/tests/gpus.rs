//! The GPUs a machine has, as every Info reports them: the coordinator's gRPC `Info`, HTTP
//! `/info`, `tome info` and a worker's `Worker.Info` give what the CUDA driver says here (names,
//! memory, compute capability), or an empty list with the reason (no driver, no GPU).

use tome_e2e::*;
use tome_proto::v1 as pb;
use tome_proto::v1::tome_client::TomeClient;
use tome_proto::v1::worker_client::WorkerClient;

/// What this machine's driver says, as the servers should report it.
fn expected() -> (Vec<(u32, String, u64, String)>, bool) {
    match tome_gpu::gpus() {
        Ok(list) => (list.into_iter().map(|g| (g.index as u32, g.name, g.memory_bytes, format!("{}.{}", g.compute_capability.0, g.compute_capability.1))).collect(), false),
        Err(_) => (Vec::new(), true),
    }
}

fn reported(gpus: &[pb::GpuDevice]) -> Vec<(u32, String, u64, String)> {
    gpus.iter().map(|g| (g.index, g.name.clone(), g.memory_bytes, g.compute_capability.clone())).collect()
}

fn assert_why_none(gpus_missing: &str, list_empty: bool, no_driver: bool) {
    assert_eq!(gpus_missing.is_empty(), !list_empty, "a reason exactly when there is no GPU: {gpus_missing:?}");
    if no_driver {
        assert!(gpus_missing.contains("libcuda.so"), "{gpus_missing}");
    }
}

fn fixture() -> std::path::PathBuf {
    repo().join("crates/tome-model/tests/fixtures/bert-tiny")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_info_reports_this_machine_s_gpus_or_why_there_are_none() {
    let (want, no_driver) = expected();
    eprintln!("this machine: {want:?}{}", if no_driver { " (no CUDA driver)" } else { "" });

    let server = start_server(&fixture(), &[]).await;
    let mut client = TomeClient::connect(server.addr.clone()).await.unwrap();
    let info = client.info(pb::InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(reported(&info.gpus), want);
    assert_why_none(&info.gpus_missing, info.gpus.is_empty(), no_driver);

    let answer = http_get(&server.host_port, "/info");
    let body: serde_json::Value = answer.split_once("\r\n\r\n").and_then(|(_, b)| serde_json::from_str(b).ok()).unwrap_or_else(|| panic!("{answer}"));
    assert_eq!(body["gpus"].as_array().map(Vec::len), Some(want.len()), "{body}");
    for (g, (index, name, memory, cc)) in body["gpus"].as_array().unwrap().iter().zip(&want) {
        assert_eq!(
            (g["index"].as_u64(), g["name"].as_str(), g["memory_bytes"].as_u64(), g["compute_capability"].as_str()),
            (Some(u64::from(*index)), Some(name.as_str()), Some(*memory), Some(cc.as_str()))
        );
    }
    assert_eq!(body["gpus_missing"].as_str(), Some(info.gpus_missing.as_str()), "{body}");

    let printed = std::process::Command::new(tome_bin()).args(["info", "--coordinator", &server.addr]).output().unwrap();
    let printed: serde_json::Value = serde_json::from_slice(&printed.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&printed.stdout)));
    assert_eq!(printed["gpus"], body["gpus"], "{printed}");
    assert_eq!(printed["gpus_missing"], body["gpus_missing"], "{printed}");

    let log = std::env::temp_dir().join(format!("tome-gpus-worker-{}.log", std::process::id()));
    let w = start_worker(&fixture(), &[], log).await;
    let mut worker = WorkerClient::connect(w.addr.clone()).await.unwrap();
    let info = worker.info(pb::WorkerInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(reported(&info.gpus), want);
    assert_why_none(&info.gpus_missing, info.gpus.is_empty(), no_driver);
    assert!(!w.log_text().contains("panicked"), "{}", w.log_text());
}

/// On a machine without a GPU, `--device cuda` stops `tome process`, `tome run` and
/// `tome serve worker` at start with the reason, and nothing is computed on the CPU instead.
#[test]
fn asking_for_a_gpu_where_there_is_none_is_an_error_with_the_reason() {
    let (gpus, _) = expected();
    if !gpus.is_empty() {
        eprintln!("this machine has GPUs: the refusal is not what happens here (scripts/gpu-check.sh runs them)");
        return;
    }
    let out = std::env::temp_dir().join(format!("tome-gpus-out-{}", std::process::id()));
    let model = fixture();
    let text = std::env::temp_dir().join(format!("tome-gpus-{}.txt", std::process::id()));
    std::fs::write(&text, "a short document").unwrap();
    let runs: [Vec<String>; 3] = [
        vec![
            "process".into(),
            text.display().to_string(),
            "--model".into(),
            model.display().to_string(),
            "--device".into(),
            "cuda".into(),
            "--out".into(),
            out.display().to_string(),
        ],
        vec!["run".into(), "--model".into(), model.display().to_string(), "--device".into(), "cuda:1".into(), "--listen".into(), format!("127.0.0.1:{}", free_port())],
        vec![
            "serve".into(),
            "worker".into(),
            "--model".into(),
            model.display().to_string(),
            "--device".into(),
            "cuda".into(),
            "--listen".into(),
            format!("127.0.0.1:{}", free_port()),
        ],
    ];
    for args in runs {
        let ran = std::process::Command::new(tome_bin()).args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&ran.stderr);
        assert!(!ran.status.success(), "{args:?} ran without a GPU");
        assert!(stderr.contains("--device cuda") && stderr.contains("no GPU:"), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    assert!(!out.exists(), "nothing was written");
    let bad = std::process::Command::new(tome_bin()).args(["process", "--device", "gpu0"]).arg(&text).output().unwrap();
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown device 'gpu0' (expected cpu, cuda or cuda:N)"));
    std::fs::remove_file(&text).ok();
}
