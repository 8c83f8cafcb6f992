//! tree: the filesystem's inodes and directories, visible and durable, and the power cut.
//!
//! Pure data structure (no I/O). A directory has *visible* entries (what lookups and listings
//! see, changed at once by create, unlink, rename, mkdir, rmdir) and *durable* entries (the
//! visible ones as of its last fsync). A power cut makes every directory's durable entries its
//! visible ones, drops every file's unsynced content ([`crate::content`]) and forgets inodes no
//! durable entry reaches. An inode lives while a visible or durable entry names it or a handle
//! holds it open. Inode numbers are never reused, so the kernel's stale ones fail cleanly.

use crate::content::Content;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::time::SystemTime;

pub const ROOT: u64 = 1;

/// An errno.
pub type Errno = i32;

#[derive(Debug)]
pub enum Node {
    File(Content),
    Dir { visible: BTreeMap<OsString, u64>, durable: BTreeMap<OsString, u64> },
}

#[derive(Debug)]
pub struct Inode {
    pub node: Node,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub mtime: SystemTime,
    pub open: u32,
}

impl Inode {
    pub fn is_dir(&self) -> bool {
        matches!(self.node, Node::Dir { .. })
    }
}

/// What a power cut dropped.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Cut {
    /// Files whose visible content differed from the durable one.
    pub files_reverted: usize,
    /// Inodes no durable entry reached (created or renamed without a directory fsync).
    pub inodes_dropped: usize,
}

#[derive(Debug)]
pub struct Tree {
    inodes: HashMap<u64, Inode>,
    next: u64,
}

impl Default for Tree {
    fn default() -> Self {
        let mut inodes = HashMap::new();
        inodes.insert(ROOT, Inode::new(Node::Dir { visible: BTreeMap::new(), durable: BTreeMap::new() }, 0o755, 0, 0));
        Tree { inodes, next: ROOT + 1 }
    }
}

impl Inode {
    fn new(node: Node, perm: u16, uid: u32, gid: u32) -> Inode {
        Inode { node, perm, uid, gid, mtime: SystemTime::now(), open: 0 }
    }
}

impl Tree {
    pub fn get(&self, ino: u64) -> Option<&Inode> {
        self.inodes.get(&ino)
    }

    pub fn get_mut(&mut self, ino: u64) -> Option<&mut Inode> {
        self.inodes.get_mut(&ino)
    }

    /// A file's content.
    pub fn file_mut(&mut self, ino: u64) -> Result<&mut Content, Errno> {
        match self.inodes.get_mut(&ino).map(|i| &mut i.node) {
            Some(Node::File(c)) => Ok(c),
            Some(Node::Dir { .. }) => Err(libc::EISDIR),
            None => Err(libc::ENOENT),
        }
    }

    fn dir(&self, ino: u64) -> Result<&BTreeMap<OsString, u64>, Errno> {
        match self.inodes.get(&ino).map(|i| &i.node) {
            Some(Node::Dir { visible, .. }) => Ok(visible),
            Some(Node::File(_)) => Err(libc::ENOTDIR),
            None => Err(libc::ENOENT),
        }
    }

    fn dir_mut(&mut self, ino: u64) -> Result<&mut BTreeMap<OsString, u64>, Errno> {
        match self.inodes.get_mut(&ino).map(|i| &mut i.node) {
            Some(Node::Dir { visible, .. }) => Ok(visible),
            Some(Node::File(_)) => Err(libc::ENOTDIR),
            None => Err(libc::ENOENT),
        }
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<u64, Errno> {
        self.dir(parent)?.get(name).copied().ok_or(libc::ENOENT)
    }

    /// A directory's visible entries, in name order.
    pub fn entries(&self, dir: u64) -> Result<Vec<(OsString, u64)>, Errno> {
        Ok(self.dir(dir)?.iter().map(|(n, i)| (n.clone(), *i)).collect())
    }

    /// Creates a file or directory `name` in `parent`.
    pub fn create(&mut self, parent: u64, name: &OsStr, dir: bool, perm: u16, uid: u32, gid: u32) -> Result<u64, Errno> {
        if self.dir(parent)?.contains_key(name) {
            return Err(libc::EEXIST);
        }
        let ino = self.next;
        self.next += 1;
        let node = if dir { Node::Dir { visible: BTreeMap::new(), durable: BTreeMap::new() } } else { Node::File(Content::default()) };
        self.inodes.insert(ino, Inode::new(node, perm, uid, gid));
        self.dir_mut(parent)?.insert(name.to_owned(), ino);
        Ok(ino)
    }

    /// Removes the entry `name` (a file with `dir` false, an empty directory with `dir` true).
    pub fn remove(&mut self, parent: u64, name: &OsStr, dir: bool) -> Result<(), Errno> {
        let ino = self.lookup(parent, name)?;
        let target = self.inodes.get(&ino).ok_or(libc::ENOENT)?;
        match (&target.node, dir) {
            (Node::Dir { .. }, false) => return Err(libc::EISDIR),
            (Node::File(_), true) => return Err(libc::ENOTDIR),
            (Node::Dir { visible, .. }, true) if !visible.is_empty() => return Err(libc::ENOTEMPTY),
            _ => {}
        }
        self.dir_mut(parent)?.remove(name);
        self.collect();
        Ok(())
    }

    /// rename(2): replaces a target file or empty directory; `noreplace` refuses an existing one.
    pub fn rename(&mut self, parent: u64, name: &OsStr, new_parent: u64, new_name: &OsStr, noreplace: bool) -> Result<(), Errno> {
        let ino = self.lookup(parent, name)?;
        self.dir(new_parent)?;
        if let Ok(old) = self.lookup(new_parent, new_name) {
            if old == ino {
                return Ok(());
            }
            if noreplace {
                return Err(libc::EEXIST);
            }
            let src_dir = self.inodes.get(&ino).is_some_and(Inode::is_dir);
            match self.inodes.get(&old).map(|i| &i.node) {
                Some(Node::Dir { visible, .. }) if !src_dir => return Err(if visible.is_empty() { libc::EISDIR } else { libc::ENOTEMPTY }),
                Some(Node::Dir { visible, .. }) if !visible.is_empty() => return Err(libc::ENOTEMPTY),
                Some(Node::File(_)) if src_dir => return Err(libc::ENOTDIR),
                _ => {}
            }
        }
        if self.inodes.get(&ino).is_some_and(Inode::is_dir) && self.is_under(new_parent, ino) {
            return Err(libc::EINVAL);
        }
        self.dir_mut(parent)?.remove(name);
        self.dir_mut(new_parent)?.insert(new_name.to_owned(), ino);
        self.collect();
        Ok(())
    }

    /// Whether `dir` is `ancestor` or inside it (visible entries).
    fn is_under(&self, dir: u64, ancestor: u64) -> bool {
        let mut seen = HashSet::new();
        let mut todo = vec![ancestor];
        while let Some(d) = todo.pop() {
            if d == dir {
                return true;
            }
            if seen.insert(d) {
                if let Ok(e) = self.dir(d) {
                    todo.extend(e.values().copied());
                }
            }
        }
        false
    }

    /// fsync of a directory: its entries as they are now are durable.
    pub fn sync_dir(&mut self, ino: u64) -> Result<(), Errno> {
        match self.inodes.get_mut(&ino).map(|i| &mut i.node) {
            Some(Node::Dir { visible, durable }) => {
                *durable = visible.clone();
                Ok(())
            }
            Some(Node::File(_)) => Err(libc::ENOTDIR),
            None => Err(libc::ENOENT),
        }
        .map(|()| self.collect())
    }

    pub fn opened(&mut self, ino: u64) {
        if let Some(i) = self.inodes.get_mut(&ino) {
            i.open += 1;
        }
    }

    pub fn released(&mut self, ino: u64) {
        if let Some(i) = self.inodes.get_mut(&ino) {
            i.open = i.open.saturating_sub(1);
            if i.open == 0 {
                self.collect();
            }
        }
    }

    /// Forgets inodes nothing names or holds.
    fn collect(&mut self) {
        let mut live: HashSet<u64> = self.inodes.iter().filter(|(_, i)| i.open > 0).map(|(n, _)| *n).collect();
        live.insert(ROOT);
        for i in self.inodes.values() {
            if let Node::Dir { visible, durable } = &i.node {
                live.extend(visible.values().chain(durable.values()).copied());
            }
        }
        self.inodes.retain(|n, _| live.contains(n));
    }

    /// The power goes: only what was made durable is left.
    pub fn power_cut(&mut self) -> Cut {
        let mut cut = Cut::default();
        for i in self.inodes.values_mut() {
            i.open = 0;
            match &mut i.node {
                Node::Dir { visible, durable } => *visible = durable.clone(),
                Node::File(c) => {
                    if c.unsynced() {
                        cut.files_reverted += 1;
                    }
                    c.power_cut();
                }
            }
        }
        // What the root's durable entries reach, and nothing else.
        let mut reach = HashSet::new();
        let mut todo = vec![ROOT];
        while let Some(d) = todo.pop() {
            if !reach.insert(d) {
                continue;
            }
            if let Some(Node::Dir { durable, .. }) = self.inodes.get(&d).map(|i| &i.node) {
                todo.extend(durable.values().copied());
            }
        }
        let before = self.inodes.len();
        self.inodes.retain(|n, _| reach.contains(n));
        cut.inodes_dropped = before - self.inodes.len();
        cut
    }

    /// Bytes of file content visible (what a full disk counts).
    pub fn used(&self) -> u64 {
        self.inodes.values().map(|i| if let Node::File(c) = &i.node { c.len() } else { 0 }).sum()
    }

    /// Bytes held in memory.
    pub fn held(&self) -> u64 {
        self.inodes.values().map(|i| if let Node::File(c) = &i.node { c.held() } else { 0 }).sum()
    }

    /// The visible path of `ino` (for fault rules and messages), if it has one.
    pub fn path_of(&self, ino: u64) -> Option<String> {
        if ino == ROOT {
            return Some("/".into());
        }
        let mut parts = Vec::new();
        let mut cur = ino;
        'up: for _ in 0..64 {
            for (d, i) in &self.inodes {
                if let Node::Dir { visible, .. } = &i.node {
                    if let Some((name, _)) = visible.iter().find(|(_, n)| **n == cur) {
                        parts.push(name.to_string_lossy().into_owned());
                        if *d == ROOT {
                            parts.reverse();
                            return Some(format!("/{}", parts.join("/")));
                        }
                        cur = *d;
                        continue 'up;
                    }
                }
            }
            return None;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(s: &str) -> &OsStr {
        OsStr::new(s)
    }

    #[test]
    fn entries_need_a_directory_fsync() {
        let mut t = Tree::default();
        let d = t.create(ROOT, os("member"), true, 0o700, 0, 0).unwrap();
        t.sync_dir(ROOT).unwrap();
        let f = t.create(d, os("a.tmp"), false, 0o600, 0, 0).unwrap();
        t.file_mut(f).unwrap().write(0, b"data");
        t.file_mut(f).unwrap().sync();
        t.rename(d, os("a.tmp"), d, os("a"), false).unwrap();
        // Without the directory's fsync the file is gone after a cut, though its data was synced.
        let cut = t.power_cut();
        assert_eq!(cut, Cut { files_reverted: 0, inodes_dropped: 1 });
        assert_eq!(t.lookup(d, os("a")), Err(libc::ENOENT));
        // With it, the rename survives; the old name does not.
        let f = t.create(d, os("a.tmp"), false, 0o600, 0, 0).unwrap();
        t.file_mut(f).unwrap().write(0, b"data");
        t.file_mut(f).unwrap().sync();
        t.rename(d, os("a.tmp"), d, os("a"), false).unwrap();
        t.sync_dir(d).unwrap();
        t.power_cut();
        let a = t.lookup(d, os("a")).unwrap();
        assert_eq!(t.file_mut(a).unwrap().read(0, 10), b"data");
        assert_eq!(t.lookup(d, os("a.tmp")), Err(libc::ENOENT));
        // An unlink without the directory's fsync comes back.
        t.remove(d, os("a"), false).unwrap();
        assert_eq!(t.lookup(d, os("a")), Err(libc::ENOENT));
        t.power_cut();
        assert_eq!(t.lookup(d, os("a")), Ok(a));
        // A directory created but not synced in its parent is gone with all it holds.
        let sub = t.create(d, os("wal"), true, 0o700, 0, 0).unwrap();
        let w = t.create(sub, os("0.wal"), false, 0o600, 0, 0).unwrap();
        t.file_mut(w).unwrap().sync();
        t.sync_dir(sub).unwrap();
        assert_eq!(t.power_cut().inodes_dropped, 2);
        assert_eq!(t.lookup(d, os("wal")), Err(libc::ENOENT));
    }

    #[test]
    fn posix_errors() {
        let mut t = Tree::default();
        let d = t.create(ROOT, os("d"), true, 0o700, 0, 0).unwrap();
        t.create(d, os("f"), false, 0o600, 0, 0).unwrap();
        assert_eq!(t.create(d, os("f"), false, 0o600, 0, 0), Err(libc::EEXIST));
        assert_eq!(t.remove(ROOT, os("d"), true), Err(libc::ENOTEMPTY));
        assert_eq!(t.remove(ROOT, os("d"), false), Err(libc::EISDIR));
        assert_eq!(t.remove(d, os("f"), true), Err(libc::ENOTDIR));
        assert_eq!(t.rename(ROOT, os("d"), d, os("x"), false), Err(libc::EINVAL));
        t.create(d, os("g"), false, 0o600, 0, 0).unwrap();
        assert_eq!(t.rename(d, os("f"), d, os("g"), true), Err(libc::EEXIST));
        t.rename(d, os("f"), d, os("g"), false).unwrap();
        assert_eq!(t.entries(d).unwrap().len(), 1);
        assert_eq!(t.path_of(t.lookup(d, os("g")).unwrap()).as_deref(), Some("/d/g"));
        // An open file outlives its last name until released.
        let g = t.lookup(d, os("g")).unwrap();
        t.opened(g);
        t.remove(d, os("g"), false).unwrap();
        assert!(t.get(g).is_some());
        t.released(g);
        assert!(t.get(g).is_none());
    }
}
