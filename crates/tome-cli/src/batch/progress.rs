//! What a batch shows while it runs: progress bars for a person (overall: documents, tokens,
//! tokens/s, ETA; one bar per large document following its layers), one JSON object per line
//! for logs, or nothing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;

use crate::args::ProgressArg;
use crate::process::layer_bar;

pub struct Progress {
    mode: ProgressArg,
    multi: MultiProgress,
    overall: ProgressBar,
    tokens: AtomicU64,
    started: Instant,
    bar_tokens: usize,
}

impl Progress {
    pub fn new(mode: ProgressArg, documents: usize, bar_tokens: usize) -> Self {
        let multi = MultiProgress::with_draw_target(if mode == ProgressArg::Bars { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() });
        let overall = multi.add(ProgressBar::new(documents as u64));
        overall.set_style(
            ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} documents  {msg}  {elapsed_precise} ETA {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        if mode == ProgressArg::Bars {
            overall.enable_steady_tick(Duration::from_millis(200));
        }
        Progress { mode, multi, overall, tokens: AtomicU64::new(0), started: Instant::now(), bar_tokens }
    }

    fn log(&self, record: serde_json::Value) {
        if self.mode == ProgressArg::Json {
            eprintln!("{record}");
        }
    }

    fn advance(&self, tokens: u64) {
        let total = self.tokens.fetch_add(tokens, Ordering::Relaxed) + tokens;
        let rate = total as f64 / self.started.elapsed().as_secs_f64().max(1e-3);
        self.overall.set_message(format!("{total} tokens, {rate:.0} tokens/s"));
        self.overall.inc(1);
    }

    /// A bar for one document: its own line when it is large, hidden otherwise.
    pub fn document(&self, id: &str, estimated_tokens: usize) -> ProgressBar {
        self.log(json!({"event": "started", "id": id, "estimated_tokens": estimated_tokens}));
        if self.mode != ProgressArg::Bars || estimated_tokens < self.bar_tokens {
            return ProgressBar::hidden();
        }
        let bar = self.multi.add(layer_bar());
        bar.set_prefix(id.to_string());
        bar.set_message(id.to_string());
        bar
    }

    pub fn done(&self, id: &str, tokens: u64, seconds: f64) {
        self.log(json!({"event": "done", "id": id, "tokens": tokens, "seconds": seconds}));
        self.advance(tokens);
    }

    pub fn skipped(&self, id: &str, why: &str) {
        self.log(json!({"event": "skipped", "id": id, "why": why}));
        self.overall.inc(1);
    }

    pub fn failed(&self, id: &str, reason: &str) {
        self.log(json!({"event": "failed", "id": id, "reason": reason}));
        if self.mode == ProgressArg::Bars {
            self.overall.println(format!("failed: {id}: {reason}"));
        }
        self.overall.inc(1);
    }

    pub fn retrying(&self, id: &str, attempt: u32, reason: &str, wait: Duration) {
        self.log(json!({"event": "retrying", "id": id, "attempt": attempt, "reason": reason, "wait_seconds": wait.as_secs_f64()}));
    }

    pub fn finish(&self) {
        self.overall.finish_and_clear();
    }
}
