//! `tome batch` end to end: a generated shelf (small documents, a book-length one, an empty
//! file, a file that is not UTF-8) on the embedded default and against a real coordinator with
//! worker processes; failures isolated and reported; a batch killed with SIGKILL and resumed
//! gives exactly the outputs of an uninterrupted run with no document processed twice; a
//! changed document is redone; the Parquet tables are read back and checked.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, UInt32Type, UInt64Type};
use arrow_array::{Array, RecordBatch};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use tome_e2e::*;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tome-batch-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `n` small documents of different lengths, each its own text.
fn small_docs(dir: &Path, n: usize) {
    for i in 0..n {
        let text = format!("Document {i}. {}", TEXT.repeat(2 + i % 5));
        std::fs::write(dir.join(format!("doc{i:02}.txt")), text).unwrap();
    }
}

const JOB: [&str; 6] = ["--attention", "window:256", "--positions", "tile", "--chunk-tokens", "200"];

fn batch(input: &Path, out: &Path, extra: &[&str]) -> Output {
    Command::new(tome_bin()).arg("batch").arg(input).arg("--out").arg(out).args(JOB).args(["--progress", "json"]).args(extra).output().unwrap()
}

fn report(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("no report ({e}): {stdout}\n{}", String::from_utf8_lossy(&out.stderr)))
}

fn read_table(path: &Path) -> Vec<RecordBatch> {
    let file = std::fs::File::open(path).unwrap();
    let reader = ParquetRecordBatchReaderBuilder::try_new(file).unwrap().build().unwrap();
    reader.map(Result::unwrap).collect()
}

/// The journal's entries, in order.
fn journal(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("journal.jsonl")).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// Every file of every document's outputs except meta.json (which records timings).
fn outputs(out: &Path) -> HashMap<String, Vec<u8>> {
    let mut files = HashMap::new();
    for doc in std::fs::read_dir(out.join("documents")).unwrap() {
        let doc = doc.unwrap().path();
        for f in std::fs::read_dir(&doc).unwrap() {
            let f = f.unwrap().path();
            let name = f.file_name().unwrap().to_string_lossy().into_owned();
            if name.ends_with(".npy") {
                files.insert(format!("{}/{name}", doc.file_name().unwrap().to_string_lossy()), std::fs::read(&f).unwrap());
            }
        }
    }
    files
}

/// The chunk table's rows as (id, index, token span, char span, snippet, embedding), sorted.
fn chunk_rows(out: &Path) -> Vec<ChunkRow> {
    let mut rows = Vec::new();
    for t in read_table(&out.join("chunks.parquet")) {
        rows.extend(batch_rows(&t));
    }
    rows.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    rows
}

type ChunkRow = (String, u32, u64, u64, Option<i64>, String, Vec<f32>);

fn batch_rows(t: &RecordBatch) -> Vec<ChunkRow> {
    let ids = t.column_by_name("document_id").unwrap().as_string::<i32>();
    let index = t.column_by_name("chunk_index").unwrap().as_primitive::<UInt32Type>();
    let t0 = t.column_by_name("token_start").unwrap().as_primitive::<UInt64Type>();
    let t1 = t.column_by_name("token_end").unwrap().as_primitive::<UInt64Type>();
    let c0 = t.column_by_name("char_start").unwrap().as_primitive::<arrow_array::types::Int64Type>();
    let snippet = t.column_by_name("snippet").unwrap().as_string::<i32>();
    let emb = t.column_by_name("embedding").unwrap().as_fixed_size_list();
    (0..t.num_rows())
        .map(|i| {
            let e = emb.value(i);
            let e: Vec<f32> = e.as_primitive::<Float32Type>().values().to_vec();
            (ids.value(i).to_string(), index.value(i), t0.value(i), t1.value(i), (!c0.is_null(i)).then(|| c0.value(i)), snippet.value(i).to_string(), e)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shelf_runs_embedded_and_on_a_cluster_to_reports_with_failures_isolated_and_tables_that_read_back() {
    let Some(model) = minilm() else { return };
    let dir = scratch("shelf");
    let shelf = dir.join("shelf");
    std::fs::create_dir_all(shelf.join("nested")).unwrap();
    small_docs(&shelf, 5);
    let book = std::fs::read_to_string(repo().join("data/books/alice29.txt")).unwrap();
    std::fs::write(shelf.join("nested/alice.txt"), &book).unwrap();
    std::fs::write(shelf.join("empty.txt"), "").unwrap();
    std::fs::write(shelf.join("latin1.txt"), b"caf\xe9 au lait").unwrap();
    let log = |n: &str| dir.join(format!("{n}.log"));
    let w1 = start_worker(&model, &[], log("w1")).await;
    let w2 = start_worker(&model, &[], log("w2")).await;
    let list = format!("{},{}", w1.host_port, w2.host_port);
    let coordinator = start_coordinator(&model, &["--workers", &list, "--probe-ms", "200", "--max-concurrent-jobs", "3"], log("c")).await;
    wait_for_workers(&coordinator.addr, 2).await;
    let (embedded, cluster) = (dir.join("embedded"), dir.join("cluster"));
    let (e, c, addr, m) = (embedded.clone(), cluster.clone(), coordinator.addr.clone(), model.to_str().unwrap().to_string());
    let (embedded_run, cluster_run) = tokio::task::spawn_blocking(move || {
        let embedded_run = batch(&shelf, &e, &["--model", &m, "--documents-in-flight", "3"]);
        let cluster_run = batch(&shelf, &c, &["--model", &m, "--documents-in-flight", "3", "--coordinator", &addr]);
        (embedded_run, cluster_run)
    })
    .await
    .unwrap();
    let local = check_shelf_run(&embedded_run, &embedded);
    let remote = check_shelf_run(&cluster_run, &cluster);
    assert_same_rows(&remote, &local);
}

/// Checks one run of the shelf; returns its chunk table.
fn check_shelf_run(run: &Output, out: &Path) -> Vec<ChunkRow> {
    assert_eq!(run.status.code(), Some(2), "some documents failed: {}", String::from_utf8_lossy(&run.stderr));
    let r = report(run);
    assert_eq!((r["documents"].as_u64(), r["succeeded"].as_u64(), r["failed"].as_u64()), (Some(8), Some(6), Some(2)), "{r}");
    let reasons: HashMap<String, String> =
        r["failures"].as_array().unwrap().iter().map(|f| (f["id"].as_str().unwrap().to_string(), f["reason"].as_str().unwrap().to_string())).collect();
    assert!(reasons["latin1.txt"].contains("UTF-8"), "{reasons:?}");
    assert!(reasons["empty.txt"].contains("empty"), "{reasons:?}");
    assert!(r["tokens"].as_u64().unwrap() > 30_000, "the book is long: {r}");
    // Machine-readable progress: one JSON object per line for every document.
    let stderr = String::from_utf8_lossy(&run.stderr);
    let events: Vec<serde_json::Value> = stderr.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert_eq!(events.iter().filter(|e| e["event"] == "done").count(), 6);
    assert_eq!(events.iter().filter(|e| e["event"] == "failed").count(), 2);

    // The tables hold every chunk and document, with the per-document arrays' values.
    let rows = chunk_rows(out);
    let journal = journal(out);
    let chunks: u64 = journal.iter().filter(|e| e["status"] == "done").map(|e| e["chunks"].as_u64().unwrap()).sum();
    assert_eq!(rows.len() as u64, chunks);
    let alice: Vec<_> = rows.iter().filter(|r| r.0 == "nested/alice.txt").collect();
    assert!(alice.len() > 100, "the book has many chunks");
    assert!(alice[0].5.starts_with("ALICE'S ADVENTURES"), "snippet {:?}", alice[0].5);
    assert_eq!(alice[1].2, alice[0].3, "chunks follow each other");
    let summary: Vec<serde_json::Value> = std::fs::read_to_string(out.join("summary.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let alice_dir = summary.iter().find(|s| s["id"] == "nested/alice.txt").unwrap()["dir"].as_str().unwrap().to_string();
    let npy = std::fs::read(out.join(&alice_dir).join("chunk_embeddings.npy")).unwrap();
    let from_npy: Vec<f32> = npyz::NpyFile::new(&npy[..]).unwrap().into_vec().unwrap();
    assert_eq!(from_npy[..384], alice[0].6[..], "table and arrays agree");
    let docs = read_table(&out.join("documents.parquet"));
    assert_eq!(docs.iter().map(RecordBatch::num_rows).sum::<usize>(), 6);
    let nulls: usize = docs.iter().map(|t| t.column_by_name("perplexity").unwrap().null_count()).sum();
    assert_eq!(nulls, 6, "encoders have no perplexity");
    rows
}

/// The coordinator at `addr` lists `n` live workers.
async fn wait_for_workers(addr: &str, n: usize) {
    let mut client = tome_proto::v1::tome_client::TomeClient::connect(addr.to_string()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.info(tome_proto::v1::InfoRequest {}).await.unwrap().into_inner().workers.len() < n {
        assert!(Instant::now() < deadline, "the workers did not show up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Same chunks, spans and snippets; embeddings within 1e-5 (ranks ran elsewhere).
fn assert_same_rows(a: &[ChunkRow], b: &[ChunkRow]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert_eq!((&x.0, x.1, x.2, x.3, x.4, &x.5), (&y.0, y.1, y.2, y.3, y.4, &y.5));
        assert!(max_diff(&x.6, &y.6) <= 1e-5, "{} chunk {}", x.0, x.1);
    }
}

#[test]
fn a_killed_batch_resumes_to_exactly_the_uninterrupted_outputs_and_redoes_changed_documents() {
    let Some(model) = minilm() else { return };
    let model = model.to_str().unwrap().to_string();
    let dir = scratch("resume");
    let shelf = dir.join("shelf");
    std::fs::create_dir_all(&shelf).unwrap();
    small_docs(&shelf, 14);
    let serial = ["--model", &model, "--documents-in-flight", "1"];

    let whole = dir.join("whole");
    let run = batch(&shelf, &whole, &serial);
    assert_eq!(run.status.code(), Some(0), "{}", String::from_utf8_lossy(&run.stderr));

    // Killed with SIGKILL once a few documents are done, then run again to the end.
    let resumed = dir.join("resumed");
    let mut child =
        Command::new(tome_bin()).arg("batch").arg(&shelf).arg("--out").arg(&resumed).args(JOB).args(serial).args(["--progress", "none"]).stdout(Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while journal(&resumed).len() < 4 {
        assert!(Instant::now() < deadline, "the batch did not get going");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let before = journal(&resumed).len();
    assert!(before < 14, "the batch was killed midway ({before} documents journaled)");
    let run = batch(&shelf, &resumed, &serial);
    assert_eq!(run.status.code(), Some(0), "{}", String::from_utf8_lossy(&run.stderr));
    let r = report(&run);
    assert_eq!(r["succeeded"].as_u64(), Some(14));
    assert!(r["done_earlier"].as_u64().unwrap() >= before as u64, "{r}");

    assert_eq!(outputs(&resumed), outputs(&whole), "the same arrays as an uninterrupted run");
    assert_eq!(chunk_rows(&resumed), chunk_rows(&whole), "the same chunk table");
    // No document processed twice to completion.
    let mut completions: HashMap<String, usize> = HashMap::new();
    for e in journal(&resumed) {
        if e["status"] == "done" && e["recovered"] != true {
            *completions.entry(e["id"].as_str().unwrap().to_string()).or_default() += 1;
        }
    }
    assert!(completions.values().all(|&n| n <= 1), "{completions:?}");
    let done: std::collections::HashSet<String> = journal(&resumed).iter().filter(|e| e["status"] == "done").map(|e| e["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(done.len(), 14);

    // A document whose content changed is redone; the others are not.
    std::fs::write(shelf.join("doc03.txt"), format!("A new third document. {}", TEXT.repeat(3))).unwrap();
    let run = batch(&shelf, &resumed, &serial);
    let r = report(&run);
    assert_eq!((r["processed_now"].as_u64(), r["done_earlier"].as_u64()), (Some(1), Some(13)), "{r}");
    let last = journal(&resumed).pop().unwrap();
    assert_eq!(last["id"], "doc03.txt");
    assert!(chunk_rows(&resumed).iter().any(|row| row.0 == "doc03.txt" && row.5.starts_with("A new third document")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_against_a_real_coordinator_matches_the_embedded_batch() {
    let Some(model) = minilm() else { return };
    let dir = scratch("manifest");
    small_docs(&dir, 3);
    let manifest = dir.join("manifest.jsonl");
    let inline = TEXT.repeat(3);
    let lines = [
        serde_json::json!({"id": "first", "path": "doc00.txt"}).to_string(),
        serde_json::json!({"id": "inline", "text": inline}).to_string(),
        serde_json::json!({"id": "fine-chunks", "path": "doc02.txt", "options": {"chunk_tokens": 64, "ranks": 3}}).to_string(),
        serde_json::json!({"id": "bad-option", "text": "short", "options": {"colour": "red"}}).to_string(),
        "{not json".to_string(),
    ];
    std::fs::write(&manifest, lines.join("\n")).unwrap();

    let log = |n: &str| dir.join(format!("{n}.log"));
    let w1 = start_worker(&model, &[], log("w1")).await;
    let w2 = start_worker(&model, &[], log("w2")).await;
    let list = format!("{},{}", w1.host_port, w2.host_port);
    let coordinator = start_coordinator(&model, &["--workers", &list, "--probe-ms", "200"], log("c")).await;
    wait_for_workers(&coordinator.addr, 2).await;

    let (m, remote, local) = (manifest.clone(), dir.join("remote"), dir.join("local"));
    let (addr, model_arg) = (coordinator.addr.clone(), model.to_str().unwrap().to_string());
    let (remote_run, local_run) =
        tokio::task::spawn_blocking(move || (batch(&m, &remote, &["--coordinator", &addr, "--model", &model_arg]), batch(&m, &local, &["--model", &model_arg]))).await.unwrap();
    for run in [&remote_run, &local_run] {
        assert_eq!(run.status.code(), Some(2), "{}", String::from_utf8_lossy(&run.stderr));
        let r = report(run);
        assert_eq!((r["succeeded"].as_u64(), r["failed"].as_u64()), (Some(3), Some(2)), "{r}");
        let reasons = r["failures"].to_string();
        assert!(reasons.contains("colour"), "an unknown option is named: {reasons}");
        assert!(reasons.contains("manifest line 5"), "a broken line is named: {reasons}");
    }
    let (remote_rows, local_rows) = (chunk_rows(&dir.join("remote")), chunk_rows(&dir.join("local")));
    assert_same_rows(&remote_rows, &local_rows);
    let fine = remote_rows.iter().filter(|r| r.0 == "fine-chunks").count();
    let first = remote_rows.iter().filter(|r| r.0 == "first").count();
    assert!(fine > first, "per-document chunk size applied ({fine} vs {first} chunks)");

    // A coordinator with no live worker: every document is retried with backoff, then fails
    // with the server's reason, and the batch still ends with its report.
    let lonely = start_coordinator(&model, &["--workers", "127.0.0.1:9", "--probe-ms", "200"], log("lonely")).await;
    let (m, out, addr, model_arg) = (manifest.clone(), dir.join("lonely"), lonely.addr.clone(), model.to_str().unwrap().to_string());
    let run = tokio::task::spawn_blocking(move || batch(&m, &out, &["--coordinator", &addr, "--model", &model_arg, "--retries", "2", "--backoff-ms", "50"])).await.unwrap();
    assert_eq!(run.status.code(), Some(2));
    let r = report(&run);
    assert_eq!(r["failed"].as_u64(), Some(5), "{r}");
    let entries = journal(&dir.join("lonely"));
    let first = entries.iter().find(|e| e["id"] == "first").unwrap();
    assert_eq!(first["attempts"].as_u64(), Some(3), "{first}");
    assert!(first["reason"].as_str().unwrap().contains("no live worker"), "{first}");
}

#[test]
fn a_causal_model_fills_the_perplexity_column() {
    let llama = repo().join("crates/tome-model/tests/fixtures/llama-tiny");
    let dir = scratch("perplexity");
    // The fixture's tokenizer knows the words w1 .. w98.
    let words = |seed: usize, n: usize| (0..n).map(|i| format!("w{}", 1 + (seed * 31 + i * 7) % 98)).collect::<Vec<_>>().join(" ");
    let lines: Vec<String> = (0..3).map(|i| serde_json::json!({"id": format!("doc{i}"), "text": words(i, 20 + 9 * i)}).to_string()).collect();
    let manifest = dir.join("manifest.jsonl");
    std::fs::write(&manifest, lines.join("\n")).unwrap();
    let out = dir.join("out");
    let run = Command::new(tome_bin())
        .arg("batch")
        .arg(&manifest)
        .arg("--out")
        .arg(&out)
        .args(["--model", llama.to_str().unwrap(), "--emit", "document,logprobs", "--ranks", "3", "--progress", "none"])
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(0), "{}", String::from_utf8_lossy(&run.stderr));
    let docs = read_table(&out.join("documents.parquet"));
    let mut seen = 0;
    for t in &docs {
        let ids = t.column_by_name("document_id").unwrap().as_string::<i32>();
        let ppl = t.column_by_name("perplexity").unwrap().as_primitive::<arrow_array::types::Float64Type>();
        for i in 0..t.num_rows() {
            assert!(!ppl.is_null(i), "{}", ids.value(i));
            let summary: Vec<serde_json::Value> = std::fs::read_to_string(out.join("summary.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
            let dir_name = summary.iter().find(|s| s["id"] == ids.value(i)).unwrap()["dir"].as_str().unwrap().to_string();
            let bytes = std::fs::read(out.join(dir_name).join("logprobs.npy")).unwrap();
            let lp: Vec<f32> = npyz::NpyFile::new(&bytes[..]).unwrap().into_vec().unwrap();
            let want = (-lp.iter().map(|&x| x as f64).sum::<f64>() / lp.len() as f64).exp();
            assert!((ppl.value(i) - want).abs() < 1e-6 * want, "{}: {} vs {want}", ids.value(i), ppl.value(i));
            seen += 1;
        }
    }
    assert_eq!(seen, 3);
}
