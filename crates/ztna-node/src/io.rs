//! Stream helpers: framed messages on QUIC streams and the splices that carry flows.
//!
//! Splices map transport semantics end to end: a finished stream becomes a TCP FIN (and back), a
//! reset stream becomes a TCP RST (and back), and QUIC flow control gives backpressure because
//! nothing is read faster than it can be written on.

use std::time::Duration;

use prometheus::IntCounter;
use quinn::{ReadError, RecvStream, SendStream, VarInt, WriteError};
use serde::{de::DeserializeOwned, Serialize};
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use ztna_proto::{codes, frame, FrameError};

#[derive(Debug, Error)]
pub enum StreamError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("stream read failed: {0}")]
    Read(#[from] ReadError),
    #[error("stream write failed: {0}")]
    Write(#[from] WriteError),
    #[error("stream closed before a complete frame")]
    Closed,
    #[error("timed out waiting for the peer")]
    Timeout,
}

impl StreamError {
    /// Application error code to close/reset with when this error is the peer's fault.
    pub fn code(&self) -> u32 {
        match self {
            StreamError::Frame(_) => codes::PROTOCOL,
            _ => codes::FLOW_ABORTED,
        }
    }
}

/// Reads one frame. Returns `Ok(None)` if the stream finished cleanly before any byte of a frame.
pub async fn read_frame<T: DeserializeOwned>(
    recv: &mut RecvStream,
) -> Result<Option<T>, StreamError> {
    let mut prefix = [0u8; frame::HEADER_LEN];
    let mut got = 0;
    while got < prefix.len() {
        match recv.read(&mut prefix[got..]).await? {
            Some(n) => got += n,
            None if got == 0 => return Ok(None),
            None => return Err(StreamError::Closed),
        }
    }
    let len = frame::check_len(prefix)?;
    let mut payload = vec![0u8; len];
    recv.read_exact(&mut payload).await.map_err(|e| match e {
        quinn::ReadExactError::FinishedEarly(_) => StreamError::Closed,
        quinn::ReadExactError::ReadError(e) => StreamError::Read(e),
    })?;
    Ok(Some(frame::decode_payload(&payload)?))
}

/// Reads one frame within `limit`; a finished stream is an error here.
pub async fn read_frame_timeout<T: DeserializeOwned>(
    recv: &mut RecvStream,
    limit: Duration,
) -> Result<T, StreamError> {
    match tokio::time::timeout(limit, read_frame(recv)).await {
        Err(_) => Err(StreamError::Timeout),
        Ok(r) => r?.ok_or(StreamError::Closed),
    }
}

/// Writes one frame.
pub async fn write_frame<T: Serialize>(send: &mut SendStream, msg: &T) -> Result<(), StreamError> {
    let bytes = frame::encode(msg)?;
    send.write_chunk(bytes).await?;
    Ok(())
}

/// Byte totals of a finished splice and whether it ended by an abort (reset) rather than FINs.
#[derive(Debug, Default, Clone, Copy)]
pub struct SpliceStats {
    /// Bytes read from the first endpoint and written to the second.
    pub forward: u64,
    /// Bytes read from the second endpoint and written to the first.
    pub backward: u64,
    pub aborted: bool,
}

fn code(c: u32) -> VarInt {
    VarInt::from_u32(c)
}

/// Copies one QUIC stream into another, chunk by chunk without copying the bytes, propagating
/// finish, reset and stop in both directions. Returns bytes copied and whether it was aborted.
pub async fn pipe_quic(
    recv: &mut RecvStream,
    send: &mut SendStream,
    counter: Option<&IntCounter>,
) -> (u64, bool) {
    let mut total = 0u64;
    loop {
        let chunk = tokio::select! {
            r = recv.read_chunk(64 * 1024, true) => r,
            stopped = send.stopped() => {
                let c = match stopped { Ok(Some(c)) => c, _ => code(codes::FLOW_ABORTED) };
                let _ = recv.stop(c);
                return (total, true);
            }
        };
        match chunk {
            Ok(Some(chunk)) => {
                let n = chunk.bytes.len() as u64;
                if let Err(e) = send.write_chunk(chunk.bytes).await {
                    let c = match e {
                        WriteError::Stopped(c) => c,
                        _ => code(codes::FLOW_ABORTED),
                    };
                    let _ = recv.stop(c);
                    return (total, true);
                }
                total += n;
                if let Some(c) = counter {
                    c.inc_by(n);
                }
            }
            Ok(None) => {
                let _ = send.finish();
                return (total, false);
            }
            Err(ReadError::Reset(c)) => {
                let _ = send.reset(c);
                return (total, true);
            }
            Err(_) => {
                let _ = send.reset(code(codes::FLOW_ABORTED));
                return (total, true);
            }
        }
    }
}

/// Relays a flow between two QUIC streams in both directions until both are done.
pub async fn splice_quic(
    a: (&mut SendStream, &mut RecvStream),
    b: (&mut SendStream, &mut RecvStream),
    a_to_b: Option<&IntCounter>,
    b_to_a: Option<&IntCounter>,
) -> SpliceStats {
    let (a_send, a_recv) = a;
    let (b_send, b_recv) = b;
    let ((forward, f_abort), (backward, b_abort)) = tokio::join!(
        pipe_quic(a_recv, b_send, a_to_b),
        pipe_quic(b_recv, a_send, b_to_a)
    );
    SpliceStats {
        forward,
        backward,
        aborted: f_abort || b_abort,
    }
}

/// Relays a flow between a TCP connection and a QUIC stream pair until both directions are done.
///
/// TCP EOF → stream finish; stream finish → TCP shutdown(write) (FIN), so half-close works.
/// TCP reset or read error → stream reset; stream reset → TCP RST (SO_LINGER 0 then close).
/// `forward` counts TCP→QUIC bytes, `backward` QUIC→TCP.
pub async fn splice_tcp(
    tcp: TcpStream,
    send: &mut SendStream,
    recv: &mut RecvStream,
    tcp_to_quic: Option<&IntCounter>,
    quic_to_tcp: Option<&IntCounter>,
) -> SpliceStats {
    let (mut rd, mut wr) = tcp.into_split();
    let abort = tokio_util::sync::CancellationToken::new();

    let up = async {
        let mut buf = vec![0u8; 32 * 1024];
        let mut total = 0u64;
        loop {
            let n = tokio::select! {
                _ = abort.cancelled() => { let _ = send.reset(code(codes::FLOW_ABORTED)); return total; }
                r = rd.read(&mut buf) => r,
            };
            match n {
                Ok(0) => {
                    let _ = send.finish();
                    return total;
                }
                Ok(n) => {
                    let res = tokio::select! {
                        _ = abort.cancelled() => { let _ = send.reset(code(codes::FLOW_ABORTED)); return total; }
                        r = send.write_all(&buf[..n]) => r,
                    };
                    if res.is_err() {
                        abort.cancel();
                        return total;
                    }
                    total += n as u64;
                    if let Some(c) = tcp_to_quic {
                        c.inc_by(n as u64);
                    }
                }
                Err(_) => {
                    let _ = send.reset(code(codes::FLOW_RESET));
                    abort.cancel();
                    return total;
                }
            }
        }
    };

    let down = async {
        let mut total = 0u64;
        loop {
            let chunk = tokio::select! {
                _ = abort.cancelled() => { let _ = recv.stop(code(codes::FLOW_ABORTED)); return total; }
                r = recv.read_chunk(64 * 1024, true) => r,
            };
            match chunk {
                Ok(Some(chunk)) => {
                    let n = chunk.bytes.len() as u64;
                    let res = tokio::select! {
                        _ = abort.cancelled() => return total,
                        r = wr.write_all(&chunk.bytes) => r,
                    };
                    if res.is_err() {
                        let _ = recv.stop(code(codes::FLOW_RESET));
                        abort.cancel();
                        return total;
                    }
                    total += n;
                    if let Some(c) = quic_to_tcp {
                        c.inc_by(n);
                    }
                }
                Ok(None) => {
                    let _ = wr.shutdown().await;
                    return total;
                }
                Err(_) => {
                    abort.cancel();
                    return total;
                }
            }
        }
    };

    let (forward, backward) = tokio::join!(up, down);
    let aborted = abort.is_cancelled();
    if aborted {
        // Abortive close: the local TCP peer sees RST, not a clean FIN.
        if let Ok(tcp) = rd.reunite(wr) {
            // SO_LINGER 0 does not block on close; it makes close() send RST.
            let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
            drop(tcp);
        }
    }
    SpliceStats {
        forward,
        backward,
        aborted,
    }
}
