//! A lean HTTP/1.1 client: one keep-alive connection with one request in flight, the
//! request written from bytes the caller rendered and the response parsed in place
//! with `httparse`.
//!
//! Why not hyper's client: the generator shares the machine with the server it
//! measures, so every microsecond it spends per request is taken from the server.
//! Here a request costs one `write`, usually one `read` and a header parse, with no
//! allocation once the buffers have grown — the way wrk works.

use std::io::{self, Write as _};
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The one address a run may send to, and the `Host` header that names it.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub authority: String,
}

impl Target {
    /// Parses `http://host:port` (a trailing `/` is allowed). Only plain HTTP: the
    /// generator measures the server, not a TLS library.
    pub fn parse(url: &str) -> anyhow::Result<Target> {
        let Some(rest) = url.strip_prefix("http://") else {
            bail!("the target must be an http:// URL, got {url:?}");
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.is_empty() || authority.contains('/') {
            bail!("the target must be http://host:port with no path, got {url:?}");
        }
        let with_port = if authority.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        let addr = with_port
            .to_socket_addrs()
            .with_context(|| format!("cannot resolve {authority}"))?
            .next()
            .with_context(|| format!("{authority} resolves to no address"))?;
        Ok(Target { addr, authority: authority.to_owned() })
    }
}

/// Appends one request to `out`.
pub fn write_request(
    out: &mut Vec<u8>,
    authority: &str,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<&[u8]>,
) {
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(authority.as_bytes());
    if let Some(token) = bearer {
        out.extend_from_slice(b"\r\nauthorization: Bearer ");
        out.extend_from_slice(token.as_bytes());
    }
    if let Some(body) = body {
        out.extend_from_slice(b"\r\ncontent-type: application/json\r\ncontent-length: ");
        // Writing into a Vec cannot fail.
        let _ = write!(out, "{}\r\n\r\n", body.len());
        out.extend_from_slice(body);
    } else {
        out.extend_from_slice(b"\r\n\r\n");
    }
}

/// Why an exchange failed. The connection is unusable after any of them.
#[derive(Debug)]
pub enum Fault {
    /// The connection failed before any byte of the response came: writing the
    /// request failed, or the server closed or reset the connection without
    /// answering (as one does with a keep-alive connection it is closing).
    Reset(io::Error),
    /// Reading failed, or the server closed the connection, mid-response.
    Io(io::Error),
    /// No whole response within the request timeout.
    Timeout,
    /// The response was not HTTP/1.1 this client can read.
    Protocol(&'static str),
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::Reset(e) => write!(f, "reset before the response: {e}"),
            Fault::Io(e) => write!(f, "i/o error: {e}"),
            Fault::Timeout => f.write_str("timed out"),
            Fault::Protocol(what) => write!(f, "protocol error: {what}"),
        }
    }
}

impl std::error::Error for Fault {}

/// One response: its status and body, borrowed from the connection's buffer until the
/// next exchange.
#[derive(Debug)]
pub struct Response<'a> {
    pub status: u16,
    pub body: &'a [u8],
}

/// Largest response accepted; far above anything gavel sends.
const MAX_RESPONSE: usize = 16 << 20;

/// A keep-alive connection.
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    filled: usize,
    /// Bytes at the front of `buf` that belong to the previous response.
    consumed: usize,
    /// The server said `connection: close`; the caller must reconnect.
    closing: bool,
}

impl Conn {
    pub async fn connect(addr: SocketAddr) -> io::Result<Conn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Conn { stream, buf: vec![0; 16 << 10], filled: 0, consumed: 0, closing: false })
    }

    /// Whether the server asked to close the connection after the last response.
    pub fn closing(&self) -> bool {
        self.closing
    }

    /// Writes `request` and reads its response, within `timeout`.
    pub async fn exchange(&mut self, request: &[u8], timeout: Duration) -> Result<Response<'_>, Fault> {
        match tokio::time::timeout(timeout, self.exchange_inner(request)).await {
            Ok(Ok((status, start, end))) => Ok(Response { status, body: &self.buf[start..end] }),
            Ok(Err(fault)) => Err(fault),
            Err(_) => Err(Fault::Timeout),
        }
    }

    async fn exchange_inner(&mut self, request: &[u8]) -> Result<(u16, usize, usize), Fault> {
        if self.consumed > 0 {
            self.buf.copy_within(self.consumed..self.filled, 0);
            self.filled -= self.consumed;
            self.consumed = 0;
        }
        self.stream.write_all(request).await.map_err(Fault::Reset)?;
        let before = self.filled;
        loop {
            if let Some(head) = parse_head(&self.buf[..self.filled])? {
                let end = head.len + head.content_length;
                while self.filled < end {
                    self.read_more().await?;
                }
                self.consumed = end;
                self.closing = head.close;
                return Ok((head.status, head.len, end));
            }
            match self.read_more().await {
                Err(Fault::Io(e)) if self.filled == before => return Err(Fault::Reset(e)),
                other => other?,
            }
        }
    }

    async fn read_more(&mut self) -> Result<(), Fault> {
        if self.filled == self.buf.len() {
            if self.buf.len() >= MAX_RESPONSE {
                return Err(Fault::Protocol("response too large"));
            }
            self.buf.resize(self.buf.len() * 2, 0);
        }
        match self.stream.read(&mut self.buf[self.filled..]).await {
            Ok(0) => Err(Fault::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => {
                self.filled += n;
                Ok(())
            }
            Err(e) => Err(Fault::Io(e)),
        }
    }
}

/// What the head of a response says about reading the rest.
#[derive(Debug, PartialEq, Eq)]
struct Head {
    status: u16,
    /// Bytes of the head, blank line included.
    len: usize,
    content_length: usize,
    close: bool,
}

/// What a response head says, as sent.
#[derive(Debug, PartialEq, Eq)]
pub struct Fields {
    pub status: u16,
    /// Bytes of the head, blank line included.
    pub len: usize,
    pub content_length: Option<usize>,
    /// `transfer-encoding` was sent (gavel sends it only as `chunked`, for
    /// streams).
    pub chunked: bool,
    pub close: bool,
}

/// Reads a response head's fields if `buf` holds all of it.
pub fn parse_fields(buf: &[u8]) -> Result<Option<Fields>, Fault> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let len = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(Fault::Protocol("malformed response head")),
    };
    let status = response.code.ok_or(Fault::Protocol("no status"))?;
    let mut fields = Fields { status, len, content_length: None, chunked: false, close: response.version == Some(0) };
    for header in response.headers.iter() {
        if header.name.eq_ignore_ascii_case("content-length") {
            let value = std::str::from_utf8(header.value).ok().and_then(|v| v.trim().parse::<usize>().ok());
            fields.content_length = Some(value.ok_or(Fault::Protocol("bad content-length"))?);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            fields.chunked = true;
        } else if header.name.eq_ignore_ascii_case("connection") {
            fields.close = header.value.eq_ignore_ascii_case(b"close");
        }
    }
    Ok(Some(fields))
}

/// Parses a response head this client can read the rest of (no chunked bodies)
/// if `buf` holds all of it.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, Fault> {
    let Some(Fields { status, len, content_length, chunked, close }) = parse_fields(buf)? else { return Ok(None) };
    if chunked {
        return Err(Fault::Protocol("chunked responses are not supported"));
    }
    let content_length = match content_length {
        Some(n) => n,
        // Statuses that never carry a body (RFC 9112 §6.3).
        None if status == 204 || status == 304 || (100..200).contains(&status) => 0,
        None => return Err(Fault::Protocol("a response without content-length")),
    };
    Ok(Some(Head { status, len, content_length, close }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_plain_http_host_and_port() {
        let t = Target::parse("http://127.0.0.1:8080/").unwrap();
        assert_eq!(t.addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(t.authority, "127.0.0.1:8080");
        assert_eq!(Target::parse("http://127.0.0.1").unwrap().addr.port(), 80);
        assert!(Target::parse("https://127.0.0.1:8080").is_err());
        assert!(Target::parse("127.0.0.1:8080").is_err());
        assert!(Target::parse("http://127.0.0.1:8080/api").is_err());
    }

    #[test]
    fn requests_carry_host_token_and_body_length() {
        let mut out = Vec::new();
        write_request(&mut out, "h:1", "POST", "/api/bids", Some("tok"), Some(b"{}"));
        assert_eq!(
            out,
            b"POST /api/bids HTTP/1.1\r\nhost: h:1\r\nauthorization: Bearer tok\r\n\
              content-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
        );
        out.clear();
        write_request(&mut out, "h:1", "GET", "/health", None, None);
        assert_eq!(out, b"GET /health HTTP/1.1\r\nhost: h:1\r\n\r\n");
    }

    #[test]
    fn heads_give_status_length_and_close() {
        let raw = b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello";
        let head = parse_head(raw).unwrap().unwrap();
        assert_eq!(head, Head { status: 201, len: raw.len() - 5, content_length: 5, close: true });
        assert_eq!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Le").unwrap(), None);
        assert_eq!(parse_head(b"HTTP/1.1 204 No Content\r\n\r\n").unwrap().unwrap().content_length, 0);
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").is_err());
        let stream = parse_fields(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap().unwrap();
        assert!(stream.chunked && stream.content_length.is_none(), "a stream's head is read, not refused");
        assert!(parse_head(b"HTTP/1.1 200 OK\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n").is_err());
        assert!(parse_head(b"garbage\r\n\r\n").is_err());
    }
}
