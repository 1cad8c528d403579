// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";
import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";
import {Ownable2Step} from "@openzeppelin/contracts/access/Ownable2Step.sol";
import {MerkleProof} from "@openzeppelin/contracts/utils/cryptography/MerkleProof.sol";

/// @title Tabula volunteer credit
/// @notice Verified compute credit of Tabula volunteers, one token unit per micro-credit
/// (1 credit = 1 GFLOP of verified inference, 6 decimals).
///
/// The coordinator (the owner) posts one Merkle root per epoch, whatever the number of
/// volunteers: the root of the tree of (payout address, cumulative credit) pairs in
/// OpenZeppelin's StandardMerkleTree leaf format. Roots are never rewritten. Anyone may then
/// claim for an address with a proof against the latest root; the contract mints the
/// difference between the proven cumulative amount and what the address claimed before, so a
/// claim can be repeated every epoch and never pays twice.
contract TabulaCredit is ERC20, Ownable2Step {
    /// The root of each posted epoch, numbered from 1.
    mapping(uint64 epoch => bytes32 root) public epochRoot;
    /// The last posted epoch (0 before the first).
    uint64 public latestEpoch;
    /// The cumulative amount each address has claimed so far.
    mapping(address account => uint256 amount) public claimed;

    /// A root was posted; `totalCredit` and `contributors` describe the tree, for auditors.
    event EpochPosted(uint64 indexed epoch, bytes32 root, uint256 totalCredit, uint256 contributors);
    /// `amount` was minted to `account`, whose claimed total is now `cumulativeAmount`.
    event Claimed(address indexed account, uint64 indexed epoch, uint256 amount, uint256 cumulativeAmount);

    /// Epochs are posted in order, each once: `given` is not the next one (`expected`).
    error EpochOutOfOrder(uint64 expected, uint64 given);
    /// The zero root proves nothing and is refused.
    error EmptyRoot();
    /// No epoch has been posted yet, so there is nothing to claim against.
    error NoEpochYet();
    /// The proof does not lead from (account, cumulativeAmount) to the latest root.
    error InvalidProof();
    /// The proven cumulative amount is not above what the account already claimed.
    error NothingToClaim(uint256 cumulativeAmount, uint256 alreadyClaimed);
    /// Without an owner no epoch could ever be posted again: transfer ownership instead.
    error RenounceDisabled();

    constructor(address initialOwner) ERC20("Tabula Credit", "TABC") Ownable(initialOwner) {}

    /// Disabled: an ownerless contract could never post another epoch, and volunteers' later
    /// credit would have nowhere to go. Ownership moves with `transferOwnership`.
    function renounceOwnership() public view override onlyOwner {
        revert RenounceDisabled();
    }

    /// One token unit is one micro-credit.
    function decimals() public pure override returns (uint8) {
        return 6;
    }

    /// Posts the root of epoch `epoch`, which must be `latestEpoch + 1`. Gas does not depend on
    /// the number of contributors.
    function postEpoch(uint64 epoch, bytes32 root, uint256 totalCredit, uint256 contributors)
        external
        onlyOwner
    {
        uint64 expected = latestEpoch + 1;
        if (epoch != expected) revert EpochOutOfOrder(expected, epoch);
        if (root == bytes32(0)) revert EmptyRoot();
        epochRoot[epoch] = root;
        latestEpoch = epoch;
        emit EpochPosted(epoch, root, totalCredit, contributors);
    }

    /// Mints to `account` what it earned since its last claim. Anyone may call it (the
    /// coordinator relays claims for volunteers who hold no gas); the tokens always go to
    /// `account`.
    function claim(address account, uint256 cumulativeAmount, bytes32[] calldata proof)
        external
        returns (uint256 amount)
    {
        uint64 epoch = latestEpoch;
        if (epoch == 0) revert NoEpochYet();
        bytes32 leaf = keccak256(bytes.concat(keccak256(abi.encode(account, cumulativeAmount))));
        if (!MerkleProof.verifyCalldata(proof, epochRoot[epoch], leaf)) revert InvalidProof();
        uint256 already = claimed[account];
        if (cumulativeAmount <= already) revert NothingToClaim(cumulativeAmount, already);
        amount = cumulativeAmount - already;
        claimed[account] = cumulativeAmount;
        _mint(account, amount);
        emit Claimed(account, epoch, amount, cumulativeAmount);
    }
}
