//! The offline tool (etcd's `etcdutl`): `keel snapshot status|restore` for snapshots taken with
//! Maintenance.Snapshot (`etcdctl snapshot save`) from etcd or from Keel (both are bbolt files in
//! etcd's schema; older Keel snapshots are redb files, also read), and `keel wal dump` for
//! debugging, and `keel migrate to-etcd`, which readies a stopped member's directory for etcd.
//!
//! Works on files only, never on a running member's data directory it could race with (the WAL
//! dump reads a copy). Calls keel-mvcc, keel-wal and keel-raft's disk layer.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use keel_mvcc::Store;
use keel_proto::keelpb::internal_raft_request::Request;
use keel_raft::{Disk, Identity};
use keel_server::membership::{Members, AUX_MEMBERS};
use sha2::Digest;
use std::path::{Path, PathBuf};

#[derive(Parser, Debug)]
#[command(name = "keel", about = "Keel's offline tool: snapshots and WAL")]
struct Tool {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Snapshot files written by `etcdctl snapshot save` against Keel.
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// The write-ahead log.
    #[command(subcommand)]
    Wal(WalCmd),
    /// A stopped member's data directory, for etcd.
    #[command(subcommand)]
    Migrate(MigrateCmd),
}

#[derive(Subcommand, Debug)]
enum MigrateCmd {
    /// Makes a stopped Keel member's data directory one etcd (3.5-3.7) starts on as the same
    /// member: the backend becomes etcd's (bbolt, `member/snap/db`; Keel's is kept as
    /// `member/snap/db.keel`); the WAL and snapshot files are etcd's format already.
    ToEtcd {
        #[arg(long)]
        data_dir: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum SnapshotCmd {
    /// Prints the snapshot's hash, revision, live keys, size and storage version.
    Status {
        file: PathBuf,
        /// simple, table, json or fields.
        #[arg(short = 'w', long = "write-out", default_value = "simple")]
        write_out: String,
    },
    /// Creates a new member's data directory from a snapshot, with a new cluster membership.
    Restore {
        file: PathBuf,
        #[arg(long, default_value = "default")]
        name: String,
        #[arg(long)]
        data_dir: Option<String>,
        #[arg(long)]
        wal_dir: Option<String>,
        #[arg(long, default_value = "default=http://localhost:2380")]
        initial_cluster: String,
        #[arg(long, default_value = "etcd-cluster")]
        initial_cluster_token: String,
        #[arg(long, default_value = "http://localhost:2380")]
        initial_advertise_peer_urls: String,
        /// Accept a file without the trailing sha256 (a copy of member/snap/db).
        #[arg(long)]
        skip_hash_check: bool,
        /// Move the revision this far past the snapshot's (with --mark-compacted): clients
        /// watching from before the restore are told their revision is compacted, as after
        /// etcdutl's (Kubernetes' restore procedure).
        #[arg(long, default_value_t = 0)]
        bump_revision: u64,
        /// Mark the revision after the bump compacted (required with --bump-revision > 0,
        /// refused without it, as etcdutl does).
        #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", action = clap::ArgAction::Set)]
        mark_compacted: bool,
        /// etcd's initial memory map size of the bbolt database; Keel's backend (redb) maps no
        /// file, so it is accepted and has no effect.
        #[arg(long, default_value_t = 0)]
        initial_memory_map_size: u64,
    },
}

#[derive(Subcommand, Debug)]
enum WalCmd {
    /// Prints every WAL record: entries with their decoded requests, hard states, snapshots.
    Dump {
        /// The data directory (or a WAL directory).
        dir: PathBuf,
    },
}

/// True when `args` (the process's arguments) name a tool command.
pub fn is_tool(args: &[String]) -> bool {
    matches!(args.get(1).map(String::as_str), Some("snapshot" | "wal" | "migrate"))
}

pub fn main(args: Vec<String>) -> std::process::ExitCode {
    let tool = match Tool::try_parse_from(args) {
        Ok(t) => t,
        Err(e) => {
            let _ = e.print();
            return std::process::ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let r = match tool.cmd {
        Cmd::Snapshot(SnapshotCmd::Status { file, write_out }) => status(&file, &write_out),
        Cmd::Snapshot(SnapshotCmd::Restore {
            file,
            name,
            data_dir,
            wal_dir,
            initial_cluster,
            initial_cluster_token,
            initial_advertise_peer_urls,
            skip_hash_check,
            bump_revision,
            mark_compacted,
            initial_memory_map_size: _,
        }) => {
            if (bump_revision == 0) == mark_compacted {
                // etcdutl's message and its exit code for bad arguments.
                eprintln!("Error: --mark-compacted required if --revision-bump > 0");
                return std::process::ExitCode::from(128);
            }
            let data_dir = data_dir.unwrap_or_else(|| format!("{name}.etcd"));
            let wal_dir = wal_dir.unwrap_or_else(|| format!("{data_dir}/member/wal"));
            restore(
                &file,
                &name,
                &data_dir,
                &wal_dir,
                &initial_cluster,
                &initial_cluster_token,
                &initial_advertise_peer_urls,
                skip_hash_check,
                bump_revision as i64,
            )
        }
        Cmd::Wal(WalCmd::Dump { dir }) => wal_dump(&dir),
        Cmd::Migrate(MigrateCmd::ToEtcd { data_dir }) => to_etcd(&data_dir),
    };
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

/// The database part of a snapshot file, checked against its trailing sha256 as etcdutl does: a
/// file whose size is a multiple of 512 plus 32 carries the hash (databases are whole pages).
fn snapshot_db(file: &Path, skip_hash_check: bool) -> Result<Vec<u8>> {
    let mut b = std::fs::read(file).with_context(|| format!("read {}", file.display()))?;
    if b.len() % 512 == 32 {
        let (db, sum) = b.split_at(b.len() - 32);
        let got = sha2::Sha256::digest(db);
        if !skip_hash_check && got.as_slice() != sum {
            bail!("{}: expected sha256 {:02x?}, got {:02x?}", file.display(), sum, got.as_slice());
        }
        b.truncate(b.len() - 32);
        return Ok(b);
    }
    if !skip_hash_check {
        bail!("{}: snapshot missing hash but --skip-hash-check=false", file.display());
    }
    Ok(b)
}

/// Opens a redb snapshot database (Keel before it wrote etcd's format) in a temporary copy.
fn open_redb(db: Vec<u8>) -> Result<(tempfile::TempDir, Store)> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("db");
    std::fs::write(&path, db)?;
    let store = Store::open(&path).context("open the snapshot's database")?;
    Ok((dir, store))
}

fn human(bytes: u64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1000.0 && i + 1 < units.len() {
        v /= 1000.0;
        i += 1;
    }
    // go-humanize's Bytes, as etcdctl prints it: one decimal below 10, none above.
    if i == 0 {
        format!("{bytes} B")
    } else if v < 10.0 {
        format!("{v:.1} {}", units[i])
    } else {
        format!("{v:.0} {}", units[i])
    }
}

fn status(file: &Path, write_out: &str) -> Result<()> {
    let mut size = std::fs::metadata(file).with_context(|| format!("stat {}", file.display()))?.len();
    let db = snapshot_db(file, true)?;
    let st = if keel_bbolt::is_bbolt(&db) {
        let db = keel_bbolt::Db::from_bytes(&file.display().to_string(), db)?;
        // etcd reports the database's size (its pages), not the file's.
        size = db.meta().pgid * db.meta().page_size as u64;
        keel_migrate::backend::status(&db)?
    } else {
        let (_dir, store) = open_redb(db)?;
        let (hash, _) = store.backend().hash().context("hash")?;
        keel_migrate::backend::SnapshotStatus { hash, revision: store.current_rev(), total_keys: store.key_count(), version: None }
    };
    print!("{}", status_text(&st, size, write_out));
    Ok(())
}

/// `etcdutl snapshot status`'s output (etcd 3.7's; 3.6's differs only in the table's lines):
/// `-w simple` (the default), `table`, `json` or `fields`.
fn status_text(st: &keel_migrate::backend::SnapshotStatus, size: u64, write_out: &str) -> String {
    let version = st.version.clone().unwrap_or_default();
    match write_out {
        "json" => format!(
            "{}\n",
            serde_json::json!({"hash": st.hash, "revision": st.revision, "totalKey": st.total_keys, "totalSize": size, "version": version})
        ),
        "fields" => format!(
            "\"Hash\" : {}\n\"Revision\" : {}\n\"Keys\" : {}\n\"Size\" : {}\n\"Version\" : {}\n",
            st.hash, st.revision, st.total_keys, size, version
        ),
        "table" => {
            let row = [format!("{:x}", st.hash), st.revision.to_string(), st.total_keys.to_string(), human(size), version];
            let head = ["HASH", "REVISION", "TOTAL KEYS", "TOTAL SIZE", "VERSION"];
            let w: Vec<usize> = head.iter().zip(&row).map(|(h, r)| h.len().max(r.len()) + 2).collect();
            // etcdutl 3.7's table: box drawing (3.6 drew it with +, - and |).
            let line = |l: &str, m: &str, r: &str| format!("{l}{}{r}\n", w.iter().map(|n| "─".repeat(*n)).collect::<Vec<_>>().join(m));
            let head = format!("│{}│\n", head.iter().zip(&w).map(|(h, n)| format!("{h:^n$}")).collect::<Vec<_>>().join("│"));
            // Cells right-aligned, as etcdutl's table writer sets them.
            let row = format!("│{}│\n", row.iter().zip(&w).map(|(r, n)| format!(" {r:>m$} ", m = n - 2)).collect::<Vec<_>>().join("│"));
            format!("{}{head}{}{row}{}", line("┌", "┬", "┐"), line("├", "┼", "┤"), line("└", "┴", "┘"))
        }
        _ => format!("{:x}, {}, {}, {}, {}\n", st.hash, st.revision, st.total_keys, human(size), version),
    }
}

#[allow(clippy::too_many_arguments)]
fn restore(
    file: &Path,
    name: &str,
    data_dir: &str,
    wal_dir: &str,
    initial_cluster: &str,
    token: &str,
    advertise: &str,
    skip_hash_check: bool,
    bump: i64,
) -> Result<()> {
    if Path::new(data_dir).exists() {
        bail!("data-dir {data_dir:?} exists");
    }
    let members = Members::from_initial_cluster(initial_cluster, token).map_err(anyhow::Error::msg)?;
    let me = members
        .members
        .iter()
        .find(|m| m.name == name)
        .with_context(|| format!("couldn't find local name {name:?} in the initial cluster configuration"))?;
    let mut mine: Vec<String> = advertise.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
    mine.sort();
    let mut have = me.peer_urls.clone();
    have.sort();
    if have != mine {
        bail!("--initial-cluster has {name}={} but --initial-advertise-peer-urls is {}", have.join(","), mine.join(","));
    }
    let db = snapshot_db(file, skip_hash_check)?;
    // Everything is made in a scratch dir beside the data dir and renamed into place once
    // durable: a failure leaves no half-made data dir.
    let scratch = format!("{}.restoring", data_dir.trim_end_matches('/'));
    let _ = std::fs::remove_dir_all(&scratch);
    let r = restore_into(&file.display().to_string(), &db, &scratch, &members, me.id, bump);
    if let Err(e) = r {
        let _ = std::fs::remove_dir_all(&scratch);
        return Err(e);
    }
    let rev = r?;
    // Each rename is made durable (the directories it changed fsynced): a power cut after the
    // restore said it was done must not take the data dir or its WAL away.
    let parent_of = |p: &str| Path::new(p).parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    if wal_dir != format!("{data_dir}/member/wal") {
        let from = format!("{scratch}/member/wal");
        keel_wal::create_dir_all_durable(&parent_of(wal_dir)).with_context(|| format!("create the parent of {wal_dir}"))?;
        std::fs::rename(&from, wal_dir).with_context(|| format!("move the WAL to {wal_dir}"))?;
        keel_wal::sync_dir(&parent_of(wal_dir)).with_context(|| format!("fsync the parent of {wal_dir}"))?;
        keel_wal::sync_dir(Path::new(&format!("{scratch}/member"))).with_context(|| format!("fsync {scratch}/member"))?;
    }
    std::fs::rename(&scratch, data_dir).with_context(|| format!("rename {scratch} to {data_dir}"))?;
    keel_wal::sync_dir(&parent_of(data_dir)).with_context(|| format!("fsync the parent of {data_dir}"))?;
    println!(
        "restored snapshot {} into {data_dir} (revision {rev}, member {:x}, cluster {:x}); start it with --data-dir {data_dir} --name {name}",
        file.display(),
        me.id,
        members.cluster_id
    );
    Ok(())
}

/// Makes a new member's data dir in `data_dir` from the snapshot database `db`; returns its
/// revision.
fn restore_into(name: &str, db: &[u8], data_dir: &str, members: &Members, me: u64, bump: i64) -> Result<i64> {
    let snap_dir = format!("{data_dir}/member/snap");
    let wal_dir = format!("{data_dir}/member/wal");
    keel_wal::create_dir_all_durable(Path::new(&snap_dir)).with_context(|| format!("create {snap_dir}"))?;
    let db_path = Path::new(&snap_dir).join("db");
    if keel_bbolt::is_bbolt(db) {
        let src = keel_bbolt::Db::from_bytes(name, db.to_vec())?;
        keel_migrate::backend::import(&src, &db_path)?;
    } else {
        std::fs::write(&db_path, db).with_context(|| format!("write {}", db_path.display()))?;
    }
    let mut store = Store::open(&db_path).context("open the restored database")?;
    // The new cluster's log starts over: its membership replaces the old one, and every entry
    // of the new log is applied. Alarms stay, as etcd's restore keeps them.
    store.set_aux(AUX_MEMBERS, members.encode());
    store.reset_consistent_index();
    if bump > 0 {
        // etcdutl's --bump-revision with --mark-compacted: the revision moves on, and everything
        // before it reads as compacted (a watch from before the restore is told so).
        let rev = store.bump_revision(bump);
        store.compact(rev).context("mark the bumped revision compacted")?;
        while store.compacting() {
            store.compact_step();
        }
    }
    store.commit().context("commit the restored database")?;
    let rev = store.current_rev();
    drop(store);
    let identity =
        Identity { cluster_id: members.cluster_id, member_id: me, initial_voters: members.members.iter().map(|m| m.id).collect() };
    let entries: Vec<(u64, Vec<u8>)> =
        members.members.iter().map(|m| (m.id, keel_server::membership::MemberJson::from(m).to_bytes())).collect();
    let disk = Disk::open(Path::new(&wal_dir), Path::new(&snap_dir), identity, &entries).context("create the WAL")?;
    drop(disk);
    Ok(rev)
}

/// `keel migrate to-etcd`: the backend written as etcd's beside Keel's, synced, then swapped in
/// (Keel's kept as `db.keel`), each rename followed by a directory fsync. Refused while the member
/// runs (its backend is locked) and on a directory that is etcd's already.
fn to_etcd(data_dir: &Path) -> Result<()> {
    let snap_dir = data_dir.join("member/snap");
    let db = snap_dir.join("db");
    let (tmp, kept) = (snap_dir.join("db.etcd-format"), snap_dir.join("db.keel"));
    if !db.exists() && kept.exists() && tmp.exists() {
        // Stopped between the two renames: the etcd backend was written and synced.
        std::fs::rename(&tmp, &db).with_context(|| format!("rename {} to {}", tmp.display(), db.display()))?;
        keel_wal::sync_dir(&snap_dir)?;
    }
    if !db.exists() {
        bail!("{} has no backend: not a member's data directory", data_dir.display());
    }
    if keel_migrate::is_bbolt(&db) {
        println!("{}: the backend is etcd's already", db.display());
        return Ok(());
    }
    // The backend alone (its key index is not needed: the export reads the tables once).
    let backend =
        keel_mvcc::backend::Backend::open(&db).with_context(|| format!("open {} (is the member still running?)", db.display()))?;
    let rewritten = keel_wal::Snapshotter::new(&snap_dir)?.rewrite_older_files()?;
    // The storage version follows the cluster version (lowered by a downgrade, as etcd migrates
    // its schema down): an etcd older than the cluster version refuses the directory, as it
    // refuses etcd's own.
    let out = std::fs::File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    keel_migrate::backend::export(&backend, out)?;
    let index = backend.read_meta()?.consistent_index;
    drop(backend);
    std::fs::rename(&db, &kept).with_context(|| format!("rename {} to {}", db.display(), kept.display()))?;
    keel_wal::sync_dir(&snap_dir)?;
    std::fs::rename(&tmp, &db).with_context(|| format!("rename {} to {}", tmp.display(), db.display()))?;
    keel_wal::sync_dir(&snap_dir)?;
    println!(
        "{}: etcd's backend now (consistent index {index}{}); Keel's is kept as {}. Start etcd with this member's --name, --data-dir and URLs.",
        db.display(),
        if rewritten > 0 { format!(", {rewritten} snapshot files rewritten in etcd's format") } else { String::new() },
        kept.display()
    );
    Ok(())
}

fn wal_dump(dir: &Path) -> Result<()> {
    let wal_dir = if dir.join("member/wal").is_dir() { dir.join("member/wal") } else { dir.to_path_buf() };
    // Read only: a torn tail ends the dump and is left as it is (a live member may own it).
    if keel_wal::legacy::is_legacy(&wal_dir).unwrap_or(false) {
        bail!("{} is in the WAL format of an older Keel: start that member once with this Keel to rewrite it in etcd's", wal_dir.display());
    }
    let records = keel_wal::Wal::read(&wal_dir).context("read WAL")?;
    println!("WAL {}: {} records", wal_dir.display(), records.len());
    for r in records {
        match r.kind {
            keel_wal::RECORD_ENTRY => {
                let e = keel_raft::wire::log_entry(&r.data).context("undecodable entry")?;
                let what = match e.get_entry_type() {
                    keel_raft::eraftpb::EntryType::EntryNormal if e.get_data().is_empty() => "empty".to_string(),
                    keel_raft::eraftpb::EntryType::EntryNormal => match keel_server::entry::decode(e.get_data()) {
                        Ok(d) => {
                            let who =
                                d.who.filter(|w| !w.username.is_empty()).map(|w| format!(" user={:?}", w.username)).unwrap_or_default();
                            format!("request id={:x}{who} {}", d.id, describe(&d.request))
                        }
                        Err(err) => format!("undecodable request: {err}"),
                    },
                    other => format!("{other:?}"),
                };
                println!("entry term={} index={} {what}", e.term, e.index);
            }
            keel_wal::RECORD_STATE => {
                let hs = keel_raft::wire::hard_state(&r.data).context("undecodable hard state")?;
                println!("hardstate term={} vote={:x} commit={}", hs.term, hs.vote, hs.commit);
            }
            keel_wal::RECORD_SNAPSHOT => {
                let (index, term) = keel_raft::wire::wal_snapshot_mark(&r.data).context("undecodable snapshot record")?;
                println!("snapshot term={term} index={index}");
            }
            keel_wal::RECORD_METADATA => println!("metadata {} bytes", r.data.len()),
            k => println!("record type={k} {} bytes", r.data.len()),
        }
    }
    Ok(())
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A one-line summary of a request (keys shown as text; values left out).
fn describe(r: &Request) -> String {
    match r {
        Request::Put(p) => format!("put key={:?} value_bytes={} lease={:x}", lossy(&p.key), p.value.len(), p.lease),
        Request::DeleteRange(d) => format!("delete_range key={:?} range_end={:?}", lossy(&d.key), lossy(&d.range_end)),
        Request::Txn(t) => format!("txn compares={} success={} failure={}", t.compare.len(), t.success.len(), t.failure.len()),
        Request::Compaction(c) => format!("compaction revision={} physical={}", c.revision, c.physical),
        Request::LeaseGrant(g) => format!("lease_grant id={:x} ttl={}", g.id, g.ttl),
        Request::LeaseRevoke(g) => format!("lease_revoke id={:x}", g.id),
        Request::LeaseCheckpoint(c) => format!("lease_checkpoint leases={}", c.checkpoints.len()),
        Request::ClusterMemberAttrSet(a) => format!("member_attributes member={:x}", a.member_id),
        Request::Authenticate(a) => format!("authenticate user={:?}", a.name),
        Request::AuthUserAdd(u) => format!("auth_user_add name={:?}", u.name),
        Request::Alarm(a) => format!("alarm action={} member={:x} alarm={}", a.action, a.member_id, a.alarm),
        other => keel_server::entry::op_name(other).to_string(),
    }
}
