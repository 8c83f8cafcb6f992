//! The one-pass writer: a fresh database from buckets given one after another (in any order,
//! each name once), each bucket's keys in key order. Leaves are filled up to a page (values
//! larger than a page get overflow pages, up to four sharing a node as in bbolt), branch levels
//! are built above them, the root bucket lists the buckets; pages 0 and 1 hold the
//! metas (transaction ids 0 and 1, as bbolt's own initialisation writes them) and page 2 an
//! empty freelist: every page below the high-water mark is in use. A bucket small enough (one
//! leaf of at most a quarter page, as bbolt decides) is stored inline in the root bucket's leaf,
//! as bbolt stores it, so a small database is as small as etcd's.

use crate::page::{self, Header, Meta};
use std::io::{Seek, SeekFrom, Write};

/// The page size the writer uses (bbolt's default on amd64).
pub const PAGE_SIZE: usize = 4096;
const FREELIST_PAGE: u64 = 2;
const FIRST_DATA_PAGE: u64 = 3;

/// One level of a B+tree being built: the first key and page of each node.
type Level = Vec<(Vec<u8>, u64)>;

/// Largest inline bucket (page header and elements), as bbolt: a quarter of a page.
const MAX_INLINE: usize = PAGE_SIZE / 4;

/// Where a finished bucket's tree is: its root page, or its one leaf, inline.
enum Root {
    Page(u64),
    Inline(Vec<u8>),
}

/// Writes a bbolt file to `out`.
pub struct Writer<W: Write + Seek> {
    out: W,
    next: u64,
    /// Finished buckets: name and tree.
    buckets: Vec<(Vec<u8>, Root)>,
    current: Option<Tree>,
}

/// A B+tree under construction.
struct Tree {
    name: Vec<u8>,
    /// Elements of the leaf being filled: key, value, leaf element flags.
    leaf: Vec<(Vec<u8>, Vec<u8>, u32)>,
    leaf_bytes: usize,
    leaves: Level,
    last: Option<Vec<u8>>,
}

impl Tree {
    fn new(name: Vec<u8>) -> Tree {
        Tree { name, leaf: Vec::new(), leaf_bytes: page::HEADER, leaves: Vec::new(), last: None }
    }
}

fn invalid(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, msg)
}

impl<W: Write + Seek> Writer<W> {
    /// Starts a database at the beginning of `out`.
    pub fn new(mut out: W) -> std::io::Result<Writer<W>> {
        out.seek(SeekFrom::Start(0))?;
        out.write_all(&vec![0u8; PAGE_SIZE * FIRST_DATA_PAGE as usize])?;
        Ok(Writer { out, next: FIRST_DATA_PAGE, buckets: Vec::new(), current: None })
    }

    /// Starts the next bucket (a name not used before).
    pub fn bucket(&mut self, name: &[u8]) -> std::io::Result<()> {
        self.end_bucket()?;
        if name.is_empty() || self.buckets.iter().any(|(n, _)| n.as_slice() == name) {
            return Err(invalid(format!("bucket {:?} is empty or written twice", String::from_utf8_lossy(name))));
        }
        self.current = Some(Tree::new(name.to_vec()));
        Ok(())
    }

    /// Adds a key to the current bucket; keys must increase.
    pub fn put(&mut self, key: &[u8], value: &[u8]) -> std::io::Result<()> {
        let Some(mut t) = self.current.take() else { return Err(invalid("put before any bucket".into())) };
        let r = self.add(&mut t, key, value, 0);
        self.current = Some(t);
        r
    }

    fn add(&mut self, t: &mut Tree, key: &[u8], value: &[u8], flags: u32) -> std::io::Result<()> {
        if t.last.as_deref().is_some_and(|last| last >= key) {
            return Err(invalid(format!(
                "key {:?} out of order in bucket {:?}",
                String::from_utf8_lossy(key),
                String::from_utf8_lossy(&t.name)
            )));
        }
        if key.is_empty() || key.len() > u32::MAX as usize || value.len() > u32::MAX as usize {
            return Err(invalid("a key must be 1 byte to 4 GiB, a value at most 4 GiB".into()));
        }
        let size = page::ELEMENT + key.len() + value.len();
        if !t.leaf.is_empty() && t.leaf_bytes + size > PAGE_SIZE && !shares_node(t.leaf.len(), t.leaf_bytes, size) {
            self.flush_leaf(t)?;
        }
        t.leaf.push((key.to_vec(), value.to_vec(), flags));
        t.leaf_bytes += size;
        t.last = Some(key.to_vec());
        Ok(())
    }

    fn flush_leaf(&mut self, t: &mut Tree) -> std::io::Result<()> {
        let items = std::mem::take(&mut t.leaf);
        t.leaf_bytes = page::HEADER;
        let first = items.first().map(|(k, _, _)| k.clone()).unwrap_or_default();
        let id = self.write_node(page::LEAF, items.iter().map(|(k, v, f)| (k.as_slice(), v.as_slice(), *f, 0)))?;
        t.leaves.push((first, id));
        Ok(())
    }

    /// Writes one node (leaf elements: key, value, flags; branch elements: key, child page) on
    /// as many pages as it needs; returns its page id.
    fn write_node<'a>(&mut self, flags: u16, elems: impl Iterator<Item = (&'a [u8], &'a [u8], u32, u64)> + Clone) -> std::io::Result<u64> {
        let id = self.next;
        let buf = encode_node(id, flags, elems, true);
        self.out.write_all(&buf)?;
        self.next += (buf.len() / PAGE_SIZE) as u64;
        Ok(id)
    }

    /// Finishes a tree: its last leaf (an empty leaf for an empty tree), then branch levels up
    /// to a single root; returns the root page.
    fn finish_tree(&mut self, mut t: Tree) -> std::io::Result<u64> {
        if !t.leaf.is_empty() || t.leaves.is_empty() {
            self.flush_leaf(&mut t)?;
        }
        let mut level = t.leaves;
        while level.len() > 1 {
            let mut up: Level = Vec::new();
            let mut node: Vec<(Vec<u8>, u64)> = Vec::new();
            let mut bytes = page::HEADER;
            for (k, id) in level {
                let size = page::ELEMENT + k.len();
                if node.len() >= 2 && bytes + size > PAGE_SIZE {
                    let first = node[0].0.clone();
                    let pid = self.write_node(page::BRANCH, node.iter().map(|(k, c)| (k.as_slice(), &[][..], 0, *c)))?;
                    up.push((first, pid));
                    node.clear();
                    bytes = page::HEADER;
                }
                bytes += size;
                node.push((k, id));
            }
            let first = node[0].0.clone();
            let pid = self.write_node(page::BRANCH, node.iter().map(|(k, c)| (k.as_slice(), &[][..], 0, *c)))?;
            up.push((first, pid));
            level = up;
        }
        Ok(level[0].1)
    }

    fn end_bucket(&mut self) -> std::io::Result<()> {
        if let Some(t) = self.current.take() {
            let name = t.name.clone();
            let root = if t.leaves.is_empty() && t.leaf_bytes <= MAX_INLINE {
                Root::Inline(encode_node(0, page::LEAF, t.leaf.iter().map(|(k, v, f)| (k.as_slice(), v.as_slice(), *f, 0)), false))
            } else {
                Root::Page(self.finish_tree(t)?)
            };
            self.buckets.push((name, root));
        }
        Ok(())
    }

    /// Writes the root bucket, the freelist and the metas; returns the output.
    pub fn finish(mut self) -> std::io::Result<W> {
        self.end_bucket()?;
        let mut root = Tree::new(Vec::new());
        let mut buckets = std::mem::take(&mut self.buckets);
        buckets.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, tree) in buckets {
            // The bucket header: root page (0 when inline) and sequence, then any inline leaf.
            let mut value = vec![0u8; page::BUCKET_HEADER];
            match tree {
                Root::Page(id) => value[..8].copy_from_slice(&id.to_le_bytes()),
                Root::Inline(leaf) => value.extend_from_slice(&leaf),
            }
            self.add(&mut root, &name, &value, page::BUCKET_LEAF)?;
        }
        let root = self.finish_tree(root)?;
        let pgid = self.next;
        let mut head = vec![0u8; PAGE_SIZE * FIRST_DATA_PAGE as usize];
        for txid in 0..2u64 {
            let at = txid as usize * PAGE_SIZE;
            Header { id: txid, flags: page::META, count: 0, overflow: 0 }.write(&mut head[at..]);
            let meta = Meta { page_size: PAGE_SIZE as u32, flags: 0, root, sequence: 0, freelist: FREELIST_PAGE, pgid, txid };
            head[at + page::HEADER..at + page::HEADER + page::META_BYTES].copy_from_slice(&meta.encode());
        }
        let at = FREELIST_PAGE as usize * PAGE_SIZE;
        Header { id: FREELIST_PAGE, flags: page::FREELIST, count: 0, overflow: 0 }.write(&mut head[at..]);
        self.out.seek(SeekFrom::Start(0))?;
        self.out.write_all(&head)?;
        self.out.seek(SeekFrom::End(0))?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Most elements of a leaf larger than a page: bbolt does not split a node of at most twice its
/// minimum keys per page (2) however large it is, so etcd's leaves of values larger than a page
/// hold up to four of them.
const MAX_BIG_NODE: usize = 4;

/// Whether an element of `size` bytes joins a leaf of `count` elements and `bytes` bytes that it
/// would take past a page (rather than starting the next): only when the element or the leaf is
/// already larger than a page (small elements fill pages one by one), while the leaf has fewer
/// than [`MAX_BIG_NODE`] elements, and when together they take no more pages than apart (a value
/// of 16 KiB and a bit takes five pages alone, four such values seventeen together).
fn shares_node(count: usize, bytes: usize, size: usize) -> bool {
    let pages = |b: usize| b.div_ceil(PAGE_SIZE);
    count < MAX_BIG_NODE
        && (page::HEADER + size > PAGE_SIZE || bytes > PAGE_SIZE)
        && pages(bytes + size) <= pages(bytes) + pages(page::HEADER + size)
}

/// One node's page image (page id `id`): padded to whole pages, or (`padded` false, an inline
/// bucket's leaf) exactly as long as its elements.
fn encode_node<'a>(id: u64, flags: u16, elems: impl Iterator<Item = (&'a [u8], &'a [u8], u32, u64)> + Clone, padded: bool) -> Vec<u8> {
    let count = elems.clone().count();
    let data: usize = elems.clone().map(|(k, v, _, _)| k.len() + v.len()).sum();
    let size = page::HEADER + count * page::ELEMENT + data;
    let pages = size.div_ceil(PAGE_SIZE).max(1);
    let mut buf = vec![0u8; if padded { pages * PAGE_SIZE } else { size }];
    let overflow = if padded { (pages - 1) as u32 } else { 0 };
    Header { id, flags, count: count as u16, overflow }.write(&mut buf);
    let mut at = page::HEADER + count * page::ELEMENT;
    for (i, (k, v, f, child)) in elems.enumerate() {
        let e = page::HEADER + i * page::ELEMENT;
        let pos = (at - e) as u32;
        if flags == page::LEAF {
            buf[e..e + 4].copy_from_slice(&f.to_le_bytes());
            buf[e + 4..e + 8].copy_from_slice(&pos.to_le_bytes());
            buf[e + 8..e + 12].copy_from_slice(&(k.len() as u32).to_le_bytes());
            buf[e + 12..e + 16].copy_from_slice(&(v.len() as u32).to_le_bytes());
        } else {
            buf[e..e + 4].copy_from_slice(&pos.to_le_bytes());
            buf[e + 4..e + 8].copy_from_slice(&(k.len() as u32).to_le_bytes());
            buf[e + 8..e + 16].copy_from_slice(&child.to_le_bytes());
        }
        buf[at..at + k.len()].copy_from_slice(k);
        at += k.len();
        buf[at..at + v.len()].copy_from_slice(v);
        at += v.len();
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Db;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn build(buckets: &BTreeMap<Vec<u8>, BTreeMap<Vec<u8>, Vec<u8>>>) -> Vec<u8> {
        let mut w = Writer::new(std::io::Cursor::new(Vec::new())).unwrap();
        // Buckets in reverse order: the writer sorts them.
        for (name, kvs) in buckets.iter().rev() {
            w.bucket(name).unwrap();
            for (k, v) in kvs {
                w.put(k, v).unwrap();
            }
        }
        w.finish().unwrap().into_inner()
    }

    fn read_all(db: &Db) -> BTreeMap<Vec<u8>, BTreeMap<Vec<u8>, Vec<u8>>> {
        db.buckets()
            .unwrap()
            .into_iter()
            .map(|b| {
                let m = db.bucket_map(&b).unwrap();
                (b, m)
            })
            .collect()
    }

    proptest! {
        #[test]
        fn what_is_written_reads_back(buckets in proptest::collection::btree_map(
            proptest::collection::vec(any::<u8>(), 1..12),
            proptest::collection::btree_map(proptest::collection::vec(any::<u8>(), 1..40), proptest::collection::vec(any::<u8>(), 0..300), 0..400),
            0..6)) {
            let bytes = build(&buckets);
            prop_assert_eq!(bytes.len() % PAGE_SIZE, 0);
            let db = Db::from_bytes("t", bytes).unwrap();
            prop_assert_eq!(read_all(&db), buckets);
        }
    }

    #[test]
    fn big_values_use_overflow_pages_and_many_keys_make_branches() {
        let mut b = BTreeMap::new();
        let mut kvs = BTreeMap::new();
        for i in 0..20_000u32 {
            kvs.insert(format!("key{i:08}").into_bytes(), vec![i as u8; (i % 50) as usize]);
        }
        kvs.insert(b"zbig".to_vec(), vec![7u8; 3 * PAGE_SIZE + 5]);
        b.insert(b"key".to_vec(), kvs);
        b.insert(b"meta".to_vec(), BTreeMap::new());
        let db = Db::from_bytes("t", build(&b)).unwrap();
        assert_eq!(read_all(&db), b);
    }

    /// Values larger than a page share nodes of up to four, as etcd's do: 100 values of 16 KiB
    /// take 17 pages per four (not 5 each), and read back.
    #[test]
    fn values_larger_than_a_page_share_nodes() {
        let mut b = BTreeMap::new();
        let kvs: BTreeMap<Vec<u8>, Vec<u8>> = (0..100u32).map(|i| (format!("key{i:08}").into_bytes(), vec![i as u8; 16 << 10])).collect();
        b.insert(b"key".to_vec(), kvs);
        let bytes = build(&b);
        let db = Db::from_bytes("t", bytes.clone()).unwrap();
        assert_eq!(read_all(&db), b);
        // 25 leaves of 17 pages, a branch, the root bucket's leaf, two metas and a freelist.
        assert_eq!(bytes.len() / PAGE_SIZE, 25 * 17 + 5, "pages of the file");
    }

    /// Regression: a branch page that names one child several times was read as that child's
    /// keys several times over (and, nested, exponentially often: a hang). A page reached twice
    /// is damage.
    #[test]
    fn a_branch_repeating_a_child_is_damage() {
        let mut b = BTreeMap::new();
        b.insert(b"key".to_vec(), (0..2000u32).map(|i| (i.to_be_bytes().to_vec(), vec![1u8; 20])).collect::<BTreeMap<_, _>>());
        let mut bytes = build(&b);
        let branch = (2..bytes.len() / PAGE_SIZE)
            .map(|p| p * PAGE_SIZE)
            .find(|at| page::Header::parse(&bytes[*at..]).is_some_and(|h| h.flags & page::BRANCH != 0 && h.count > 1))
            .expect("a branch page");
        let h = page::Header::parse(&bytes[branch..]).unwrap();
        let first = page::u64_at(&bytes, branch + page::HEADER + 8).unwrap();
        for i in 1..h.count as usize {
            let at = branch + page::HEADER + i * page::ELEMENT + 8;
            bytes[at..at + 8].copy_from_slice(&first.to_le_bytes());
        }
        let r = Db::from_bytes("t", bytes).and_then(|db| db.bucket_map(b"key"));
        let e = r.expect_err("a repeated child must be detected");
        assert!(e.offset as usize > branch, "{e}");
    }

    #[test]
    fn damage_is_an_error_naming_the_offset() {
        let mut b = BTreeMap::new();
        b.insert(b"key".to_vec(), (0..500u32).map(|i| (i.to_be_bytes().to_vec(), vec![1u8; 20])).collect::<BTreeMap<_, _>>());
        let bytes = build(&b);
        // A truncated file, a bad page id in a header, garbage over a page: errors, no panic.
        assert!(Db::from_bytes("t", bytes[..bytes.len() - 100].to_vec()).is_err());
        for at in [3 * PAGE_SIZE, 4 * PAGE_SIZE + 16, 5 * PAGE_SIZE + 40] {
            let mut bad = bytes.clone();
            for x in &mut bad[at..at + 64] {
                *x = 0xff;
            }
            let r = Db::from_bytes("t", bad).and_then(|db| db.bucket_map(b"key").map(|_| ()));
            let e = r.expect_err("damage must be detected");
            assert!(e.offset > 0, "{e}");
        }
        let mut both = bytes.clone();
        both[16] ^= 1;
        both[PAGE_SIZE + 16] ^= 1;
        assert!(Db::from_bytes("t", both).is_err());
    }
}
