//! The worker socket at `/v1/worker`: challenge-response login, then units on request,
//! results, releases, heartbeats and payout links. Every frame is size-bounded and decoded by
//! `tabula-protocol`; a bad frame earns the worker an error message and a closed socket, and
//! never disturbs anyone else.

use std::{future::Future, net::SocketAddr, pin::Pin, sync::Arc, task::Poll, time::Duration};

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::{
    FutureExt, SinkExt, StreamExt,
    stream::{FuturesOrdered, SplitSink},
};
use tabula_protocol::{
    Bytes, MAX_WORKER_FRAME, Precision, PublicKey, SignerKey, Submission, Takes, ToCoordinator,
    ToWorker, decode, encode, sign::login_message,
};
use tokio::sync::mpsc;

use crate::{
    db::random_bytes,
    pipeline::{Event, Forward},
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

/// Whether a session that ended for `reason` may succeed again on a new connection: silence
/// (a network's failure) and the coordinator's own failure, not a broken or refused client.
fn retryable(reason: &str) -> bool {
    reason == SILENT || reason == INTERNAL
}

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
    let (signer, takes, stages) = match next_frame(&mut socket, Duration::from_secs(15)).await {
        Ok(ToCoordinator::Login {
            key,
            signature,
            agent,
            precisions,
            stages,
            max_model_mb,
        }) => {
            // Decompressed once: every result of the session is checked under it.
            let Ok(signer) = SignerKey::parse(&key).and_then(|signer| {
                signer.verify(&login_message(&nonce, &coordinator, &key), &signature)?;
                Ok(signer)
            }) else {
                close_with(&mut socket, "login signature does not verify".into(), false).await;
                return;
            };
            let network = network_prefix(&addr, &key, false);
            match state.login(&key, &agent, &network).await {
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
                Ok(Err((refusal, retry))) => {
                    close_with(&mut socket, refusal, retry).await;
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
            // Shared with every request's handler without a copy per frame.
            (
                signer,
                Arc::new(Takes {
                    precisions,
                    max_model_mb,
                }),
                stages.then_some(max_model_mb),
            )
        }
        Ok(_) => {
            close_with(&mut socket, "log in first".into(), false).await;
            return;
        }
        Err(e) => {
            if !e.is_empty() {
                let retry = retryable(&e);
                close_with(&mut socket, e, retry).await;
            }
            return;
        }
    };
    let key = *signer.public();
    let prefix: Arc<str> = network_prefix(&addr, &key, state.config.local).into();
    tracing::info!(worker = %key, %prefix, "worker connected");
    let (tx, mut pushed) = mpsc::unbounded_channel();
    if let Some(budget_mb) = stages {
        state
            .pipelines
            .join(key, tx.clone(), prefix.clone(), budget_mb);
    }
    state.attach(key, tx, takes.clone());
    let timeout = Duration::from_millis(u64::from(state.config.heartbeat_ms) * 3 + 1000);
    let (mut sink, mut stream) = socket.split();
    // Requests whose decisions are made and whose replies wait for their commit, oldest
    // first. The session reads the next frame meanwhile, so a worker's `Submit` and the
    // `Ready` it sends right after share one commit instead of waiting for two in a row.
    let mut replies: FuturesOrdered<Reply> = FuturesOrdered::new();
    // A frame read ahead while grouping requests, to be handled next.
    let mut read_ahead: Option<Result<Option<ToCoordinator>, String>> = None;
    // Receipts for this worker arrive from other tasks; forward them while reading frames.
    let reason = loop {
        // A frame read ahead waits, like any other, while too many replies wait.
        let parsed = match read_ahead.take_if(|_| replies.len() < MAX_IN_FLIGHT) {
            Some(parsed) => parsed,
            None => {
                let frame = tokio::select! {
                    Some(m) = pushed.recv() => {
                        match send_waiting(&mut sink, Ok(vec![m]), &mut pushed, &mut replies, &key).await {
                            Ok(()) => continue,
                            Err(reason) => break reason,
                        }
                    }
                    Some(reply) = replies.next(), if !replies.is_empty() => {
                        match send_waiting(&mut sink, reply, &mut pushed, &mut replies, &key).await {
                            Ok(()) => continue,
                            Err(reason) => break reason,
                        }
                    }
                    // A worker that does not read its replies stops being read.
                    frame = tokio::time::timeout(timeout, stream.next()),
                        if read_ahead.is_none() && replies.len() < MAX_IN_FLIGHT => frame,
                };
                frame.map_err(|_| SILENT.to_string()).and_then(parse)
            }
        };
        let message = match parsed {
            Ok(Some(m)) => m,
            Ok(None) => continue,
            Err(reason) => break reason,
        };
        // Requests of one kind that arrived together are decided together: a worker keeping
        // several units in flight sends its results, then as many `Ready`s, in one burst, and
        // they take one turn of the book lock and one journal entry instead of one each. Only
        // frames already read are grouped; the session never waits for more.
        let mut request = Request::from(message);
        // Bounded in frames and in bytes: a group holds at most about two frames' worth of
        // outputs, so grouping does not multiply what a session may hold in memory.
        while request.len() < MAX_GROUP && request.output_bytes() < MAX_WORKER_FRAME {
            let Some(frame) = stream.next().now_or_never() else {
                break;
            };
            match parse(frame) {
                Ok(Some(next)) => {
                    if let Some(other) = request.absorb(next) {
                        read_ahead = Some(Ok(Some(other)));
                        break;
                    }
                }
                Ok(None) => {}
                Err(reason) => {
                    read_ahead = Some(Err(reason));
                    break;
                }
            }
        }
        let mut reply: Reply = Box::pin(handle(
            state.clone(),
            signer,
            prefix.clone(),
            takes.clone(),
            request,
        ));
        // Run the request up to its first real wait now, in arrival order: that is where it
        // is decided (under the book lock) and queued for the journal. Only its commit, and
        // so its reply, is left for later.
        match std::future::poll_fn(|cx| Poll::Ready(reply.as_mut().poll(cx))).await {
            Poll::Ready(done) => replies.push_back(Box::pin(std::future::ready(done))),
            Poll::Pending => replies.push_back(reply),
        }
    };
    // Decisions already made are committed whatever happens to the socket; wait for them so
    // their effects (receipts to other workers, waiting requests woken) are not dropped.
    while replies.next().await.is_some() {}
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
                    retry: retryable(&reason),
                    message: reason.clone(),
                })
                .into(),
            ))
            .await;
        let _ = sink.send(Message::Close(None)).await;
    }
    // The receiving end goes first, so `detach` sees this session's sender closed and forgets
    // it (it was kept for every session that ever ended before).
    drop(pushed);
    state.detach(&key);
    state.pipelines.leave(&key);
}

/// Sends `first` and every other message already waiting — receipts pushed to this worker,
/// replies whose commits are done — with one flush, so a busy session writes to its socket
/// once per wake-up instead of once per message. `Err` carries the reason to end the session
/// (empty when the socket is gone).
async fn send_waiting(
    sink: &mut SplitSink<WebSocket, Message>,
    first: ReplyResult,
    pushed: &mut mpsc::UnboundedReceiver<ToWorker>,
    replies: &mut FuturesOrdered<Reply>,
    worker: &PublicKey,
) -> Result<(), String> {
    let mut next = Some(first);
    while let Some(item) = next.take() {
        match item {
            Ok(messages) => {
                for message in messages {
                    sink.feed(Message::Binary(encode(&message).into()))
                        .await
                        .map_err(|_| String::new())?;
                }
            }
            Err(e) => {
                tracing::error!(%worker, "{e}");
                return Err(INTERNAL.to_string());
            }
        }
        next = match pushed.try_recv() {
            Ok(m) => Some(Ok(vec![m])),
            Err(_) => replies.next().now_or_never().flatten(),
        };
    }
    sink.flush().await.map_err(|_| String::new())
}

/// The replies to a request, in order: one per frame it grouped (none for a heartbeat or a
/// release).
type ReplyResult = Result<Vec<ToWorker>, crate::CoordinatorError>;

/// A request being handled: its replies once its decision is committed.
type Reply = Pin<Box<dyn Future<Output = ReplyResult> + Send>>;

/// Requests of one session whose replies may wait for their commit at the same time.
const MAX_IN_FLIGHT: usize = 4;

/// The most frames one request groups ([`Request`]).
const MAX_GROUP: usize = 16;

/// One or more frames of a worker decided together: consecutive `Ready`s, or consecutive
/// `Submit`s; any other message alone.
enum Request {
    Ready(usize),
    Submit(Vec<Submission>),
    Other(Box<ToCoordinator>),
}

impl From<ToCoordinator> for Request {
    fn from(message: ToCoordinator) -> Self {
        match message {
            ToCoordinator::Ready => Request::Ready(1),
            ToCoordinator::Submit(s) => Request::Submit(vec![s]),
            other => Request::Other(Box::new(other)),
        }
    }
}

impl Request {
    fn len(&self) -> usize {
        match self {
            Request::Ready(n) => *n,
            Request::Submit(results) => results.len(),
            // Nothing joins a lone message.
            Request::Other(_) => MAX_GROUP,
        }
    }

    /// The bytes of the outputs it carries.
    fn output_bytes(&self) -> usize {
        match self {
            Request::Submit(results) => results.iter().map(|s| s.output.len()).sum(),
            Request::Ready(_) | Request::Other(_) => 0,
        }
    }

    /// Adds `next` when it is of this request's kind, else gives it back.
    fn absorb(&mut self, next: ToCoordinator) -> Option<ToCoordinator> {
        match (self, next) {
            (Request::Ready(n), ToCoordinator::Ready) => *n += 1,
            (Request::Submit(results), ToCoordinator::Submit(s)) => results.push(s),
            (_, other) => return Some(other),
        }
        None
    }
}

async fn handle(
    state: Arc<State>,
    signer: SignerKey,
    prefix: Arc<str>,
    takes: Arc<Takes>,
    request: Request,
) -> ReplyResult {
    let key = signer.public();
    let message = match request {
        Request::Ready(units) => return ready(&state, key, &prefix, &takes, units).await,
        Request::Submit(results) => return submit(&state, &signer, results).await,
        Request::Other(message) => *message,
    };
    Ok(match message {
        ToCoordinator::Ready => return ready(&state, key, &prefix, &takes, 1).await,
        ToCoordinator::Submit(s) => return submit(&state, &signer, vec![s]).await,
        ToCoordinator::Heartbeat => Vec::new(),
        ToCoordinator::Release { lease } => {
            state.release(key, &lease).await?;
            Vec::new()
        }
        ToCoordinator::LinkPayout { address, signature } => {
            if signer
                .verify(
                    &tabula_protocol::sign::payout_message(&address, key),
                    &signature,
                )
                .is_err()
            {
                vec![ToWorker::Error {
                    message: "the payout link signature does not verify".into(),
                    retry: false,
                }]
            } else {
                state.link_payout(key, &address).await?;
                vec![ToWorker::PayoutLinked { address }]
            }
        }
        ToCoordinator::Login { .. } => vec![ToWorker::Error {
            message: "already logged in".into(),
            retry: false,
        }],
        ToCoordinator::StageUp {
            session,
            downstream,
        } => {
            state
                .pipelines
                .event(key, &session, Event::Up { downstream });
            Vec::new()
        }
        ToCoordinator::StageStep { session, report } => {
            state.pipelines.event(key, &session, Event::Step(report));
            Vec::new()
        }
        ToCoordinator::StageOutput {
            session,
            activation,
        } => {
            state
                .pipelines
                .event(key, &session, Event::Output(activation));
            Vec::new()
        }
        ToCoordinator::StageFailed { session, reason } => {
            state.pipelines.event(key, &session, Event::Failed(reason));
            Vec::new()
        }
        ToCoordinator::Signal {
            session,
            peer,
            signal,
        } => forward(&state, key, session, peer, Forward::Signal(signal)),
        ToCoordinator::Relay {
            session,
            peer,
            chunk,
        } => forward(&state, key, session, peer, Forward::Relay(chunk)),
    })
}

/// Signalling or a relayed chunk for a neighbour; what is addressed to anyone else, or
/// passes the session's relay limit, is dropped.
fn forward(
    state: &State,
    from: &PublicKey,
    session: tabula_protocol::SessionId,
    to: PublicKey,
    payload: Forward,
) -> Vec<ToWorker> {
    // Refused quietly: a neighbour's last chunks may still be on their way after a
    // pipeline was rebuilt without it, and ending its socket for that would be wrong.
    if let Err(why) = state.pipelines.forward(from, &session, &to, payload) {
        tracing::debug!(worker = %from, "not forwarded: {why}");
    }
    Vec::new()
}

/// One reply per `Ready`: a unit each while they last, then "no work".
async fn ready(
    state: &State,
    key: &PublicKey,
    prefix: &str,
    takes: &Takes,
    units: usize,
) -> ReplyResult {
    // A pipeline stage keeps its worker busy for the whole session.
    if state.pipelines.busy(key) {
        return Ok((0..units)
            .map(|_| ToWorker::NoWork { retry_ms: 1000 })
            .collect());
    }
    let granted = state.grant(key, prefix, takes, units).await?;
    let no_work = units.saturating_sub(granted.len());
    Ok(granted
        .into_iter()
        .map(ToWorker::Assign)
        .chain((0..no_work).map(|_| ToWorker::NoWork { retry_ms: 250 }))
        .collect())
}

/// One verdict per result, in order.
async fn submit(state: &State, signer: &SignerKey, results: Vec<Submission>) -> ReplyResult {
    let verdicts = state.submit(signer, &results).await?;
    Ok(results
        .iter()
        .zip(verdicts)
        .map(|(s, verdict)| match verdict {
            Verdict::Accepted => ToWorker::Accepted { lease: s.lease },
            Verdict::Rejected(reason) => ToWorker::Rejected {
                lease: s.lease,
                reason,
            },
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(output_len: usize) -> ToCoordinator {
        let me = tabula_protocol::Identity::from_seed([1; 32]);
        ToCoordinator::Submit(me.submission(Bytes([2; 16]), Bytes([3; 32]), vec![0; output_len]))
    }

    /// Only requests of one kind join, a lone message takes nothing with it, and a group
    /// counts the bytes of the outputs it holds (the session stops grouping at a frame's worth).
    #[test]
    fn requests_group_by_kind_and_count_their_bytes() {
        let mut ready = Request::from(ToCoordinator::Ready);
        assert!(ready.absorb(ToCoordinator::Ready).is_none());
        assert_eq!(ready.len(), 2);
        assert!(matches!(
            ready.absorb(result(1)),
            Some(ToCoordinator::Submit(_))
        ));
        assert_eq!(ready.output_bytes(), 0);

        let mut results = Request::from(result(1000));
        assert!(results.absorb(result(500)).is_none());
        assert_eq!((results.len(), results.output_bytes()), (2, 1500));
        assert!(matches!(
            results.absorb(ToCoordinator::Ready),
            Some(ToCoordinator::Ready)
        ));

        let heartbeat = Request::from(ToCoordinator::Heartbeat);
        assert_eq!(heartbeat.len(), MAX_GROUP, "a lone message is a full group");
    }
}
