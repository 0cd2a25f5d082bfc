//! Feeds arbitrary bytes, split at an arbitrary point, into the frame decoder and every message
//! decoder. Run with `cargo +nightly fuzz run frame_decoder` from the repository root.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ztna_proto::{datagram, frame, ClientMsg, FlowOpen, FlowReply, FrameDecoder, ServerMsg};

fuzz_target!(|data: &[u8]| {
    let cut = data.first().map(|b| *b as usize % (data.len() + 1)).unwrap_or(0);
    let mut d = FrameDecoder::new();
    for piece in [&data[..cut], &data[cut..]] {
        d.extend(piece);
        while let Ok(Some(payload)) = d.next_frame() {
            let _ = frame::decode_payload::<ClientMsg>(&payload);
            let _ = frame::decode_payload::<ServerMsg>(&payload);
            let _ = frame::decode_payload::<FlowOpen>(&payload);
            let _ = frame::decode_payload::<FlowReply>(&payload);
        }
    }
    let _ = datagram::decode(&bytes::Bytes::copy_from_slice(data));
});
