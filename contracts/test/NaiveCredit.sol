// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";
import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";

/// The peer for the gas report: the obvious design without Merkle trees, where the coordinator
/// mints every contributor's new credit itself each epoch. Its cost grows with the number of
/// contributors; TabulaCredit's post does not.
contract NaiveCredit is ERC20, Ownable {
    constructor(address initialOwner) ERC20("Naive Credit", "NAIVE") Ownable(initialOwner) {}

    function mintAll(address[] calldata accounts, uint256[] calldata amounts) external onlyOwner {
        for (uint256 i = 0; i < accounts.length; i++) {
            _mint(accounts[i], amounts[i]);
        }
    }
}
