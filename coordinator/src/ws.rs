//! The worker socket at `/v1/worker`: challenge-response login, then units on request,
//! results, releases, heartbeats and payout links. Every frame is size-bounded and decoded by
//! `tabula-protocol`; a bad frame earns the worker an error message and a closed socket, and
//! never disturbs anyone else.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::{SinkExt, StreamExt};
use tabula_protocol::{
    Bytes, MAX_WORKER_FRAME, Precision, PublicKey, ToCoordinator, ToWorker, decode, encode,
    sign::login_message, verify,
};
use tokio::sync::mpsc;

use crate::{
    db::random_bytes,
    scheduler::{State, Verdict},
};

/// The network prefix replicas of a unit must not share: the /24 of an IPv4 address, the /48
/// of an IPv6 one. In `--local` mode a loopback worker is its own prefix.
pub fn network_prefix(addr: &SocketAddr, worker: &PublicKey, local: bool) -> String {
    let ip = addr.ip();
    if local && ip.is_loopback() {
        return format!("loopback:{worker}");
    }
    match ip {
        std::net::IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.0/24", o[0], o[1], o[2])
        }
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => {
                let o = v4.octets();
                format!("{}.{}.{}.0/24", o[0], o[1], o[2])
            }
            None => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}::/48", s[0], s[1], s[2])
            }
        },
    }
}

async fn send(socket: &mut WebSocket, message: &ToWorker) -> Result<(), axum::Error> {
    socket.send(Message::Binary(encode(message).into())).await
}

/// Ends a session before login with `message`; `retry` as in [`ToWorker::Error`].
async fn close_with(socket: &mut WebSocket, message: String, retry: bool) {
    let _ = send(
        socket,
        &ToWorker::Error {
            message: message.clone(),
            retry,
        },
    )
    .await;
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code: 1008,
            reason: message.chars().take(100).collect::<String>().into(),
        })))
        .await;
}

/// One received frame as a worker message: `Ok(None)` for control frames to skip, `Err` with
/// the reason to close (empty when the worker closed or left).
fn parse(frame: Option<Result<Message, axum::Error>>) -> Result<Option<ToCoordinator>, String> {
    match frame {
        Some(Ok(Message::Binary(bytes))) => {
            let message: ToCoordinator =
                decode(&bytes, MAX_WORKER_FRAME).map_err(|e| e.to_string())?;
            message.validate().map_err(|e| e.to_string())?;
            Ok(Some(message))
        }
        Some(Ok(Message::Text(_))) => {
            Err("text frames are not part of the protocol; send binary frames".into())
        }
        Some(Ok(Message::Close(_))) | None => Err(String::new()),
        Some(Ok(_)) => Ok(None),
        Some(Err(e)) => Err(e.to_string()),
    }
}

const SILENT: &str = "no message within the heartbeat timeout";
/// The session ended on the coordinator's own failure (a database error, say).
const INTERNAL: &str = "internal error; reconnect later";

/// Reads the next worker message, or says why there is none.
async fn next_frame(socket: &mut WebSocket, timeout: Duration) -> Result<ToCoordinator, String> {
    loop {
        let frame = tokio::time::timeout(timeout, socket.recv())
            .await
            .map_err(|_| SILENT.to_string())?;
        if let Some(message) = parse(frame)? {
            return Ok(message);
        }
    }
}

pub async fn session(mut socket: WebSocket, addr: SocketAddr, state: Arc<State>) {
    let nonce = Bytes(random_bytes::<32>());
    let coordinator = state.identity.public();
    if send(&mut socket, &ToWorker::Challenge { nonce, coordinator })
        .await
        .is_err()
    {
        return;
    }
    let (key, precisions) = match next_frame(&mut socket, Duration::from_secs(15)).await {
        Ok(ToCoordinator::Login {
            key,
            signature,
            agent,
            precisions,
        }) => {
            if verify(&key, &login_message(&nonce, &coordinator, &key), &signature).is_err() {
                close_with(&mut socket, "login signature does not verify".into(), false).await;
                return;
            }
            match state.login(&key, &agent).await {
                Ok(Ok(credit)) => {
                    if send(
                        &mut socket,
                        &ToWorker::Welcome {
                            heartbeat_ms: state.config.heartbeat_ms,
                            credit_micro: credit,
                        },
                    )
                    .await
                    .is_err()
                    {
                        return;
                    }
                }
                Ok(Err(refusal)) => {
                    close_with(&mut socket, refusal, false).await;
                    return;
                }
                Err(e) => {
                    tracing::error!("login: {e}");
                    close_with(
                        &mut socket,
                        "the coordinator cannot log you in now".into(),
                        true,
                    )
                    .await;
                    return;
                }
            }
            let precisions: Vec<Precision> = if precisions.is_empty() {
                vec![Precision::Exact]
            } else {
                precisions
            };
            (key, precisions)
        }
        Ok(_) => {
            close_with(&mut socket, "log in first".into(), false).await;
            return;
        }
        Err(e) => {
            if !e.is_empty() {
                let retry = e == SILENT;
                close_with(&mut socket, e, retry).await;
            }
            return;
        }
    };
    let prefix = network_prefix(&addr, &key, state.config.local);
    tracing::info!(worker = %key, %prefix, "worker connected");
    let (tx, mut pushed) = mpsc::unbounded_channel();
    state.attach(key, tx);
    let timeout = Duration::from_millis(u64::from(state.config.heartbeat_ms) * 3 + 1000);
    let (mut sink, mut stream) = socket.split();
    // Receipts for this worker arrive from other tasks; forward them while reading frames.
    let reason = loop {
        let frame = tokio::select! {
            pushed = pushed.recv() => {
                if let Some(m) = pushed
                    && sink.send(Message::Binary(encode(&m).into())).await.is_err()
                {
                    break String::new();
                }
                continue;
            }
            frame = tokio::time::timeout(timeout, stream.next()) => frame,
        };
        let message = match frame.map_err(|_| SILENT.to_string()).and_then(parse) {
            Ok(Some(m)) => m,
            Ok(None) => continue,
            Err(reason) => break reason,
        };
        let reply = match handle(&state, &key, &prefix, &precisions, message).await {
            Ok(Some(reply)) => reply,
            Ok(None) => continue,
            Err(e) => {
                tracing::error!(worker = %key, "{e}");
                break INTERNAL.to_string();
            }
        };
        if sink
            .send(Message::Binary(encode(&reply).into()))
            .await
            .is_err()
        {
            break String::new();
        }
    };
    // The worker left (closed the socket or went silent) rather than broke the protocol: a
    // unit it still holds expires without a strike.
    if (reason.is_empty() || reason == SILENT)
        && let Err(e) = state.orphan_leases(&key).await
    {
        tracing::error!(worker = %key, "orphaning its leases: {e}");
    }
    if !reason.is_empty() {
        tracing::info!(worker = %key, "closing session: {reason}");
        let _ = sink
            .send(Message::Binary(
                encode(&ToWorker::Error {
                    retry: reason == SILENT || reason == INTERNAL,
                    message: reason.clone(),
                })
                .into(),
            ))
            .await;
        let _ = sink.send(Message::Close(None)).await;
    }
    state.detach(&key);
}

async fn handle(
    state: &Arc<State>,
    key: &PublicKey,
    prefix: &str,
    precisions: &[Precision],
    message: ToCoordinator,
) -> Result<Option<ToWorker>, crate::CoordinatorError> {
    Ok(match message {
        ToCoordinator::Ready => Some(match state.grant(key, prefix, precisions).await? {
            Some(a) => ToWorker::Assign(a),
            None => ToWorker::NoWork { retry_ms: 250 },
        }),
        ToCoordinator::Heartbeat => None,
        ToCoordinator::Submit(s) => Some(match state.submit(key, &s).await? {
            Verdict::Accepted => ToWorker::Accepted { lease: s.lease },
            Verdict::Rejected(reason) => ToWorker::Rejected {
                lease: s.lease,
                reason,
            },
        }),
        ToCoordinator::Release { lease } => {
            state.release(key, &lease).await?;
            None
        }
        ToCoordinator::LinkPayout { address, signature } => {
            if verify(
                key,
                &tabula_protocol::sign::payout_message(&address, key),
                &signature,
            )
            .is_err()
            {
                Some(ToWorker::Error {
                    message: "the payout link signature does not verify".into(),
                    retry: false,
                })
            } else {
                state.link_payout(key, &address).await?;
                Some(ToWorker::PayoutLinked { address })
            }
        }
        ToCoordinator::Login { .. } => Some(ToWorker::Error {
            message: "already logged in".into(),
            retry: false,
        }),
    })
}
