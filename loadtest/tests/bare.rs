//! gavel-bare, the reference server of `loadtest/compare`, as a process: it serves its
//! fixed body, with its type and length, on every path and over keep-alive.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use gavel_loadtest::http::{Conn, write_request};

/// The running server, killed on drop.
struct Bare {
    child: Child,
    addr: String,
}

impl Drop for Bare {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts gavel-bare on a free port and waits for it to say where it listens.
fn start(body: &str) -> Bare {
    let mut child = Command::new(env!("CARGO_BIN_EXE_gavel-bare"))
        .args(["--listen", "127.0.0.1:0", "--cores", "2", "--body", body])
        .stdout(Stdio::piped())
        .spawn()
        .expect("gavel-bare starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.split("http://").nth(1).and_then(|rest| rest.split_whitespace().next()).map(str::to_owned);
    let addr = addr.unwrap_or_else(|| panic!("no address in {line:?}"));
    Bare { child, addr }
}

#[test]
fn every_request_gets_the_fixed_body_as_json_with_its_length() {
    let body = r#"{"id":7,"title":"lot"}"#;
    let bare = start(body);

    let mut raw = TcpStream::connect(&bare.addr).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    raw.write_all(b"GET /api/inventory/lt-1 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    raw.read_to_string(&mut response).unwrap();
    let lower = response.to_ascii_lowercase();
    assert!(lower.starts_with("http/1.1 200 ok\r\n"), "{response}");
    assert!(lower.contains("\r\ncontent-type: application/json\r\n"), "{response}");
    assert!(lower.contains(&format!("\r\ncontent-length: {}\r\n", body.len())), "{response}");
    assert!(response.ends_with(&format!("\r\n\r\n{body}")), "{response}");

    // Keep-alive: several requests, any path, on one connection.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut conn = Conn::connect(bare.addr.parse().unwrap()).await.unwrap();
        for path in ["/api/auctions/1", "/api/auctions/2", "/anything"] {
            let mut request = Vec::new();
            write_request(&mut request, &bare.addr, "GET", path, None, None);
            let response = conn.exchange(&request, Duration::from_secs(5)).await.unwrap();
            assert_eq!((response.status, response.body), (200, body.as_bytes()));
            assert!(!conn.closing());
        }
    });
}
