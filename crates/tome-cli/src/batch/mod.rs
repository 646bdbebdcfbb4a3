//! `tome batch`: a shelf of documents through the same API as `tome process`, durably.
//!
//! Documents run concurrently within two bounds (documents and tokens in flight). Each one's
//! outputs are written whole or not at all (store), then recorded in the journal; a rerun with
//! the same output directory skips what is done (same content, options and settings), retries
//! what failed and redoes what changed, so a killed batch loses at most the documents that were
//! in flight. A document that fails — unreadable, not UTF-8, empty, too long, refused by the
//! server after retries — is recorded with its reason and the batch goes on. At the end the
//! Parquet tables are rebuilt from every completed document, and a report says how many
//! succeeded and failed (exit code 2 when any failed).

mod inputs;
mod journal;
mod progress;
mod store;
mod tables;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::Semaphore;
use tome_proto::v1 as pb;

use crate::args::{BatchArgs, LayoutArg, PoolingArg, PositionsArg, ProgressArg};
use crate::outputs::Collected;
use crate::process::{collect, options, Target};
use inputs::DocInput;
use journal::{Entry, Journal, Status};
use progress::Progress;

/// Exit code of a batch in which some documents failed.
pub const SOME_FAILED: u8 = 2;

/// Options a manifest line may set for its document.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DocOptions {
    attention: Option<String>,
    positions: Option<String>,
    chunk_tokens: Option<u32>,
    pooling: Option<String>,
    normalize: Option<bool>,
    global_tokens: Option<Vec<u64>>,
    ranks: Option<u32>,
    layout: Option<String>,
    hidden_layer: Option<u32>,
    segment_len: Option<u32>,
    dtype: Option<String>,
}

fn enum_value<T: clap::ValueEnum>(field: &str, value: &str) -> anyhow::Result<T> {
    T::from_str(value, true).map_err(|_| anyhow::anyhow!("options.{field}: unknown value {value:?}"))
}

/// The request for one document: the batch's options, overridden by the document's own.
fn request(args: &BatchArgs, doc: &DocInput, text: Vec<u8>) -> anyhow::Result<pb::ProcessRequest> {
    let mut flags = args.job.clone();
    let mut ranks = args.embedded.ranks;
    if !doc.options.is_null() {
        let o: DocOptions = serde_json::from_value(doc.options.clone()).map_err(|e| anyhow::anyhow!("options: {e}"))?;
        if let Some(a) = o.attention {
            flags.attention = Some(a);
        }
        if let Some(p) = o.positions {
            flags.positions = enum_value::<PositionsArg>("positions", &p)?;
        }
        if let Some(c) = o.chunk_tokens {
            flags.chunk_tokens = Some(c);
        }
        if let Some(p) = o.pooling {
            flags.pooling = Some(enum_value::<PoolingArg>("pooling", &p)?);
        }
        if let Some(n) = o.normalize {
            flags.normalize = Some(n);
        }
        if let Some(g) = o.global_tokens {
            flags.global_tokens = g;
        }
        if let Some(l) = o.layout {
            flags.layout = enum_value::<LayoutArg>("layout", &l)?;
        }
        if let Some(k) = o.hidden_layer {
            flags.hidden_layer = Some(k);
        }
        if let Some(s) = o.segment_len {
            flags.segment_len = Some(s);
        }
        if let Some(d) = o.dtype {
            flags.dtype = d.parse().map_err(|e| anyhow::anyhow!("options.dtype: {e}"))?;
        }
        if let Some(r) = o.ranks {
            ranks = r as usize;
        }
    }
    let opts = options(&flags, ranks)?;
    Ok(pb::ProcessRequest { model: flags.model_name.clone(), input: Some(pb::process_request::Input::Text(text)), options: Some(opts) })
}

/// What every document's hash includes besides its own content and options: the batch's
/// settings that change outputs (not the ranks: outputs are the same on any number).
fn settings(args: &BatchArgs) -> anyhow::Result<String> {
    let mut o = options(&args.job, 1)?;
    o.ranks = 0;
    let models: Vec<String> = args.embedded.models.iter().map(|m| m.display().to_string()).collect();
    Ok(format!("{:?}|{}|{}|{}", o, args.job.model_name, args.coordinator.as_deref().unwrap_or("embedded"), models.join(",")))
}

/// A refusal worth retrying: the server was busy or a worker went away.
fn retryable(s: &tonic::Status) -> bool {
    match s.code() {
        tonic::Code::Unavailable | tonic::Code::Unknown => true,
        tonic::Code::ResourceExhausted => tome_server::status::is_busy(s),
        _ => false,
    }
}

fn describe(s: &tonic::Status) -> String {
    format!("{} ({:?})", s.message(), s.code())
}

/// The final tally.
#[derive(Default)]
struct Tally {
    done: usize,
    skipped: usize,
    failed: Vec<(String, String)>,
    tokens: u64,
}

/// Everything a document task shares.
struct Shared {
    args: BatchArgs,
    target: Target,
    settings: String,
    journal: Mutex<Journal>,
    progress: Progress,
    documents: Semaphore,
    tokens: Arc<Semaphore>,
    tally: Mutex<Tally>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub async fn run(mut args: BatchArgs) -> anyhow::Result<u8> {
    let started = Instant::now();
    let docs = inputs::documents(&args.input)?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    store::clean_temporaries(&args.out);
    let journal = Journal::open(&args.out.join("journal.jsonl"))?;
    if args.quiet {
        args.progress = ProgressArg::None;
    }
    // The embedded coordinator must admit as many jobs as the batch sends at once.
    args.embedded.max_concurrent_jobs = args.embedded.max_concurrent_jobs.max(args.documents_in_flight);
    let target = Target::new(args.coordinator.as_deref(), &args.tls, &args.embedded).await?;
    let shared = Arc::new(Shared {
        settings: settings(&args)?,
        target,
        journal: Mutex::new(journal),
        progress: Progress::new(args.progress, docs.len(), docs.iter().map(DocInput::estimated_tokens).sum(), args.bar_tokens),
        documents: Semaphore::new(args.documents_in_flight.max(1)),
        tokens: Arc::new(Semaphore::new(args.tokens_in_flight.clamp(1, Semaphore::MAX_PERMITS))),
        tally: Mutex::new(Tally::default()),
        args,
    });
    let mut tasks = tokio::task::JoinSet::new();
    for doc in docs.iter().cloned() {
        let shared = shared.clone();
        tasks.spawn(async move { document(&shared, doc).await });
    }
    while let Some(r) = tasks.join_next().await {
        r.context("a document task failed")??;
    }
    shared.progress.finish();
    report(&shared, &docs, started)
}

/// Runs one document to its journal entry (or skips it).
async fn document(shared: &Shared, doc: DocInput) -> anyhow::Result<()> {
    let _slot = shared.documents.acquire().await?;
    let args = &shared.args;
    let estimated = doc.estimated_tokens();
    let bytes = match doc.bytes() {
        Ok(b) => b,
        Err(e) => return fail(shared, &doc, estimated, String::new(), format!("{e:#}"), 0, 0.0),
    };
    let hash = inputs::content_hash(&bytes, &doc.options, &shared.settings);
    let dir = store::doc_dir(&args.out, &doc.id);
    let on_disk = store::read_meta(&dir).filter(|m| m.hash == hash);
    if lock(&shared.journal).latest(&doc.id).is_some_and(|e| e.status == Status::Done && e.hash == hash) && on_disk.is_some() {
        lock(&shared.tally).skipped += 1;
        shared.progress.skipped(&doc.id, estimated, "done in an earlier run");
        return Ok(());
    }
    if let Some(meta) = on_disk {
        // A run was killed between writing these outputs and journaling them.
        let entry = Entry {
            id: doc.id.clone(),
            hash,
            status: Status::Done,
            tokens: Some(meta.tokens),
            chunks: Some(meta.chunks),
            reason: None,
            attempts: 0,
            seconds: meta.seconds,
            recovered: true,
        };
        lock(&shared.journal).record(entry)?;
        lock(&shared.tally).skipped += 1;
        shared.progress.skipped(&doc.id, estimated, "outputs complete on disk");
        return Ok(());
    }
    // A document larger than the whole budget runs alone.
    let budget = (estimated as usize).clamp(1, args.tokens_in_flight.clamp(1, Semaphore::MAX_PERMITS));
    let _tokens = shared.tokens.clone().acquire_many_owned(u32::try_from(budget).unwrap_or(u32::MAX)).await?;
    let text_for_snippets = String::from_utf8_lossy(&bytes).into_owned();
    let req = match request(args, &doc, bytes) {
        Ok(r) => r,
        Err(e) => return fail(shared, &doc, estimated, hash, format!("{e:#}"), 0, 0.0),
    };
    let bar = shared.progress.document(&doc.id, estimated as usize);
    let t0 = Instant::now();
    let mut attempts = 0;
    let collected: Collected = loop {
        attempts += 1;
        let outcome = match shared.target.open(req.clone()).await {
            Ok(stream) => collect(stream, &bar).await,
            Err(s) => Err(s),
        };
        match outcome {
            Ok(mut c) => {
                c.hidden_layer = req.options.as_ref().and_then(|o| o.hidden_layer);
                break c;
            }
            Err(s) if retryable(&s) && attempts <= args.retries => {
                let wait = Duration::from_millis(args.backoff_ms.saturating_mul(1 << (attempts - 1).min(16)));
                shared.progress.retrying(&doc.id, attempts, &describe(&s), wait);
                tokio::time::sleep(wait).await;
            }
            Err(s) => {
                bar.finish_and_clear();
                return fail(shared, &doc, estimated, hash, describe(&s), attempts, t0.elapsed().as_secs_f64());
            }
        }
    };
    let seconds = t0.elapsed().as_secs_f64();
    let tokens = collected.done.as_ref().and_then(|d| d["tokens"].as_u64()).unwrap_or(0);
    let meta = store::Meta {
        id: doc.id.clone(),
        hash: hash.clone(),
        path: doc.path().map(|p| p.display().to_string()),
        tokens,
        chunks: collected.chunk_tokens.len() as u64,
        seconds,
        perplexity: collected.done.as_ref().and_then(|d| d["perplexity"].as_f64()),
        snippets: store::snippets(&text_for_snippets, &collected.chunk_chars),
    };
    let chunks = meta.chunks;
    let out = args.out.clone();
    // Writing and syncing files blocks: off the runtime.
    tokio::task::spawn_blocking(move || store::write(&out, &collected, &meta)).await??;
    let entry = Entry { id: doc.id.clone(), hash, status: Status::Done, tokens: Some(tokens), chunks: Some(chunks), reason: None, attempts, seconds, recovered: false };
    lock(&shared.journal).record(entry)?;
    {
        let mut t = lock(&shared.tally);
        t.done += 1;
        t.tokens += tokens;
    }
    shared.progress.done(&doc.id, estimated, tokens, seconds);
    Ok(())
}

fn fail(shared: &Shared, doc: &DocInput, estimated: u64, hash: String, reason: String, attempts: u32, seconds: f64) -> anyhow::Result<()> {
    let entry = Entry { id: doc.id.clone(), hash, status: Status::Failed, tokens: None, chunks: None, reason: Some(reason.clone()), attempts, seconds, recovered: false };
    lock(&shared.journal).record(entry)?;
    shared.progress.failed(&doc.id, estimated, &reason);
    lock(&shared.tally).failed.push((doc.id.clone(), reason));
    Ok(())
}

/// Rebuilds the tables and the summary, prints the report; returns the exit code.
fn report(shared: &Shared, docs: &[DocInput], started: Instant) -> anyhow::Result<u8> {
    let out = &shared.args.out;
    let journal = lock(&shared.journal);
    let mut rows = Vec::new();
    let mut summary = String::new();
    for d in docs {
        let entry = journal.latest(&d.id);
        summary.push_str(
            &json!({"id": d.id, "status": entry.map(|e| &e.status), "tokens": entry.and_then(|e| e.tokens),
            "chunks": entry.and_then(|e| e.chunks), "reason": entry.and_then(|e| e.reason.as_ref()),
            "dir": store::doc_dir(Path::new(""), &d.id)})
            .to_string(),
        );
        summary.push('\n');
        if let Some(e) = entry.filter(|e| e.status == Status::Done) {
            let dir = store::doc_dir(out, &d.id);
            let meta = store::read_meta(&dir).filter(|m| m.hash == e.hash).with_context(|| format!("the outputs of {:?} are missing", d.id))?;
            rows.push(tables::DocRows::read(&dir, meta)?);
        }
    }
    drop(journal);
    let (chunk_rows, doc_rows) = tables::write_tables(out, &rows)?;
    std::fs::write(out.join("summary.jsonl"), summary)?;
    let tally = lock(&shared.tally);
    let wall = started.elapsed().as_secs_f64();
    let report = json!({
        "documents": docs.len(),
        "succeeded": tally.done + tally.skipped,
        "processed_now": tally.done,
        "done_earlier": tally.skipped,
        "failed": tally.failed.len(),
        "tokens": tally.tokens,
        "wall_seconds": wall,
        "tokens_per_second": tally.tokens as f64 / wall.max(1e-9),
        "failures": tally.failed.iter().map(|(id, r)| json!({"id": id, "reason": r})).collect::<Vec<_>>(),
        "tables": {"chunks.parquet": chunk_rows, "documents.parquet": doc_rows},
    });
    std::fs::write(out.join("report.json"), serde_json::to_string_pretty(&report)?)?;
    crate::process::print_line(&report.to_string())?;
    Ok(if tally.failed.is_empty() { 0 } else { SOME_FAILED })
}
