//! Makes client connections tolerate what etcd's Go gRPC server tolerates: an HTTP/2
//! `:authority` that carries a URL scheme. etcdctl 3.4 dials `--cluster` endpoints as
//! `passthrough:///http://host:port`, so its requests arrive with `:authority: http://host:port`,
//! which the Rust HTTP/2 server rejects as malformed (RST_STREAM PROTOCOL_ERROR).
//!
//! [`FixAuthority`] sits between the socket and the HTTP/2 server on the read side. When the
//! connection starts with the HTTP/2 preface, it parses frames, decodes every header block (so
//! it tracks the client's HPACK state) and re-encodes it with literals only (so the server's
//! HPACK table stays empty and in step), replacing a `scheme://host:port` authority by
//! `host:port`. A client sends one authority on a connection, so the first header block decides:
//! when it needs no fix, it and everything after it pass through untouched (no per-request HPACK
//! work). Any other connection (HTTP/1.1) passes through untouched. Writes pass through.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADERS: u8 = 0x1;
const FRAME_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// The smallest SETTINGS_MAX_FRAME_SIZE a server may have: re-encoded blocks are cut to it. The
/// server behind keeps that default, so a longer HEADERS or CONTINUATION frame is a protocol
/// error there: the shim refuses it before buffering it.
const MAX_FRAME: usize = 16_384;
/// Largest header block accepted, encoded and decoded (names and values): a client cannot make
/// the shim hold more (an HPACK block of small references to big table entries decodes large).
const MAX_BLOCK: usize = 1 << 20;
/// The server's SETTINGS_HEADER_TABLE_SIZE (the default): a client may not make the decoder's
/// dynamic table bigger.
const HPACK_TABLE: usize = 4096;

#[derive(PartialEq, Eq)]
enum Mode {
    Sniff,
    H2,
    Passthrough,
}

struct Block {
    stream_id: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
    /// The frames as received, passed on unchanged when the block needs no fix.
    raw: Vec<u8>,
}

pub struct FixAuthority<S> {
    inner: S,
    mode: Mode,
    inbuf: Vec<u8>,
    outbuf: Vec<u8>,
    out_pos: usize,
    eof: bool,
    /// Bytes of the current frame's payload still to pass through as they arrive (frames other
    /// than header blocks are never buffered whole).
    passing: usize,
    decoder: loona_hpack::Decoder<'static>,
    block: Option<Block>,
    /// True once a header block has been rewritten: every later block is re-encoded too.
    rewriting: bool,
}

impl<S> FixAuthority<S> {
    /// Bytes held on behalf of the connection (read and not yet handed on, a header block being
    /// collected).
    pub fn held(&self) -> usize {
        self.inbuf.len() + (self.outbuf.len() - self.out_pos) + self.block.as_ref().map_or(0, |b| b.fragment.len() + b.raw.len())
    }

    pub fn new(inner: S) -> Self {
        FixAuthority {
            inner,
            mode: Mode::Sniff,
            inbuf: Vec::new(),
            outbuf: Vec::new(),
            out_pos: 0,
            eof: false,
            passing: 0,
            decoder: {
                let mut d = loona_hpack::Decoder::new();
                d.set_max_allowed_table_size(HPACK_TABLE);
                d
            },
            block: None,
            rewriting: false,
        }
    }

    fn process(&mut self) -> io::Result<()> {
        loop {
            match self.mode {
                Mode::Sniff => {
                    let n = self.inbuf.len().min(PREFACE.len());
                    if self.inbuf[..n] != PREFACE[..n] {
                        self.mode = Mode::Passthrough;
                    } else if n == PREFACE.len() {
                        self.outbuf.extend_from_slice(PREFACE);
                        self.inbuf.drain(..PREFACE.len());
                        self.mode = Mode::H2;
                    } else {
                        return Ok(());
                    }
                }
                Mode::Passthrough => {
                    self.outbuf.append(&mut self.inbuf);
                    return Ok(());
                }
                Mode::H2 => {
                    if self.passing > 0 {
                        let n = self.passing.min(self.inbuf.len());
                        if n == 0 {
                            return Ok(());
                        }
                        self.outbuf.extend(self.inbuf.drain(..n));
                        self.passing -= n;
                        continue;
                    }
                    if self.inbuf.len() < 9 {
                        return Ok(());
                    }
                    let len = u32::from_be_bytes([0, self.inbuf[0], self.inbuf[1], self.inbuf[2]]) as usize;
                    let kind = self.inbuf[3];
                    if kind != FRAME_HEADERS && kind != FRAME_CONTINUATION {
                        if self.block.is_some() {
                            return Err(io::Error::new(io::ErrorKind::InvalidData, "http2: header block interrupted"));
                        }
                        // Not a header block: its header now, its payload as it comes.
                        self.outbuf.extend(self.inbuf.drain(..9));
                        self.passing = len;
                        continue;
                    }
                    if len > MAX_FRAME {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, "http2: header frame larger than SETTINGS_MAX_FRAME_SIZE"));
                    }
                    if self.inbuf.len() < 9 + len {
                        return Ok(());
                    }
                    let frame: Vec<u8> = self.inbuf.drain(..9 + len).collect();
                    self.frame(&frame)?;
                }
            }
        }
    }

    fn frame(&mut self, f: &[u8]) -> io::Result<()> {
        let (kind, flags) = (f[3], f[4]);
        let stream_id = u32::from_be_bytes([f[5], f[6], f[7], f[8]]) & 0x7fff_ffff;
        let payload = &f[9..];
        let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, format!("http2: {m}"));
        match kind {
            FRAME_HEADERS => {
                let mut p = payload;
                let mut pad = 0usize;
                if flags & FLAG_PADDED != 0 {
                    pad = *p.first().ok_or_else(|| bad("short HEADERS"))? as usize;
                    p = &p[1..];
                }
                let mut priority = None;
                if flags & FLAG_PRIORITY != 0 {
                    if p.len() < 5 {
                        return Err(bad("short HEADERS"));
                    }
                    let mut pr = [0u8; 5];
                    pr.copy_from_slice(&p[..5]);
                    priority = Some(pr);
                    p = &p[5..];
                }
                if pad > p.len() {
                    return Err(bad("HEADERS padding too long"));
                }
                let block = Block {
                    stream_id,
                    end_stream: flags & FLAG_END_STREAM != 0,
                    priority,
                    fragment: p[..p.len() - pad].to_vec(),
                    raw: f.to_vec(),
                };
                self.block = Some(block);
                if flags & FLAG_END_HEADERS != 0 {
                    self.finish()?;
                }
            }
            FRAME_CONTINUATION => {
                let b = self.block.as_mut().ok_or_else(|| bad("CONTINUATION without HEADERS"))?;
                b.fragment.extend_from_slice(payload);
                b.raw.extend_from_slice(f);
                if b.fragment.len() > MAX_BLOCK {
                    return Err(bad("header block too large"));
                }
                if flags & FLAG_END_HEADERS != 0 {
                    self.finish()?;
                }
            }
            _ => return Err(bad("not a header frame")),
        }
        Ok(())
    }

    /// Decodes a complete header block, fixes it, and writes it out re-encoded.
    fn finish(&mut self) -> io::Result<()> {
        let Some(b) = self.block.take() else { return Ok(()) };
        let mut headers = Vec::new();
        let mut decoded = 0usize;
        self.decoder
            .decode_with_cb(&b.fragment, |n, v| {
                decoded += n.len() + v.len() + 32;
                if decoded <= MAX_BLOCK {
                    headers.push((n.into_owned(), v.into_owned()));
                }
            })
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("http2: bad header block: {e:?}")))?;
        if decoded > MAX_BLOCK {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "http2: header list too large"));
        }
        let needs_fix = headers.iter().any(|(n, v)| n == b":authority" && v.windows(3).any(|w| w == b"://"));
        if !needs_fix && !self.rewriting {
            // The server's HPACK state follows the client's from here on: stop looking.
            self.outbuf.extend_from_slice(&b.raw);
            self.mode = Mode::Passthrough;
            return Ok(());
        }
        self.rewriting = true;
        let mut enc = Vec::with_capacity(b.fragment.len() + 64);
        for (name, value) in headers {
            let value = if name == b":authority" { strip_scheme(&value) } else { value };
            // Literal header field without indexing, new name, no Huffman coding.
            enc.push(0x00);
            put_int(&mut enc, 7, 0, name.len());
            enc.extend_from_slice(&name);
            put_int(&mut enc, 7, 0, value.len());
            enc.extend_from_slice(&value);
        }
        let mut chunks = Vec::new();
        let first_room = MAX_FRAME - if b.priority.is_some() { 5 } else { 0 };
        let (head, mut rest) = enc.split_at(enc.len().min(first_room));
        chunks.push(head);
        while !rest.is_empty() {
            let (c, r) = rest.split_at(rest.len().min(MAX_FRAME));
            chunks.push(c);
            rest = r;
        }
        let last = chunks.len() - 1;
        for (i, c) in chunks.iter().enumerate() {
            let mut flags = 0u8;
            let mut payload_len = c.len();
            let kind = if i == 0 { FRAME_HEADERS } else { FRAME_CONTINUATION };
            if i == 0 {
                if b.end_stream {
                    flags |= FLAG_END_STREAM;
                }
                if b.priority.is_some() {
                    flags |= FLAG_PRIORITY;
                    payload_len += 5;
                }
            }
            if i == last {
                flags |= FLAG_END_HEADERS;
            }
            self.outbuf.extend_from_slice(&(payload_len as u32).to_be_bytes()[1..]);
            self.outbuf.push(kind);
            self.outbuf.push(flags);
            self.outbuf.extend_from_slice(&b.stream_id.to_be_bytes());
            if i == 0 {
                if let Some(pr) = b.priority {
                    self.outbuf.extend_from_slice(&pr);
                }
            }
            self.outbuf.extend_from_slice(c);
        }
        Ok(())
    }
}

/// `http://host:port/...` -> `host:port`; anything without a scheme is left alone.
fn strip_scheme(v: &[u8]) -> Vec<u8> {
    let Some(pos) = v.windows(3).position(|w| w == b"://") else { return v.to_vec() };
    let rest = &v[pos + 3..];
    let end = rest.iter().position(|c| *c == b'/').unwrap_or(rest.len());
    rest[..end].to_vec()
}

/// HPACK integer with an `n`-bit prefix (RFC 7541 §5.1).
fn put_int(out: &mut Vec<u8>, n: u32, first: u8, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128 + 128) as u8);
        v /= 128;
    }
    out.push(v as u8);
}

impl<S: AsyncRead + Unpin> AsyncRead for FixAuthority<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.out_pos < this.outbuf.len() {
                let n = buf.remaining().min(this.outbuf.len() - this.out_pos);
                buf.put_slice(&this.outbuf[this.out_pos..this.out_pos + n]);
                this.out_pos += n;
                if this.out_pos == this.outbuf.len() {
                    this.outbuf.clear();
                    this.out_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.mode == Mode::Passthrough && this.inbuf.is_empty() {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            this.process()?;
            if !this.outbuf.is_empty() {
                continue;
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let mut tmp = [0u8; 16 * 1024];
            let mut rb = ReadBuf::new(&mut tmp);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                this.eof = true;
                // Whatever is left is an incomplete frame: hand it over as is.
                this.outbuf.append(&mut this.inbuf);
            } else {
                this.inbuf.extend_from_slice(rb.filled());
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FixAuthority<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_scheme_from_authority() {
        assert_eq!(strip_scheme(b"http://127.0.0.1:2379"), b"127.0.0.1:2379");
        assert_eq!(strip_scheme(b"https://h:1/x"), b"h:1");
        assert_eq!(strip_scheme(b"h:1"), b"h:1");
    }

    #[test]
    fn hpack_integers() {
        let mut v = Vec::new();
        put_int(&mut v, 5, 0, 1337);
        assert_eq!(v, vec![31, 154, 10]);
        let mut v = Vec::new();
        put_int(&mut v, 7, 0, 10);
        assert_eq!(v, vec![10]);
    }

    #[tokio::test]
    async fn rewrites_a_header_block() {
        use tokio::io::AsyncReadExt;
        // HEADERS with an authority carrying a scheme, encoded by a real HPACK encoder.
        let mut enc = loona_hpack::Encoder::new();
        let block = enc.encode(vec![(&b":method"[..], &b"POST"[..]), (b":authority", b"http://127.0.0.1:2379"), (b":path", b"/x")]);
        let mut wire = PREFACE.to_vec();
        wire.extend_from_slice(&(block.len() as u32).to_be_bytes()[1..]);
        wire.extend_from_slice(&[FRAME_HEADERS, FLAG_END_HEADERS, 0, 0, 0, 1]);
        wire.extend_from_slice(&block);
        let mut fixed = FixAuthority::new(&wire[..]);
        let mut out = Vec::new();
        fixed.read_to_end(&mut out).await.unwrap();
        assert_eq!(&out[..PREFACE.len()], PREFACE);
        let f = &out[PREFACE.len()..];
        let len = u32::from_be_bytes([0, f[0], f[1], f[2]]) as usize;
        let headers = loona_hpack::Decoder::new().decode(&f[9..9 + len]).unwrap();
        assert!(headers.contains(&(b":authority".to_vec(), b"127.0.0.1:2379".to_vec())));
        assert!(headers.contains(&(b":path".to_vec(), b"/x".to_vec())));
    }

    fn headers_frame(block: &[u8], stream: u8) -> Vec<u8> {
        let mut f = (block.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[FRAME_HEADERS, FLAG_END_HEADERS, 0, 0, 0, stream]);
        f.extend_from_slice(block);
        f
    }

    /// A reader that yields `chunks` one per read, then stays pending (a client that sent them
    /// and waits).
    struct Trickle(Vec<Vec<u8>>);

    impl AsyncRead for Trickle {
        fn poll_read(mut self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            if self.0.is_empty() {
                return Poll::Pending;
            }
            let n = self.0[0].len().min(buf.remaining());
            let rest = self.0[0].split_off(n);
            buf.put_slice(&self.0[0]);
            if rest.is_empty() {
                self.0.remove(0);
            } else {
                self.0[0] = rest;
            }
            Poll::Ready(Ok(()))
        }
    }

    /// Everything the shim hands on now, without waiting for more input.
    async fn available(f: &mut FixAuthority<Trickle>) -> io::Result<Vec<u8>> {
        use tokio::io::AsyncReadExt;
        let mut out = Vec::new();
        let mut buf = [0u8; 65536];
        loop {
            match tokio::time::timeout(std::time::Duration::from_millis(20), f.read(&mut buf)).await {
                Ok(Ok(0)) | Err(_) => return Ok(out),
                Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
                Ok(Err(e)) => return Err(e),
            }
        }
    }

    #[tokio::test]
    async fn a_large_frame_passes_through_as_it_arrives() {
        // While rewriting (etcdctl 3.4's connections), a DATA frame announcing 16 MiB is not
        // held until complete: its bytes go on as they come.
        let mut enc = loona_hpack::Encoder::new();
        let mut first = PREFACE.to_vec();
        first.extend(headers_frame(&enc.encode(vec![(&b":authority"[..], &b"http://127.0.0.1:2379"[..])]), 1));
        let mut data = vec![0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 1];
        data.extend(vec![7u8; 10_000]);
        let mut f = FixAuthority::new(Trickle(vec![first, data.clone(), vec![8u8; 10_000]]));
        let out = available(&mut f).await.unwrap();
        assert!(out.ends_with(&[7u8; 10_000]) || out.ends_with(&[8u8; 10_000]), "payload held back");
        assert!(out.windows(9).any(|w| w == &data[..9]));
        assert_eq!(out.iter().filter(|b| **b == 8).count(), 10_000);
        assert!(f.inbuf.len() < 64 * 1024, "buffered {} bytes", f.inbuf.len());
    }

    #[tokio::test]
    async fn header_frames_past_the_limits_are_refused() {
        // A HEADERS frame longer than SETTINGS_MAX_FRAME_SIZE: refused on its 9-byte header.
        let mut wire = PREFACE.to_vec();
        wire.extend_from_slice(&[0x10, 0, 0, FRAME_HEADERS, FLAG_END_HEADERS, 0, 0, 0, 1]);
        let mut f = FixAuthority::new(Trickle(vec![wire]));
        assert!(available(&mut f).await.is_err());
        // An HPACK bomb: one 4000-byte table entry, then a block of 16,000 one-byte references
        // to it (64 MB decoded): refused, not decoded.
        let mut enc = Vec::new();
        enc.push(0x40); // literal with incremental indexing, new name
        put_int(&mut enc, 7, 0, 3);
        enc.extend_from_slice(b"x-a");
        put_int(&mut enc, 7, 0, 4000);
        enc.extend(vec![b'v'; 4000]);
        let mut wire = PREFACE.to_vec();
        wire.extend(headers_frame(&[&[0x00, 10][..], b":authority", &[10], b"http://h:1", &enc[..]].concat(), 1));
        let refs = vec![0x80 | 62u8; 16_000];
        for (i, c) in refs.chunks(16_000).enumerate() {
            wire.extend(headers_frame(c, 3 + 2 * i as u8));
        }
        let mut f = FixAuthority::new(Trickle(vec![wire]));
        let r = available(&mut f).await;
        assert!(r.is_err(), "an HPACK bomb was decoded");
        // A table size update past the server's table size is refused too.
        let mut wire = PREFACE.to_vec();
        let mut upd = Vec::new();
        put_int(&mut upd, 5, 0x20, 1 << 30);
        wire.extend(headers_frame(&[&upd[..], &[0x00, 10][..], b":authority", &[10], b"http://h:1"].concat(), 1));
        let mut f = FixAuthority::new(Trickle(vec![wire]));
        assert!(available(&mut f).await.is_err());
    }

    #[tokio::test]
    async fn plain_authority_passes_the_connection_through() {
        use tokio::io::AsyncReadExt;
        let mut enc = loona_hpack::Encoder::new();
        let mut wire = PREFACE.to_vec();
        wire.extend(headers_frame(&enc.encode(vec![(&b":method"[..], &b"POST"[..]), (b":authority", b"127.0.0.1:2379")]), 1));
        // Later blocks, even one with a scheme, are not looked at: the client keeps one authority.
        wire.extend(headers_frame(&enc.encode(vec![(&b":authority"[..], &b"http://h:1"[..])]), 3));
        wire.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0, 1, 7, 7]);
        let mut fixed = FixAuthority::new(&wire[..]);
        let mut out = Vec::new();
        fixed.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, wire);
        assert!(fixed.mode == Mode::Passthrough);
    }

    #[tokio::test]
    async fn once_rewriting_every_block_is_reencoded() {
        use tokio::io::AsyncReadExt;
        let mut enc = loona_hpack::Encoder::new();
        let mut wire = PREFACE.to_vec();
        wire.extend(headers_frame(&enc.encode(vec![(&b":authority"[..], &b"http://127.0.0.1:2379"[..]), (b"x-a", b"1")]), 1));
        // This block refers to the client's dynamic table, which the server never saw.
        wire.extend(headers_frame(&enc.encode(vec![(&b":authority"[..], &b"127.0.0.1:2379"[..]), (b"x-a", b"1")]), 3));
        let mut fixed = FixAuthority::new(&wire[..]);
        let mut out = Vec::new();
        fixed.read_to_end(&mut out).await.unwrap();
        let mut dec = loona_hpack::Decoder::new();
        let mut f = &out[PREFACE.len()..];
        for _ in 0..2 {
            let len = u32::from_be_bytes([0, f[0], f[1], f[2]]) as usize;
            let headers = dec.decode(&f[9..9 + len]).unwrap();
            assert!(headers.contains(&(b":authority".to_vec(), b"127.0.0.1:2379".to_vec())));
            assert!(headers.contains(&(b"x-a".to_vec(), b"1".to_vec())));
            f = &f[9 + len..];
        }
        assert!(f.is_empty());
    }

    #[tokio::test]
    async fn http1_passes_through() {
        use tokio::io::AsyncReadExt;
        let wire = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        let mut fixed = FixAuthority::new(&wire[..]);
        let mut out = Vec::new();
        fixed.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, wire);
    }
}
