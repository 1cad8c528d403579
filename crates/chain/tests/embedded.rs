//! The in-process EVM: the contract scenario, persistence across reopening, and several
//! handles (as several processes would) sharing one state file.

mod common;

use common::{FIRST, first_epoch, leaf, node, second_epoch, temp_dir};
use tabula_chain::{Address, Chain, ChainError, EmbeddedChain, U256};

const OWNER: Address = Address::repeat_byte(0x0c);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_survives_reopening() {
    let dir = temp_dir("embedded-scenario");
    let state = dir.join("chain.json");
    let chain = Chain::embedded(&state, OWNER).unwrap();
    let contract = chain.contract_address();
    assert_eq!(contract, OWNER.create(0));
    assert_eq!(
        chain.describe(),
        format!("embedded EVM (state in {})", state.display())
    );
    let gas = first_epoch(&chain).await;
    // Intrinsic 21 000 + calldata + a fresh storage slot or two: what a node would report.
    assert!(gas.post > 40_000 && gas.claim > 40_000, "{gas:?}");
    drop(chain);

    let chain = Chain::embedded(&state, OWNER).unwrap();
    assert_eq!(chain.contract_address(), contract);
    second_epoch(&chain).await;
    drop(chain);

    // One block per successful transaction (deployment, 2 posts, 3 claims); the reverted ones
    // left no trace. The owner's nonce counts the same transactions.
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    assert_eq!(json["block_number"], 6);
    let accounts = json["accounts"].as_object().unwrap();
    let account = |a: Address| {
        accounts
            .iter()
            .find(|(k, _)| k.parse::<Address>().unwrap() == a)
            .map(|(_, v)| v)
            .unwrap()
    };
    assert_eq!(account(OWNER)["nonce"], 6);
    assert!(account(contract)["code"].as_str().unwrap().len() > 1000);
    assert!(!dir.join("chain.json.tmp").exists());

    // The file belongs to OWNER: another owner is refused rather than silently unable to post.
    match Chain::embedded(&state, Address::repeat_byte(0x0d)) {
        Err(ChainError::State { message, .. }) => assert!(message.contains("owner"), "{message}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// Eight handles claim at once on one file while another reads: no claim is lost (each
/// operation is load–execute–write under the lock) and no read sees a torn file.
#[test]
fn handles_sharing_a_file_lose_nothing() {
    let dir = temp_dir("embedded-shared");
    let state = dir.join("chain.json");
    let accounts: Vec<(Address, U256)> = (1..=8u8)
        .map(|i| (Address::repeat_byte(i), U256::from(FIRST * u64::from(i))))
        .collect();
    // A perfect tree of 8 leaves, and each leaf's proof.
    let mut levels = vec![
        accounts
            .iter()
            .map(|&(a, n)| leaf(a, n))
            .collect::<Vec<_>>(),
    ];
    while levels.last().unwrap().len() > 1 {
        let next = levels
            .last()
            .unwrap()
            .chunks(2)
            .map(|p| node(p[0], p[1]))
            .collect();
        levels.push(next);
    }
    let root = levels.last().unwrap()[0];
    let proof = |mut i: usize| {
        let mut proof = Vec::new();
        for level in &levels[..levels.len() - 1] {
            proof.push(level[i ^ 1]);
            i /= 2;
        }
        proof
    };

    let chain = EmbeddedChain::open(&state, OWNER).unwrap();
    chain
        .post_epoch(1, root, U256::from(36 * FIRST), 8)
        .unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let chain = EmbeddedChain::open(&state, OWNER).unwrap();
            let mut reads = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                assert_eq!(chain.latest_epoch().unwrap(), 1);
                reads += 1;
            }
            reads
        });
        let claimers: Vec<_> = accounts
            .iter()
            .enumerate()
            .map(|(i, &(account, amount))| {
                let (state, proof) = (&state, proof(i));
                s.spawn(move || {
                    let chain = EmbeddedChain::open(state, OWNER).unwrap();
                    chain.claim(account, amount, &proof).unwrap()
                })
            })
            .collect();
        let mut hashes: Vec<_> = claimers
            .into_iter()
            .map(|t| t.join().unwrap().tx_hash)
            .collect();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(reader.join().unwrap() > 0);
        hashes.sort();
        hashes.dedup();
        assert_eq!(
            hashes.len(),
            8,
            "one block per transaction, so distinct hashes"
        );
    });
    for (account, amount) in accounts {
        assert_eq!(chain.balance_of(account).unwrap(), amount);
        assert_eq!(chain.claimed(account).unwrap(), amount);
    }
    std::fs::remove_dir_all(dir).unwrap();
}
