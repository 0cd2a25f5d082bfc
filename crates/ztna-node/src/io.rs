//! Stream helpers: framed messages on QUIC streams and the splices that carry flows.
//!
//! Reads of framed streams go through [`FramedRecv`], which owns the stream *and* its receive
//! buffer: bytes are taken with quinn's cancel-safe `read_chunk` and parsed by
//! [`ztna_proto::FrameDecoder`], so a `select!` that drops a pending read loses nothing, however
//! the peer's frames were split into packets.
//!
//! Splices map transport semantics end to end: a finished stream becomes a TCP FIN (and back), a
//! reset stream becomes a TCP RST (and back), and QUIC flow control gives backpressure because
//! nothing is read faster than it can be written on. Every splice also ends on an idle timeout
//! or an external abort (revocation, drain deadline), resetting both sides.

use std::time::Duration;

use bytes::Bytes;
use prometheus::IntCounter;
use quinn::{ReadError, RecvStream, SendStream, VarInt, WriteError};
use serde::Serialize;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use ztna_proto::{codes, frame, FrameDecoder, FrameError, Message};

use crate::clock::Activity;
use crate::credit::FlowCredit;
use crate::flows::{CancelCode, FlowGuard};

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

    /// True when the peer sent something malformed (as opposed to going away).
    pub fn is_protocol(&self) -> bool {
        matches!(self, StreamError::Frame(_))
    }
}

/// Largest chunk taken from a stream at once.
const CHUNK: usize = 64 * 1024;
/// Most received chunks (about a packet each) moved in one batch.
const BATCH: usize = 32;

/// Writes all of `bufs` to `w` with vectored writes (one system call for many chunks).
async fn write_all_bytes<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    bufs: &mut [Bytes],
) -> std::io::Result<()> {
    use bytes::Buf;
    let mut first = 0;
    while first < bufs.len() {
        let slices: Vec<std::io::IoSlice<'_>> = bufs[first..]
            .iter()
            .filter(|b| !b.is_empty())
            .map(|b| std::io::IoSlice::new(b))
            .collect();
        if slices.is_empty() {
            return Ok(());
        }
        let mut n = w.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 && first < bufs.len() {
            let take = n.min(bufs[first].len());
            bufs[first].advance(take);
            n -= take;
            if bufs[first].is_empty() {
                first += 1;
            }
        }
        while first < bufs.len() && bufs[first].is_empty() {
            first += 1;
        }
    }
    Ok(())
}

/// A receive stream carrying length-prefixed frames, with its own buffer (cancel-safe reads).
pub struct FramedRecv {
    recv: RecvStream,
    dec: FrameDecoder,
    finished: bool,
}

impl FramedRecv {
    pub fn new(recv: RecvStream) -> FramedRecv {
        FramedRecv {
            recv,
            dec: FrameDecoder::new(),
            finished: false,
        }
    }

    /// The next complete frame's payload; `Ok(None)` when the stream finished cleanly between
    /// frames. Cancel-safe: dropping the future keeps every byte already received.
    pub async fn next_frame(&mut self) -> Result<Option<Bytes>, StreamError> {
        loop {
            if let Some(f) = self.dec.next_frame()? {
                return Ok(Some(f));
            }
            if self.finished {
                return if self.dec.pending() == 0 {
                    Ok(None)
                } else {
                    Err(StreamError::Closed)
                };
            }
            match self.recv.read_chunk(CHUNK, true).await? {
                Some(chunk) => self.dec.extend(&chunk.bytes),
                None => self.finished = true,
            }
        }
    }

    /// The next frame already received in full, without waiting. A malformed frame is left for
    /// [`Self::next_frame`] to report.
    pub fn buffered_frame(&mut self) -> Option<Bytes> {
        self.dec.next_frame().ok().flatten()
    }

    /// The next message; `Ok(None)` at a clean end of stream. Cancel-safe.
    pub async fn next<T: Message>(&mut self) -> Result<Option<T>, StreamError> {
        match self.next_frame().await? {
            Some(payload) => Ok(Some(frame::decode_payload(&payload)?)),
            None => Ok(None),
        }
    }

    /// The next message within `limit`; an ended stream is an error here.
    pub async fn expect<T: Message>(&mut self, limit: Duration) -> Result<T, StreamError> {
        match tokio::time::timeout(limit, self.next()).await {
            Err(_) => Err(StreamError::Timeout),
            Ok(r) => r?.ok_or(StreamError::Closed),
        }
    }

    pub fn stream(&mut self) -> &mut RecvStream {
        &mut self.recv
    }

    /// The stream and whatever was received past the last frame (bytes a peer pipelined after a
    /// flow header), to be passed on before anything read later.
    pub fn into_parts(mut self) -> (RecvStream, Bytes) {
        let rest = self.dec.take_pending();
        (self.recv, rest)
    }
}

/// Writes one frame.
pub async fn write_frame<T: Serialize>(send: &mut SendStream, msg: &T) -> Result<(), StreamError> {
    let bytes = frame::encode(msg)?;
    send.write_chunk(bytes).await?;
    Ok(())
}

/// Most raw frames [`write_raw_frames`] is given at once by the UDP stream writers.
pub const FRAME_BATCH: usize = 32;

/// Writes every payload in `batch` as a raw frame (`u32 length ‖ payload`), in order, as one
/// contiguous chunk: one lock of the connection and one wake-up of its driver per batch, and
/// one segment in quinn's send buffer. quinn looks a packet's data up by walking the stream's
/// unacknowledged segments from the oldest, and a STREAM frame never spans two segments, so a
/// 4-byte header and its payload written as two chunks cost a frame each and lengthen every
/// later walk; copying the payloads (UDP-sized) costs less. Leaves `batch` empty.
pub async fn write_raw_frames(
    send: &mut SendStream,
    batch: &mut Vec<Bytes>,
) -> Result<(), StreamError> {
    let total: usize = batch.iter().map(|p| frame::HEADER_LEN + p.len()).sum();
    let mut out = bytes::BytesMut::with_capacity(total);
    for payload in batch.drain(..) {
        out.extend_from_slice(&frame::raw_header(payload.len())?);
        out.extend_from_slice(&payload);
    }
    send.write_chunk(out.freeze()).await?;
    Ok(())
}

/// Moves what `rx` already holds into `batch`, up to [`FRAME_BATCH`] in all, without waiting.
pub fn take_ready(rx: &mut tokio::sync::mpsc::Receiver<Bytes>, batch: &mut Vec<Bytes>) {
    while batch.len() < FRAME_BATCH {
        match rx.try_recv() {
            Ok(p) => batch.push(p),
            Err(_) => return,
        }
    }
}

/// How a splice ended.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum SpliceEnd {
    /// Both directions finished (FIN both ways).
    #[default]
    Finished,
    /// One side reset, stopped or went away; the other side was reset too.
    Aborted,
    /// No byte in either direction for the idle timeout; both sides were reset.
    Idle,
    /// Ended from outside (revocation, drain deadline, shutdown); both sides were reset.
    Cancelled,
}

/// Which end of a TCP ↔ QUIC splice failed first, when it was aborted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AbortCause {
    /// The TCP connection: its peer reset it, or reading or writing it failed.
    Tcp,
    /// The QUIC side: the stream was reset or stopped by the peer (the reason names its code),
    /// or the connection carrying it was lost.
    Tunnel(String),
}

/// Byte totals of a finished splice and how it ended.
#[derive(Debug, Default, Clone)]
pub struct SpliceStats {
    /// Bytes read from the first endpoint and written to the second.
    pub forward: u64,
    /// Bytes read from the second endpoint and written to the first.
    pub backward: u64,
    pub end: SpliceEnd,
    /// For an [`SpliceEnd::Aborted`] TCP splice: which end failed first.
    pub cause: Option<AbortCause>,
}

impl SpliceStats {
    pub fn aborted(&self) -> bool {
        self.end != SpliceEnd::Finished
    }
}

/// What else can end a splice besides its endpoints.
#[derive(Clone, Default)]
pub struct SpliceCtl {
    /// Reset both sides when no byte moved either way for this long.
    pub idle_timeout: Option<Duration>,
    /// Reset both sides (with the code in `code`) when this is cancelled.
    pub cancel: CancellationToken,
    pub code: CancelCode,
    /// Touched on every byte moved (for idle decisions elsewhere, e.g. a drain).
    pub activity: Activity,
}

impl SpliceCtl {
    /// Ends with the flow: its cancellation, reason code and activity clock.
    pub fn for_flow<M>(guard: &FlowGuard<M>, idle_timeout: Option<Duration>) -> Self {
        SpliceCtl {
            idle_timeout,
            cancel: guard.cancel.clone(),
            code: guard.code.clone(),
            activity: guard.activity.clone(),
        }
    }

    /// Completes with the reason the splice must end early: idle or cancelled.
    async fn stop_reason(&self) -> SpliceEnd {
        let idle = async {
            let Some(limit) = self.idle_timeout else {
                return std::future::pending().await;
            };
            self.activity.idle_out(limit).await
        };
        tokio::select! {
            _ = self.cancel.cancelled() => SpliceEnd::Cancelled,
            _ = idle => SpliceEnd::Idle,
        }
    }

    fn end_code(&self, end: SpliceEnd) -> u32 {
        match end {
            SpliceEnd::Idle => codes::IDLE,
            SpliceEnd::Cancelled => self.code.get(),
            _ => codes::FLOW_ABORTED,
        }
    }
}

fn code(c: u32) -> VarInt {
    VarInt::from_u32(c)
}

/// How long a flow's finished direction waits for the peer to acknowledge the last of it.
const DELIVERY_WAIT: Duration = Duration::from_secs(10);

/// Finishes `send` and returns once the peer has acknowledged everything on it (`stopped`, the
/// stream's [`SendStream::stopped`], resolves), `abort` fires, or [`DELIVERY_WAIT`] passes.
/// A direction of a flow ends only then: a drain closes the connection as soon as its flows
/// have ended, and closing discards whatever quinn has not yet sent or had acknowledged, so the
/// end of a response could be lost (the client saw a reset instead).
async fn finish_delivered(
    send: &mut SendStream,
    stopped: std::pin::Pin<&mut impl std::future::Future>,
    abort: impl std::future::Future,
) {
    let _ = send.finish();
    tokio::select! {
        _ = stopped => {}
        _ = abort => {}
        _ = tokio::time::sleep(DELIVERY_WAIT) => {}
    }
}

/// Copies one QUIC stream into another, chunk by chunk without copying the bytes, starting with
/// `prefix` (bytes already read past a header), propagating finish, reset and stop in both
/// directions. Ends early (with a reset) when `stop` is cancelled. Returns bytes copied and
/// whether it was aborted.
/// `recv_credit` counts what is read from `recv`; `send_credit` budgets what goes to `send`.
#[allow(clippy::too_many_arguments)]
async fn pipe_quic(
    recv: &mut RecvStream,
    prefix: Bytes,
    send: &mut SendStream,
    counter: Option<&IntCounter>,
    activity: &Activity,
    stop: &CancellationToken,
    recv_credit: FlowCredit<'_>,
    send_credit: FlowCredit<'_>,
) -> (u64, bool) {
    let mut total = 0u64;
    let stopped = send.stopped();
    tokio::pin!(stopped);
    // Whatever is ready is moved in one batch (one wake-up and one lock of each connection per
    // batch instead of per received packet).
    let mut bufs: [Bytes; BATCH] = Default::default();
    let mut pending = (!prefix.is_empty()).then_some(prefix);
    loop {
        let got = match pending.take() {
            Some(p) => {
                bufs[0] = p;
                Ok(Some(1))
            }
            None => tokio::select! {
                r = recv.read_chunks(&mut bufs) => r,
                s = &mut stopped => {
                    let c = match s { Ok(Some(c)) => c, _ => code(codes::FLOW_ABORTED) };
                    let _ = recv.stop(c);
                    return (total, true);
                }
                _ = stop.cancelled() => return (total, true),
            },
        };
        match got {
            Ok(Some(k)) => {
                let n: u64 = bufs[..k].iter().map(|b| b.len() as u64).sum();
                activity.touch();
                recv_credit.read(n);
                // One segment for the batch in quinn's send buffer, not one per received packet:
                // quinn finds a packet's data by walking a stream's unacknowledged segments from
                // the oldest, and at relay speeds thousands of packet-sized segments are in
                // flight (8 % of the intermediate's CPU in `ztna-bench --mode tcp`). Copying the
                // batch once costs less.
                if k > 1 {
                    let mut joined = bytes::BytesMut::with_capacity(n as usize);
                    for b in &mut bufs[..k] {
                        joined.extend_from_slice(b);
                        *b = Bytes::new();
                    }
                    bufs[0] = joined.freeze();
                }
                let k = k.min(1);
                let res = tokio::select! {
                    r = async {
                        send_credit.take(n).await;
                        send.write_all_chunks(&mut bufs[..k]).await
                    } => r,
                    _ = stop.cancelled() => return (total, true),
                };
                if let Err(e) = res {
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
                finish_delivered(send, stopped.as_mut(), stop.cancelled()).await;
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

/// One side of a QUIC splice: the stream pair, any bytes already read from `recv`, and the
/// flow credit of this stream pair (writes to `send` budgeted, reads from `recv` reported).
pub struct QuicSide<'a> {
    pub send: &'a mut SendStream,
    pub recv: &'a mut RecvStream,
    pub prefix: Bytes,
    pub credit: FlowCredit<'a>,
}

/// Relays a flow between two QUIC stream pairs in both directions until both are done, the
/// flow idles out, or `ctl.cancel` fires. A direction that aborts (a reset, a stop, a lost
/// connection) aborts the whole flow, like a TCP reset: the other direction may be blocked on a
/// peer that will never take more (a stalled receiver, an exhausted flow credit), and must not
/// keep the flow and its buffers alive after one end is gone.
pub async fn splice_quic(
    a: QuicSide<'_>,
    b: QuicSide<'_>,
    a_to_b: Option<&IntCounter>,
    b_to_a: Option<&IntCounter>,
    ctl: &SpliceCtl,
) -> SpliceStats {
    let early = CancellationToken::new();
    let abort_on_abort = |r: (u64, bool)| {
        if r.1 {
            early.cancel();
        }
        r
    };
    let (((forward, f_abort), (backward, b_abort)), early_end) = {
        let pipes = async {
            tokio::join!(
                async {
                    let r = pipe_quic(
                        a.recv,
                        a.prefix,
                        b.send,
                        a_to_b,
                        &ctl.activity,
                        &early,
                        a.credit,
                        b.credit,
                    )
                    .await;
                    abort_on_abort(r)
                },
                async {
                    let r = pipe_quic(
                        b.recv,
                        b.prefix,
                        a.send,
                        b_to_a,
                        &ctl.activity,
                        &early,
                        b.credit,
                        a.credit,
                    )
                    .await;
                    abort_on_abort(r)
                }
            )
        };
        tokio::pin!(pipes);
        tokio::select! {
            r = &mut pipes => (r, None),
            why = ctl.stop_reason() => {
                early.cancel();
                (pipes.await, Some(why))
            }
        }
    };
    let end = match early_end {
        Some(why) => {
            let c = code(ctl.end_code(why));
            let _ = a.send.reset(c);
            let _ = b.send.reset(c);
            let _ = a.recv.stop(c);
            let _ = b.recv.stop(c);
            why
        }
        None if f_abort || b_abort => {
            // The aborting direction passed its code on; the other one learns it ended too.
            let c = code(codes::FLOW_ABORTED);
            let _ = a.send.reset(c);
            let _ = b.send.reset(c);
            let _ = a.recv.stop(c);
            let _ = b.recv.stop(c);
            SpliceEnd::Aborted
        }
        None => SpliceEnd::Finished,
    };
    SpliceStats {
        forward,
        backward,
        end,
        cause: None,
    }
}

/// Makes a TCP socket abortive by default: if this process dies, the kernel closes it with RST,
/// so the peer sees the truncation instead of a clean end of stream. A graceful end sends its
/// FIN with an explicit `shutdown(Write)` and clears the linger before the socket is dropped
/// (see [`splice_tcp`]). Also enables TCP keepalive so a peer that vanished is noticed.
pub fn prepare_tcp(tcp: &TcpStream) {
    let sock = socket2::SockRef::from(tcp);
    let _ = sock.set_linger(Some(Duration::ZERO));
    let _ = tcp.set_nodelay(true);
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10));
    let _ = sock.set_tcp_keepalive(&ka);
}

/// Relays a flow between a TCP connection and a QUIC stream pair until both directions are done.
///
/// TCP EOF → stream finish; stream finish → TCP shutdown(write) (FIN), so half-close works.
/// TCP reset or read error → stream reset; stream reset or stop → TCP RST. An idle timeout or
/// `ctl.cancel` resets the stream and the TCP connection. `forward` counts TCP→QUIC bytes,
/// `backward` QUIC→TCP. `prefix` is stream data already read past the flow header.
///
/// The TCP socket should have gone through [`prepare_tcp`] (abortive close by default).
/// `credit` budgets the writes to `send` and counts the reads from `recv` (flow credit).
#[allow(clippy::too_many_arguments)]
pub async fn splice_tcp(
    tcp: TcpStream,
    send: &mut SendStream,
    recv: &mut RecvStream,
    prefix: Bytes,
    tcp_to_quic: Option<&IntCounter>,
    quic_to_tcp: Option<&IntCounter>,
    ctl: &SpliceCtl,
    credit: FlowCredit<'_>,
) -> SpliceStats {
    let (mut rd, mut wr) = tcp.into_split();
    let abort = CancellationToken::new();
    // The first failure, whichever direction saw it (the other one then stops on `abort`).
    let cause = std::sync::OnceLock::new();
    let fail = |c: AbortCause| {
        let _ = cause.set(c);
        abort.cancel();
    };
    let activity = &ctl.activity;
    let ((forward, backward), early) = {
        let up = async {
            // Read straight into a buffer whose filled part goes to quinn without another copy.
            let mut buf = bytes::BytesMut::with_capacity(CHUNK);
            let mut total = 0u64;
            // The peer stopping the stream (or its connection going away) ends this direction
            // even while the TCP side has nothing to say.
            let stopped = send.stopped();
            tokio::pin!(stopped);
            loop {
                if buf.capacity() < CHUNK / 4 {
                    buf.reserve(CHUNK);
                }
                let n = tokio::select! {
                    _ = abort.cancelled() => return total,
                    r = rd.read_buf(&mut buf) => r,
                    r = &mut stopped => {
                        fail(AbortCause::Tunnel(match r {
                            Ok(Some(c)) => format!("stopped by the peer: {}", codes::name(c.into_inner())),
                            Ok(None) => "stopped by the peer".to_string(),
                            Err(e) => e.to_string(),
                        }));
                        return total;
                    }
                };
                match n {
                    Ok(0) => {
                        finish_delivered(send, stopped.as_mut(), abort.cancelled()).await;
                        return total;
                    }
                    Ok(n) => {
                        activity.touch();
                        let chunk = buf.split().freeze();
                        let res = tokio::select! {
                            _ = abort.cancelled() => return total,
                            r = async {
                                credit.take(n as u64).await;
                                send.write_chunk(chunk).await
                            } => r,
                        };
                        if let Err(e) = res {
                            fail(AbortCause::Tunnel(e.to_string()));
                            return total;
                        }
                        total += n as u64;
                        if let Some(c) = tcp_to_quic {
                            c.inc_by(n as u64);
                        }
                    }
                    Err(_) => {
                        let _ = send.reset(code(codes::FLOW_RESET));
                        fail(AbortCause::Tcp);
                        return total;
                    }
                }
            }
        };

        let down = async {
            let mut total = 0u64;
            let mut bufs: [Bytes; BATCH] = Default::default();
            let mut pending = (!prefix.is_empty()).then_some(prefix);
            loop {
                let got = match pending.take() {
                    Some(p) => {
                        bufs[0] = p;
                        Ok(Some(1))
                    }
                    None => tokio::select! {
                        _ = abort.cancelled() => return total,
                        r = recv.read_chunks(&mut bufs) => r,
                    },
                };
                match got {
                    Ok(Some(k)) => {
                        let n: u64 = bufs[..k].iter().map(|b| b.len() as u64).sum();
                        activity.touch();
                        credit.read(n);
                        // Everything ready in one vectored write, not a system call per packet.
                        let res = tokio::select! {
                            _ = abort.cancelled() => return total,
                            r = write_all_bytes(&mut wr, &mut bufs[..k]) => r,
                        };
                        if res.is_err() {
                            fail(AbortCause::Tcp);
                            return total;
                        }
                        total += n;
                        if let Some(c) = quic_to_tcp {
                            c.inc_by(n);
                        }
                    }
                    Ok(None) => {
                        // A real FIN, whatever the socket's linger setting.
                        let _ = wr.shutdown().await;
                        return total;
                    }
                    Err(e) => {
                        fail(AbortCause::Tunnel(match e {
                            ReadError::Reset(c) => {
                                format!("reset by the peer: {}", codes::name(c.into_inner()))
                            }
                            e => e.to_string(),
                        }));
                        return total;
                    }
                }
            }
        };

        let both = async { tokio::join!(up, down) };
        tokio::pin!(both);
        tokio::select! {
            r = &mut both => (r, None),
            why = ctl.stop_reason() => {
                abort.cancel();
                (both.await, Some(why))
            }
        }
    };
    let end = match early {
        Some(why) => why,
        None if abort.is_cancelled() => SpliceEnd::Aborted,
        None => SpliceEnd::Finished,
    };
    let tcp = rd.reunite(wr).ok();
    if end == SpliceEnd::Finished {
        // Both FINs exchanged: an orderly close, not a reset.
        if let Some(tcp) = &tcp {
            let _ = socket2::SockRef::from(tcp).set_linger(None);
        }
    } else {
        // Abortive close: the stream is reset and the local TCP peer sees RST (SO_LINGER 0 makes
        // close() send RST), never a clean FIN it could take for a complete transfer.
        let c = code(ctl.end_code(end));
        let _ = send.reset(c);
        let _ = recv.stop(c);
        if let Some(tcp) = &tcp {
            let _ = socket2::SockRef::from(tcp).set_linger(Some(Duration::ZERO));
        }
    }
    drop(tcp);
    SpliceStats {
        forward,
        backward,
        end,
        cause: (end == SpliceEnd::Aborted)
            .then(|| cause.into_inner())
            .flatten(),
    }
}
