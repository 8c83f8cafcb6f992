//! control: the commands a test harness sends, one per line, each answered with one line.
//!
//! - `cut`: the power goes (see [`crate::tree::Tree::power_cut`]) → `ok files_reverted=N inodes_dropped=M`
//! - `fault <write|fsync|read> <eio|enospc> <N|P%> [path-substring]`: arm a fault → `ok`
//! - `capacity <bytes|off>`: ENOSPC once files would hold more → `ok`
//! - `clear`: disarm every fault → `ok`
//! - `stats` → `ok used=B held=B injected=N`
//!
//! Anything else → `err <why>`. Calls the shared state of [`crate::fs`] only.

use crate::fs::Shared;

/// Runs one command line; the answer line.
pub fn run(state: &Shared, line: &str) -> String {
    let words: Vec<&str> = line.split_whitespace().collect();
    let mut s = state.lock();
    match words.as_slice() {
        ["cut"] => {
            let c = s.tree.power_cut();
            tracing::info!(files_reverted = c.files_reverted, inodes_dropped = c.inodes_dropped, "power cut");
            format!("ok files_reverted={} inodes_dropped={}", c.files_reverted, c.inodes_dropped)
        }
        ["fault", op, errno, times] | ["fault", op, errno, times, _] => {
            let path = words.get(4).copied();
            match s.faults.arm(op, errno, times, path) {
                Ok(()) => "ok".into(),
                Err(e) => format!("err {e}"),
            }
        }
        ["capacity", "off"] => {
            s.faults.set_capacity(None);
            "ok".into()
        }
        ["capacity", n] => match n.parse() {
            Ok(b) => {
                s.faults.set_capacity(Some(b));
                "ok".into()
            }
            Err(e) => format!("err bad capacity {n:?}: {e}"),
        },
        ["clear"] => {
            s.faults.clear();
            "ok".into()
        }
        ["stats"] => format!("ok used={} held={} injected={}", s.tree.used(), s.tree.held(), s.faults.injected()),
        _ => format!("err unknown command {line:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_answer() {
        let st = Shared::default();
        assert_eq!(run(&st, "cut"), "ok files_reverted=0 inodes_dropped=0");
        assert_eq!(run(&st, "fault fsync eio 1"), "ok");
        assert_eq!(run(&st, "fault write enospc 5% /wal/"), "ok");
        assert!(run(&st, "fault open eio 1").starts_with("err"));
        assert_eq!(run(&st, "capacity 1000"), "ok");
        assert_eq!(run(&st, "capacity off"), "ok");
        assert_eq!(run(&st, "clear"), "ok");
        assert_eq!(run(&st, "stats"), "ok used=0 held=0 injected=0");
        assert!(run(&st, "reboot").starts_with("err"));
    }
}
