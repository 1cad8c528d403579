// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {Base, console} from "./Base.sol";
import {NaiveCredit} from "./NaiveCredit.sol";
import {TabulaCredit} from "../src/TabulaCredit.sol";

/// Gas of one epoch and of a claim at 10, 1 000 and 100 000 contributors, next to the naive
/// design (mint to every contributor each epoch, test/NaiveCredit.sol).
/// `bash contracts/gas-report.sh` runs this with `--isolate`, so each measured call is its own
/// transaction and gasleft() deltas are what a transaction pays: 21 000 base, calldata, cold
/// storage and execution. Without `--isolate` (as in test.sh) the numbers are execution only;
/// the bounds asserted here hold either way.
///
/// The trees are real StandardMerkleTrees of `contributors` random (address, amount) leaves,
/// built in the test; the measured claims use a deepest leaf (proof length ceil(log2 n)).
contract GasTest is Base {
    address owner = address(0xC00D);

    /// Contributor k of a run: a random address and credit (up to 10^6 credits, 6 decimals).
    function contributor(uint256 k, uint256 epoch) internal pure returns (address account, uint256 amount) {
        account = address(uint160(uint256(keccak256(abi.encode("account", k)))));
        amount = (uint256(keccak256(abi.encode("amount", k))) % 1e12 + 1) * epoch;
    }

    /// Epoch `epoch`'s tree and the total credit in it.
    function tree(uint256 contributors, uint256 epoch) internal pure returns (bytes32[] memory nodes, uint256 total) {
        bytes32[] memory leaves = new bytes32[](contributors);
        for (uint256 k = 0; k < contributors; k++) {
            (address account, uint256 amount) = contributor(k, epoch);
            leaves[k] = leafOf(account, amount);
            total += amount;
        }
        nodes = buildTree(leaves);
    }

    /// Claims contributor k's cumulative credit of epoch `epoch` from `nodes`; returns its gas.
    function claimOf(TabulaCredit credit, bytes32[] memory nodes, uint256 k, uint256 epoch)
        internal
        returns (uint256 gas, uint256 proofLength)
    {
        (address account, uint256 amount) = contributor(k, epoch);
        bytes32[] memory proof = proofOf(nodes, leafOf(account, amount));
        reserveMemory(4096);
        uint256 before = gasleft();
        credit.claim(account, amount, proof);
        gas = before - gasleft();
        proofLength = proof.length;
        assertEq(credit.balanceOf(account), amount, "claimed the cumulative amount");
    }

    /// The contributor whose leaf is the smallest hash in epoch `epoch`: StandardMerkleTree puts
    /// it last, at the greatest depth.
    function deepest(uint256 contributors, uint256 epoch) internal pure returns (uint256 best) {
        bytes32 min = bytes32(type(uint256).max);
        for (uint256 k = 0; k < contributors; k++) {
            (address account, uint256 amount) = contributor(k, epoch);
            bytes32 leaf = leafOf(account, amount);
            if (leaf < min) (min, best) = (leaf, k);
        }
    }

    /// Expands memory by `size` bytes past the free pointer without allocating, so that encoding
    /// the measured call's arguments costs no memory expansion inside the measured window (with
    /// 100 000-leaf trees in memory, each new word would cost thousands of gas).
    function reserveMemory(uint256 size) internal pure {
        assembly {
            mstore(add(mload(0x40), size), 0)
        }
    }

    /// ceil(log2(n)): the longest proof in a StandardMerkleTree of n leaves.
    function depthOf(uint256 n) internal pure returns (uint256 depth) {
        while ((uint256(1) << depth) < n) depth++;
    }

    struct Row {
        uint256 post1;
        uint256 post2;
        uint256 veryFirst;
        uint256 firstClaim;
        uint256 firstDepth;
        uint256 repeatClaim;
        uint256 laterDepth;
    }

    function measureMerkle(uint256 contributors) internal {
        TabulaCredit credit = new TabulaCredit(owner);
        Row memory r;
        // The measured claims use the deepest leaf of their epoch's tree: `first` in epoch 1,
        // `later` in epoch 2 (every cumulative amount doubles, so the leaves move).
        uint256 first = deepest(contributors, 1);
        uint256 later = deepest(contributors, 2);
        uint256 warmUp = 0;
        while (warmUp == first || warmUp == later) warmUp++;

        (bytes32[] memory nodes, uint256 total) = tree(contributors, 1);
        vm.prank(owner);
        reserveMemory(4096);
        uint256 before = gasleft();
        credit.postEpoch(1, nodes[0], total, contributors);
        r.post1 = before - gasleft();
        // The contract's very first mint also sets totalSupply from zero, which no later claim
        // pays: it is logged apart.
        (r.veryFirst,) = claimOf(credit, nodes, warmUp, 1);
        (r.firstClaim, r.firstDepth) = claimOf(credit, nodes, first, 1);
        if (later != first) claimOf(credit, nodes, later, 1);

        (nodes, total) = tree(contributors, 2);
        vm.prank(owner);
        reserveMemory(4096);
        before = gasleft();
        credit.postEpoch(2, nodes[0], total, contributors);
        r.post2 = before - gasleft();
        (r.repeatClaim, r.laterDepth) = claimOf(credit, nodes, later, 2);

        assertEq(r.firstDepth, depthOf(contributors), "the first proof is ceil(log2 n) long");
        assertEq(r.laterDepth, depthOf(contributors), "the later proof is ceil(log2 n) long");
        // An epoch costs the same whatever the tree; a claim grows only with the proof.
        assertTrue(r.post1 < 80_000 && r.post2 < 65_000, "postEpoch stays constant");
        assertTrue(r.firstClaim < 110_000 && r.repeatClaim < 70_000, "claim stays small");

        console.log("contributors", contributors);
        console.log("proof length", r.firstDepth);
        console.log("postEpoch (first epoch)", r.post1);
        console.log("postEpoch (later epoch)", r.post2);
        console.log("claim (contract's very first)", r.veryFirst);
        console.log("claim (first)", r.firstClaim);
        console.log("claim (later epoch)", r.repeatClaim);
    }

    function measureNaive(uint256 contributors) internal {
        NaiveCredit naive = new NaiveCredit(owner);
        address[] memory accounts = new address[](contributors);
        uint256[] memory amounts = new uint256[](contributors);
        for (uint256 k = 0; k < contributors; k++) {
            (accounts[k], amounts[k]) = contributor(k, 1);
        }
        vm.prank(owner);
        reserveMemory(64 * contributors + 4096);
        uint256 before = gasleft();
        naive.mintAll(accounts, amounts);
        uint256 firstEpoch = before - gasleft();
        vm.prank(owner);
        reserveMemory(64 * contributors + 4096);
        before = gasleft();
        naive.mintAll(accounts, amounts);
        uint256 laterEpoch = before - gasleft();
        assertEq(naive.balanceOf(accounts[contributors - 1]), 2 * amounts[contributors - 1], "minted twice");
        // Linear in the contributors: at least one balance write each per epoch (2 900 when
        // the slot is already warm, as without --isolate, where the whole test is one
        // transaction; 5 000 in a transaction of its own).
        assertTrue(laterEpoch > 2_900 * contributors, "naive grows with the contributors");
        console.log("contributors", contributors);
        console.log("naive mintAll (first epoch)", firstEpoch);
        console.log("naive mintAll (later epoch)", laterEpoch);
    }

    function test_gas_merkle_10() public { measureMerkle(10); }
    function test_gas_merkle_1000() public { measureMerkle(1000); }
    function test_gas_merkle_100000() public { measureMerkle(100_000); }
    function test_gas_naive_10() public { measureNaive(10); }
    function test_gas_naive_1000() public { measureNaive(1000); }
    /// Far above any block gas limit (foundry.toml raises the test's): measured to show it.
    function test_gas_naive_100000() public { measureNaive(100_000); }
}
