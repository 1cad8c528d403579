// Reads [[address, amount], …] as JSON on stdin and prints the root and every proof of
// @openzeppelin/merkle-tree's StandardMerkleTree over ["address", "uint256"]: the reference the
// Rust tree is checked against (tests/openzeppelin_tree.rs).
import { StandardMerkleTree } from '@openzeppelin/merkle-tree';

let input = '';
for await (const chunk of process.stdin) input += chunk;
const values = JSON.parse(input);
const tree = StandardMerkleTree.of(values, ['address', 'uint256']);
const proofs = values.map((_, i) => tree.getProof(i));
process.stdout.write(JSON.stringify({ root: tree.root, proofs }));
