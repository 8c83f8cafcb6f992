//! faults: which operations fail, and how: EIO on write, fsync or read, ENOSPC past a capacity.
//!
//! Pure policy: [`Faults::check`] is asked before each operation and answers with the errno to
//! fail it with, if any. Rules come from the control channel ([`crate::control`]), e.g.
//! `fault fsync eio 1` (the next fsync fails), `fault write eio 2% /member/wal` (2% of writes to
//! paths containing that string), `capacity 50000000` (ENOSPC once files would hold more).

use rand::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Write,
    Fsync,
    Read,
}

impl Op {
    pub fn parse(s: &str) -> Option<Op> {
        match s {
            "write" => Some(Op::Write),
            "fsync" => Some(Op::Fsync),
            "read" => Some(Op::Read),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Times {
    /// The next n operations that match.
    Next(u32),
    /// Each matching operation with this probability.
    Chance(f64),
}

#[derive(Debug, Clone)]
struct Rule {
    op: Op,
    errno: i32,
    times: Times,
    path: Option<String>,
}

/// The faults armed now, and how many were injected.
#[derive(Debug, Default)]
pub struct Faults {
    rules: Vec<Rule>,
    capacity: Option<u64>,
    injected: u64,
}

impl Faults {
    /// Arms a rule: `op` (write|fsync|read), `errno` (eio|enospc), `times` (`N` for the next N,
    /// `P%` for a chance each time), optional path substring.
    pub fn arm(&mut self, op: &str, errno: &str, times: &str, path: Option<&str>) -> Result<(), String> {
        let op = Op::parse(op).ok_or_else(|| format!("unknown operation {op:?} (write, fsync, read)"))?;
        let errno = match errno {
            "eio" => libc::EIO,
            "enospc" => libc::ENOSPC,
            other => return Err(format!("unknown errno {other:?} (eio, enospc)")),
        };
        let times = match times.strip_suffix('%') {
            Some(p) => Times::Chance(p.parse::<f64>().map_err(|e| format!("bad chance {times:?}: {e}"))? / 100.0),
            None => Times::Next(times.parse().map_err(|e| format!("bad count {times:?}: {e}"))?),
        };
        self.rules.push(Rule { op, errno, times, path: path.map(str::to_owned) });
        Ok(())
    }

    /// ENOSPC once the files' visible bytes would pass `bytes` (None: no limit).
    pub fn set_capacity(&mut self, bytes: Option<u64>) {
        self.capacity = bytes;
    }

    pub fn capacity(&self) -> Option<u64> {
        self.capacity
    }

    /// Disarms every rule and the capacity.
    pub fn clear(&mut self) {
        self.rules.clear();
        self.capacity = None;
    }

    pub fn injected(&self) -> u64 {
        self.injected
    }

    /// Whether any rule names a path (then callers pass the path).
    pub fn wants_path(&self) -> bool {
        self.rules.iter().any(|r| r.path.is_some())
    }

    /// The errno `op` on `path` fails with now, if any (a `Next` rule is used up by it).
    pub fn check(&mut self, op: Op, path: Option<&str>) -> Option<i32> {
        let mut rng = rand::thread_rng();
        let mut hit = None;
        for r in &mut self.rules {
            if r.op != op || r.path.as_deref().is_some_and(|p| !path.is_some_and(|x| x.contains(p))) {
                continue;
            }
            let fire = match &mut r.times {
                Times::Next(0) => false,
                Times::Next(n) => {
                    *n -= 1;
                    true
                }
                Times::Chance(p) => rng.gen_bool(p.clamp(0.0, 1.0)),
            };
            if fire {
                hit = Some(r.errno);
                break;
            }
        }
        self.rules.retain(|r| r.times != Times::Next(0));
        if hit.is_some() {
            self.injected += 1;
        }
        hit
    }

    /// Whether growing the files' visible bytes from `used` to `after` passes the capacity.
    pub fn full(&mut self, used: u64, after: u64) -> bool {
        let full = after > used && self.capacity.is_some_and(|c| after > c);
        if full {
            self.injected += 1;
        }
        full
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_fire_as_armed() {
        let mut f = Faults::default();
        f.arm("fsync", "eio", "2", None).unwrap();
        f.arm("write", "eio", "100%", Some("/wal/")).unwrap();
        assert_eq!(f.check(Op::Fsync, None), Some(libc::EIO));
        assert_eq!(f.check(Op::Fsync, None), Some(libc::EIO));
        assert_eq!(f.check(Op::Fsync, None), None);
        assert_eq!(f.check(Op::Write, Some("/m/member/snap/db")), None);
        assert_eq!(f.check(Op::Write, Some("/m/member/wal/0.wal")), Some(libc::EIO));
        assert_eq!(f.check(Op::Read, None), None);
        f.set_capacity(Some(100));
        assert!(!f.full(0, 100));
        assert!(f.full(50, 101));
        assert!(!f.full(200, 150), "shrinking is always allowed");
        assert_eq!(f.injected(), 4);
        assert!(f.arm("open", "eio", "1", None).is_err());
        assert!(f.arm("write", "eperm", "1", None).is_err());
        f.clear();
        assert_eq!(f.check(Op::Write, Some("/wal/")), None);
    }
}
