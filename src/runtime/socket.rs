//! Listening sockets: one per core, all bound to the same address with
//! `SO_REUSEPORT`, so the kernel spreads incoming connections across cores.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

/// Accept backlog per core. Bursts of new connections from load generators queue
/// here rather than being refused; the kernel caps it at `net.core.somaxconn`.
pub const BACKLOG: i32 = 4096;

/// Binds a non-blocking listener on `addr` that other cores may share.
pub fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    // Accepted sockets inherit this on Linux; each is set again after accept anyway.
    socket.set_nodelay(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// Asks the kernel to hand this listener the connections whose packets arrive on
/// `cpu` (`SO_INCOMING_CPU`; Linux 6.2 and later apply it within a `SO_REUSEPORT`
/// group, and fall back to the usual hash when no listener's CPU matches).
///
/// Without it the kernel spreads connections by a hash of their addresses and
/// ports, and a few connections split unevenly by chance: auction-read over 8
/// connections put 4–121 % more requests on one core than on the other (median
/// 10 %, 13 runs); tied to the cores' CPUs, 0.4–15 % (median 5 %, 10 runs). At 64
/// connections both are within the machine's noise (medians 12 % and 9 %). A
/// connection lands on the core whose CPU receives its packets — on loopback, the
/// client thread's own CPU; behind a NIC, the CPU its receive queue interrupts —
/// so the spread follows the clients' (or the NIC's) own balance, and packets
/// never change CPU on the way in. Measured: per-core `http_requests_total` from
/// the admin `/metrics` before and after `gavel-loadtest run auction-read
/// --connections C --threads 2 --duration 3s` on 2 cores, settings alternating;
/// the table and the interrupt layouts it suits are in `tuning/README.md`.
#[cfg(target_os = "linux")]
pub fn steer_to_cpu(listener: &std::net::TcpListener, cpu: usize) -> io::Result<()> {
    socket2::SockRef::from(listener).set_cpu_affinity(cpu)
}

/// Binds `cores` listeners on `addr`. With port 0 the first picks a free port and the
/// others join it.
pub fn bind_all(addr: SocketAddr, cores: usize) -> io::Result<Vec<std::net::TcpListener>> {
    let first = bind(addr)?;
    let shared = first.local_addr()?;
    let mut all = Vec::with_capacity(cores);
    all.push(first);
    for _ in 1..cores {
        all.push(bind(shared)?);
    }
    Ok(all)
}

/// An accepted connection that HTTP/2 writes to as if it had no vectored writes.
///
/// h2 copies a DATA frame into its 16 KiB write buffer only below a threshold:
/// 256 bytes on a socket with vectored writes, 1 KiB without. A larger frame is
/// chained after the buffer and must be written out before the next frame can
/// be buffered, so every event of an SSE stream (an auction's state is ~350
/// bytes) cost one `writev` of its own. Without vectored writes the events of all
/// the connection's streams that are ready go out in one write: 10,000 streams
/// on 100 connections, `gavel-loadtest watch --http2-streams 100`, 2026-11-30,
/// 182K writes in 3 s against 365K (with delivery passes of one change each; see
/// `events::DELIVERY_PACE` for what pacing the passes added). Frames of 1 KiB or
/// more (image bytes) take two writes instead of one `writev`.
#[derive(Debug)]
pub struct Unvectored(pub tokio::net::TcpStream);

impl tokio::io::AsyncRead for Unvectored {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Unvectored {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        false
    }
}

/// An accepted connection with what was already read from it in front: what
/// `runtime::fast` read but left to hyper is read again first.
#[derive(Debug)]
pub struct Prefixed {
    read: bytes::Bytes,
    stream: tokio::net::TcpStream,
}

impl Prefixed {
    pub fn new(read: bytes::Bytes, stream: tokio::net::TcpStream) -> Self {
        Prefixed { read, stream }
    }
}

impl tokio::io::AsyncRead for Prefixed {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        if self.read.is_empty() {
            return std::pin::Pin::new(&mut self.stream).poll_read(cx, buf);
        }
        let n = self.read.len().min(buf.remaining());
        buf.put_slice(&self.read.split_to(n));
        std::task::Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncWrite for Prefixed {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cores_share_one_port() {
        let all = bind_all("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        let port = all[0].local_addr().unwrap().port();
        assert_ne!(port, 0);
        assert!(all.iter().all(|l| l.local_addr().unwrap().port() == port));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_listener_can_be_tied_to_a_cpu() {
        let all = bind_all("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        steer_to_cpu(&all[1], 0).unwrap();
        assert_eq!(socket2::SockRef::from(&all[1]).cpu_affinity().unwrap(), 0);
    }

    #[tokio::test]
    async fn prefixed_reads_what_was_read_before_the_socket() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let mut served = Prefixed::new(bytes::Bytes::from_static(b"GET / HT"), listener.accept().await.unwrap().0);
        client.write_all(b"TP/1.1\r\n").await.unwrap();
        let mut got = [0u8; 16];
        served.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"GET / HTTP/1.1\r\n");
        served.write_all(b"ok").await.unwrap();
        let mut back = [0u8; 2];
        client.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"ok");
    }

    #[tokio::test]
    async fn unvectored_passes_bytes_both_ways_and_says_it_has_no_vectored_writes() {
        use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let mut served = Unvectored(listener.accept().await.unwrap().0);
        assert!(client.is_write_vectored(), "a plain socket would have h2 chain its frames");
        assert!(!served.is_write_vectored());
        served.write_all(b"event").await.unwrap();
        let mut got = [0u8; 5];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"event");
        client.write_all(b"ack").await.unwrap();
        let mut back = [0u8; 3];
        served.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"ack");
        served.shutdown().await.unwrap();
        assert_eq!(client.read(&mut got).await.unwrap(), 0, "shut down for writing");
    }
}
