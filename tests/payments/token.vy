# pragma version ~=0.4.3
# A minimal ERC-20 for the payment tests: a fixed supply minted to the deployer, `transfer`
# (which reverts when asked to move more than the sender holds), and `transfer_two`: one
# transaction, two Transfer logs (a batch payment, as wallets and payroll contracts make).

event Transfer:
    sender: indexed(address)
    receiver: indexed(address)
    amount: uint256

name: public(String[32])
symbol: public(String[8])
decimals: public(uint8)
totalSupply: public(uint256)
balanceOf: public(HashMap[address, uint256])


@deploy
def __init__(_symbol: String[8], _decimals: uint8, _supply: uint256):
    self.name = _symbol
    self.symbol = _symbol
    self.decimals = _decimals
    self.totalSupply = _supply
    self.balanceOf[msg.sender] = _supply
    log Transfer(sender=empty(address), receiver=msg.sender, amount=_supply)


@internal
def _move(_to: address, _amount: uint256):
    assert self.balanceOf[msg.sender] >= _amount, "balance too low"
    self.balanceOf[msg.sender] -= _amount
    self.balanceOf[_to] += _amount
    log Transfer(sender=msg.sender, receiver=_to, amount=_amount)


@external
def transfer(_to: address, _amount: uint256) -> bool:
    self._move(_to, _amount)
    return True


@external
def transfer_two(_a: address, _x: uint256, _b: address, _y: uint256) -> bool:
    self._move(_a, _x)
    self._move(_b, _y)
    return True
