//! Forwards raft-rs's slog records to `tracing` (target `raft`).

use slog::{Drain, Level, Never, OwnedKVList, Record, Serializer, KV};
use std::fmt::Write;

struct KvString(String);

impl Serializer for KvString {
    fn emit_arguments(&mut self, key: slog::Key, val: &std::fmt::Arguments) -> slog::Result {
        let _ = write!(self.0, " {key}={val}");
        Ok(())
    }
}

struct TracingDrain;

impl Drain for TracingDrain {
    type Ok = ();
    type Err = Never;

    fn log(&self, record: &Record, values: &OwnedKVList) -> Result<(), Never> {
        let mut kv = KvString(String::new());
        let _ = record.kv().serialize(record, &mut kv);
        let _ = values.serialize(record, &mut kv);
        let msg = record.msg();
        match record.level() {
            Level::Critical | Level::Error => tracing::error!(target: "raft", "{msg}{}", kv.0),
            Level::Warning => tracing::warn!(target: "raft", "{msg}{}", kv.0),
            Level::Info => tracing::info!(target: "raft", "{msg}{}", kv.0),
            Level::Debug | Level::Trace => tracing::debug!(target: "raft", "{msg}{}", kv.0),
        }
        Ok(())
    }
}

/// A slog logger whose records end up in `tracing`.
pub fn logger() -> slog::Logger {
    slog::Logger::root(TracingDrain.fuse(), slog::o!())
}
