//! Keel's own snapshot body between Keel members: the backend's records as a stream, so that a
//! leader sends its committed state straight from one consistent read (no file written first)
//! and a Keel follower loads it as it arrives (no etcd backend to convert afterwards). etcd
//! members never see it: a sender asks first ([`FORMAT_PATH`]) and sends etcd's bbolt body to a
//! peer that does not answer with [`FORMAT`].
//!
//! After the raft message (etcd's framing: its size as 8 bytes big-endian, then the protobuf),
//! frames of `[tag u8][key length u32 BE][value length u32 BE][key][value]`: tag [`TAG_KEY`] a
//! `key` table record, [`TAG_AUX`] an auxiliary record, and last [`TAG_END`], whose key is the
//! CRC-32C of every byte of the frames before it and whose value is the state's meta record
//! (consistent index, term, current and compacted revision, 8 bytes each, big-endian). A body
//! without its end frame, with a wrong checksum or with bytes after the end is refused.
//!
//! Owns nothing; pure encoding and decoding.

use bytes::{Buf, BufMut, BytesMut};
use keel_mvcc::backend::{Meta, TABLE_AUX, TABLE_KEYS};

/// Where a Keel member takes its own snapshot body (`POST`) and says it does (`GET`).
pub const FORMAT_PATH: &str = "/raft/keel/snapshot";
/// What a Keel member answers a `GET` of [`FORMAT_PATH`] with: the body it takes.
pub const FORMAT: &str = "keel-records-1";

pub const TAG_KEY: u8 = 0;
pub const TAG_AUX: u8 = 1;
pub const TAG_END: u8 = 0xff;
const HEAD: usize = 9;
const META_LEN: usize = 32;
/// The largest key or value a frame may carry (a record is one key's revision: at most etcd's
/// request size limit, far below this).
pub const MAX_FIELD: u32 = 256 << 20;

/// Writes frames, keeping the running checksum.
#[derive(Default)]
pub struct Encoder {
    crc: u32,
}

impl Encoder {
    /// Appends the frame of record (`table`, `k`, `v`) to `out`.
    pub fn record(&mut self, out: &mut BytesMut, table: u32, k: &[u8], v: &[u8]) {
        let tag = if table == TABLE_KEYS { TAG_KEY } else { TAG_AUX };
        let start = out.len();
        out.put_u8(tag);
        out.put_u32(k.len() as u32);
        out.put_u32(v.len() as u32);
        out.put_slice(k);
        out.put_slice(v);
        self.crc = crc32c::crc32c_append(self.crc, &out[start..]);
    }

    /// Appends the end frame with `meta`.
    pub fn end(self, out: &mut BytesMut, meta: &Meta) {
        out.put_u8(TAG_END);
        out.put_u32(4);
        out.put_u32(META_LEN as u32);
        out.put_u32(self.crc);
        out.put_u64(meta.consistent_index);
        out.put_u64(meta.term);
        out.put_i64(meta.current_rev);
        out.put_i64(meta.compacted_rev);
    }
}

/// What the decoder found next.
#[derive(Debug, PartialEq)]
pub enum Frame {
    /// A record: its table number ([`TABLE_KEYS`] or [`TABLE_AUX`]), key and value.
    Record(u32, Vec<u8>, Vec<u8>),
    /// The end, with the state's meta record; the checksum matched.
    End(Meta),
}

/// Reads frames from bytes as they arrive.
#[derive(Default)]
pub struct Decoder {
    crc: u32,
    ended: bool,
}

impl Decoder {
    /// The next whole frame at the front of `buf` (taken from it), None when more bytes are
    /// needed; Err on a malformed frame, a wrong checksum, or bytes after the end.
    pub fn next(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, String> {
        if self.ended {
            return if buf.is_empty() { Ok(None) } else { Err("bytes after the end of the snapshot".into()) };
        }
        if buf.len() < HEAD {
            return Ok(None);
        }
        let tag = buf[0];
        let klen = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
        let vlen = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]);
        if klen > MAX_FIELD || vlen > MAX_FIELD {
            return Err(format!("a record of {klen} + {vlen} bytes"));
        }
        let len = HEAD + klen as usize + vlen as usize;
        if buf.len() < len {
            buf.reserve(len - buf.len());
            return Ok(None);
        }
        let frame = buf.split_to(len);
        match tag {
            TAG_KEY | TAG_AUX => {
                self.crc = crc32c::crc32c_append(self.crc, &frame);
                let (k, v) = frame[HEAD..].split_at(klen as usize);
                let table = if tag == TAG_KEY { TABLE_KEYS } else { TABLE_AUX };
                Ok(Some(Frame::Record(table, k.to_vec(), v.to_vec())))
            }
            TAG_END if klen == 4 && vlen as usize == META_LEN => {
                let mut b = &frame[HEAD..];
                let crc = b.get_u32();
                if crc != self.crc {
                    return Err(format!("checksum {crc:08x}, computed {:08x}", self.crc));
                }
                self.ended = true;
                Ok(Some(Frame::End(Meta {
                    consistent_index: b.get_u64(),
                    term: b.get_u64(),
                    current_rev: b.get_i64(),
                    compacted_rev: b.get_i64(),
                })))
            }
            _ => Err(format!("unknown frame tag {tag:#x} ({klen} + {vlen} bytes)")),
        }
    }

    /// True once the end frame was read.
    pub fn ended(&self) -> bool {
        self.ended
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(meta: &Meta) -> BytesMut {
        let mut out = BytesMut::new();
        let mut e = Encoder::default();
        e.record(&mut out, TABLE_KEYS, b"k1", b"v1");
        e.record(&mut out, TABLE_AUX, b"members", &[7u8; 300]);
        e.end(&mut out, meta);
        out
    }

    #[test]
    fn frames_split_anywhere_decode_to_the_records_and_the_meta() {
        let meta = Meta { consistent_index: 9, term: 2, current_rev: 5, compacted_rev: 3 };
        let all = encoded(&meta);
        for cut in 0..all.len() {
            let mut d = Decoder::default();
            let mut buf = BytesMut::from(&all[..cut]);
            let mut got = Vec::new();
            while let Some(f) = d.next(&mut buf).unwrap() {
                got.push(f);
            }
            buf.extend_from_slice(&all[cut..]);
            while let Some(f) = d.next(&mut buf).unwrap() {
                got.push(f);
            }
            assert!(d.ended());
            assert_eq!(
                got,
                vec![
                    Frame::Record(TABLE_KEYS, b"k1".to_vec(), b"v1".to_vec()),
                    Frame::Record(TABLE_AUX, b"members".to_vec(), vec![7u8; 300]),
                    Frame::End(meta)
                ]
            );
        }
    }

    #[test]
    fn a_changed_byte_a_bad_tag_a_huge_field_and_bytes_after_the_end_are_refused() {
        let meta = Meta::default();
        let mut bad = encoded(&meta);
        bad[10] ^= 1; // in the first record's key
        let mut d = Decoder::default();
        let mut r = Ok(None);
        for _ in 0..3 {
            r = d.next(&mut bad);
        }
        assert!(r.unwrap_err().contains("checksum"));

        let mut tag = encoded(&meta);
        tag[0] = 5;
        assert!(Decoder::default().next(&mut tag).unwrap_err().contains("unknown frame tag"));

        let mut huge = BytesMut::new();
        huge.put_u8(TAG_KEY);
        huge.put_u32(MAX_FIELD + 1);
        huge.put_u32(0);
        assert!(Decoder::default().next(&mut huge).is_err());

        let mut after = encoded(&meta);
        after.put_u8(0);
        let mut d = Decoder::default();
        while !d.ended() {
            d.next(&mut after).unwrap();
        }
        assert!(d.next(&mut after).is_err());
    }
}
