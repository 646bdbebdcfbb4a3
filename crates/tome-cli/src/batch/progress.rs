//! What a batch shows while it runs: progress bars for a person (overall: documents, tokens,
//! tokens/s, ETA; one bar per large document following its layers), one JSON object per line
//! for logs, or nothing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;

use crate::args::ProgressArg;
use crate::process::layer_bar;

/// The overall bar counts estimated tokens (so its ETA weighs a book more than a page); its
/// message counts documents and the tokens the server reported.
pub struct Progress {
    mode: ProgressArg,
    multi: MultiProgress,
    overall: ProgressBar,
    documents: usize,
    ended: AtomicU64,
    tokens: AtomicU64,
    started: Instant,
    bar_tokens: usize,
}

impl Progress {
    /// `estimated_tokens`: of all the documents together.
    pub fn new(mode: ProgressArg, documents: usize, estimated_tokens: u64, bar_tokens: usize) -> Self {
        let multi = MultiProgress::with_draw_target(if mode == ProgressArg::Bars { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() });
        let overall = multi.add(ProgressBar::new(estimated_tokens.max(1)));
        overall.set_style(ProgressStyle::with_template("{spinner} [{bar:30}] {msg}  {elapsed_precise} ETA {eta}").unwrap_or_else(|_| ProgressStyle::default_bar()));
        if mode == ProgressArg::Bars {
            overall.enable_steady_tick(Duration::from_millis(200));
        }
        let p = Progress { mode, multi, overall, documents, ended: AtomicU64::new(0), tokens: AtomicU64::new(0), started: Instant::now(), bar_tokens };
        p.advance(0, 0, false);
        p
    }

    fn log(&self, record: serde_json::Value) {
        if self.mode == ProgressArg::Json {
            eprintln!("{record}");
        }
    }

    /// One more document ended (`ended`), `estimated` tokens of the bar done, `tokens` counted.
    fn advance(&self, estimated: u64, tokens: u64, ended: bool) {
        let total = self.tokens.fetch_add(tokens, Ordering::Relaxed) + tokens;
        let docs = self.ended.fetch_add(u64::from(ended), Ordering::Relaxed) + u64::from(ended);
        let rate = total as f64 / self.started.elapsed().as_secs_f64().max(1e-3);
        self.overall.set_message(format!("{docs}/{} documents, {total} tokens, {rate:.0} tokens/s", self.documents));
        self.overall.inc(estimated);
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

    pub fn done(&self, id: &str, estimated: u64, tokens: u64, seconds: f64) {
        self.log(json!({"event": "done", "id": id, "tokens": tokens, "seconds": seconds}));
        self.advance(estimated, tokens, true);
    }

    pub fn skipped(&self, id: &str, estimated: u64, why: &str) {
        self.log(json!({"event": "skipped", "id": id, "why": why}));
        self.advance(estimated, 0, true);
    }

    pub fn failed(&self, id: &str, estimated: u64, reason: &str) {
        self.log(json!({"event": "failed", "id": id, "reason": reason}));
        if self.mode == ProgressArg::Bars {
            self.overall.println(format!("failed: {id}: {reason}"));
        }
        self.advance(estimated, 0, true);
    }

    pub fn retrying(&self, id: &str, attempt: u32, reason: &str, wait: Duration) {
        self.log(json!({"event": "retrying", "id": id, "attempt": attempt, "reason": reason, "wait_seconds": wait.as_secs_f64()}));
    }

    pub fn finish(&self) {
        self.overall.finish_and_clear();
    }
}
