//! gavel-bare: the bare per-core hyper server `loadtest/compare` measures gavel
//! against. It answers every request with 200 and one fixed `application/json` body
//! (gavel's own bytes for one auction or one sku), and does nothing else: no router,
//! no middleware, no timers, no metrics.
//!
//! It is built the way gavel is: one pinned thread per core, each with a
//! current-thread tokio runtime and its own `SO_REUSEPORT` listener, hyper 1.x
//! HTTP/1.1 with keep-alive. So gavel's requests/s ÷ this server's is what gavel's
//! own code costs on top of hyper and the kernel.
//!
//! Its listeners are tied to their cores' CPUs (`SO_INCOMING_CPU`), as gavel's
//! are by default, because that is its best setting: side by side, 5 s closed
//! loop at 64 connections, four alternating rounds, tied 144.6–150.0K requests/s
//! with p99 0.62–0.67 ms; untied 116.1–149.6K with p99 7.2–8.0 ms (the kernel's
//! hash leaves a connection's client and server on different CPUs).
//!
//! ```text
//! gavel-bare --listen 127.0.0.1:0 --cores 2 --body-file auction.json
//! ```
//!
//! Prints `listening on http://ADDR` on stdout once every core accepts (with port 0,
//! the port the kernel picked), and runs until killed.

use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use socket2::{Domain, Protocol, Socket, Type};

/// A bare hyper server answering every request with one fixed JSON body.
#[derive(Debug, Parser)]
#[command(name = "gavel-bare", version)]
#[command(group = clap::ArgGroup::new("source").required(true).args(["body", "body_file"]))]
struct Args {
    /// Address to listen on; port 0 picks a free port (all cores share it).
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: SocketAddr,
    /// Cores, each a pinned thread with its own runtime and listener. Unset: every
    /// core this process may run on, as gavel does.
    #[arg(long)]
    cores: Option<usize>,
    /// The body to serve.
    #[arg(long)]
    body: Option<String>,
    /// A file holding the body to serve, byte for byte.
    #[arg(long)]
    body_file: Option<PathBuf>,
    /// Tie each core's listener to its CPU (`SO_INCOMING_CPU`), as gavel does by
    /// default, so a connection is served on the CPU that receives its packets.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    steer_by_cpu: bool,
}

/// Accept backlog per core, gavel's.
const BACKLOG: i32 = 4096;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let body = match (&args.body, &args.body_file) {
        (Some(text), _) => Bytes::from(text.clone()),
        (None, Some(file)) => {
            Bytes::from(std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?)
        }
        (None, None) => unreachable!("clap requires one of --body and --body-file"),
    };
    let cores = args.cores.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1);
    let listeners = listeners(args.listen, cores).with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listeners[0].local_addr()?;
    let pins = core_affinity::get_core_ids().unwrap_or_default();
    let mut threads = Vec::with_capacity(cores);
    for (i, listener) in listeners.into_iter().enumerate() {
        let body = body.clone();
        let pin = pins.get(i % pins.len().max(1)).copied();
        if args.steer_by_cpu
            && let Some(pin) = pin
        {
            socket2::SockRef::from(&listener).set_cpu_affinity(pin.id)?;
        }
        let thread = std::thread::Builder::new().name(format!("bare-{i}")).spawn(move || {
            if let Some(pin) = pin {
                core_affinity::set_for_current(pin);
            }
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async move { serve(tokio::net::TcpListener::from_std(listener)?, body).await })
        })?;
        threads.push(thread);
    }
    println!("listening on http://{addr} ({cores} cores, {}-byte body)", body.len());
    std::io::stdout().flush()?;
    for thread in threads {
        match thread.join() {
            Ok(result) => result?,
            Err(_) => anyhow::bail!("a core thread panicked"),
        }
    }
    Ok(())
}

/// `cores` non-blocking listeners on one port, `SO_REUSEPORT`, so that the kernel
/// spreads connections over the cores as it does for gavel's. With port 0 the first
/// picks the port and the others join it.
fn listeners(addr: SocketAddr, cores: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let mut all: Vec<std::net::TcpListener> = Vec::with_capacity(cores);
    for _ in 0..cores {
        let at = all.first().map_or(Ok(addr), |first| first.local_addr())?;
        let socket = Socket::new(Domain::for_address(at), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nodelay(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&at.into())?;
        socket.listen(BACKLOG)?;
        all.push(socket.into());
    }
    Ok(all)
}

/// One core's accept loop: every connection served by hyper with keep-alive.
async fn serve(listener: tokio::net::TcpListener, body: Bytes) -> std::io::Result<()> {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.keep_alive(true);
    let json = HeaderValue::from_static("application/json");
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                accept_failed(&e).await;
                continue;
            }
        };
        stream.set_nodelay(true)?;
        let (body, json) = (body.clone(), json.clone());
        // hyper sets Content-Length from the body's exact size.
        let answer = service_fn(move |_: Request<hyper::body::Incoming>| {
            let mut response = Response::new(Full::new(body.clone()));
            response.headers_mut().insert(CONTENT_TYPE, json.clone());
            async move { Ok::<_, Infallible>(response) }
        });
        let connection = http.serve_connection(TokioIo::new(stream), answer);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                eprintln!("gavel-bare: connection ended with an error: {e}");
            }
        });
    }
}

/// Out of file descriptors and the like: back off briefly rather than spin; the
/// connection waits in the backlog.
#[cold]
async fn accept_failed(e: &std::io::Error) {
    eprintln!("gavel-bare: accept failed: {e}");
    tokio::time::sleep(Duration::from_millis(20)).await;
}
