//! UDP sockets for flows: sized for bursts, connected where the peer is fixed.

use std::net::SocketAddr;

use tokio::net::UdpSocket;

fn any_for(peer: &SocketAddr) -> SocketAddr {
    if peer.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    }
}

/// Sets the socket's send and receive buffers to `bytes` (the kernel caps them at
/// `net.core.{r,w}mem_max`; the effective size is what it granted).
pub fn size_buffers(socket: &UdpSocket, bytes: usize) {
    let s = socket2::SockRef::from(socket);
    let _ = s.set_recv_buffer_size(bytes);
    let _ = s.set_send_buffer_size(bytes);
}

/// A UDP socket *connected* to `peer`, so the kernel delivers only datagrams from `peer`, with
/// buffers of `bytes`.
pub async fn connected(peer: SocketAddr, bytes: usize) -> std::io::Result<UdpSocket> {
    let socket = UdpSocket::bind(any_for(&peer)).await?;
    size_buffers(&socket, bytes);
    socket.connect(peer).await?;
    // tokio knows a new socket is writable only once its reactor has seen the registration's
    // first event; until then `try_send` fails with WouldBlock without trying. A UDP flow's
    // first datagram is sent with `try_send` as soon as the flow exists, so wait for it here.
    socket.writable().await?;
    Ok(socket)
}

/// Points a connected UDP socket at `peer` instead (same address family), at once: datagrams
/// sent from now on go there, and only `peer`'s are received.
pub fn reconnect(socket: &UdpSocket, peer: SocketAddr) -> std::io::Result<()> {
    socket2::SockRef::from(socket).connect(&peer.into())
}

/// A UDP socket bound to `addr` (a local forward), with buffers of `bytes`.
pub async fn bound(addr: SocketAddr, bytes: usize) -> std::io::Result<UdpSocket> {
    let socket = UdpSocket::bind(addr).await?;
    size_buffers(&socket, bytes);
    Ok(socket)
}

/// One datagram received with [`recv_from`] / [`recv_buf_from`].
#[derive(Debug, Clone, Copy)]
pub struct Received {
    pub len: usize,
    pub from: SocketAddr,
    /// The socket's cumulative count of datagrams the kernel dropped because its receive buffer
    /// was full (`SO_RXQ_OVFL`), if the socket reports it.
    pub overflows: Option<u32>,
}

/// Asks the kernel to report receive-buffer drops with every datagram (`SO_RXQ_OVFL`, Linux).
/// Returns whether it will.
pub fn report_overflows(socket: &UdpSocket) -> bool {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let on: libc::c_int = 1;
        // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a live local.
        let r = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RXQ_OVFL,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        r == 0
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = socket;
        false
    }
}

/// Sets the socket's receive and send buffers to `bytes` past the kernel's limits
/// (`net.core.rmem_max` / `wmem_max`) with `SO_RCVBUFFORCE` / `SO_SNDBUFFORCE`, which the kernel
/// allows only to a process with `CAP_NET_ADMIN` (root, typically). Returns whether both were
/// set; without the capability nothing changes.
pub fn force_buffers(socket: &std::net::UdpSocket, bytes: usize) -> bool {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let Ok(v) = libc::c_int::try_from(bytes) else {
            return false;
        };
        [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE]
            .into_iter()
            .all(|opt| {
                // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a live local.
                let r = unsafe {
                    libc::setsockopt(
                        socket.as_raw_fd(),
                        libc::SOL_SOCKET,
                        opt,
                        (&v as *const libc::c_int).cast(),
                        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                    )
                };
                r == 0
            })
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (socket, bytes);
        false
    }
}

/// `recvmsg` into `buf`, with the `SO_RXQ_OVFL` control message decoded.
#[cfg(target_os = "linux")]
fn recvmsg(
    fd: std::os::fd::RawFd,
    buf: &mut [std::mem::MaybeUninit<u8>],
) -> std::io::Result<Received> {
    let (buf, cap) = (buf.as_mut_ptr().cast::<u8>(), buf.len());
    // Room for one SO_RXQ_OVFL control message (CMSG_SPACE(4) is 16 on 64-bit Linux).
    let mut control = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: buf.cast(),
        iov_len: cap,
    };
    // SAFETY: every pointer handed to recvmsg points at live locals or at `buf`, which the
    // caller guarantees is valid for `cap` writable bytes; the kernel writes at most the lengths
    // given. Control messages are walked with the libc CMSG macros within `msg_controllen`.
    let (len, overflows, addr) = unsafe {
        socket2::SockAddr::try_init(|storage, addr_len| {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_name = storage.cast();
            msg.msg_namelen = *addr_len;
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&control) as _;
            let n = libc::recvmsg(fd, &mut msg, 0);
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
            *addr_len = msg.msg_namelen;
            let mut overflows = None;
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SO_RXQ_OVFL {
                    overflows = Some(std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<u32>()));
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
            Ok((n as usize, overflows))
        })
        .map(|((n, o), addr)| (n, o, addr))?
    };
    let from = addr.as_socket().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "datagram from a non-IP address",
        )
    })?;
    Ok(Received {
        len,
        from,
        overflows,
    })
}

/// Receives one datagram into `buf`, reporting kernel receive-buffer drops (see
/// [`report_overflows`]).
pub async fn recv_from(socket: &UdpSocket, buf: &mut [u8]) -> std::io::Result<Received> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let fd = socket.as_raw_fd();
        // SAFETY: viewing initialised bytes as possibly-uninitialised ones is sound as long as
        // nothing uninitialised is written through the view; only the kernel writes into it.
        let buf = unsafe {
            std::slice::from_raw_parts_mut(
                buf.as_mut_ptr().cast::<std::mem::MaybeUninit<u8>>(),
                buf.len(),
            )
        };
        socket
            .async_io(tokio::io::Interest::READABLE, || recvmsg(fd, buf))
            .await
    }
    #[cfg(not(target_os = "linux"))]
    {
        let (len, from) = socket.recv_from(buf).await?;
        Ok(Received {
            len,
            from,
            overflows: None,
        })
    }
}

/// One `recvmsg` into the spare capacity of `buf`, extending its length.
#[cfg(target_os = "linux")]
fn recv_spare(socket: &UdpSocket, buf: &mut bytes::BytesMut) -> std::io::Result<Received> {
    use std::os::fd::AsRawFd;
    let r = recvmsg(socket.as_raw_fd(), buf.spare_capacity_mut())?;
    // SAFETY: the kernel initialised `r.len <= cap` bytes of the spare capacity.
    unsafe { buf.set_len(buf.len() + r.len) };
    Ok(r)
}

/// Receives one datagram into the spare capacity of `buf` (extending its length), reporting
/// kernel receive-buffer drops. `buf` must have spare capacity for the largest datagram.
pub async fn recv_buf_from(
    socket: &UdpSocket,
    buf: &mut bytes::BytesMut,
) -> std::io::Result<Received> {
    #[cfg(target_os = "linux")]
    {
        socket
            .async_io(tokio::io::Interest::READABLE, || recv_spare(socket, buf))
            .await
    }
    #[cfg(not(target_os = "linux"))]
    {
        let (len, from) = socket.recv_buf_from(buf).await?;
        Ok(Received {
            len,
            from,
            overflows: None,
        })
    }
}

/// [`recv_buf_from`] without waiting: `WouldBlock` when no datagram is ready.
pub fn try_recv_buf_from(
    socket: &UdpSocket,
    buf: &mut bytes::BytesMut,
) -> std::io::Result<Received> {
    #[cfg(target_os = "linux")]
    {
        socket.try_io(tokio::io::Interest::READABLE, || recv_spare(socket, buf))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let (len, from) = socket.try_recv_buf_from(buf)?;
        Ok(Received {
            len,
            from,
            overflows: None,
        })
    }
}

/// Turns a socket's cumulative `SO_RXQ_OVFL` readings into counter increments.
#[derive(Debug, Default)]
pub struct OverflowCounter {
    last: Option<u32>,
}

impl OverflowCounter {
    /// Drops since the previous reading (the first reading counts from zero).
    pub fn delta(&mut self, reading: Option<u32>) -> u64 {
        let Some(now) = reading else { return 0 };
        let before = self.last.replace(now).unwrap_or(0);
        u64::from(now.wrapping_sub(before))
    }
}

/// Datagrams the kernel dropped at the UDP socket bound to `port` (in this network namespace)
/// because its receive buffer was full: the `drops` column of `/proc/self/net/udp` and `udp6`.
/// `None` where that table cannot be read. quinn reads its socket with `recvmmsg` and has no
/// overflow counter of its own, so this is the only place these drops show.
pub fn kernel_drops_at(port: u16) -> Option<u64> {
    let mut found = None;
    for table in ["/proc/self/net/udp", "/proc/self/net/udp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        found = Some(found.unwrap_or(0) + drops_in(&text, port));
    }
    found
}

/// Sums the `drops` column of the rows of a `/proc/net/udp{,6}` table whose local port is `port`.
fn drops_in(table: &str, port: u16) -> u64 {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = f.get(1)?.rsplit(':').next()?;
            if u16::from_str_radix(local_port, 16).ok()? != port {
                return None;
            }
            f.last()?.parse::<u64>().ok()
        })
        .sum()
}

/// How often [`watch_quic_socket`] reads the kernel's count.
pub const KERNEL_DROPS_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

const KERNEL_DROP_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Adds what the kernel drops at the QUIC socket on `port` to `counter` every
/// [`KERNEL_DROPS_EVERY`], and warns (at most once a minute) while it rises, until `stop`.
pub async fn watch_quic_socket(
    port: u16,
    counter: prometheus::IntCounter,
    stop: tokio_util::sync::CancellationToken,
) {
    // Reading the kernel's table is file I/O (long on a host with many sockets): off the runtime.
    let read = move || async move {
        tokio::task::spawn_blocking(move || kernel_drops_at(port))
            .await
            .ok()
            .flatten()
    };
    let Some(mut last) = read().await else {
        tracing::debug!("no /proc/self/net/udp: kernel drops at the QUIC socket are not counted");
        return;
    };
    let mut tick = tokio::time::interval(KERNEL_DROPS_EVERY);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(now) = read().await else {
            continue;
        };
        let lost = now.saturating_sub(last);
        last = now;
        if lost > 0 {
            counter.inc_by(lost);
            crate::warn_limited!(KERNEL_DROP_LOG_EVERY, port, lost, "the kernel dropped packets at the QUIC socket: its receive buffer was full (raise net.core.rmem_max; the NixOS modules set 16 MiB)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rows of the socket's port are summed (an IPv4 and an IPv6 table), others ignored.
    #[test]
    fn kernel_drops_are_read_per_local_port() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
  1: 00000000:115C 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 4242 2 0000000000000000 17\n\
  2: 0100007F:1F90 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 4243 2 0000000000000000 5\n";
        let v6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
  3: 00000000000000000000000000000000:115C 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 4244 2 0000000000000000 3\n";
        assert_eq!(drops_in(v4, 4444), 17);
        assert_eq!(drops_in(v6, 4444), 3);
        assert_eq!(drops_in(v4, 8080), 5);
        assert_eq!(drops_in(v4, 9999), 0);
    }

    /// A real socket that overflows: the kernel's count of its drops is found by its port.
    #[test]
    fn kernel_drops_of_an_overflowing_socket_are_counted() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket2::SockRef::from(&rx)
            .set_recv_buffer_size(4096)
            .unwrap();
        let port = rx.local_addr().unwrap().port();
        let Some(before) = kernel_drops_at(port) else {
            eprintln!("SKIP: /proc/self/net/udp not readable here");
            return;
        };
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for _ in 0..200 {
            let _ = tx.send_to(&[0u8; 1200], rx.local_addr().unwrap());
        }
        let after = kernel_drops_at(port).unwrap_or(0);
        assert!(after > before + 100, "drops {before} -> {after}");
    }

    /// A socket nobody reads overflows; the next datagram read reports how many the kernel
    /// dropped, and payloads and sources come through intact.
    #[tokio::test]
    async fn kernel_receive_drops_are_reported() {
        let rx = bound("127.0.0.1:0".parse().unwrap(), 4096).await.unwrap();
        assert!(report_overflows(&rx));
        let to = rx.local_addr().unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        for i in 0..2000u32 {
            let _ = tx.send_to(&[i as u8; 1000], to).await;
        }
        // The kernel stamps each datagram with the socket's drop count when it is queued, so
        // drain what was queued before the drops, then read one queued after them.
        let mut buf = vec![0u8; 2048];
        while let Ok(Ok(r)) = tokio::time::timeout(
            std::time::Duration::from_millis(100),
            recv_from(&rx, &mut buf),
        )
        .await
        {
            assert_eq!(r.len, 1000);
        }
        let _ = tx.send_to(&[9u8; 1000], to).await;
        let r = recv_from(&rx, &mut buf).await.unwrap();
        assert_eq!((r.len, &buf[..3]), (1000, &[9u8, 9, 9][..]));
        assert_eq!(r.from, tx.local_addr().unwrap());
        let dropped = r.overflows;
        let dropped = dropped.expect("SO_RXQ_OVFL reported");
        assert!(dropped > 100, "only {dropped} drops counted");
        let mut c = OverflowCounter::default();
        assert_eq!(c.delta(Some(dropped)), u64::from(dropped));
        assert_eq!(c.delta(Some(dropped + 5)), 5);
        let mut arena = bytes::BytesMut::with_capacity(4096);
        arena.extend_from_slice(b"hdr");
        let _ = tx.send_to(&[7u8; 1000], to).await;
        let r = recv_buf_from(&rx, &mut arena).await.unwrap();
        assert_eq!(arena.len(), 3 + r.len);
        assert_eq!(&arena[..3], b"hdr");
    }
}
