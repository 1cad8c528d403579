//! The credit tree against the reference: npm `@openzeppelin/merkle-tree` (run with node) must
//! give the same root and the same proofs for the same entries.

use std::{io::Write, path::PathBuf, process::Command};

use alloy_primitives::{Address, B256, U256};
use tabula_chain::merkle::{CreditTree, Entry};

fn repo_root() -> PathBuf {
    // Cargo's variable at run time first: a test binary reused from a build in another
    // checkout (a shared target directory) still finds this checkout.
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .join("../..")
}

/// Root and proofs from `@openzeppelin/merkle-tree`.
fn reference(entries: &[Entry]) -> (B256, Vec<Vec<B256>>) {
    let module = repo_root().join("node_modules/@openzeppelin/merkle-tree");
    assert!(
        module.exists(),
        "{} is missing: run `npm ci` in the repository root",
        module.display()
    );
    let values: Vec<[String; 2]> = entries
        .iter()
        .map(|e| [e.account.to_string(), e.amount.to_string()])
        .collect();
    let mut child = Command::new("node")
        .arg(repo_root().join("crates/chain/tests/openzeppelin-tree.mjs"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("node must be installed (see .ci/run)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_json::to_string(&values).unwrap().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the reference script failed");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let hash = |v: &serde_json::Value| v.as_str().unwrap().parse::<B256>().unwrap();
    let proofs = json["proofs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_array().unwrap().iter().map(hash).collect())
        .collect();
    (hash(&json["root"]), proofs)
}

/// Deterministic pseudo-random entries (SplitMix64), with amounts up to 2^200 so the full
/// uint256 encoding is exercised, and one repeated address.
fn entries(n: usize, seed: u64) -> Vec<Entry> {
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let mut out: Vec<Entry> = (0..n)
        .map(|_| {
            let mut account = [0u8; 20];
            for chunk in account.chunks_mut(8) {
                let bytes = next().to_le_bytes();
                chunk.copy_from_slice(&bytes[..chunk.len()]);
            }
            let amount = U256::from(next()) << (next() % 137) as usize;
            Entry {
                account: Address::from(account),
                amount,
            }
        })
        .collect();
    if n > 2 {
        out[n - 1].account = out[0].account;
    }
    out
}

#[test]
fn root_and_proofs_equal_openzeppelin_merkle_tree() {
    for (n, seed) in [(1, 1), (2, 2), (3, 3), (7, 4), (64, 5), (1000, 6)] {
        let entries = entries(n, seed);
        let tree = CreditTree::build(&entries).unwrap();
        let (root, proofs) = reference(&entries);
        assert_eq!(tree.root(), root, "root of {n} entries");
        for (i, expected) in proofs.iter().enumerate() {
            assert_eq!(
                &tree.proof(i).unwrap(),
                expected,
                "proof {i} of {n} entries"
            );
        }
    }
}
