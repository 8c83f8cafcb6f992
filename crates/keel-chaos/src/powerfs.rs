//! powerfs: a keel-powerfs mount for one member's data, driven over its control channel.
//!
//! [`Disk::mount`] starts `keel-powerfs` on a directory and waits until it is mounted;
//! [`Disk::cut`] cuts the power (only what was fsynced is left; the member must be dead first);
//! [`Disk::command`] arms faults. Dropping it unmounts.

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

pub struct Disk {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    mountpoint: PathBuf,
}

impl Disk {
    /// Mounts a fresh, empty keel-powerfs on `mountpoint` (created if missing).
    pub fn mount(bin: &Path, mountpoint: &Path) -> Result<Disk> {
        std::fs::create_dir_all(mountpoint)?;
        // A mount left by an earlier run that was killed.
        let _ = Command::new("umount").arg("-l").arg(mountpoint).stderr(Stdio::null()).status();
        let mut child = Command::new(bin)
            .arg(mountpoint)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else { bail!("keel-powerfs without pipes") };
        let mut d = Disk { child, stdin, stdout: BufReader::new(stdout), mountpoint: mountpoint.to_path_buf() };
        let first = d.line()?;
        if !first.starts_with("ready") {
            bail!("keel-powerfs did not mount {}: {first:?}", mountpoint.display());
        }
        Ok(d)
    }

    fn line(&mut self) -> Result<String> {
        let mut l = String::new();
        if self.stdout.read_line(&mut l)? == 0 {
            bail!("keel-powerfs on {} exited", self.mountpoint.display());
        }
        Ok(l.trim_end().to_string())
    }

    /// Sends one control command; its `ok ...` answer, or an error.
    pub fn command(&mut self, cmd: &str) -> Result<String> {
        writeln!(self.stdin, "{cmd}")?;
        self.stdin.flush()?;
        let l = self.line()?;
        if !l.starts_with("ok") {
            bail!("keel-powerfs: {cmd}: {l}");
        }
        Ok(l)
    }

    /// The power goes: what was not fsynced is gone.
    pub fn cut(&mut self) -> Result<String> {
        self.command("cut")
    }

    /// One number of the `stats` answer (`used`, `injected`, ...); 0 when it has none.
    pub fn stat(&mut self, name: &str) -> Result<u64> {
        let stats = self.command("stats")?;
        let prefix = format!("{name}=");
        Ok(stats.split_whitespace().find_map(|w| w.strip_prefix(prefix.as_str())).and_then(|v| v.parse().ok()).unwrap_or(0))
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.stdin.flush();
        let _ = self.child.wait();
    }
}
