//! fs: the FUSE adapter: kernel requests onto the [`Tree`], with the armed [`Faults`].
//!
//! Everything is in memory. The kernel caches nothing (attribute and entry TTLs of zero, direct
//! I/O on every open file), so what programs see is the tree's visible state at every moment,
//! also right after a power cut. Owns the [`Shared`] state; [`crate::control`] takes the same
//! lock to cut power or arm faults.

use crate::faults::{Faults, Op};
use crate::tree::{Node, Tree, ROOT};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use parking_lot::Mutex;
use std::ffi::OsStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// The filesystem's state, shared by the FUSE thread and the control channel.
#[derive(Default)]
pub struct State {
    pub tree: Tree,
    pub faults: Faults,
}

pub type Shared = Arc<Mutex<State>>;

pub struct PowerFs {
    state: Shared,
}

impl PowerFs {
    pub fn new(state: Shared) -> PowerFs {
        PowerFs { state }
    }
}

const TTL: Duration = Duration::ZERO;

fn errno(e: i32) -> Errno {
    Errno::from_i32(e)
}

fn attr(tree: &Tree, ino: u64) -> Option<FileAttr> {
    let i = tree.get(ino)?;
    let (kind, size, nlink) = match &i.node {
        Node::File(c) => (FileType::RegularFile, c.len(), 1),
        Node::Dir { .. } => (FileType::Directory, 4096, 2),
    };
    Some(FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size.div_ceil(512),
        atime: i.mtime,
        mtime: i.mtime,
        ctime: i.mtime,
        crtime: i.mtime,
        kind,
        perm: i.perm,
        nlink,
        uid: i.uid,
        gid: i.gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    })
}

impl State {
    /// Whether file `ino` may take `new_len` bytes: its errno when not (not a file, or the
    /// capacity would be passed). Shrinking is always allowed.
    fn may_grow(&mut self, ino: u64, new_len: u64) -> Result<(), i32> {
        let used = self.tree.used();
        let len = self.tree.file_mut(ino)?.len();
        if self.faults.full(used, used - len + new_len.max(len)) {
            return Err(libc::ENOSPC);
        }
        Ok(())
    }

    /// The errno an operation on `ino` fails with now, if a fault is armed for it.
    fn fault(&mut self, op: Op, ino: u64) -> Option<i32> {
        let path = if self.faults.wants_path() { self.tree.path_of(ino) } else { None };
        self.faults.check(op, path.as_deref())
    }
}

impl Filesystem for PowerFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let s = self.state.lock();
        match s.tree.lookup(parent.0, name).ok().and_then(|i| attr(&s.tree, i)) {
            Some(a) => reply.entry(&TTL, &a, Generation(0)),
            None => reply.error(errno(libc::ENOENT)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match attr(&self.state.lock().tree, ino.0) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(errno(libc::ENOENT)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut s = self.state.lock();
        if let Some(n) = size {
            if let Err(e) = s.may_grow(ino.0, n) {
                return reply.error(errno(e));
            }
            if let Ok(c) = s.tree.file_mut(ino.0) {
                c.set_len(n);
            }
        }
        let Some(i) = s.tree.get_mut(ino.0) else { return reply.error(errno(libc::ENOENT)) };
        if let Some(m) = mode {
            i.perm = (m & 0o7777) as u16;
        }
        if let Some(u) = uid {
            i.uid = u;
        }
        if let Some(g) = gid {
            i.gid = g;
        }
        match mtime {
            Some(TimeOrNow::SpecificTime(t)) => i.mtime = t,
            Some(TimeOrNow::Now) => i.mtime = SystemTime::now(),
            None if size.is_some() => i.mtime = SystemTime::now(),
            None => {}
        }
        match attr(&s.tree, ino.0) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(errno(libc::ENOENT)),
        }
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let mut s = self.state.lock();
        let perm = (mode & !umask & 0o7777) as u16;
        match s.tree.create(parent.0, name, true, perm, req.uid(), req.gid()) {
            Ok(i) => match attr(&s.tree, i) {
                Some(a) => reply.entry(&TTL, &a, Generation(0)),
                None => reply.error(errno(libc::EIO)),
            },
            Err(e) => reply.error(errno(e)),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.state.lock().tree.remove(parent.0, name, false) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.state.lock().tree.remove(parent.0, name, true) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.intersects(RenameFlags::RENAME_EXCHANGE | RenameFlags::RENAME_WHITEOUT) {
            return reply.error(errno(libc::EINVAL));
        }
        let noreplace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        match self.state.lock().tree.rename(parent.0, name, newparent.0, newname, noreplace) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let mut s = self.state.lock();
        if s.tree.get(ino.0).is_none() {
            return reply.error(errno(libc::ENOENT));
        }
        s.tree.opened(ino.0);
        reply.opened(FileHandle(ino.0), FopenFlags::FOPEN_DIRECT_IO);
    }

    fn create(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, _flags: i32, reply: ReplyCreate) {
        let mut s = self.state.lock();
        let perm = (mode & !umask & 0o7777) as u16;
        match s.tree.create(parent.0, name, false, perm, req.uid(), req.gid()) {
            Ok(i) => {
                s.tree.opened(i);
                match attr(&s.tree, i) {
                    Some(a) => reply.created(&TTL, &a, Generation(0), FileHandle(i), FopenFlags::FOPEN_DIRECT_IO),
                    None => reply.error(errno(libc::EIO)),
                }
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let mut s = self.state.lock();
        if let Some(e) = s.fault(Op::Read, ino.0) {
            return reply.error(errno(e));
        }
        match s.tree.file_mut(ino.0) {
            Ok(c) => reply.data(&c.read(offset, size as u64)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut s = self.state.lock();
        if let Some(e) = s.fault(Op::Write, ino.0) {
            return reply.error(errno(e));
        }
        if let Err(e) = s.may_grow(ino.0, offset + data.len() as u64) {
            return reply.error(errno(e));
        }
        if let Ok(c) = s.tree.file_mut(ino.0) {
            c.write(offset, data);
        }
        if let Some(i) = s.tree.get_mut(ino.0) {
            i.mtime = SystemTime::now();
        }
        reply.written(data.len() as u32);
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.state.lock().tree.released(ino.0);
        reply.ok();
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let mut s = self.state.lock();
        let fault = s.fault(Op::Fsync, ino.0);
        match s.tree.file_mut(ino.0) {
            Ok(c) => match fault {
                Some(e) => {
                    c.fail_sync();
                    reply.error(errno(e))
                }
                None => {
                    c.sync();
                    reply.ok()
                }
            },
            Err(e) => reply.error(errno(e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.state.lock().tree.get(ino.0) {
            Some(i) if i.is_dir() => reply.opened(FileHandle(ino.0), FopenFlags::empty()),
            Some(_) => reply.error(errno(libc::ENOTDIR)),
            None => reply.error(errno(libc::ENOENT)),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let s = self.state.lock();
        let entries = match s.tree.entries(ino.0) {
            Ok(e) => e,
            Err(e) => return reply.error(errno(e)),
        };
        let mut all =
            vec![(OsStr::new(".").to_owned(), ino.0, FileType::Directory), (OsStr::new("..").to_owned(), ROOT, FileType::Directory)];
        for (name, i) in entries {
            let kind = if s.tree.get(i).is_some_and(|n| n.is_dir()) { FileType::Directory } else { FileType::RegularFile };
            all.push((name, i, kind));
        }
        for (n, (name, i, kind)) in all.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(i), n as u64 + 1, kind, &name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let mut s = self.state.lock();
        if let Some(e) = s.fault(Op::Fsync, ino.0) {
            return reply.error(errno(e));
        }
        match s.tree.sync_dir(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let s = self.state.lock();
        let total = s.faults.capacity().unwrap_or(64 << 30) / 4096;
        let used = s.tree.used() / 4096;
        let free = total.saturating_sub(used);
        reply.statfs(total, free, free, 1 << 20, 1 << 20, 4096, 255, 4096);
    }

    fn fallocate(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, length: u64, mode: i32, reply: ReplyEmpty) {
        let mut s = self.state.lock();
        if mode & !libc::FALLOC_FL_KEEP_SIZE != 0 {
            return reply.error(errno(libc::EOPNOTSUPP));
        }
        let want = offset + length;
        if mode & libc::FALLOC_FL_KEEP_SIZE != 0 {
            return match s.tree.file_mut(ino.0) {
                Ok(_) => reply.ok(),
                Err(e) => reply.error(errno(e)),
            };
        }
        if let Err(e) = s.may_grow(ino.0, want) {
            return reply.error(errno(e));
        }
        if let Ok(c) = s.tree.file_mut(ino.0) {
            if want > c.len() {
                c.set_len(want);
            }
        }
        reply.ok();
    }
}
