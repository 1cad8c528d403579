//! What the embedded and the JSON-RPC tests share: the single-leaf credit tree and the scenario
//! both backends must pass.

#![allow(dead_code)]

use tabula_chain::{Address, B256, Chain, ChainError, TxOutcome, U256};

/// A leaf of OpenZeppelin's StandardMerkleTree over (address, uint256):
/// `keccak256(bytes.concat(keccak256(abi.encode(account, amount))))`. A single-leaf tree's root
/// is its leaf, and its proof is empty.
pub fn leaf(account: Address, amount: U256) -> B256 {
    let mut encoded = [0u8; 64];
    encoded[12..32].copy_from_slice(account.as_slice());
    encoded[32..].copy_from_slice(&amount.to_be_bytes::<32>());
    alloy_primitives::keccak256(alloy_primitives::keccak256(encoded))
}

/// An inner node: the hash of the two children, the smaller first.
pub fn node(a: B256, b: B256) -> B256 {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    alloy_primitives::keccak256([lo.as_slice(), hi.as_slice()].concat())
}

pub const VOLUNTEER: Address = Address::repeat_byte(0x5a);
pub const FIRST: u64 = 1_000_000;
pub const SECOND: u64 = 2_500_000;

pub fn reason(result: Result<TxOutcome, ChainError>) -> String {
    match result {
        Err(ChainError::Reverted { reason }) => reason,
        other => panic!("expected a revert, got {other:?}"),
    }
}

/// Gas of the first post and the first claim, to compare the backends.
#[derive(Debug, PartialEq, Eq)]
pub struct Gas {
    pub post: u64,
    pub claim: u64,
}

/// Before a restart: epoch 1 with a single leaf, a claim, and the refusals.
pub async fn first_epoch(chain: &Chain) -> Gas {
    assert_eq!(chain.latest_epoch().await.unwrap(), 0);
    assert_eq!(chain.epoch_root(1).await.unwrap(), B256::ZERO);
    let r = reason(chain.claim(VOLUNTEER, U256::from(FIRST), &[]).await);
    assert!(r.starts_with("NoEpochYet"), "{r}");

    let amount = U256::from(FIRST);
    let root = leaf(VOLUNTEER, amount);
    let posted = chain.post_epoch(1, root, amount, 1).await.unwrap();
    assert!(posted.gas_used > 21_000, "{posted:?}");
    assert_eq!(chain.latest_epoch().await.unwrap(), 1);
    assert_eq!(chain.epoch_root(1).await.unwrap(), root);

    let claimed = chain.claim(VOLUNTEER, amount, &[]).await.unwrap();
    assert!(claimed.gas_used > 21_000, "{claimed:?}");
    assert_ne!(claimed.tx_hash, posted.tx_hash);
    assert_eq!(chain.balance_of(VOLUNTEER).await.unwrap(), amount);
    assert_eq!(chain.claimed(VOLUNTEER).await.unwrap(), amount);

    let r = reason(chain.post_epoch(1, root, amount, 1).await);
    assert_eq!(
        r,
        "EpochOutOfOrder: epoch 1 was given but the next epoch is 2"
    );
    let r = reason(chain.post_epoch(2, B256::ZERO, amount, 1).await);
    assert!(r.starts_with("EmptyRoot"), "{r}");
    let r = reason(chain.claim(VOLUNTEER, amount + U256::ONE, &[]).await);
    assert_eq!(
        r,
        "InvalidProof: the proof does not lead to the latest root"
    );
    let r = reason(chain.claim(VOLUNTEER, amount, &[]).await);
    assert_eq!(
        r,
        "NothingToClaim: the cumulative amount 1000000 is not above the 1000000 already claimed"
    );
    // The refusals changed nothing.
    assert_eq!(chain.latest_epoch().await.unwrap(), 1);
    assert_eq!(chain.balance_of(VOLUNTEER).await.unwrap(), amount);
    Gas {
        post: posted.gas_used,
        claim: claimed.gas_used,
    }
}

/// After a restart: the state survived, and a second epoch mints only the difference.
pub async fn second_epoch(chain: &Chain) {
    assert_eq!(chain.latest_epoch().await.unwrap(), 1);
    assert_eq!(
        chain.balance_of(VOLUNTEER).await.unwrap(),
        U256::from(FIRST)
    );
    assert_eq!(chain.claimed(VOLUNTEER).await.unwrap(), U256::from(FIRST));

    // Two leaves this time: the volunteer's new total and someone else's.
    let other = Address::repeat_byte(0x77);
    let (mine, theirs) = (
        leaf(VOLUNTEER, U256::from(SECOND)),
        leaf(other, U256::from(5)),
    );
    let root = node(mine, theirs);
    chain
        .post_epoch(2, root, U256::from(SECOND + 5), 2)
        .await
        .unwrap();
    assert_eq!(chain.epoch_root(2).await.unwrap(), root);
    // A proof against epoch 1's root no longer works.
    let r = reason(chain.claim(VOLUNTEER, U256::from(FIRST), &[]).await);
    assert!(r.starts_with("InvalidProof"), "{r}");
    chain
        .claim(VOLUNTEER, U256::from(SECOND), &[theirs])
        .await
        .unwrap();
    assert_eq!(
        chain.balance_of(VOLUNTEER).await.unwrap(),
        U256::from(SECOND)
    );
    assert_eq!(chain.claimed(VOLUNTEER).await.unwrap(), U256::from(SECOND));
    chain.claim(other, U256::from(5), &[mine]).await.unwrap();
    assert_eq!(chain.balance_of(other).await.unwrap(), U256::from(5));
    assert_eq!(chain.latest_epoch().await.unwrap(), 2);
}

/// A fresh directory under the target's temporary directory.
pub fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("tabula-chain-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
