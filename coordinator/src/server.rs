//! The HTTP server: accepts TCP connections and serves the API router over HTTP/1.1 with
//! limits a client cannot outwait (finding 6 of the red-team pass).
//!
//! - **Header and keep-alive timeout:** a request's head must arrive whole within
//!   `header_timeout` of the connection opening or of the previous response, so neither a
//!   slowloris client (one header byte at a time) nor an idle keep-alive connection holds a
//!   socket longer than that. Upgraded worker sockets are bounded by the session's own
//!   heartbeat timeout instead ([`crate::ws`]).
//! - **Connection caps:** at most `max_connections` sockets at once (derived from the open-file
//!   limit by default), and at most `max_per_address` from one address (one IPv6 /64), except
//!   trusted proxies, whose clients are told apart per request. A connection over a cap gets a
//!   one-line HTTP error in OpenAI's shape and is closed at once; it never waits in the kernel's
//!   backlog, so `/healthz` and honest clients still get in while an attacker's idle sockets
//!   count down their timeout.
//! - **Open files:** [`raise_open_file_limit`] lifts the soft limit to the hard one at start.
//!
//! A connection's slot is held by its stream ([`Counted`]), so it is freed when the socket is
//! closed, also after an upgrade to a WebSocket hands the stream to a worker session.
//! This module owns sockets only; it must not know the API's routes.

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use axum::{Router, extract::ConnectInfo};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, watch},
};
use tower::ServiceExt;

use crate::net::Cidr;

/// File descriptors kept back from the connection cap for the database, models, logs and
/// the chain's state.
const RESERVED_FILES: u64 = 256;
/// The most connections `max_connections = 0` (automatic) ever allows.
const AUTO_MAX_CONNECTIONS: u64 = 65_536;
/// How long a stopping server waits for requests in progress before it drops them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// What the server allows; see the module doc.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Sockets open at once; 0 picks the open-file limit less [`RESERVED_FILES`].
    pub max_connections: usize,
    /// Sockets open at once from one address (an IPv4 address or an IPv6 /64).
    pub max_per_address: usize,
    /// The time a request's head may take to arrive, also the keep-alive idle time.
    pub header_timeout: Duration,
    /// Proxies exempt from the per-address cap.
    pub trusted_proxies: Vec<Cidr>,
}

impl Limits {
    /// The connection cap in force, given the process's open-file limit.
    pub fn connection_cap(&self, open_files: u64) -> usize {
        if self.max_connections > 0 {
            return self.max_connections;
        }
        let cap = open_files
            .saturating_sub(RESERVED_FILES)
            .clamp(16, AUTO_MAX_CONNECTIONS);
        usize::try_from(cap).unwrap_or(usize::MAX)
    }
}

/// Raises the soft open-file limit to the hard one; returns the limit now in force (`u64::MAX`
/// where there is none). A failure leaves the limit as it was, with a warning.
pub fn raise_open_file_limit() -> u64 {
    #[cfg(unix)]
    {
        use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
        let limit = getrlimit(Resource::Nofile);
        let soft = limit.current.unwrap_or(u64::MAX);
        if limit.current == limit.maximum {
            return soft;
        }
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => {
                let now = limit.maximum.unwrap_or(u64::MAX);
                tracing::info!(from = soft, to = now, "raised the open-file limit");
                now
            }
            Err(e) => {
                tracing::warn!(limit = soft, "cannot raise the open-file limit: {e}");
                soft
            }
        }
    }
    #[cfg(not(unix))]
    {
        u64::MAX
    }
}

/// The key connections are counted under: the address, or its /64 for IPv6 (one host's share
/// of addresses).
fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !(u128::MAX >> 64)).into()),
        },
        v4 => v4,
    }
}

/// Open connections per address. Invariant: every count is at least 1 (a zero is removed).
#[derive(Default)]
struct PerAddress(Mutex<HashMap<IpAddr, usize>>);

impl PerAddress {
    fn try_take(&self, key: IpAddr, max: usize) -> bool {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let count = map.entry(key).or_insert(0);
        if *count >= max {
            return false;
        }
        *count += 1;
        true
    }

    fn give_back(&self, key: IpAddr) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let count = map.get_mut(&key);
        assert!(count.is_some(), "a connection slot given back twice");
        if let Some(count) = count {
            *count -= 1;
            if *count == 0 {
                map.remove(&key);
            }
        }
    }
}

/// A connection's place under the caps, freed on drop.
struct Slot {
    _global: OwnedSemaphorePermit,
    per_address: Option<(Arc<PerAddress>, IpAddr)>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some((table, key)) = self.per_address.take() {
            table.give_back(key);
        }
    }
}

/// A TCP stream that holds its connection's [`Slot`] for as long as it lives.
struct Counted {
    io: TcpStream,
    _slot: Slot,
}

impl AsyncRead for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, b)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// The whole answer to a connection refused over a cap: an HTTP response in OpenAI's error
/// shape, written before the socket is closed.
fn refusal(status: &str, message: &str) -> Vec<u8> {
    let body = serde_json::json!({
        "error": { "message": message, "type": "rate_limit_error", "param": null, "code": "too_many_connections" }
    })
    .to_string();
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 5\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Answers a refused connection without waiting on it: the write is tried once and the socket
/// dropped, so a client that reads nothing costs nothing.
fn refuse(stream: TcpStream, status: &str, message: &str) {
    let _ = stream.try_write(&refusal(status, message));
    tokio::spawn(async move {
        let mut stream = stream;
        let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
    });
}

/// Serves `router` on `listener` under `limits` until `shutdown` resolves, then stops accepting,
/// lets requests in progress finish for up to [`SHUTDOWN_GRACE`], and returns.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    open_files: u64,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let cap = limits.connection_cap(open_files);
    assert!(cap > 0 && limits.max_per_address > 0);
    tracing::info!(
        connections = cap,
        per_address = limits.max_per_address,
        header_timeout_ms = limits.header_timeout.as_millis() as u64,
        "accepting connections"
    );
    let global = Arc::new(Semaphore::new(cap));
    let per_address = Arc::new(PerAddress::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    // Every connection task holds a receiver; `stop_tx.closed()` resolves when all are gone.
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors or a connection reset before accept: wait and go on.
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = global.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "connection refused: the server is at its connection cap");
            refuse(
                stream,
                "503 Service Unavailable",
                "The coordinator has as many connections as it can hold; retry in a few seconds.",
            );
            continue;
        };
        let key = address_key(peer.ip());
        let exempt = limits.trusted_proxies.iter().any(|c| c.contains(peer.ip()));
        if !exempt && !per_address.try_take(key, limits.max_per_address) {
            tracing::debug!(%peer, "connection refused: too many from this address");
            refuse(
                stream,
                "429 Too Many Requests",
                "Too many connections from your address; close some and retry.",
            );
            continue;
        }
        if let Err(e) = stream.set_nodelay(true) {
            // No Nagle: a worker's frames are small and each waits for an answer.
            tracing::debug!("TCP_NODELAY: {e}");
        }
        let io = Counted {
            io: stream,
            _slot: Slot {
                _global: permit,
                per_address: (!exempt).then(|| (per_address.clone(), key)),
            },
        };
        tokio::spawn(connection(
            io,
            peer,
            router.clone(),
            limits.header_timeout,
            stop_rx.clone(),
        ));
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(stop_rx);
    if tokio::time::timeout(SHUTDOWN_GRACE, stop_tx.closed())
        .await
        .is_err()
    {
        tracing::warn!("stopping with requests still in progress");
    }
    Ok(())
}

/// Serves one connection until it closes, it upgrades, or the server stops.
async fn connection(
    io: Counted,
    peer: SocketAddr,
    router: Router,
    header_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let service = hyper::service::service_fn(move |mut request: hyper::Request<_>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        router.clone().oneshot(request)
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true);
    let conn = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let stopping = async { stop.wait_for(|s| *s).await.is_ok() };
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(%peer, "connection: {e}");
            }
            return;
        }
        true = stopping => {}
    }
    conn.as_mut().graceful_shutdown();
    if let Err(e) = conn.await {
        tracing::debug!(%peer, "connection: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_counted_per_host() {
        let key = |s: &str| address_key(s.parse().unwrap()).to_string();
        assert_eq!(key("203.0.113.9"), "203.0.113.9");
        assert_eq!(key("::ffff:203.0.113.9"), "203.0.113.9");
        // One /64 is one host's share of IPv6 addresses.
        assert_eq!(key("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::");
        assert_eq!(key("2001:db8:1:2:bbbb::7"), "2001:db8:1:2::");
        assert_ne!(key("2001:db8:1:3::1"), "2001:db8:1:2::");
    }

    #[test]
    fn the_per_address_table_counts_and_forgets() {
        let table = PerAddress::default();
        let a: IpAddr = "198.51.100.1".parse().unwrap();
        let b: IpAddr = "198.51.100.2".parse().unwrap();
        assert!(table.try_take(a, 2));
        assert!(table.try_take(a, 2));
        assert!(
            !table.try_take(a, 2),
            "a third connection over a cap of two"
        );
        assert!(table.try_take(b, 2), "another address has its own count");
        table.give_back(a);
        assert!(table.try_take(a, 2));
        table.give_back(a);
        table.give_back(a);
        table.give_back(b);
        assert!(
            table.0.lock().unwrap().is_empty(),
            "no zero counts are kept"
        );
    }

    #[test]
    fn the_automatic_cap_follows_the_open_file_limit() {
        let limits = |max| Limits {
            max_connections: max,
            max_per_address: 256,
            header_timeout: Duration::from_secs(20),
            trusted_proxies: Vec::new(),
        };
        assert_eq!(limits(0).connection_cap(1024), 768);
        assert_eq!(limits(0).connection_cap(100), 16);
        assert_eq!(limits(0).connection_cap(u64::MAX), 65_536);
        assert_eq!(limits(500).connection_cap(1024), 500);
    }

    #[test]
    fn a_refusal_is_a_whole_http_response() {
        let text = String::from_utf8(refusal("429 Too Many Requests", "slow down")).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 429 Too Many Requests\r\n"));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["message"], "slow down");
        assert_eq!(v["error"]["code"], "too_many_connections");
    }
}
