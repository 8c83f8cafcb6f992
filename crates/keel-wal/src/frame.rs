//! etcd's WAL frame: how one record is laid out in a segment, written and parsed.
//!
//! A frame is an 8-byte little-endian length field, a `walpb.Record` (protobuf: `type` int64
//! field 1, `crc` uint32 field 2, `data` bytes field 3), then zero padding to the next multiple
//! of 8. The length field's low 56 bits count the record's bytes; when padding follows, its top
//! byte is `0x80 | padding`. A zero length field is the preallocated, never-written part of a
//! segment. Parsing is done here by hand on the segment's bytes (no copy of the data, no
//! allocation), so that scanning a damaged segment for intact frames stays cheap.
//!
//! Owns nothing and calls nothing in the crate; `wal` uses it through [`encode`] and [`parse`].

use prost::encoding::{decode_varint, encode_varint};

/// Bytes of the length field.
pub const HEADER: usize = 8;

/// One parsed frame: the record's fields, borrowed from the segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    pub kind: i64,
    pub crc: u32,
    pub data: &'a [u8],
    /// Offset just past the frame's padding.
    pub next: usize,
}

/// What the bytes at an offset are.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed<'a> {
    /// A zero length field, or fewer than 8 bytes left: nothing was written here.
    End,
    /// The length field announces a record that runs past the end of the bytes.
    Short {
        len: u64,
    },
    /// The record's bytes are not a `walpb.Record`.
    Garbled(String),
    Frame(Frame<'a>),
}

fn padding(len: usize) -> usize {
    (8 - len % 8) % 8
}

/// Appends one frame holding (`kind`, `crc`, `data`) to `buf`; the data field is left out when
/// `with_data` is false (etcd writes its crc record without one).
pub fn encode(buf: &mut Vec<u8>, kind: i64, crc: u32, data: &[u8], with_data: bool) {
    let mut rec_len = 1 + prost::encoding::encoded_len_varint(kind as u64);
    if crc != 0 {
        rec_len += 1 + prost::encoding::encoded_len_varint(crc as u64);
    }
    let with_data = with_data || !data.is_empty();
    if with_data {
        rec_len += 1 + prost::encoding::encoded_len_varint(data.len() as u64) + data.len();
    }
    let pad = padding(rec_len);
    let mut field = rec_len as u64;
    if pad > 0 {
        field |= (0x80 | pad as u64) << 56;
    }
    buf.reserve(HEADER + rec_len + pad);
    buf.extend_from_slice(&field.to_le_bytes());
    buf.push(0x08);
    encode_varint(kind as u64, buf);
    if crc != 0 {
        buf.push(0x10);
        encode_varint(crc as u64, buf);
    }
    if with_data {
        buf.push(0x1a);
        encode_varint(data.len() as u64, buf);
        buf.extend_from_slice(data);
    }
    buf.extend(std::iter::repeat_n(0u8, pad));
}

/// Parses the frame at `off` in `bytes`.
pub fn parse(bytes: &[u8], off: usize) -> Parsed<'_> {
    let Some(head) = bytes.get(off..off + HEADER) else { return Parsed::End };
    let field = u64::from_le_bytes(head.try_into().unwrap_or([0; 8]));
    if field == 0 {
        return Parsed::End;
    }
    let len = field & !(0xffu64 << 56);
    let pad = if field >> 63 == 1 { (field >> 56) & 0x7 } else { 0 };
    let start = off + HEADER;
    let rec_end = (start as u64).checked_add(len);
    let Some(rec_end) = rec_end.filter(|e| *e <= bytes.len() as u64).map(|e| e as usize) else {
        return Parsed::Short { len };
    };
    // The padding of the last frame may be missing (a file cut inside it): the record is whole.
    let next = rec_end + pad as usize;
    match record(&bytes[start..rec_end]) {
        Ok((kind, crc, data)) => Parsed::Frame(Frame { kind, crc, data, next }),
        Err(why) => Parsed::Garbled(why),
    }
}

/// Decodes a `walpb.Record`; unknown fields are skipped as protobuf allows.
fn record(mut b: &[u8]) -> Result<(i64, u32, &[u8]), String> {
    let (mut kind, mut crc, mut data): (i64, u32, &[u8]) = (0, 0, &[]);
    while !b.is_empty() {
        let key = decode_varint(&mut b).map_err(|e| e.to_string())?;
        let (field, wire) = (key >> 3, key & 7);
        if field == 0 {
            return Err("field number 0".into());
        }
        match wire {
            0 => {
                let v = decode_varint(&mut b).map_err(|e| e.to_string())?;
                match field {
                    1 => kind = v as i64,
                    2 => crc = u32::try_from(v).map_err(|_| format!("crc {v} out of range"))?,
                    _ => {}
                }
            }
            2 => {
                let n = decode_varint(&mut b).map_err(|e| e.to_string())?;
                let n = usize::try_from(n)
                    .ok()
                    .filter(|n| *n <= b.len())
                    .ok_or_else(|| format!("field {field} of {n} bytes runs past the record"))?;
                if field == 3 {
                    data = &b[..n];
                }
                b = &b[n..];
            }
            1 if b.len() >= 8 => b = &b[8..],
            5 if b.len() >= 4 => b = &b[4..],
            _ => return Err(format!("field {field} has wire type {wire}")),
        }
    }
    Ok((kind, crc, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, PartialEq, prost::Message)]
    struct Record {
        #[prost(int64, tag = "1")]
        kind: i64,
        #[prost(uint32, tag = "2")]
        crc: u32,
        #[prost(bytes = "vec", tag = "3")]
        data: Vec<u8>,
    }

    #[test]
    fn frames_round_trip_and_match_protobuf() {
        for (kind, crc, data) in
            [(1i64, 7u32, b"meta".to_vec()), (2, 0xffff_ffff, vec![9; 1000]), (4, 0, vec![]), (5, 3, vec![8, 0, 16, 0])]
        {
            let mut buf = Vec::new();
            encode(&mut buf, kind, crc, &data, kind != 4);
            assert_eq!(buf.len() % 8, 0);
            let Parsed::Frame(f) = parse(&buf, 0) else { panic!("not a frame") };
            assert_eq!((f.kind, f.crc, f.data, f.next), (kind, crc, data.as_slice(), buf.len()));
            let field = u64::from_le_bytes(buf[..8].try_into().unwrap());
            let len = (field & 0x00ff_ffff_ffff_ffff) as usize;
            let r = <Record as prost::Message>::decode(&buf[8..8 + len]).unwrap();
            assert_eq!(r, Record { kind, crc, data });
        }
    }

    #[test]
    fn truncated_and_zero_frames() {
        let mut buf = Vec::new();
        encode(&mut buf, 2, 1, &[1; 20], true);
        assert_eq!(parse(&buf[..10], 0), Parsed::Short { len: 26 });
        assert_eq!(parse(&[0u8; 16], 0), Parsed::End);
        assert_eq!(parse(&buf[..4], 0), Parsed::End);
        let mut bad = buf.clone();
        bad[8] = 0x0f; // field 1, wire type 7
        assert!(matches!(parse(&bad, 0), Parsed::Garbled(_)));
    }
}
