// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {Base} from "./Base.sol";
import {OzFixture} from "./OzFixture.sol";
import {TabulaCredit} from "../src/TabulaCredit.sol";
import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";

contract TabulaCreditTest is Base {
    TabulaCredit credit;
    address owner = address(0xC00D);
    address alice = address(0xA11CE);
    address bob = address(0xB0B);
    address carol = address(0xCA201);
    address relayer = address(0x5E1A7);

    event EpochPosted(uint64 indexed epoch, bytes32 root, uint256 totalCredit, uint256 contributors);
    event Claimed(address indexed account, uint64 indexed epoch, uint256 amount, uint256 cumulativeAmount);
    event Transfer(address indexed from, address indexed to, uint256 value);
    event OwnershipTransferStarted(address indexed previousOwner, address indexed newOwner);

    function setUp() public {
        credit = new TabulaCredit(owner);
    }

    /// A three-leaf tree: alice `a`, bob `b`, carol 7.
    function tree3(uint256 a, uint256 b) internal pure returns (bytes32[] memory) {
        bytes32[] memory leaves = new bytes32[](3);
        leaves[0] = leafOf(address(0xA11CE), a);
        leaves[1] = leafOf(address(0xB0B), b);
        leaves[2] = leafOf(address(0xCA201), 7);
        return buildTree(leaves);
    }

    function post(bytes32[] memory nodes) internal {
        uint64 next = credit.latestEpoch() + 1;
        vm.prank(owner);
        credit.postEpoch(next, nodes[0], 0, (nodes.length + 1) / 2);
    }

    function test_metadata() public view {
        assertTrue(keccak256(bytes(credit.symbol())) == keccak256("TABC"), "symbol");
        assertEq(credit.decimals(), 6, "decimals");
        assertTrue(credit.owner() == owner, "owner");
        assertEq(credit.latestEpoch(), 0, "no epoch at first");
    }

    function test_epochs_are_posted_in_order_and_never_rewritten() public {
        bytes32[] memory nodes = tree3(100, 200);
        vm.expectEmit(true, false, false, true);
        emit EpochPosted(1, nodes[0], 307, 3);
        vm.prank(owner);
        credit.postEpoch(1, nodes[0], 307, 3);
        assertEq(credit.epochRoot(1), nodes[0], "root 1");
        assertEq(credit.latestEpoch(), 1, "latest");
        // The same epoch again, with another root: refused, the first root stays.
        vm.prank(owner);
        vm.expectRevert(abi.encodeWithSelector(TabulaCredit.EpochOutOfOrder.selector, uint64(2), uint64(1)));
        credit.postEpoch(1, keccak256("other"), 0, 0);
        // Skipping an epoch: refused.
        vm.prank(owner);
        vm.expectRevert(abi.encodeWithSelector(TabulaCredit.EpochOutOfOrder.selector, uint64(2), uint64(3)));
        credit.postEpoch(3, keccak256("other"), 0, 0);
        assertEq(credit.epochRoot(1), nodes[0], "root 1 unchanged");
        assertEq(credit.epochRoot(3), bytes32(0), "no root 3");
    }

    function test_the_zero_root_is_refused() public {
        vm.prank(owner);
        vm.expectRevert(abi.encodeWithSelector(TabulaCredit.EmptyRoot.selector));
        credit.postEpoch(1, bytes32(0), 0, 0);
    }

    function test_only_the_owner_posts() public {
        vm.prank(alice);
        vm.expectRevert(abi.encodeWithSelector(Ownable.OwnableUnauthorizedAccount.selector, alice));
        credit.postEpoch(1, keccak256("root"), 0, 0);
    }

    function test_ownership_cannot_be_renounced() public {
        vm.prank(owner);
        vm.expectRevert(abi.encodeWithSelector(TabulaCredit.RenounceDisabled.selector));
        credit.renounceOwnership();
        vm.prank(alice);
        vm.expectRevert(abi.encodeWithSelector(Ownable.OwnableUnauthorizedAccount.selector, alice));
        credit.renounceOwnership();
        assertTrue(credit.owner() == owner, "still owned");
    }

    function test_ownership_moves_in_two_steps() public {
        // Only the owner starts a transfer.
        vm.prank(bob);
        vm.expectRevert(abi.encodeWithSelector(Ownable.OwnableUnauthorizedAccount.selector, bob));
        credit.transferOwnership(bob);
        vm.expectEmit(true, true, false, true, address(credit));
        emit OwnershipTransferStarted(owner, bob);
        vm.prank(owner);
        credit.transferOwnership(bob);
        // The pending owner has no rights before accepting.
        vm.prank(bob);
        vm.expectRevert(abi.encodeWithSelector(Ownable.OwnableUnauthorizedAccount.selector, bob));
        credit.postEpoch(1, keccak256("root"), 0, 0);
        // Nor does the old owner accept in its place.
        vm.prank(owner);
        vm.expectRevert(abi.encodeWithSelector(Ownable.OwnableUnauthorizedAccount.selector, owner));
        credit.acceptOwnership();
        assertTrue(credit.owner() == owner, "still the old owner until accepted");
        assertTrue(credit.pendingOwner() == bob, "pending");
        vm.prank(alice);
        vm.expectRevert(abi.encodeWithSelector(Ownable.OwnableUnauthorizedAccount.selector, alice));
        credit.acceptOwnership();
        vm.prank(bob);
        credit.acceptOwnership();
        assertTrue(credit.owner() == bob, "new owner");
        vm.prank(owner);
        vm.expectRevert(abi.encodeWithSelector(Ownable.OwnableUnauthorizedAccount.selector, owner));
        credit.postEpoch(1, keccak256("root"), 0, 0);
        vm.prank(bob);
        credit.postEpoch(1, keccak256("root"), 0, 0);
        assertTrue(credit.pendingOwner() == address(0), "no pending owner left");
    }

    function test_nothing_to_claim_before_the_first_epoch() public {
        vm.expectRevert(abi.encodeWithSelector(TabulaCredit.NoEpochYet.selector));
        credit.claim(alice, 1, new bytes32[](0));
    }

    function test_a_relayed_claim_mints_to_the_account() public {
        bytes32[] memory nodes = tree3(100, 200);
        post(nodes);
        bytes32[] memory proof = proofOf(nodes, leafOf(alice, 100));
        vm.expectEmit(true, true, false, true);
        emit Claimed(alice, 1, 100, 100);
        vm.prank(relayer);
        uint256 minted = credit.claim(alice, 100, proof);
        assertEq(minted, 100, "minted");
        assertEq(credit.balanceOf(alice), 100, "alice's balance");
        assertEq(credit.balanceOf(relayer), 0, "the relayer gets nothing");
        assertEq(credit.claimed(alice), 100, "claimed");
        assertEq(credit.totalSupply(), 100, "supply");
        // Again: nothing new.
        vm.expectRevert(abi.encodeWithSelector(TabulaCredit.NothingToClaim.selector, 100, 100));
        credit.claim(alice, 100, proof);
    }

    function test_later_epochs_pay_only_the_difference() public {
        bytes32[] memory first = tree3(100, 200);
        post(first);
        credit.claim(alice, 100, proofOf(first, leafOf(alice, 100)));
        bytes32[] memory second = tree3(250, 200);
        post(second);
        vm.expectEmit(true, true, false, true, address(credit));
        emit Claimed(alice, 2, 150, 250);
        assertEq(credit.claim(alice, 250, proofOf(second, leafOf(alice, 250))), 150, "difference");
        assertEq(credit.balanceOf(alice), 250, "cumulative");
        // Bob claims both epochs' credit at once.
        assertEq(credit.claim(bob, 200, proofOf(second, leafOf(bob, 200))), 200, "bob");
    }

    function test_invalid_proofs_are_refused() public {
        bytes32[] memory first = tree3(100, 200);
        post(first);
        bytes32[] memory proof = proofOf(first, leafOf(alice, 100));
        // A wrong amount.
        vm.expectRevert(abi.encodeWithSelector(TabulaCredit.InvalidProof.selector));
        credit.claim(alice, 101, proof);
        // Alice's proof for another account.
        vm.expectRevert(abi.encodeWithSelector(TabulaCredit.InvalidProof.selector));
        credit.claim(bob, 100, proof);
        // A tampered proof.
        proof[0] = bytes32(uint256(proof[0]) ^ 1);
        vm.expectRevert(abi.encodeWithSelector(TabulaCredit.InvalidProof.selector));
        credit.claim(alice, 100, proof);
        // A proof of an older epoch after a newer one was posted.
        bytes32[] memory oldProof = proofOf(first, leafOf(alice, 100));
        post(tree3(300, 200));
        vm.expectRevert(abi.encodeWithSelector(TabulaCredit.InvalidProof.selector));
        credit.claim(alice, 100, oldProof);
        assertEq(credit.balanceOf(alice), 0, "nothing minted");
    }

    /// Every leaf of a random tree claims exactly its amount, once.
    function testFuzz_every_leaf_claims_its_amount(uint256 seed, uint8 size) public {
        uint256 n = bound(size, 1, 40);
        address[] memory accounts = new address[](n);
        uint256[] memory amounts = new uint256[](n);
        bytes32[] memory leaves = new bytes32[](n);
        uint256 total;
        for (uint256 i = 0; i < n; i++) {
            // Distinct accounts: the index is part of the address.
            accounts[i] = address(uint160(uint256(keccak256(abi.encode(seed, i))) << 16 | (i + 1)));
            amounts[i] = uint256(keccak256(abi.encode(seed, i, "amount"))) % 1e24 + 1;
            leaves[i] = leafOf(accounts[i], amounts[i]);
            total += amounts[i];
        }
        bytes32[] memory nodes = buildTree(leaves);
        post(nodes);
        for (uint256 i = 0; i < n; i++) {
            bytes32[] memory proof = proofOf(nodes, leafOf(accounts[i], amounts[i]));
            assertEq(credit.claim(accounts[i], amounts[i], proof), amounts[i], "minted");
            assertEq(credit.balanceOf(accounts[i]), amounts[i], "balance");
        }
        assertEq(credit.totalSupply(), total, "supply");
    }

    /// A proven amount changed by any nonzero delta, or a random proof, never verifies.
    function testFuzz_forged_claims_revert(uint256 amount, uint256 delta, bytes32 junk) public {
        amount = bound(amount, 1, type(uint128).max);
        delta = bound(delta, 1, type(uint128).max);
        bytes32[] memory nodes = tree3(amount, 200);
        post(nodes);
        bytes32[] memory proof = proofOf(nodes, leafOf(alice, amount));
        vm.expectRevert(abi.encodeWithSelector(TabulaCredit.InvalidProof.selector));
        credit.claim(alice, amount + delta, proof);
        bytes32[] memory forged = new bytes32[](proof.length);
        for (uint256 i = 0; i < forged.length; i++) {
            forged[i] = keccak256(abi.encode(junk, i));
        }
        vm.expectRevert(abi.encodeWithSelector(TabulaCredit.InvalidProof.selector));
        credit.claim(alice, amount, forged);
        assertEq(credit.claim(alice, amount, proof), amount, "the real proof still works");
    }

    /// A tree made by the OpenZeppelin merkle-tree JS library (test/OzFixture.sol): the contract accepts
    /// its proofs, and the tests' Solidity builder makes the same root from the same values.
    function test_a_standard_merkle_tree_from_the_oz_library_claims() public {
        bytes32[] memory leaves = new bytes32[](OzFixture.SIZE);
        for (uint256 i = 0; i < OzFixture.SIZE; i++) {
            (address account, uint256 amount,) = OzFixture.entry(i);
            leaves[i] = leafOf(account, amount);
        }
        assertEq(buildTree(leaves)[0], OzFixture.ROOT, "the test builder matches StandardMerkleTree");
        vm.prank(owner);
        credit.postEpoch(1, OzFixture.ROOT, 0, OzFixture.SIZE);
        for (uint256 i = 0; i < OzFixture.SIZE; i++) {
            (address account, uint256 amount, bytes32[] memory proof) = OzFixture.entry(i);
            vm.prank(relayer);
            assertEq(credit.claim(account, amount, proof), amount, "minted");
            assertEq(credit.balanceOf(account), amount, "balance");
        }
    }

    function test_a_one_leaf_tree_claims_with_an_empty_proof() public {
        vm.prank(owner);
        credit.postEpoch(1, leafOf(alice, 5), 5, 1);
        assertEq(credit.claim(alice, 5, new bytes32[](0)), 5, "minted");
        // The root itself is no leaf of another (account, amount).
        vm.expectRevert(abi.encodeWithSelector(TabulaCredit.InvalidProof.selector));
        credit.claim(bob, 5, new bytes32[](0));
    }

    function test_a_claim_mints_from_the_zero_address() public {
        bytes32[] memory nodes = tree3(100, 200);
        post(nodes);
        bytes32[] memory proof = proofOf(nodes, leafOf(bob, 200));
        vm.expectEmit(true, true, false, true, address(credit));
        emit Transfer(address(0), bob, 200);
        vm.expectEmit(true, true, false, true, address(credit));
        emit Claimed(bob, 1, 200, 200);
        credit.claim(bob, 200, proof);
    }

    /// A zero leaf, or a later tree with a lower cumulative amount (a coordinator bug), pays
    /// nothing and says why.
    function test_a_cumulative_amount_not_above_the_claimed_one_pays_nothing() public {
        bytes32[] memory first = tree3(0, 200);
        post(first);
        vm.expectRevert(abi.encodeWithSelector(TabulaCredit.NothingToClaim.selector, 0, 0));
        credit.claim(alice, 0, proofOf(first, leafOf(alice, 0)));
        credit.claim(bob, 200, proofOf(first, leafOf(bob, 200)));
        bytes32[] memory second = tree3(0, 150);
        post(second);
        vm.expectRevert(abi.encodeWithSelector(TabulaCredit.NothingToClaim.selector, 150, 200));
        credit.claim(bob, 150, proofOf(second, leafOf(bob, 150)));
        assertEq(credit.balanceOf(bob), 200, "bob keeps what he had");
    }

    /// Credit that grows over random epochs, claimed at random epochs (or never): each account
    /// ends up with exactly its last claimed cumulative amount, however often it claimed.
    function testFuzz_claims_over_many_epochs_pay_the_latest_cumulative_amount(uint256 seed) public {
        uint256 epochs = bound(seed, 2, 8);
        address[3] memory who = [alice, bob, carol];
        uint256[3] memory cumulative;
        uint256[3] memory paid;
        uint256 supply;
        for (uint256 e = 1; e <= epochs; e++) {
            bytes32[] memory leaves = new bytes32[](3);
            for (uint256 k = 0; k < 3; k++) {
                cumulative[k] += uint256(keccak256(abi.encode(seed, e, k))) % 1e12;
                leaves[k] = leafOf(who[k], cumulative[k]);
            }
            bytes32[] memory nodes = buildTree(leaves);
            post(nodes);
            for (uint256 k = 0; k < 3; k++) {
                // Claim about half the time; always in the last epoch.
                if (e < epochs && uint256(keccak256(abi.encode(seed, e, k, "claim"))) % 2 == 0) continue;
                bytes32[] memory proof = proofOf(nodes, leafOf(who[k], cumulative[k]));
                if (cumulative[k] == paid[k]) {
                    vm.expectRevert(
                        abi.encodeWithSelector(TabulaCredit.NothingToClaim.selector, cumulative[k], paid[k])
                    );
                    credit.claim(who[k], cumulative[k], proof);
                    continue;
                }
                vm.prank(relayer);
                assertEq(credit.claim(who[k], cumulative[k], proof), cumulative[k] - paid[k], "difference");
                supply += cumulative[k] - paid[k];
                paid[k] = cumulative[k];
            }
        }
        for (uint256 k = 0; k < 3; k++) {
            assertEq(credit.balanceOf(who[k]), cumulative[k], "balance is the latest cumulative amount");
            assertEq(credit.claimed(who[k]), cumulative[k], "claimed");
        }
        assertEq(credit.totalSupply(), supply, "supply");
        assertEq(credit.balanceOf(relayer), 0, "the relayer gets nothing");
    }

    /// A proof for one leaf of a random tree never claims another leaf's amount or account.
    function testFuzz_a_proof_proves_only_its_own_leaf(uint256 seed, uint8 size, uint8 pick, uint8 other) public {
        uint256 n = bound(size, 2, 24);
        uint256 i = bound(pick, 0, n - 1);
        uint256 j = bound(other, 0, n - 1);
        vm.assume(i != j);
        address[] memory accounts = new address[](n);
        uint256[] memory amounts = new uint256[](n);
        bytes32[] memory leaves = new bytes32[](n);
        for (uint256 k = 0; k < n; k++) {
            accounts[k] = address(uint160(uint256(keccak256(abi.encode(seed, k))) << 16 | (k + 1)));
            amounts[k] = uint256(keccak256(abi.encode(seed, k, "amount"))) % 1e18 + 1;
            leaves[k] = leafOf(accounts[k], amounts[k]);
        }
        bytes32[] memory nodes = buildTree(leaves);
        post(nodes);
        bytes32[] memory proof = proofOf(nodes, leafOf(accounts[i], amounts[i]));
        vm.expectRevert(abi.encodeWithSelector(TabulaCredit.InvalidProof.selector));
        credit.claim(accounts[j], amounts[i], proof);
        if (amounts[j] != amounts[i]) {
            vm.expectRevert(abi.encodeWithSelector(TabulaCredit.InvalidProof.selector));
            credit.claim(accounts[i], amounts[j], proof);
        }
        // An inner node is no leaf: claiming with a shortened proof fails.
        if (proof.length > 1) {
            bytes32[] memory shorter = new bytes32[](proof.length - 1);
            for (uint256 k = 0; k < shorter.length; k++) shorter[k] = proof[k + 1];
            vm.expectRevert(abi.encodeWithSelector(TabulaCredit.InvalidProof.selector));
            credit.claim(accounts[i], amounts[i], shorter);
        }
        assertEq(credit.totalSupply(), 0, "nothing minted");
    }
}
