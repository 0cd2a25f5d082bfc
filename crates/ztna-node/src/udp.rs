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
    Ok(socket)
}

/// A UDP socket bound to `addr` (a local forward), with buffers of `bytes`.
pub async fn bound(addr: SocketAddr, bytes: usize) -> std::io::Result<UdpSocket> {
    let socket = UdpSocket::bind(addr).await?;
    size_buffers(&socket, bytes);
    Ok(socket)
}
