//! keel_server::rafthttp::codec, the decoders of etcd's raft streams (message and msgappv2), and
//! the chunked body framing the raft thread takes off them (`reader::Dechunker`), on arbitrary
//! bytes: no panic, nothing buffered past the size bound, what the message codec accepts its
//! encoder writes back to bytes that decode to the same messages, and the body comes out the
//! same whether the bytes arrive at once or one by one.
#![no_main]
use bytes::BytesMut;
use keel_server::rafthttp::codec::{MessageCodec, MsgAppV2Codec};
use keel_server::rafthttp::reader::Dechunker;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::{Decoder, Encoder};

fn decode_all<D: Decoder<Item = keel_raft::eraftpb::Message>>(d: &mut D, bytes: &[u8]) -> Vec<keel_raft::eraftpb::Message> {
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    while let Ok(Some(m)) = d.decode(&mut buf) {
        out.push(m);
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let got = decode_all(&mut MessageCodec::with_limit(1 << 20), data);
    let mut buf = BytesMut::new();
    for m in &got {
        MessageCodec::default().encode(m, &mut buf).expect("encode");
    }
    assert_eq!(decode_all(&mut MessageCodec::default(), &buf), got);
    let _ = decode_all(&mut MsgAppV2Codec::with_limit(1, 2, 1 << 20), data);
    let (mut whole, mut bytewise) = (BytesMut::new(), BytesMut::new());
    let at_once = Dechunker::default().feed(data, &mut whole);
    let mut d = Dechunker::default();
    let mut one_by_one = Ok(false);
    for b in data {
        one_by_one = d.feed(std::slice::from_ref(b), &mut bytewise);
        if !matches!(one_by_one, Ok(false)) {
            break;
        }
    }
    if let (Ok(a), Ok(b)) = (&at_once, &one_by_one) {
        assert_eq!((a, &whole), (b, &bytewise));
    }
});
