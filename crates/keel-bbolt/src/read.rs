//! The checked reader. Opens a file (or bytes), picks the current meta, and walks buckets'
//! B+trees in key order. Every page id is checked against the meta's high-water mark and the
//! file's length, every page header against the id it was read for, every element against its
//! page's bounds, and the tree depth is bounded (a cycle of page ids cannot loop).

use crate::page::{self, Header, Meta};
use crate::Error;
use std::collections::{BTreeMap, HashSet};
use std::path::Path;

/// Told each element of a walk: key, value, and whether the value is a nested bucket.
type Visit<'a> = &'a mut dyn FnMut(&[u8], &[u8], bool) -> Result<(), Error>;
/// Told each key and value of a bucket.
pub type ForEach<'a> = &'a mut dyn FnMut(&[u8], &[u8]) -> Result<(), Error>;
/// A bucket's name and value (its bucket header and inline page).
type Named = (Vec<u8>, Vec<u8>);

/// Deepest B+tree the reader follows (bbolt trees of a few TB are under 10 levels).
const MAX_DEPTH: usize = 32;
/// Page sizes a meta may name.
const PAGE_SIZES: std::ops::RangeInclusive<u32> = 512..=(1 << 20);

enum Source {
    File(std::fs::File),
    Bytes(Vec<u8>),
}

/// An open bbolt database, read-only.
pub struct Db {
    name: String,
    src: Source,
    len: u64,
    meta: Meta,
}

impl Db {
    /// Opens the file at `path`.
    pub fn open(path: &Path) -> Result<Db, Error> {
        let name = path.display().to_string();
        let err = |e: std::io::Error| Error { file: name.clone(), offset: 0, msg: e.to_string() };
        let f = std::fs::File::open(path).map_err(err)?;
        let len = f.metadata().map_err(err)?.len();
        Db::with_source(name.clone(), Source::File(f), len)
    }

    /// A database held in memory (`name` is used in errors).
    pub fn from_bytes(name: &str, bytes: Vec<u8>) -> Result<Db, Error> {
        let len = bytes.len() as u64;
        Db::with_source(name.to_string(), Source::Bytes(bytes), len)
    }

    fn with_source(name: String, src: Source, len: u64) -> Result<Db, Error> {
        let mut db = Db { name, src, len, meta: Meta { page_size: 4096, flags: 0, root: 0, sequence: 0, freelist: 0, pgid: 0, txid: 0 } };
        db.meta = db.current_meta()?;
        Ok(db)
    }

    fn err(&self, offset: u64, msg: impl Into<String>) -> Error {
        Error { file: self.name.clone(), offset, msg: msg.into() }
    }

    fn read_at(&self, offset: u64, n: usize) -> Result<Vec<u8>, Error> {
        let end = offset.checked_add(n as u64).filter(|e| *e <= self.len);
        if end.is_none() {
            return Err(self.err(offset, format!("file ends at {} bytes, reading {n} bytes here", self.len)));
        }
        match &self.src {
            Source::Bytes(b) => Ok(b[offset as usize..offset as usize + n].to_vec()),
            Source::File(f) => {
                use std::os::unix::fs::FileExt;
                let mut buf = vec![0u8; n];
                f.read_exact_at(&mut buf, offset).map_err(|e| self.err(offset, e.to_string()))?;
                Ok(buf)
            }
        }
    }

    /// The meta at `offset` (a page start), if it is a valid one.
    fn meta_at(&self, offset: u64) -> Result<Meta, String> {
        let b = self.read_at(offset, page::HEADER + page::META_BYTES).map_err(|e| e.msg)?;
        let h = Header::parse(&b).ok_or("short page header")?;
        if h.flags & page::META == 0 {
            return Err(format!("page flags {:#x} are not a meta page's", h.flags));
        }
        let m = Meta::parse(&b[page::HEADER..])?;
        if !PAGE_SIZES.contains(&m.page_size) || !m.page_size.is_power_of_two() {
            return Err(format!("invalid page size {}", m.page_size));
        }
        Ok(m)
    }

    /// The valid meta with the higher transaction id (bbolt's rule), checked against the file.
    fn current_meta(&self) -> Result<Meta, Error> {
        if self.len < (page::HEADER + page::META_BYTES) as u64 {
            return Err(self.err(0, format!("too small for a bbolt file ({} bytes)", self.len)));
        }
        let first = self.meta_at(0);
        // The second meta sits one page in; without a valid first meta, try the usual sizes.
        let sizes: Vec<u64> = match &first {
            Ok(m) => vec![m.page_size as u64],
            Err(_) => vec![4096, 8192, 16384, 32768, 65536],
        };
        let second = sizes.iter().map(|s| self.meta_at(*s)).find(|m| m.is_ok()).unwrap_or_else(|| Err("no valid second meta".into()));
        let meta = match (first, second) {
            (Ok(a), Ok(b)) => {
                if b.txid > a.txid {
                    b
                } else {
                    a
                }
            }
            (Ok(a), Err(_)) => a,
            (Err(_), Ok(b)) => b,
            (Err(e), Err(_)) => return Err(self.err(page::HEADER as u64, e)),
        };
        let need = meta.pgid.checked_mul(meta.page_size as u64);
        if need.is_none_or(|n| n > self.len) {
            return Err(self.err(
                self.len,
                format!(
                    "file is truncated: the meta counts {} pages of {} bytes, the file has {} bytes",
                    meta.pgid, meta.page_size, self.len
                ),
            ));
        }
        if meta.root < 2 || meta.root >= meta.pgid {
            return Err(
                self.err(page::HEADER as u64 + 16, format!("root bucket page {} is outside the file's {} pages", meta.root, meta.pgid))
            );
        }
        Ok(meta)
    }

    /// The current meta record.
    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    /// Page `id` and its overflow pages, checked: in the file, its header naming it.
    fn page(&self, id: u64) -> Result<(u64, Vec<u8>), Error> {
        let ps = self.meta.page_size as u64;
        if id < 2 || id >= self.meta.pgid {
            return Err(self.err(0, format!("page id {id} is outside the file's {} pages", self.meta.pgid)));
        }
        let offset = id * ps;
        let first = self.read_at(offset, ps as usize)?;
        let h = Header::parse(&first).ok_or_else(|| self.err(offset, "short page header"))?;
        if h.id != id {
            return Err(self.err(offset, format!("page {id} has id {} in its header", h.id)));
        }
        if h.overflow == 0 {
            return Ok((offset, first));
        }
        let pages = 1 + h.overflow as u64;
        if id + pages > self.meta.pgid {
            return Err(self.err(offset, format!("page {id} overflows by {} pages past the file's {} pages", h.overflow, self.meta.pgid)));
        }
        Ok((offset, self.read_at(offset, (pages * ps) as usize)?))
    }

    /// Calls `f(key, value, is_bucket)` for every element of the tree in `node` (bytes of a page or
    /// an inline bucket's page, at `offset` in the file), in key order.
    /// `seen` holds the pages of the tree walked so far: each page has one parent, so a page
    /// reached twice (a branch repeating a child, or a cycle) is damage, not more keys.
    fn walk(&self, node: &[u8], offset: u64, depth: usize, seen: &mut HashSet<u64>, f: Visit<'_>) -> Result<(), Error> {
        if depth > MAX_DEPTH {
            return Err(self.err(offset, format!("B+tree deeper than {MAX_DEPTH} levels (a cycle of pages?)")));
        }
        let h = Header::parse(node).ok_or_else(|| self.err(offset, "short page header"))?;
        let count = h.count as usize;
        if page::HEADER + count * page::ELEMENT > node.len() {
            return Err(self.err(offset, format!("{count} elements do not fit in the page")));
        }
        for i in 0..count {
            let at = page::HEADER + i * page::ELEMENT;
            let bad = |what: &str| self.err(offset + at as u64, format!("element {i} of page {}: {what}", h.id));
            if h.flags & page::LEAF != 0 {
                let flags = page::u32_at(node, at).unwrap_or(0);
                let pos = page::u32_at(node, at + 4).unwrap_or(0) as usize;
                let ksize = page::u32_at(node, at + 8).unwrap_or(0) as usize;
                let vsize = page::u32_at(node, at + 12).unwrap_or(0) as usize;
                let k0 = at.checked_add(pos).ok_or_else(|| bad("position overflows"))?;
                let v0 = k0.checked_add(ksize).ok_or_else(|| bad("key size overflows"))?;
                let v1 = v0.checked_add(vsize).ok_or_else(|| bad("value size overflows"))?;
                if v1 > node.len() {
                    return Err(bad(&format!("key and value end at byte {v1} of a {}-byte page", node.len())));
                }
                f(&node[k0..v0], &node[v0..v1], flags & page::BUCKET_LEAF != 0)?;
            } else if h.flags & page::BRANCH != 0 {
                let child = page::u64_at(node, at + 8).unwrap_or(0);
                if !seen.insert(child) {
                    return Err(bad(&format!("child page {child} is reached twice")));
                }
                let (coff, cnode) = self.page(child).map_err(|e| bad(&format!("child: {}", e.msg)))?;
                self.walk(&cnode, coff, depth + 1, seen, f)?;
            } else {
                return Err(self.err(offset, format!("page {} is neither a branch nor a leaf (flags {:#x})", h.id, h.flags)));
            }
        }
        Ok(())
    }

    /// Walks the bucket whose value (bucket header, then an inline page when its root is 0) is
    /// `value`, found at `offset`.
    fn walk_bucket(&self, value: &[u8], offset: u64, f: Visit<'_>) -> Result<(), Error> {
        let root = page::u64_at(value, 0).ok_or_else(|| self.err(offset, "bucket header is truncated"))?;
        if root == 0 {
            let inline = &value[page::BUCKET_HEADER.min(value.len())..];
            return self.walk(inline, offset, 0, &mut HashSet::new(), f);
        }
        let (off, node) = self.page(root)?;
        self.walk(&node, off, 0, &mut HashSet::from([root]), f)
    }

    /// The top-level buckets' names and values (bucket headers).
    fn top(&self) -> Result<Vec<Named>, Error> {
        let (off, node) = self.page(self.meta.root)?;
        let mut out = Vec::new();
        self.walk(&node, off, 0, &mut HashSet::from([self.meta.root]), &mut |k, v, is_bucket| {
            if is_bucket {
                out.push((k.to_vec(), v.to_vec()));
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// The names of the top-level buckets, in order.
    pub fn buckets(&self) -> Result<Vec<Vec<u8>>, Error> {
        Ok(self.top()?.into_iter().map(|(k, _)| k).collect())
    }

    /// Calls `f(key, value)` for every key of top-level bucket `name` in order (nested buckets,
    /// which etcd never makes, are skipped). False when there is no such bucket.
    pub fn for_each(&self, name: &[u8], f: ForEach<'_>) -> Result<bool, Error> {
        let Some((_, v)) = self.top()?.into_iter().find(|(k, _)| k == name) else { return Ok(false) };
        self.walk_bucket(&v, self.meta.root * self.meta.page_size as u64, &mut |k, v, nested| if nested { Ok(()) } else { f(k, v) })?;
        Ok(true)
    }

    /// Every key of a (small) top-level bucket; empty when it does not exist.
    pub fn bucket_map(&self, name: &[u8]) -> Result<BTreeMap<Vec<u8>, Vec<u8>>, Error> {
        let mut m = BTreeMap::new();
        self.for_each(name, &mut |k, v| {
            m.insert(k.to_vec(), v.to_vec());
            Ok(())
        })?;
        Ok(m)
    }
}
