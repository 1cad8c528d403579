// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// The few forge cheatcodes these tests use (forge answers them at this address).
interface Vm {
    function prank(address sender) external;
    function expectRevert(bytes calldata revertData) external;
    function expectEmit(bool topic1, bool topic2, bool topic3, bool data) external;
    function expectEmit(bool topic1, bool topic2, bool topic3, bool data, address emitter) external;
    function toString(uint256 value) external pure returns (string memory);
    function toString(bytes32 value) external pure returns (string memory);
    function assume(bool condition) external;
    function addr(uint256 privateKey) external returns (address);
}

/// forge-std's console.log, for the two shapes these tests print (forge decodes calls to this
/// address and prints them with `-vv`).
library console {
    address internal constant CONSOLE = 0x000000000000000000636F6e736F6c652e6c6f67;

    function log(string memory label, uint256 value) internal view {
        (bool ok,) = CONSOLE.staticcall(abi.encodeWithSignature("log(string,uint256)", label, value));
        ok;
    }

    function log(string memory line) internal view {
        (bool ok,) = CONSOLE.staticcall(abi.encodeWithSignature("log(string)", line));
        ok;
    }
}

/// Assertions and a StandardMerkleTree builder for the tests. No forge-std: it is not among the
/// npm packages in node_modules, and forge runs offline, so this file stands in for the little
/// of it the tests need.
abstract contract Base {
    Vm internal constant vm = Vm(address(uint160(uint256(keccak256("hevm cheat code")))));

    /// Printed by `forge test -vv`.
    event log_named_uint(string key, uint256 val);

    function assertEq(uint256 a, uint256 b, string memory what) internal pure {
        if (a != b) revert(string.concat(what, ": ", vm.toString(a), " != ", vm.toString(b)));
    }

    function assertEq(bytes32 a, bytes32 b, string memory what) internal pure {
        if (a != b) revert(string.concat(what, ": ", vm.toString(a), " != ", vm.toString(b)));
    }

    function assertEq(address a, address b, string memory what) internal pure {
        if (a != b) revert(string.concat(what, ": addresses differ"));
    }

    /// `x` folded into [min, max].
    function bound(uint256 x, uint256 min, uint256 max) internal pure returns (uint256) {
        return min + x % (max - min + 1);
    }

    function assertTrue(bool condition, string memory what) internal pure {
        if (!condition) revert(what);
    }

    /// OpenZeppelin StandardMerkleTree's leaf for (account, amount).
    function leafOf(address account, uint256 amount) internal pure returns (bytes32) {
        return keccak256(bytes.concat(keccak256(abi.encode(account, amount))));
    }

    function hashPair(bytes32 a, bytes32 b) internal pure returns (bytes32) {
        return a < b ? keccak256(abi.encode(a, b)) : keccak256(abi.encode(b, a));
    }

    /// A tree in StandardMerkleTree's layout: `nodes` has 2n-1 entries with the (sorted) leaves
    /// at the end in reverse order and node i's children at 2i+1 and 2i+2.
    function buildTree(bytes32[] memory leaves) internal pure returns (bytes32[] memory nodes) {
        uint256 n = leaves.length;
        require(n > 0, "empty tree");
        sort(leaves, 0, n);
        nodes = new bytes32[](2 * n - 1);
        for (uint256 i = 0; i < n; i++) {
            nodes[nodes.length - 1 - i] = leaves[i];
        }
        for (uint256 k = nodes.length - n; k > 0; k--) {
            uint256 i = k - 1;
            nodes[i] = hashPair(nodes[2 * i + 1], nodes[2 * i + 2]);
        }
    }

    /// Sorts `a[lo..hi)` ascending (quicksort, insertion sort below 16 elements).
    function sort(bytes32[] memory a, uint256 lo, uint256 hi) internal pure {
        while (hi - lo > 16) {
            bytes32 pivot = a[lo + (hi - lo) / 2];
            uint256 i = lo;
            uint256 j = hi - 1;
            while (true) {
                while (a[i] < pivot) i++;
                while (a[j] > pivot) j--;
                if (i >= j) break;
                (a[i], a[j]) = (a[j], a[i]);
                i++;
                j--;
            }
            // Hoare partition: [lo, j] <= pivot <= [j + 1, hi).
            sort(a, lo, j + 1);
            lo = j + 1;
        }
        for (uint256 i = lo + 1; i < hi; i++) {
            bytes32 x = a[i];
            uint256 j = i;
            while (j > lo && a[j - 1] > x) {
                a[j] = a[j - 1];
                j--;
            }
            a[j] = x;
        }
    }

    /// The proof of the leaf at `index` in `nodes` (2n-1 entries, leaves at the end).
    function proofAt(bytes32[] memory nodes, uint256 index) internal pure returns (bytes32[] memory proof) {
        uint256 depth;
        for (uint256 i = index; i > 0; i = (i - 1) / 2) depth++;
        proof = new bytes32[](depth);
        for (uint256 d = 0; index > 0; d++) {
            proof[d] = nodes[index % 2 == 1 ? index + 1 : index - 1];
            index = (index - 1) / 2;
        }
    }

    /// The proof of `leaf` in `nodes`.
    function proofOf(bytes32[] memory nodes, bytes32 leaf) internal pure returns (bytes32[] memory proof) {
        uint256 index = type(uint256).max;
        uint256 n = (nodes.length + 1) / 2;
        for (uint256 i = nodes.length - n; i < nodes.length; i++) {
            if (nodes[i] == leaf) index = i;
        }
        require(index != type(uint256).max, "leaf not in tree");
        return proofAt(nodes, index);
    }
}
