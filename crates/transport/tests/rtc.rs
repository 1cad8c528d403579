//! Real WebRTC data channels between two peers of this process on loopback: messages both
//! ways, and what a hostile peer can send (garbage SDP, garbage ICE candidates, oversized
//! messages).

use std::time::Duration;

use tabula_protocol::Signal;
use tabula_transport::{
    Link, Path, TransportError,
    native::{Role, RtcLink, RtcOptions, connect},
};
use tokio::sync::mpsc;

fn loopback(limit: usize) -> RtcOptions {
    RtcOptions {
        bind: vec![std::net::SocketAddr::from(([127, 0, 0, 1], 0))],
        connect_timeout: Duration::from_secs(10),
        limit,
    }
}

/// Carries one side's signals to the other, passing each through `tamper` (which may
/// replace it, or add signals before it).
fn forward(
    mut from: mpsc::UnboundedReceiver<Signal>,
    to: mpsc::Sender<Signal>,
    mut tamper: impl FnMut(Signal) -> Vec<Signal> + Send + 'static,
) {
    tokio::spawn(async move {
        while let Some(s) = from.recv().await {
            for s in tamper(s) {
                if to.send(s).await.is_err() {
                    return;
                }
            }
        }
    });
}

async fn pair_with(
    tamper_offer_side: impl FnMut(Signal) -> Vec<Signal> + Send + 'static,
    limit: usize,
) -> (
    Result<RtcLink, TransportError>,
    Result<RtcLink, TransportError>,
) {
    let (a_out, a_out_rx) = mpsc::unbounded_channel();
    let (b_out, b_out_rx) = mpsc::unbounded_channel();
    let (a_in_tx, a_in) = mpsc::channel(64);
    let (b_in_tx, b_in) = mpsc::channel(64);
    forward(a_out_rx, b_in_tx, tamper_offer_side);
    forward(b_out_rx, a_in_tx, |s| vec![s]);
    tokio::join!(
        connect(Role::Offerer, a_out, a_in, loopback(limit)),
        connect(Role::Answerer, b_out, b_in, loopback(limit)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_peers_exchange_large_messages_over_a_direct_data_channel() {
    let (a, b) = pair_with(|s| vec![s], 8 << 20).await;
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.path(), Path::Direct);
    let big: Vec<u8> = (0..(3 << 20) + 17).map(|i: u32| (i % 251) as u8).collect();
    let (sent, got) = tokio::join!(a.send(&big), b.recv());
    sent.unwrap();
    assert_eq!(got.unwrap(), big);
    for i in 0..20u8 {
        b.send(&[i; 1000]).await.unwrap();
    }
    for i in 0..20u8 {
        assert_eq!(a.recv().await.unwrap(), vec![i; 1000], "in order");
    }
    assert_eq!(a.rejected_candidates() + b.rejected_candidates(), 0);
    a.close().await;
    let end = tokio::time::timeout(Duration::from_secs(30), b.recv()).await;
    assert_eq!(
        end.expect("the peer sees the close"),
        Err(TransportError::Closed)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_is_refused_and_the_link_goes_on() {
    let (a, b) = pair_with(|s| vec![s], 1 << 20).await;
    let (a, b) = (a.unwrap(), b.unwrap());
    let (sent, got) = tokio::join!(
        async {
            a.send(&vec![7u8; 2 << 20]).await?;
            a.send(b"next").await
        },
        async {
            let first = b.recv().await;
            (first, b.recv().await)
        }
    );
    sent.unwrap();
    assert!(
        matches!(got.0, Err(TransportError::TooLarge { size, limit }) if size == 2 << 20 && limit == 1 << 20),
        "{:?}",
        got.0
    );
    assert_eq!(got.1.unwrap(), b"next");
    a.close().await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbage_sdp_offer_fails_fast_with_a_clear_error() {
    let (a, b) = pair_with(
        |s| match s {
            Signal::Offer { .. } => vec![Signal::Offer {
                sdp: "v=0\r\nthis is not an offer".into(),
            }],
            s => vec![s],
        },
        1 << 20,
    )
    .await;
    let err = b.err().expect("the answerer refuses the offer");
    assert!(
        matches!(&err, TransportError::Signalling(m) if m.contains("SDP offer")),
        "{err}"
    );
    // The offerer never gets an answer: it gives up when the peer's signalling ends (or at
    // its connect timeout), and its caller relays through the coordinator instead.
    let err = a.err().expect("the offerer gives up");
    assert!(
        matches!(&err, TransportError::Signalling(m) if m.contains("stopped signalling")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_ice_candidates_are_skipped_and_counted() {
    let mut injected = false;
    let (a, b) = pair_with(
        move |s| {
            if matches!(s, Signal::Candidate { .. }) && !injected {
                injected = true;
                return vec![
                    Signal::Candidate {
                        json: "not json".into(),
                    },
                    Signal::Candidate {
                        json: r#"{"candidate":"candidate:garbage","sdpMid":"0"}"#.into(),
                    },
                    s,
                ];
            }
            vec![s]
        },
        1 << 20,
    )
    .await;
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(b.rejected_candidates(), 2);
    a.send(b"still works").await.unwrap();
    assert_eq!(b.recv().await.unwrap(), b"still works");
    a.close().await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_ice_candidates_is_capped_and_the_link_still_connects() {
    let mut flooded = false;
    let (a, b) = pair_with(
        move |s| {
            if let Signal::Candidate { json } = &s
                && !flooded
            {
                flooded = true;
                let mut out = vec![Signal::Candidate {
                    json: "c".repeat(tabula_protocol::MAX_CANDIDATE + 1),
                }];
                out.extend((0..50).map(|_| Signal::Candidate { json: json.clone() }));
                return out;
            }
            vec![s]
        },
        1 << 20,
    )
    .await;
    let (a, b) = (a.unwrap(), b.unwrap());
    // One oversized candidate, and everything past the cap of 32 accepted ones.
    assert!(
        b.rejected_candidates() as usize > 50 - tabula_transport::native::MAX_REMOTE_CANDIDATES,
        "{}",
        b.rejected_candidates()
    );
    a.send(b"still works").await.unwrap();
    assert_eq!(b.recv().await.unwrap(), b"still works");
    a.close().await;
    b.close().await;
}
