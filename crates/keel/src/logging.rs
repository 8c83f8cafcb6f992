//! The server's log: `tracing` events written to stderr as etcd writes them.
//!
//! `--log-format json` (etcd's default) writes one JSON object per line with etcd's keys:
//! `level`, `ts` (RFC 3339, microseconds, UTC), `caller` (file:line), `msg`, then the event's
//! fields with etcd's spelling (`member_id` becomes `member-id`), so that log pipelines and
//! etcd's own tests read Keel's log as they read etcd's. `--log-format console` writes the
//! plain text lines of `tracing-subscriber`. `--log-level` picks the level; `KEEL_LOG` (an
//! `EnvFilter` directive) overrides it. Owns the global subscriber only.

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Installs the subscriber for `level` (etcd's names) in `format` (`json` or `console`).
pub fn init(level: &str, format: &str) {
    let level = match level {
        "debug" => "debug",
        "warn" => "warn",
        "error" | "panic" | "fatal" | "dpanic" => "error",
        _ => "info",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("KEEL_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(false);
    if format == "console" {
        fmt.init();
    } else {
        fmt.event_format(EtcdJson).init();
    }
}

/// One JSON line per event, with etcd's keys.
struct EtcdJson;

/// The event's fields as JSON, `message` kept apart.
#[derive(Default)]
struct Fields {
    msg: String,
    rest: serde_json::Map<String, serde_json::Value>,
}

impl Fields {
    fn put(&mut self, field: &Field, v: serde_json::Value) {
        if field.name() == "message" {
            self.msg = match v {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
        } else {
            self.rest.insert(field.name().replace('_', "-"), v);
        }
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, value.to_string().into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.put(field, format!("{value:?}").into());
    }
}

impl<S, N> FormatEvent<S, N> for EtcdJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, _ctx: &FmtContext<'_, S, N>, mut w: Writer<'_>, event: &Event<'_>) -> std::fmt::Result {
        let meta = event.metadata();
        let mut f = Fields::default();
        event.record(&mut f);
        let mut ts = String::new();
        tracing_subscriber::fmt::time::SystemTime.format_time(&mut Writer::new(&mut ts))?;
        let file = meta.file().map(|p| p.strip_prefix("crates/").unwrap_or(p)).unwrap_or(meta.target());
        let caller = format!("{file}:{}", meta.line().unwrap_or(0));
        // etcd's key order: level, ts, caller, msg, then the fields.
        let q = |s: &str| serde_json::Value::from(s).to_string();
        let mut line = format!(
            "{{\"level\":{},\"ts\":{},\"caller\":{},\"msg\":{}",
            q(&meta.level().as_str().to_ascii_lowercase()),
            q(&ts),
            q(&caller),
            q(&f.msg)
        );
        for (k, v) in f.rest {
            line.push(',');
            line.push_str(&q(&k));
            line.push(':');
            line.push_str(&v.to_string());
        }
        line.push('}');
        writeln!(w, "{line}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_is_one_json_line_with_etcds_keys() {
        let buf = std::sync::Arc::new(parking_lot::Mutex::new(Vec::<u8>::new()));
        let b = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_writer(move || {
                struct W(std::sync::Arc<parking_lot::Mutex<Vec<u8>>>);
                impl std::io::Write for W {
                    fn write(&mut self, d: &[u8]) -> std::io::Result<usize> {
                        self.0.lock().extend_from_slice(d);
                        Ok(d.len())
                    }
                    fn flush(&mut self) -> std::io::Result<()> {
                        Ok(())
                    }
                }
                W(b.clone())
            })
            .event_format(EtcdJson)
            .finish();
        tracing::subscriber::with_default(sub, || {
            tracing::warn!(member_id = "8e9e05c52164694d", term = 2u64, "raft: \"elected\" leader");
        });
        let out = String::from_utf8(buf.lock().clone()).unwrap();
        assert_eq!(out.lines().count(), 1, "{out}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v["level"], "warn");
        assert_eq!(v["msg"], "raft: \"elected\" leader");
        assert_eq!(v["member-id"], "8e9e05c52164694d");
        assert_eq!(v["term"], 2);
        assert!(v["caller"].as_str().unwrap().starts_with("keel/src/logging.rs:"), "{v}");
        let ts = v["ts"].as_str().unwrap();
        assert!(ts.ends_with('Z') && ts.len() == "2026-12-01T16:22:00.452405Z".len(), "{ts}");
    }
}
