//! `tome bench`: tome's side of the benchmark suite (scripts/bench/ runs the references beside
//! it and writes the table of ratios).
//!
//! `tome bench suite` runs every case in a fresh process of its own (`tome bench case NAME`),
//! so each peak-memory figure belongs to one case, and prints one JSON record per case.
//! `--smoke` shrinks every size so the whole suite takes seconds (CI runs it).

mod cases;
mod gpu;
mod memory;
mod peak;

use std::process::Command;

use anyhow::{bail, Context};

use crate::args::{BenchArgs, BenchCommand};

/// One measurement: what ran, on how many tokens, how long, how fast, and the memory it took.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone)]
pub struct Record {
    pub case: String,
    pub tokens: usize,
    pub seconds: f64,
    /// Useful floating-point work per second, where the case has a FLOP count.
    pub gflops: Option<f64>,
    /// Where the case has a FLOP count: the machine's FMA peak measured just before and just after
    /// the reported run, the higher of the two. `gflops` is read against it, not against a peak
    /// measured minutes away: on a shared machine the peak moves by a third within the hour.
    #[serde(default)]
    pub fma_peak_gflops: Option<f64>,
    /// Peak resident memory during the timed part, above what the process held before it.
    pub peak_increment_mb: f64,
    /// Peak resident memory of the whole process.
    pub peak_rss_mb: f64,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.command {
        BenchCommand::Case { name, tokens } => {
            let record = cases::run(&name, tokens)?;
            println!("{}", serde_json::to_string(&record)?);
            Ok(())
        }
        BenchCommand::List { smoke } => {
            for (name, tokens) in cases::suite(smoke) {
                println!("{name} {tokens}");
            }
            Ok(())
        }
        BenchCommand::Suite { smoke, out } => {
            let exe = std::env::current_exe().context("locating the tome binary")?;
            let mut records = Vec::new();
            for (name, tokens) in cases::suite(smoke) {
                let output = Command::new(&exe).args(["bench", "case", &name, "--tokens", &tokens.to_string()]).output()?;
                if !output.status.success() {
                    bail!("bench case {name} ({tokens} tokens) failed: {}", String::from_utf8_lossy(&output.stderr));
                }
                let record: Record = serde_json::from_slice(&output.stdout).with_context(|| format!("reading the record of {name}"))?;
                eprintln!("{:<28} {:>9} tokens {:>9.4} s{}", record.case, record.tokens, record.seconds, record.gflops.map_or(String::new(), |g| format!(" {g:>7.1} GFLOP/s")));
                records.push(record);
            }
            let json = serde_json::to_string_pretty(&records)?;
            match out {
                Some(path) => std::fs::write(&path, json).with_context(|| format!("writing {}", path.display()))?,
                None => println!("{json}"),
            }
            Ok(())
        }
    }
}
