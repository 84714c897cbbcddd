// SPDX-License-Identifier: MIT
pragma solidity ^0.8.0;

import "@openzeppelin/contracts/token/ERC20/ERC20.sol";

contract DevnetToken is ERC20 {
    uint8 private immutable _decimals;

    constructor(string memory name_, string memory symbol_, uint8 decimals_, uint256 supply, address owner)
        ERC20(name_, symbol_)
    {
        _decimals = decimals_;
        _mint(owner, supply);
    }

    function decimals() public view override returns (uint8) {
        return _decimals;
    }
}
