//! keel_server::rafthttp::codec, the decoders of etcd's raft streams (message and msgappv2), on
//! arbitrary bytes: no panic, nothing buffered past the size bound, and what the message codec
//! accepts its encoder writes back to bytes that decode to the same messages.
#![no_main]
use bytes::BytesMut;
use keel_server::rafthttp::codec::{MessageCodec, MsgAppV2Codec};
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
});
