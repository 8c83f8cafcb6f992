//! The HTTP/2 authority shim (`keel_api::h2fix`) on arbitrary client bytes, delivered in arbitrary
//! pieces: no panic; it never holds more than a bounded amount (a header block's limits plus a
//! read); a stream that is not HTTP/2 passes through byte for byte.
#![no_main]
use keel_api::h2fix::FixAuthority;
use libfuzzer_sys::fuzz_target;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

/// Yields the pieces one per read (each cut to what the reader has room for), then EOF.
struct Pieces(Vec<Vec<u8>>);

impl AsyncRead for Pieces {
    fn poll_read(mut self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if let Some(first) = self.0.first_mut() {
            let n = first.len().min(buf.remaining());
            buf.put_slice(&first[..n]);
            first.drain(..n);
            if first.is_empty() {
                self.0.remove(0);
            }
        }
        Poll::Ready(Ok(()))
    }
}

fuzz_target!(|data: &[u8]| {
    // [cut byte][bytes...]: the input is delivered in pieces of (cut % 64 + 1) * 97 bytes; half
    // of the inputs get the HTTP/2 preface in front, so that frames are parsed.
    let Some((&cut, rest)) = data.split_first() else { return };
    let mut input = Vec::new();
    if cut & 0x80 != 0 {
        input.extend_from_slice(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    }
    input.extend_from_slice(rest);
    let piece = (cut as usize % 64 + 1) * 97;
    let pieces: Vec<Vec<u8>> = input.chunks(piece).map(<[u8]>::to_vec).collect();
    let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    let out = rt.block_on(async {
        let mut f = FixAuthority::new(Pieces(pieces));
        let mut out = Vec::new();
        let mut buf = vec![0u8; 8192];
        loop {
            match f.read(&mut buf).await {
                Ok(0) => return Ok(out),
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) => return Err(e),
            }
            assert!(f.held() <= (4 << 20) + 64 * 1024, "the shim holds {} bytes", f.held());
        }
    });
    if !input.starts_with(b"PRI") {
        assert_eq!(out.expect("a plain stream passes"), input);
    }
});
