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
}
