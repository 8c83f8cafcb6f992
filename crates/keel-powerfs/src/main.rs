//! `keel-powerfs MOUNTPOINT`: mounts the filesystem (as root, through /dev/fuse), prints
//! `ready MOUNTPOINT`, then runs the commands of [`keel_powerfs::control`] read from stdin, one
//! answer line each on stdout. Unmounts on `quit` or end of input.

use keel_powerfs::fs::{PowerFs, Shared};
use std::io::{BufRead, Write};

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    let Some(mountpoint) = std::env::args().nth(1) else {
        eprintln!("usage: keel-powerfs MOUNTPOINT (commands on stdin: cut, fault, capacity, clear, stats, quit)");
        return std::process::ExitCode::from(2);
    };
    let state = Shared::default();
    let mut cfg = fuser::Config::default();
    cfg.mount_options.push(fuser::MountOption::FSName("keel-powerfs".into()));
    cfg.mount_options.push(fuser::MountOption::CUSTOM("allow_other".into()));
    let session = match fuser::spawn_mount(PowerFs::new(state.clone()), &mountpoint, &cfg) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("keel-powerfs: cannot mount {mountpoint}: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "ready {mountpoint}");
    let _ = out.flush();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        if line.trim() == "quit" {
            break;
        }
        if line.trim().is_empty() {
            continue;
        }
        let _ = writeln!(out, "{}", keel_powerfs::control::run(&state, &line));
        let _ = out.flush();
    }
    match session.umount_and_join() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keel-powerfs: unmount {mountpoint}: {e}");
            std::process::ExitCode::from(1)
        }
    }
}
