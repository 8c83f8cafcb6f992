//! Latency and throughput of one run: an HDR histogram per client, merged; printed like etcd's
//! benchmark tool (summary, histogram, percentiles) or as one JSON object.

use hdrhistogram::Histogram;
use std::time::Duration;

pub struct Report {
    pub name: String,
    pub hist: Histogram<u64>,
    pub errors: u64,
    pub elapsed: Duration,
    pub first_error: Option<String>,
}

/// A histogram of microseconds, 1 µs .. 1 h, 3 significant digits.
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("histogram bounds")
}

impl Report {
    pub fn ops(&self) -> u64 {
        self.hist.len()
    }

    pub fn rps(&self) -> f64 {
        self.ops() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn ms(us: u64) -> f64 {
        us as f64 / 1000.0
    }

    pub fn json(&self) -> serde_json::Value {
        let h = &self.hist;
        serde_json::json!({
            "workload": self.name,
            "ops": self.ops(),
            "errors": self.errors,
            "seconds": self.elapsed.as_secs_f64(),
            "rps": self.rps(),
            "avg_ms": h.mean() / 1000.0,
            "stddev_ms": h.stdev() / 1000.0,
            "min_ms": Self::ms(h.min()),
            "max_ms": Self::ms(h.max()),
            "p50_ms": Self::ms(h.value_at_quantile(0.50)),
            "p90_ms": Self::ms(h.value_at_quantile(0.90)),
            "p99_ms": Self::ms(h.value_at_quantile(0.99)),
            "p999_ms": Self::ms(h.value_at_quantile(0.999)),
            "first_error": self.first_error,
        })
    }

    pub fn print(&self) {
        let h = &self.hist;
        println!("\nSummary ({}):", self.name);
        println!("  Total:\t{:.4} secs.", self.elapsed.as_secs_f64());
        if h.is_empty() {
            println!("  No successful requests.");
        } else {
            println!("  Slowest:\t{:.4} secs.", h.max() as f64 / 1e6);
            println!("  Fastest:\t{:.4} secs.", h.min() as f64 / 1e6);
            println!("  Average:\t{:.4} secs.", h.mean() / 1e6);
            println!("  Stddev:\t{:.4} secs.", h.stdev() / 1e6);
            println!("  Requests/sec:\t{:.4}", self.rps());
            println!("\nResponse time histogram:");
            let (lo, hi) = (h.min(), h.max().max(h.min() + 1));
            let step = (hi - lo).div_ceil(10);
            let mut counts = Vec::new();
            for i in 0..10 {
                let a = lo + i * step;
                let b = if i == 9 { hi } else { a + step - 1 };
                counts.push((b, h.count_between(a, b)));
            }
            let max = counts.iter().map(|c| c.1).max().unwrap_or(1).max(1);
            for (b, c) in counts {
                let bar = "∎".repeat((c * 40 / max) as usize);
                println!("  {:.4} [{c}]\t|{bar}", b as f64 / 1e6);
            }
            println!("\nLatency distribution:");
            for q in [10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.9] {
                println!("  {q}% in {:.4} secs.", h.value_at_percentile(q) as f64 / 1e6);
            }
        }
        if self.errors > 0 {
            println!("\n{} errors; first: {}", self.errors, self.first_error.as_deref().unwrap_or("?"));
        }
    }
}
