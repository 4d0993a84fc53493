//! A closed-loop load generator: N workers, each issuing one operation at a
//! time for a fixed duration; reports throughput and latency percentiles.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

/// What one phase measured.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    pub system: String,
    pub op: String,
    pub clients: usize,
    pub ops: u64,
    pub errors: u64,
    pub secs: f64,
    pub ops_per_sec: f64,
    pub p50_us: u64,
    pub p99_us: u64,
}

impl Stats {
    pub fn row(&self) -> String {
        format!(
            "{:<7} {:<8} {:>4} {:>10.0} {:>9} {:>9} {:>8}",
            self.system, self.op, self.clients, self.ops_per_sec, self.p50_us, self.p99_us, self.errors
        )
    }

    pub fn header() -> String {
        format!(
            "{:<7} {:<8} {:>4} {:>10} {:>9} {:>9} {:>8}",
            "system", "op", "cli", "ops/s", "p50 us", "p99 us", "errors"
        )
    }
}

/// Runs `op(worker, seq)` from `clients` workers for `duration` (or until a
/// worker's op returns `None`, meaning it has no more work).
pub async fn run<F, Fut>(system: &str, name: &str, clients: usize, duration: Duration, op: F) -> Stats
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Option<Result<(), String>>> + Send,
{
    let op = Arc::new(op);
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for w in 0..clients {
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(1 << 16);
            let mut errors = 0u64;
            let mut first_error = None;
            let mut seq = 0u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                match op(w, seq).await {
                    None => break,
                    Some(Ok(())) => lat.push(t.elapsed().as_micros() as u32),
                    Some(Err(e)) => {
                        errors += 1;
                        first_error.get_or_insert(e);
                    }
                }
                seq += 1;
            }
            (lat, errors, first_error)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (lat, e, first) = t.await.expect("worker");
        all.extend(lat);
        errors += e;
        if let Some(f) = first {
            eprintln!("  {system} {name}: error: {f}");
        }
    }
    let secs = start.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| -> u64 {
        if all.is_empty() {
            0
        } else {
            all[((all.len() as f64 * p) as usize).min(all.len() - 1)] as u64
        }
    };
    Stats {
        system: system.into(),
        op: name.into(),
        clients,
        ops: all.len() as u64,
        errors,
        secs,
        ops_per_sec: all.len() as f64 / secs,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
    }
}
