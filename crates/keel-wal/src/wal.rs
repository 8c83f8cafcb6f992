//! Segmented, checksummed, preallocated log files in etcd's WAL format.
//!
//! Owns the segment files of one WAL directory. Calls `frame` and, for released segments,
//! `keel_reclaim`.

use crate::frame::{self, Parsed, HEADER};
use crate::{io_err, sync_dir, Error, Result};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Member metadata (etcd's `etcdserverpb.Metadata`); begins every segment after its crc record.
pub const RECORD_METADATA: u8 = 1;
/// A raft log entry (`raftpb.Entry`).
pub const RECORD_ENTRY: u8 = 2;
/// A raft hard state (`raftpb.HardState`: term, vote, commit).
pub const RECORD_STATE: u8 = 3;
/// The checksum chain so far; first record of every segment. Never returned to callers.
pub const RECORD_CRC: u8 = 4;
/// Marks that a snapshot was saved (`walpb.Snapshot`: index, term, configuration).
pub const RECORD_SNAPSHOT: u8 = 5;

/// The snapshot record every new WAL begins with: `walpb.Snapshot{index: 0, term: 0}` as etcd
/// encodes it (both fields written), which etcd's reader asks for when it reads from the start.
pub const EMPTY_SNAPSHOT: [u8; 4] = [0x08, 0x00, 0x10, 0x00];

const SECTOR: usize = 512;
/// A WAL sync slower than this is logged, as etcd's "slow fdatasync" (its `warnSyncDuration`).
const SLOW_SYNC: std::time::Duration = std::time::Duration::from_secs(1);
/// etcd's segment size.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 * 1000 * 1000;

/// One record: a type and its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub kind: u8,
    pub data: Vec<u8>,
}

/// Tunables; the defaults are etcd's.
#[derive(Debug, Clone)]
pub struct WalOptions {
    /// A segment is cut once it holds this many bytes (and preallocated to this size).
    pub segment_bytes: u64,
}

impl Default for WalOptions {
    fn default() -> Self {
        WalOptions { segment_bytes: DEFAULT_SEGMENT_BYTES }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SegmentName {
    seq: u64,
    index: u64,
}

impl SegmentName {
    pub(crate) fn file_name(&self) -> String {
        format!("{:016x}-{:016x}.wal", self.seq, self.index)
    }

    fn parse(name: &str) -> Option<SegmentName> {
        let stem = name.strip_suffix(".wal")?;
        let (a, b) = stem.split_once('-')?;
        if a.len() != 16 || b.len() != 16 {
            return None;
        }
        Some(SegmentName { seq: u64::from_str_radix(a, 16).ok()?, index: u64::from_str_radix(b, 16).ok()? })
    }
}

/// A segment open for reading back records written to it ([`RecordAt::read`]); the
/// descriptor is the writer's, duplicated (reads at an offset do not move it).
#[derive(Debug)]
struct Segment {
    path: PathBuf,
    file: File,
}

impl Segment {
    fn of(path: PathBuf, writer: &File) -> Result<Arc<Segment>> {
        let file = writer.try_clone().map_err(io_err(&path))?;
        Ok(Arc::new(Segment { path, file }))
    }
}

/// Where one record this WAL wrote lies, to read it back later ([`RecordAt::read`]) instead of
/// keeping it in memory. It holds its segment open, but a released segment is truncated step by
/// step all the same (`keel_reclaim`), and reads of its records fail from then on: the caller
/// releases no segment it still reads ([`Wal::release_to`]).
#[derive(Debug, Clone)]
pub struct RecordAt {
    segment: Arc<Segment>,
    offset: u64,
    len: u32,
    /// The checksum chain before the record: its stored checksum continues it.
    chain: u32,
    /// The record's type, which the frame read back must have too.
    kind: u8,
}

impl RecordAt {
    /// The record's data, checked against its checksum as when it was written.
    pub fn read(&self) -> Result<Vec<u8>> {
        let path = &self.segment.path;
        let mut buf = vec![0u8; self.len as usize];
        self.segment.file.read_exact_at(&mut buf, self.offset).map_err(io_err(path))?;
        let reason = match frame::parse(&buf, 0) {
            Parsed::Frame(f) if f.kind != i64::from(self.kind) => {
                format!("reading back a record of type {}: found type {}", self.kind, f.kind)
            }
            Parsed::Frame(f) if crc32c::crc32c_append(self.chain, f.data) == f.crc => return Ok(f.data.to_vec()),
            Parsed::Frame(_) => "checksum mismatch reading back a record".to_string(),
            other => format!("reading back a record: {other:?}"),
        };
        Err(Error::Corrupt { path: path.clone(), offset: self.offset, reason })
    }
}

/// An open write-ahead log, positioned for appending at the end of its last segment.
pub struct Wal {
    dir: PathBuf,
    opts: WalOptions,
    segments: Vec<SegmentName>,
    file: File,
    /// The last segment, for [`RecordAt`]s of records appended to it.
    segment: Arc<Segment>,
    /// Where each record of the last append went, in order.
    placed: Vec<RecordAt>,
    offset: u64,
    /// The checksum chain through the last record written.
    crc: u32,
    metadata: Vec<u8>,
    last_state: Option<Vec<u8>>,
    /// Highest `next_index` seen; names the next segment.
    next_index: u64,
    buf: Vec<u8>,
}

/// Appends a record's frame to `buf`, carrying the checksum chain `crc` on through its data.
fn encode_into(buf: &mut Vec<u8>, crc: &mut u32, kind: u8, data: &[u8]) {
    if kind != RECORD_CRC {
        *crc = crc32c::crc32c_append(*crc, data);
    }
    frame::encode(buf, kind as i64, *crc, data, kind != RECORD_CRC);
}

/// Outcome of scanning one segment's bytes.
struct Scan {
    records: Vec<Record>,
    /// Where each record lies: offset, length of its frame, the checksum chain before it.
    places: Vec<(u64, u32, u32)>,
    /// Offset just past the last good record.
    end: u64,
    /// The checksum chain through the last good record.
    crc: u32,
    /// Why scanning stopped early, if it was not a clean end: (offset, reason, looks torn).
    damage: Option<(u64, String, bool)>,
}

/// Scans a segment. It must begin with a crc record; `chain` is the previous segment's chain,
/// which that record must continue (None for the first segment on disk: the ones before it
/// were released).
fn scan(bytes: &[u8], chain: Option<u32>) -> Scan {
    // `crc` is the chain through the last good record; `end` and `damage` are set on the way out.
    let mut out = Scan { records: Vec::new(), places: Vec::new(), end: 0, crc: 0, damage: None };
    let mut off = 0usize;
    loop {
        let stop = |out: Scan, damage: Option<(String, bool)>| Scan {
            end: off as u64,
            damage: damage.map(|(reason, torn)| (off as u64, reason, torn)),
            ..out
        };
        let f = match frame::parse(bytes, off) {
            Parsed::End => {
                let rest = bytes.get(off..).unwrap_or(&[]);
                // `off` may lie past the end: the last frame's padding was cut off (the file is
                // extended with zeros when it is reopened for writing).
                let damage = if rest.iter().all(|b| *b == 0) {
                    None
                } else if rest.len() < HEADER {
                    Some(("partial length field".to_string(), true))
                } else {
                    Some(("zero length field followed by data".to_string(), false))
                };
                return stop(out, damage);
            }
            Parsed::Short { len } => {
                // A record cut short by the end of the file is torn, unless its length is what is
                // damaged and records written after it are still there.
                let torn = !intact_record_after(bytes, off, out.crc);
                return stop(out, Some((format!("record of {len} bytes runs past the end of the file"), torn)));
            }
            Parsed::Garbled(why) => {
                let torn = looks_torn(bytes, off) && !intact_record_after(bytes, off, out.crc);
                return stop(out, Some((format!("undecodable record: {why}"), torn)));
            }
            Parsed::Frame(f) => f,
        };
        let Ok(kind) = u8::try_from(f.kind).map_err(|_| ()).and_then(|k| if (1..=5).contains(&k) { Ok(k) } else { Err(()) }) else {
            let torn = looks_torn(bytes, off) && !intact_record_after(bytes, off, out.crc);
            return stop(out, Some((format!("unknown record type {}", f.kind), torn)));
        };
        if off == 0 {
            if kind != RECORD_CRC {
                return stop(out, Some(("segment does not start with a crc record".into(), false)));
            }
            if let Some(prev) = chain.filter(|c| *c != 0 && *c != f.crc) {
                return stop(
                    out,
                    Some((format!("crc record {:#010x} does not continue the previous segment's {prev:#010x}", f.crc), false)),
                );
            }
            out.crc = f.crc;
        } else if kind == RECORD_CRC {
            return stop(out, Some(("crc record inside a segment".into(), false)));
        } else {
            let want = crc32c::crc32c_append(out.crc, f.data);
            if want != f.crc {
                let torn = looks_torn(bytes, off) && !intact_record_after(bytes, off, out.crc);
                return stop(out, Some((format!("crc mismatch (stored {:#010x}, computed {want:#010x})", f.crc), torn)));
            }
            let len = f.next.min(bytes.len()) - off;
            out.places.push((off as u64, u32::try_from(len).unwrap_or(u32::MAX), out.crc));
            out.crc = want;
            out.records.push(Record { kind, data: f.data.to_vec() });
        }
        off = f.next;
    }
}

/// A torn write leaves a whole sector unwritten (zeros) inside the damaged frame, or leaves
/// nothing but zeros after it.
fn looks_torn(bytes: &[u8], off: usize) -> bool {
    let field = bytes.get(off..off + HEADER).map(|h| u64::from_le_bytes(h.try_into().unwrap_or([0; 8]))).unwrap_or(0);
    let len = (field & !(0xffu64 << 56)).min(bytes.len() as u64) as usize;
    let end = (off + HEADER).saturating_add(len).next_multiple_of(8).min(bytes.len());
    let mut s = off.div_ceil(SECTOR) * SECTOR;
    while s + SECTOR <= end {
        if bytes[s..s + SECTOR].iter().all(|b| *b == 0) {
            return true;
        }
        s += SECTOR;
    }
    bytes[end..].iter().all(|b| *b == 0)
}

/// True when an intact record lies somewhere after the damaged frame at `off` (frames are
/// 8-byte aligned): a frame whose checksum continues the chain before the damage, or the damaged
/// record's own stored checksum, or a frame followed by one whose checksum continues it. A torn
/// write damages only the last record written, so anything intact after the damage means the
/// damage is corruption (a damaged length field, say, which would otherwise hide every record
/// fsynced after it).
fn intact_record_after(bytes: &[u8], off: usize, chain: u32) -> bool {
    let mut from = vec![chain];
    if let Some(stored) = stored_crc(bytes, off) {
        from.push(stored);
    }
    let mut at = off + 8;
    while at + HEADER <= bytes.len() {
        if let Parsed::Frame(f) = frame::parse(bytes, at) {
            if f.kind != RECORD_CRC as i64 {
                if from.iter().any(|c| crc32c::crc32c_append(*c, f.data) == f.crc) {
                    return true;
                }
                if let Parsed::Frame(g) = frame::parse(bytes, f.next) {
                    if g.kind != RECORD_CRC as i64 && crc32c::crc32c_append(f.crc, g.data) == g.crc {
                        return true;
                    }
                }
            }
        }
        at += 8;
    }
    false
}

/// The crc field of the (damaged) record at `off`, when its first bytes still decode: etcd's
/// encoder writes the type, then the crc.
fn stored_crc(bytes: &[u8], off: usize) -> Option<u32> {
    let mut b = bytes.get(off + HEADER..)?;
    if b.first() != Some(&0x08) {
        return None;
    }
    b = &b[1..];
    prost::encoding::decode_varint(&mut b).ok()?;
    if b.first() != Some(&0x10) {
        return None;
    }
    b = &b[1..];
    u32::try_from(prost::encoding::decode_varint(&mut b).ok()?).ok()
}

impl Wal {
    /// True if `dir` holds at least one WAL segment.
    pub fn exists(dir: &Path) -> bool {
        list_segments(dir).map(|s| !s.is_empty()).unwrap_or(false)
    }

    /// Creates a new WAL in `dir` (which must hold no segment) whose segments all begin with
    /// `metadata`.
    pub fn create(dir: &Path, metadata: &[u8], opts: WalOptions) -> Result<Wal> {
        crate::create_dir_all_durable(dir)?;
        if !list_segments(dir)?.is_empty() {
            return Err(Error::Invalid(format!("{} already holds a WAL", dir.display())));
        }
        let name = SegmentName { seq: 0, index: 0 };
        // As etcd: the first segment holds the empty snapshot record after the metadata.
        let (file, offset, crc) = create_segment(dir, name, &opts, 0, metadata, RECORD_SNAPSHOT, Some(&EMPTY_SNAPSHOT))?;
        let segment = Segment::of(dir.join(name.file_name()), &file)?;
        Ok(Wal {
            dir: dir.to_path_buf(),
            opts,
            segments: vec![name],
            file,
            segment,
            placed: Vec::new(),
            offset,
            crc,
            metadata: metadata.to_vec(),
            last_state: None,
            next_index: 0,
            buf: Vec::new(),
        })
    }

    /// Opens the WAL in `dir`, checks every record and returns them in order. A torn tail of the
    /// last segment is cut off (with a warning); other damage is an error.
    pub fn open(dir: &Path, opts: WalOptions) -> Result<(Wal, Vec<Record>)> {
        Wal::open_placed(dir, opts).map(|(wal, records, _)| (wal, records))
    }

    /// [`Wal::open`], also telling where each record returned lies, to read it back later.
    pub fn open_placed(dir: &Path, opts: WalOptions) -> Result<(Wal, Vec<Record>, Vec<RecordAt>)> {
        let segments = list_segments(dir)?;
        if segments.is_empty() {
            return Err(Error::Invalid(format!("no WAL segment in {}", dir.display())));
        }
        for pair in segments.windows(2) {
            if pair[1].seq != pair[0].seq + 1 {
                return Err(Error::Invalid(format!(
                    "WAL segments out of sequence in {}: {} followed by {}",
                    dir.display(),
                    pair[0].file_name(),
                    pair[1].file_name()
                )));
            }
        }
        let (all, places, tail_end, crc) = read_segments(dir, &segments, ReadFor::Opening)?;
        let metadata = all.first().map(|r| r.data.clone()).unwrap_or_default();
        let last_state = all.iter().rev().find(|r| r.kind == RECORD_STATE).map(|r| r.data.clone());
        let last = *segments.last().ok_or_else(|| Error::Invalid("no segment".into()))?;
        let path = dir.join(last.file_name());
        let file = OpenOptions::new().read(true).write(true).open(&path).map_err(io_err(&path))?;
        // Zero everything after the last good record, so that stale bytes can never be read back as
        // records once new ones are appended in front of them.
        let len = file.metadata().map_err(io_err(&path))?.len();
        if len > tail_end {
            file.set_len(tail_end).map_err(io_err(&path))?;
        }
        preallocate(&file, opts.segment_bytes.max(tail_end)).map_err(io_err(&path))?;
        file.sync_all().map_err(io_err(&path))?;
        let next_index = last.index;
        let segment = Segment::of(path, &file)?;
        let wal = Wal {
            dir: dir.to_path_buf(),
            opts,
            segments,
            file,
            segment,
            placed: Vec::new(),
            offset: tail_end,
            crc,
            metadata,
            last_state,
            next_index,
            buf: Vec::new(),
        };
        Ok((wal, all, places))
    }

    /// Every record of the WAL in `dir`, in order, changing nothing on disk (a torn tail of the
    /// last segment ends the log; other damage is an error). For reading another member's WAL.
    pub fn read(dir: &Path) -> Result<Vec<Record>> {
        let segments = segments_in(dir, true)?;
        if segments.is_empty() {
            return Err(Error::Invalid(format!("no WAL segment in {}", dir.display())));
        }
        Ok(read_segments(dir, &segments, ReadFor::Reading)?.0)
    }

    /// Appends `records` and makes them durable (fdatasync) before returning. `next_index` is the
    /// index the next raft entry after these records would get (0 if unknown); the highest one
    /// seen names the next segment, so a segment's name never exceeds the entries before it.
    pub fn save(&mut self, records: &[(u8, &[u8])], next_index: u64) -> Result<()> {
        self.append(records, next_index, true)
    }

    /// Appends `records` without waiting for them to be durable: the next [`Wal::save`] makes
    /// them so, and a power cut before it may lose them (torn-tail repair drops a partial one).
    /// For what raft does not need durable, as etcd's `MustSync` decides: a hard state that only
    /// moves the commit index. A write that fills the segment is synced all the same.
    pub fn write(&mut self, records: &[(u8, &[u8])], next_index: u64) -> Result<()> {
        self.append(records, next_index, false)
    }

    fn append(&mut self, records: &[(u8, &[u8])], next_index: u64, sync: bool) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        self.next_index = self.next_index.max(next_index);
        self.buf.clear();
        self.placed.clear();
        let mut crc = self.crc;
        for (kind, data) in records {
            if *kind == RECORD_CRC {
                return Err(Error::Invalid("crc records are the WAL's own".into()));
            }
            let (at, chain) = (self.buf.len(), crc);
            encode_into(&mut self.buf, &mut crc, *kind, data);
            let len = u32::try_from(self.buf.len() - at).map_err(|_| Error::Invalid(format!("a record of {} bytes", data.len())))?;
            self.placed.push(RecordAt { segment: self.segment.clone(), offset: self.offset + at as u64, len, chain, kind: *kind });
            if *kind == RECORD_STATE {
                self.last_state = Some(data.to_vec());
            }
        }
        let path = self.current_path();
        let w0 = std::time::Instant::now();
        self.file.seek(SeekFrom::Start(self.offset)).map_err(io_err(&path))?;
        self.file.write_all(&self.buf).map_err(io_err(&path))?;
        self.offset += self.buf.len() as u64;
        self.crc = crc;
        if let Some(observe) = crate::WRITE_OBSERVER.get() {
            observe(self.buf.len(), w0.elapsed());
        }
        if !sync && self.offset < self.opts.segment_bytes {
            return Ok(());
        }
        #[cfg(feature = "failpoints")]
        fail::fail_point!("wal::before_fsync", |_| std::process::abort());
        let t0 = std::time::Instant::now();
        // Negative control of the power-loss tests (failpoints builds only): skip the fsync.
        #[cfg(feature = "failpoints")]
        let skip = (|| {
            fail::fail_point!("wal::skip_fsync", |_| true);
            false
        })();
        #[cfg(not(feature = "failpoints"))]
        let skip = false;
        if !skip {
            if self.offset > self.opts.segment_bytes {
                // The file grew past its preallocation: extend metadata too.
                self.file.sync_all().map_err(io_err(&path))?;
            } else {
                self.file.sync_data().map_err(io_err(&path))?;
            }
        }
        let took = t0.elapsed();
        if took > SLOW_SYNC {
            tracing::warn!(took = ?took, expected_duration = ?SLOW_SYNC, "slow fdatasync");
        }
        if let Some(observe) = crate::FSYNC_OBSERVER.get() {
            observe(took);
        }
        #[cfg(feature = "failpoints")]
        fail::fail_point!("wal::after_fsync", |_| std::process::abort());
        if self.offset >= self.opts.segment_bytes {
            self.cut(self.next_index)?;
        }
        Ok(())
    }

    fn current_path(&self) -> PathBuf {
        match self.segments.last() {
            Some(s) => self.dir.join(s.file_name()),
            None => self.dir.clone(),
        }
    }

    /// Starts a new segment; as etcd's, it begins with the checksum chain so far, the metadata
    /// and the latest hard state.
    fn cut(&mut self, next_index: u64) -> Result<()> {
        let seq = self.segments.last().map(|s| s.seq + 1).unwrap_or(0);
        #[cfg(feature = "failpoints")]
        fail::fail_point!("wal::cut", |_| std::process::abort());
        let name = SegmentName { seq, index: next_index };
        let (file, offset, crc) =
            create_segment(&self.dir, name, &self.opts, self.crc, &self.metadata, RECORD_STATE, self.last_state.as_deref())?;
        self.segment = Segment::of(self.dir.join(name.file_name()), &file)?;
        self.offset = offset;
        self.crc = crc;
        self.file = file;
        self.segments.push(name);
        tracing::info!(segment = %name.file_name(), "wal: cut a new segment");
        Ok(())
    }

    /// Removes segments that hold only entries at or below `index` (a snapshot covers them).
    /// The last segment is always kept.
    pub fn release_to(&mut self, index: u64) -> Result<()> {
        let mut removable = 0;
        for i in 0..self.segments.len().saturating_sub(1) {
            if self.segments[i + 1].index <= index + 1 {
                removable = i + 1;
            }
        }
        for seg in self.segments.drain(..removable) {
            let path = self.dir.join(seg.file_name());
            // Its blocks go back in steps: a 64 MB segment freed at once held the next fsyncs
            // for ~65 ms.
            keel_reclaim::remove(&path).map_err(io_err(&path))?;
            tracing::info!(segment = %seg.file_name(), "wal: released segment covered by a snapshot");
        }
        if removable > 0 {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Where each record of the last [`Wal::save`] or [`Wal::write`] went, in the order given.
    pub fn placed(&self) -> &[RecordAt] {
        &self.placed
    }

    /// The names of the segments currently on disk, oldest first.
    pub fn segment_files(&self) -> Vec<String> {
        self.segments.iter().map(|s| s.file_name()).collect()
    }

    /// The metadata every segment begins with.
    pub fn metadata(&self) -> &[u8] {
        &self.metadata
    }
}

/// Why the segments are read: to open the WAL for appending (a torn tail is repaired, and
/// each record's place is kept to read it back later) or only to read them (neither).
#[derive(Clone, Copy, PartialEq, Eq)]
enum ReadFor {
    Opening,
    Reading,
}

/// Reads and checks `segments` of `dir` in order: every record but the crc records, the offset
/// just past the last good record of the last segment, and the checksum chain there. With
/// [`ReadFor::Opening`], a torn tail of the last segment is reported as one to be cut off, and
/// each record's place is returned; [`ReadFor::Reading`] reads only: a torn tail just ends the
/// log, and no place is kept.
fn read_segments(dir: &Path, segments: &[SegmentName], read_for: ReadFor) -> Result<(Vec<Record>, Vec<RecordAt>, u64, u32)> {
    let repair = read_for == ReadFor::Opening;
    let mut all = Vec::new();
    let mut places = Vec::new();
    let mut tail_end = 0u64;
    let mut chain = None;
    let mut metadata: Option<Vec<u8>> = None;
    // One buffer for every segment: each is as long as its preallocation (64 MB by default), and
    // fresh memory is what reading them mostly cost (the kernel zeroing the pages it faults in).
    let mut bytes = Vec::new();
    for (i, seg) in segments.iter().enumerate() {
        let path = dir.join(seg.file_name());
        let mut file = File::open(&path).map_err(io_err(&path))?;
        bytes.clear();
        file.read_to_end(&mut bytes).map_err(io_err(&path))?;
        let s = scan(&bytes, chain);
        let last = i + 1 == segments.len();
        if let Some((offset, reason, torn)) = s.damage {
            if last && torn {
                if repair {
                    tracing::warn!(file = %path.display(), offset, reason = %reason, "wal: torn last record; truncating the tail of the WAL");
                } else {
                    tracing::warn!(file = %path.display(), offset, reason = %reason, "wal: torn last record ends the log");
                }
            } else {
                return Err(Error::Corrupt { path, offset, reason });
            }
        }
        match (s.records.first(), &metadata) {
            (Some(r), None) if r.kind == RECORD_METADATA => metadata = Some(r.data.clone()),
            (Some(r), Some(m)) if r.kind == RECORD_METADATA && r.data != *m => {
                return Err(Error::Corrupt { path, offset: 0, reason: "metadata differs from the first segment's".into() });
            }
            (Some(r), Some(_)) if r.kind == RECORD_METADATA => {}
            _ => return Err(Error::Corrupt { path, offset: 0, reason: "segment does not start with metadata".into() }),
        }
        chain = Some(s.crc);
        if last {
            tail_end = s.end;
        }
        if read_for == ReadFor::Opening {
            let segment = Arc::new(Segment { path, file });
            // One place per record, in order (`scan` pushes both together).
            places.extend(s.places.iter().zip(&s.records).map(|(&(offset, len, chain), r)| RecordAt {
                segment: segment.clone(),
                offset,
                len,
                chain,
                kind: r.kind,
            }));
        }
        all.extend(s.records);
    }
    Ok((all, places, tail_end, chain.unwrap_or(0)))
}

/// Reserves `len` bytes of disk for `f` (zero-filled) so that appends never wait for block
/// allocation; falls back to a sparse file where the filesystem cannot preallocate.
fn preallocate(f: &File, len: u64) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: fallocate on a valid, open file descriptor owned by `f`; no memory is shared.
        let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, len as libc::off_t) };
        if r == 0 {
            return Ok(());
        }
    }
    f.set_len(len)
}

/// Creates segment `name` durably: a crc record carrying `crc` on, the metadata, then
/// (`third_kind`, `third`) if given. Returns it open, the offset after its records and the chain.
fn create_segment(
    dir: &Path,
    name: SegmentName,
    opts: &WalOptions,
    crc: u32,
    metadata: &[u8],
    third_kind: u8,
    third: Option<&[u8]>,
) -> Result<(File, u64, u32)> {
    let tmp = dir.join(format!("{}.tmp", name.file_name()));
    let fin = dir.join(name.file_name());
    let mut f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&tmp).map_err(io_err(&tmp))?;
    let mut buf = Vec::new();
    let mut crc = crc;
    encode_into(&mut buf, &mut crc, RECORD_CRC, &[]);
    encode_into(&mut buf, &mut crc, RECORD_METADATA, metadata);
    if let Some(s) = third {
        encode_into(&mut buf, &mut crc, third_kind, s);
    }
    f.write_all(&buf).map_err(io_err(&tmp))?;
    preallocate(&f, opts.segment_bytes.max(buf.len() as u64)).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, &fin).map_err(io_err(&fin))?;
    sync_dir(dir)?;
    Ok((f, buf.len() as u64, crc))
}

/// The segments in `dir` by sequence. `.tmp` files (a segment whose creation did not finish, or
/// etcd's next preallocated segment) are removed, unless `read_only`.
pub(crate) fn list_segments(dir: &Path) -> Result<Vec<SegmentName>> {
    segments_in(dir, false)
}

fn segments_in(dir: &Path, read_only: bool) -> Result<Vec<SegmentName>> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::Io { path: dir.to_path_buf(), source: e }),
    };
    let mut out = Vec::new();
    for ent in rd {
        let ent = ent.map_err(io_err(dir))?;
        let name = ent.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".tmp") && !read_only {
            // A segment whose creation did not finish: never held acknowledged data.
            let _ = fs::remove_file(ent.path());
            continue;
        }
        if let Some(s) = SegmentName::parse(&name) {
            out.push(s);
        }
    }
    out.sort_by_key(|s| s.seq);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> WalOptions {
        WalOptions { segment_bytes: 4096 }
    }

    fn entries(wal: &mut Wal, from: u64, to: u64) {
        for i in from..=to {
            let data = format!("entry-{i:08}-{}", "x".repeat(100));
            wal.save(&[(RECORD_ENTRY, data.as_bytes())], i + 1).expect("save");
        }
    }

    #[test]
    fn unsynced_writes_keep_the_order_and_chain_and_fill_segments() {
        let d = tempfile::tempdir().unwrap();
        let mut w = Wal::create(d.path(), b"meta", small()).unwrap();
        for i in 1..=60u64 {
            let data = format!("entry-{i:08}-{}", "x".repeat(100));
            w.save(&[(RECORD_ENTRY, data.as_bytes())], i + 1).unwrap();
            w.write(&[(RECORD_STATE, format!("commit-{i}").as_bytes())], 0).unwrap();
        }
        assert!(w.segment_files().len() > 1, "unsynced writes cut segments too");
        drop(w);
        let (_, recs) = Wal::open(d.path(), small()).unwrap();
        let states: Vec<_> = recs.iter().filter(|r| r.kind == RECORD_STATE && r.data.starts_with(b"commit-")).collect();
        assert_eq!(states.last().map(|r| r.data.clone()), Some(b"commit-60".to_vec()));
        assert_eq!(recs.iter().filter(|r| r.kind == RECORD_ENTRY).count(), 60);
    }

    /// Every record's place, across segment cuts and a reopen, reads back what was written;
    /// a byte changed on disk under one is reported as corruption naming the file and offset.
    #[test]
    fn placed_records_read_back_across_segments() {
        let d = tempfile::tempdir().unwrap();
        let mut w = Wal::create(d.path(), b"meta", small()).unwrap();
        let mut placed = Vec::new();
        for i in 1..=60u64 {
            let data = format!("entry-{i:08}-{}", "x".repeat(100));
            w.save(&[(RECORD_ENTRY, data.as_bytes()), (RECORD_STATE, b"hs")], i + 1).unwrap();
            assert_eq!(w.placed().len(), 2);
            placed.push((data, w.placed()[0].clone()));
            assert_eq!(w.placed()[1].read().unwrap(), b"hs");
        }
        assert!(w.segment_files().len() >= 3, "the records span several segments");
        drop(w);
        let (mut w, records, places) = Wal::open_placed(d.path(), small()).unwrap();
        assert_eq!(records.len(), places.len());
        for (r, at) in records.iter().zip(&places) {
            assert_eq!(at.read().unwrap(), r.data, "a recovered record's place reads it back");
        }
        w.save(&[(RECORD_ENTRY, b"after reopen")], 62).unwrap();
        placed.push(("after reopen".to_string(), w.placed()[0].clone()));
        for (data, at) in &placed {
            assert_eq!(at.read().unwrap(), data.as_bytes());
        }
        // A flipped byte inside the tenth record's data.
        let at = &placed[9].1;
        at.segment.file.write_all_at(b"?", at.offset + at.len as u64 - 20).unwrap();
        let err = at.read().unwrap_err().to_string();
        assert!(err.contains(&at.segment.path.display().to_string()) && err.contains(&format!("offset {}", at.offset)), "{err}");
        assert_eq!(placed[10].1.read().unwrap(), placed[10].0.as_bytes());
        // A place that says another type than the frame it finds (an entry read as a state).
        let wrong = RecordAt { kind: RECORD_STATE, ..placed[10].1.clone() };
        let err = wrong.read().unwrap_err().to_string();
        assert!(err.contains("found type"), "{err}");
    }

    #[test]
    fn roundtrip_and_segments() {
        let d = tempfile::tempdir().unwrap();
        let mut w = Wal::create(d.path(), b"meta", small()).unwrap();
        entries(&mut w, 1, 100);
        w.save(&[(RECORD_STATE, b"hs")], 101).unwrap();
        let segs = w.segment_files();
        assert!(segs.len() > 2, "expected several segments, got {segs:?}");
        drop(w);
        let (w, recs) = Wal::open(d.path(), small()).unwrap();
        let ents: Vec<_> = recs.iter().filter(|r| r.kind == RECORD_ENTRY).collect();
        assert_eq!(ents.len(), 100);
        assert!(ents[99].data.starts_with(b"entry-00000100"));
        assert_eq!(w.metadata(), b"meta");
    }

    #[test]
    fn release_keeps_needed_segments() {
        let d = tempfile::tempdir().unwrap();
        let mut w = Wal::create(d.path(), b"meta", small()).unwrap();
        entries(&mut w, 1, 100);
        let before = w.segment_files().len();
        w.release_to(60).unwrap();
        assert!(w.segment_files().len() < before);
        drop(w);
        let (_, recs) = Wal::open(d.path(), small()).unwrap();
        let first = recs.iter().find(|r| r.kind == RECORD_ENTRY).unwrap();
        let idx: u64 = std::str::from_utf8(&first.data[6..14]).unwrap().parse().unwrap();
        assert!(idx <= 61, "entry 61 must survive release_to(60), first is {idx}");
    }

    /// A WAL in `dir` with 10 entries whose last record is cut in half; its segment's path.
    fn torn_after_ten(dir: &Path) -> PathBuf {
        let mut w = Wal::create(dir, b"meta", WalOptions::default()).unwrap();
        entries(&mut w, 1, 10);
        let end = w.offset;
        drop(w);
        let path = dir.join(SegmentName { seq: 0, index: 0 }.file_name());
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(end - 50).unwrap();
        path
    }

    #[test]
    fn torn_tail_is_truncated() {
        let d = tempfile::tempdir().unwrap();
        torn_after_ten(d.path());
        let (mut w, recs) = Wal::open(d.path(), WalOptions::default()).unwrap();
        assert_eq!(recs.iter().filter(|r| r.kind == RECORD_ENTRY).count(), 9);
        entries(&mut w, 10, 12);
        drop(w);
        let (_, recs) = Wal::open(d.path(), WalOptions::default()).unwrap();
        assert_eq!(recs.iter().filter(|r| r.kind == RECORD_ENTRY).count(), 12);
    }

    /// Regression (found by the `wal_decode` fuzz target): a file that ends inside the padding of
    /// its last, intact record made the scanner slice past the end and panic.
    #[test]
    fn file_ending_inside_padding_opens_and_appends() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join(SegmentName { seq: 0, index: 0 }.file_name());
        let mut bytes = Vec::new();
        let mut crc = 0;
        encode_into(&mut bytes, &mut crc, RECORD_CRC, &[]);
        encode_into(&mut bytes, &mut crc, RECORD_METADATA, b"m");
        encode_into(&mut bytes, &mut crc, RECORD_ENTRY, b"0123456789");
        assert!(bytes.len() % 8 == 0 && bytes.ends_with(&[0]), "the last record is padded");
        bytes.truncate(bytes.len() - 1);
        std::fs::write(&path, &bytes).unwrap();
        let (mut w, recs) = Wal::open(d.path(), small()).unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(w.crc, crc, "the chain goes on from the last record");
        w.save(&[(RECORD_ENTRY, b"next")], 0).unwrap();
        drop(w);
        let (_, recs) = Wal::open(d.path(), small()).unwrap();
        assert_eq!(recs.len(), 3);
        assert_eq!(recs[2].data, b"next");
    }

    #[test]
    fn garbage_in_last_record_is_torn() {
        let d = tempfile::tempdir().unwrap();
        let mut w = Wal::create(d.path(), b"meta", WalOptions::default()).unwrap();
        entries(&mut w, 1, 10);
        let end = w.offset;
        drop(w);
        let path = d.path().join(SegmentName { seq: 0, index: 0 }.file_name());
        let mut bytes = fs::read(&path).unwrap();
        bytes[end as usize - 20] ^= 0xff;
        fs::write(&path, &bytes).unwrap();
        let (_, recs) = Wal::open(d.path(), WalOptions::default()).unwrap();
        assert_eq!(recs.iter().filter(|r| r.kind == RECORD_ENTRY).count(), 9);
    }

    /// Regression: a damaged length field in the last segment was taken for a torn tail (the
    /// record it announced ran over zeros), and every record fsynced after it was cut off with a
    /// warning. Records after the damage are intact, so it is corruption, reported with file and
    /// offset.
    #[test]
    fn damaged_length_in_last_segment_is_corruption_not_a_torn_tail() {
        let d = tempfile::tempdir().unwrap();
        let mut w = Wal::create(d.path(), b"meta", WalOptions::default()).unwrap();
        entries(&mut w, 1, 10);
        w.save(&[(RECORD_STATE, b"vote")], 11).unwrap();
        drop(w);
        let path = d.path().join(SegmentName { seq: 0, index: 0 }.file_name());
        let bytes = fs::read(&path).unwrap();
        // The fifth entry's length (records: crc, metadata, empty snapshot, entries 1..10, state).
        let mut off = 0usize;
        for _ in 0..7 {
            let Parsed::Frame(f) = frame::parse(&bytes, off) else { panic!("no frame at {off}") };
            off = f.next;
        }
        for (len, what) in [(4000u64, "longer, over later records"), (1u64 << 20, "longer, over the zeros after them")] {
            let mut b = bytes.clone();
            b[off..off + 8].copy_from_slice(&len.to_le_bytes());
            fs::write(&path, &b).unwrap();
            match Wal::open(d.path(), WalOptions::default()) {
                Err(Error::Corrupt { path: p, offset, .. }) => {
                    assert_eq!(p, path, "{what}");
                    assert_eq!(offset, off as u64, "{what}");
                }
                Err(e) => panic!("{what}: unexpected error {e}"),
                Ok((_, recs)) => panic!("{what}: opened as a torn tail with {} records", recs.len()),
            }
        }
    }

    #[test]
    fn flipped_byte_in_middle_is_corruption() {
        let d = tempfile::tempdir().unwrap();
        let mut w = Wal::create(d.path(), b"meta", WalOptions::default()).unwrap();
        entries(&mut w, 1, 10);
        drop(w);
        let path = d.path().join(SegmentName { seq: 0, index: 0 }.file_name());
        let mut bytes = fs::read(&path).unwrap();
        bytes[200] ^= 0x01;
        fs::write(&path, &bytes).unwrap();
        match Wal::open(d.path(), WalOptions::default()) {
            Err(Error::Corrupt { path: p, offset, .. }) => {
                assert_eq!(p, path);
                assert!(offset <= 200);
            }
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("corruption was not detected"),
        }
    }

    #[test]
    fn flipped_byte_in_closed_segment_is_corruption() {
        let d = tempfile::tempdir().unwrap();
        let mut w = Wal::create(d.path(), b"meta", small()).unwrap();
        entries(&mut w, 1, 100);
        let first = d.path().join(w.segment_files()[0].clone());
        drop(w);
        let mut bytes = fs::read(&first).unwrap();
        // Damage the last record of the closed first segment: still corruption, not a torn tail.
        let s = scan(&bytes, None);
        bytes[s.end as usize - 10] ^= 0x01;
        fs::write(&first, &bytes).unwrap();
        assert!(matches!(Wal::open(d.path(), small()), Err(Error::Corrupt { .. })));
    }

    #[test]
    fn the_chain_continues_across_segments_and_a_broken_link_is_corruption() {
        let d = tempfile::tempdir().unwrap();
        let mut w = Wal::create(d.path(), b"meta", small()).unwrap();
        entries(&mut w, 1, 100);
        let segs = w.segment_files();
        drop(w);
        let second = d.path().join(&segs[1]);
        let mut bytes = fs::read(&second).unwrap();
        let Parsed::Frame(f) = frame::parse(&bytes, 0) else { panic!("no crc record") };
        assert_eq!(f.kind, RECORD_CRC as i64);
        assert_ne!(f.crc, 0, "a later segment carries the chain on");
        // The crc record's frame: length field, 0x08 4 (type), 0x10 then the chain as a varint.
        // Flipping its low bit keeps its encoded length: the link is broken, nothing else.
        assert_eq!(&bytes[8..11], &[0x08, 0x04, 0x10]);
        bytes[11] ^= 0x01;
        fs::write(&second, &bytes).unwrap();
        match Wal::open(d.path(), small()) {
            Err(Error::Corrupt { path, offset, .. }) => assert_eq!((path, offset), (second, 0)),
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("a broken chain was not detected"),
        }
    }

    #[test]
    fn read_changes_nothing_and_stops_at_a_torn_tail() {
        let d = tempfile::tempdir().unwrap();
        let path = torn_after_ten(d.path());
        let before = fs::read(&path).unwrap();
        let recs = Wal::read(d.path()).unwrap();
        assert_eq!(recs.iter().filter(|r| r.kind == RECORD_ENTRY).count(), 9);
        assert_eq!(recs[0], Record { kind: RECORD_METADATA, data: b"meta".to_vec() });
        assert_eq!(recs[1], Record { kind: RECORD_SNAPSHOT, data: EMPTY_SNAPSHOT.to_vec() });
        assert_eq!(fs::read(&path).unwrap(), before);
    }
}
