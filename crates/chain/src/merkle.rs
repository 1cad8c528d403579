//! The credit tree: OpenZeppelin's `StandardMerkleTree` for `(address, uint256)` leaves, bit for
//! bit, so that `@openzeppelin/merkle-tree` (and any auditor using it) rebuilds the same root
//! from the same ledger, and the contract's `MerkleProof.verifyCalldata` accepts our proofs.
//!
//! The format, from `@openzeppelin/merkle-tree` 1.0 (`StandardMerkleTree.of(values,
//! ["address", "uint256"])` with its default `sortLeaves: true`):
//! - a leaf is `keccak256(keccak256(abi.encode(account, amount)))` (hashed twice, so no leaf
//!   can be mistaken for an inner node);
//! - leaves are sorted by hash, and the tree is an array of `2n − 1` nodes with the leaves at
//!   the end in reverse order and node `i`'s children at `2i + 1` and `2i + 2`;
//! - an inner node is `keccak256` of its two children, smaller first (the pair order
//!   `MerkleProof` expects);
//! - a proof is the sibling of each node on the way from the leaf up to the root.

use alloy_primitives::{Address, B256, U256, keccak256};

/// One contributor of an epoch: a payout address and its cumulative credit in micro-credits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub account: Address,
    pub amount: U256,
}

/// The leaf of `entry`: `keccak256(keccak256(abi.encode(account, amount)))`.
pub fn leaf_hash(entry: &Entry) -> B256 {
    let mut encoded = [0u8; 64];
    encoded[12..32].copy_from_slice(entry.account.as_slice());
    encoded[32..].copy_from_slice(&entry.amount.to_be_bytes::<32>());
    keccak256(keccak256(encoded))
}

/// An inner node: the hash of its children, the smaller first.
fn node_hash(a: &B256, b: &B256) -> B256 {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    let mut pair = [0u8; 64];
    pair[..32].copy_from_slice(lo.as_slice());
    pair[32..].copy_from_slice(hi.as_slice());
    keccak256(pair)
}

/// A built tree over the entries of one epoch.
#[derive(Clone, Debug)]
pub struct CreditTree {
    /// The node array in OpenZeppelin's layout (root at 0).
    nodes: Vec<B256>,
    /// For each entry (in the order given), its index in `nodes`.
    positions: Vec<usize>,
}

impl CreditTree {
    /// Builds the tree, or `None` for no entries (an empty tree has no root; OpenZeppelin
    /// refuses it too).
    pub fn build(entries: &[Entry]) -> Option<Self> {
        if entries.is_empty() {
            return None;
        }
        let mut hashed: Vec<(B256, usize)> = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (leaf_hash(e), i))
            .collect();
        // A stable sort by hash alone, like JavaScript's `Array.prototype.sort`.
        hashed.sort_by_key(|a| a.0);
        let n = hashed.len();
        let mut nodes = vec![B256::ZERO; 2 * n - 1];
        let mut positions = vec![0; n];
        for (sorted, (hash, entry)) in hashed.iter().enumerate() {
            let at = nodes.len() - 1 - sorted;
            nodes[at] = *hash;
            positions[*entry] = at;
        }
        for i in (0..nodes.len() - n).rev() {
            nodes[i] = node_hash(&nodes[2 * i + 1], &nodes[2 * i + 2]);
        }
        Some(Self { nodes, positions })
    }

    pub fn root(&self) -> B256 {
        self.nodes[0]
    }

    /// The number of entries.
    pub fn len(&self) -> usize {
        self.positions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    /// The proof of the entry at `index` (in the order given to [`CreditTree::build`]).
    pub fn proof(&self, index: usize) -> Option<Vec<B256>> {
        let mut at = *self.positions.get(index)?;
        let mut proof = Vec::new();
        while at > 0 {
            let sibling = if at % 2 == 1 { at + 1 } else { at - 1 };
            proof.push(self.nodes[sibling]);
            at = (at - 1) / 2;
        }
        Some(proof)
    }
}

/// Whether `proof` leads from `entry` to `root`: `MerkleProof.verify`, for tests and auditors.
pub fn verify(root: &B256, entry: &Entry, proof: &[B256]) -> bool {
    let computed = proof
        .iter()
        .fold(leaf_hash(entry), |acc, sibling| node_hash(&acc, sibling));
    computed == *root
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: u64) -> Entry {
        let mut account = [0u8; 20];
        account[..8].copy_from_slice(&i.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_be_bytes());
        Entry {
            account: Address::from(account),
            amount: U256::from(1_000 + i * 7),
        }
    }

    #[test]
    fn every_proof_verifies_and_a_changed_amount_does_not() {
        for n in [1usize, 2, 3, 5, 8, 13, 100] {
            let entries: Vec<Entry> = (0..n as u64).map(entry).collect();
            let tree = CreditTree::build(&entries).unwrap();
            assert_eq!(tree.len(), n);
            for (i, e) in entries.iter().enumerate() {
                let proof = tree.proof(i).unwrap();
                assert!(verify(&tree.root(), e, &proof), "n={n} i={i}");
                let mut wrong = *e;
                wrong.amount += U256::from(1);
                assert!(!verify(&tree.root(), &wrong, &proof), "n={n} i={i}");
            }
            assert!(tree.proof(n).is_none());
        }
    }

    #[test]
    fn a_single_entry_is_its_own_root_and_no_entries_have_none() {
        let e = entry(1);
        let tree = CreditTree::build(&[e]).unwrap();
        assert_eq!(tree.root(), leaf_hash(&e));
        assert!(tree.proof(0).unwrap().is_empty());
        assert!(CreditTree::build(&[]).is_none());
    }

    #[test]
    fn the_root_does_not_depend_on_the_order_of_entries() {
        let entries: Vec<Entry> = (0..10).map(entry).collect();
        let mut reversed = entries.clone();
        reversed.reverse();
        assert_eq!(
            CreditTree::build(&entries).unwrap().root(),
            CreditTree::build(&reversed).unwrap().root()
        );
    }
}
