"""A Solana cluster double: LiteSVM runs real signed transactions, a loopback JSON-RPC serves them.

LiteSVM (in solders) executes transactions as a validator would (signatures, the System and
SPL Token programs, rent, failures) but has no RPC and keeps no token balances per transaction.
`FakeCluster.send` snapshots the balances of every account a transaction names before and after
it runs, and records what a validator's RPC would answer about it: `getSignatureStatuses` and
`getTransaction` in `jsonParsed` form (System and Token instructions parsed as the RPC's
parsers do, pre/post lamport and token balances). The answers are built from solders' own RPC
types and serialised by them, the serde of the validator's RPC. The test moves each signature
through processed -> confirmed -> finalized, or drops it (a fork that died).

`rpc_app` is the Starlette app (POST /, JSON-RPC 2.0): getGenesisHash, getSlot,
getSignatureStatuses, getTransaction.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from solders.account_decoder import UiTokenAmount
from solders.hash import Hash
from solders.instruction import AccountMeta, Instruction
from solders.keypair import Keypair
from solders.litesvm import LiteSVM
from solders.message import Message
from solders.pubkey import Pubkey
from solders.rpc.responses import (
    GetSignatureStatusesResp,
    GetTransactionResp,
    RpcResponseContext,
)
from solders.system_program import CreateAccountParams, TransferParams, create_account, transfer
from solders.token.state import Mint, TokenAccount
from solders.transaction import Transaction
from solders.transaction_metadata import FailedTransactionMetadata
from solders.transaction_status import (
    EncodedConfirmedTransactionWithStatusMeta,
    EncodedTransactionWithStatusMeta,
    InstructionErrorCustom,
    ParsedAccount,
    ParsedAccountSource,
    ParsedInstruction,
    TransactionConfirmationStatus,
    TransactionErrorInstructionError,
    TransactionStatus,
    UiInnerInstructions,
    UiParsedMessage,
    UiPartiallyDecodedInstruction,
    UiTransaction,
    UiTransactionStatusMeta,
    UiTransactionTokenBalance,
)
from spl.token.constants import ASSOCIATED_TOKEN_PROGRAM_ID, MINT_LEN, TOKEN_PROGRAM_ID
from spl.token.instructions import (
    create_associated_token_account,
    get_associated_token_address,
    initialize_mint,
    mint_to_checked,
    transfer_checked,
)
from spl.token.models import InitializeMintParams, MintToCheckedParams, TransferCheckedParams
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

SYSTEM = "11111111111111111111111111111111"
TOKEN = str(TOKEN_PROGRAM_ID)
LEVELS = ("processed", "confirmed", "finalized")
_STATUS = {
    "processed": TransactionConfirmationStatus.Processed,
    "confirmed": TransactionConfirmationStatus.Confirmed,
    "finalized": TransactionConfirmationStatus.Finalized,
}


@dataclass
class Landed:
    """A transaction the cluster ran: its slot, its RPC answer, how settled it is."""

    slot: int
    answer: EncodedConfirmedTransactionWithStatusMeta
    err: Any
    level: str = "processed"


@dataclass
class FakeCluster:
    svm: LiteSVM = field(default_factory=LiteSVM)
    genesis_hash: str = field(default_factory=lambda: str(Hash.new_unique()))
    slot: int = 1
    landed: dict[str, Landed] = field(default_factory=dict)

    # -- making transactions ------------------------------------------------------------------

    def funded(self, lamports: int = 100 * 10**9) -> Keypair:
        wallet = Keypair()
        self.svm.airdrop(wallet.pubkey(), lamports)
        return wallet

    def run(self, payer: Keypair, ixs: list[Instruction], *signers: Keypair) -> str:
        """Sign and run `ixs` (paid by `payer`); the signature. The cluster records it as
        processed; `settle` moves it on."""
        blockhash = self.svm.latest_blockhash()
        message = Message.new_with_blockhash(ixs, payer.pubkey(), blockhash)
        tx = Transaction([payer, *signers], message, blockhash)
        return self.send(tx)

    def setup(self, payer: Keypair, ixs: list[Instruction], *signers: Keypair) -> None:
        """Run set-up instructions, final at once (mints, token accounts)."""
        signature = self.run(payer, ixs, *signers)
        assert self.landed[signature].err is None, self.landed[signature].err
        self.settle(signature, "finalized")

    def new_mint(self, authority: Keypair, decimals: int = 6) -> Pubkey:
        mint = Keypair()
        rent = self.svm.minimum_balance_for_rent_exemption(MINT_LEN)
        self.setup(
            authority,
            [
                create_account(
                    CreateAccountParams(
                        from_pubkey=authority.pubkey(),
                        to_pubkey=mint.pubkey(),
                        lamports=rent,
                        space=MINT_LEN,
                        owner=TOKEN_PROGRAM_ID,
                    )
                ),
                initialize_mint(
                    InitializeMintParams(
                        decimals=decimals,
                        mint=mint.pubkey(),
                        mint_authority=authority.pubkey(),
                        program_id=TOKEN_PROGRAM_ID,
                    )
                ),
            ],
            mint,
        )
        return mint.pubkey()

    def token_account(self, payer: Keypair, owner: Pubkey, mint: Pubkey) -> Pubkey:
        """The associated token account of `owner` for `mint`, created if absent."""
        address = get_associated_token_address(owner, mint)
        if self.svm.get_account(address) is None:
            self.setup(payer, [create_associated_token_account(payer.pubkey(), owner, mint)])
        return address

    def mint_to(self, authority: Keypair, mint: Pubkey, owner: Pubkey, amount: int) -> None:
        dest = self.token_account(authority, owner, mint)
        decimals = Mint.from_bytes(bytes(self.svm.get_account(mint).data)).decimals  # type: ignore[union-attr]
        self.setup(
            authority,
            [
                mint_to_checked(
                    MintToCheckedParams(
                        program_id=TOKEN_PROGRAM_ID,
                        mint=mint,
                        dest=dest,
                        mint_authority=authority.pubkey(),
                        amount=amount,
                        decimals=decimals,
                    )
                )
            ],
        )

    def pay_sol(
        self, payer: Keypair, to: Pubkey, lamports: int, reference: str | None = None
    ) -> str:
        ix = transfer(TransferParams(from_pubkey=payer.pubkey(), to_pubkey=to, lamports=lamports))
        return self.run(payer, [with_reference(ix, reference)])

    def pay_token(
        self,
        payer: Keypair,
        mint: Pubkey,
        to_owner: Pubkey,
        amount: int,
        reference: str | None = None,
    ) -> str:
        source = get_associated_token_address(payer.pubkey(), mint)
        dest = self.token_account(payer, to_owner, mint)
        decimals = Mint.from_bytes(bytes(self.svm.get_account(mint).data)).decimals  # type: ignore[union-attr]
        ix = transfer_checked(
            TransferCheckedParams(
                program_id=TOKEN_PROGRAM_ID,
                source=source,
                mint=mint,
                dest=dest,
                owner=payer.pubkey(),
                amount=amount,
                decimals=decimals,
            )
        )
        return self.run(payer, [with_reference(ix, reference)])

    # -- the cluster's record -----------------------------------------------------------------

    def send(self, tx: Transaction) -> str:
        keys = list(tx.message.account_keys)
        before = [self._balances(k) for k in keys]
        result = self.svm.send_transaction(tx)
        failed = isinstance(result, FailedTransactionMetadata)
        meta_in = result.meta() if failed else result  # type: ignore[union-attr]
        after = [self._balances(k) for k in keys]
        self.slot += 1
        self.svm.warp_to_slot(self.slot)
        err = None
        if failed:
            err = TransactionErrorInstructionError(0, InstructionErrorCustom(1))
        signature = str(tx.signatures[0])
        self.landed[signature] = Landed(
            self.slot, self._answer(tx, keys, before, after, meta_in, err), err
        )
        return signature

    def settle(self, signature: str, level: str) -> None:
        self.landed[signature].level = level

    def drop(self, signature: str) -> None:
        """The fork that held `signature` died: the cluster never saw it."""
        del self.landed[signature]

    def _balances(self, key: Pubkey) -> tuple[int, TokenAccount | None, int | None]:
        account = self.svm.get_account(key)
        if account is None:
            return 0, None, None
        token = None
        decimals = None
        if str(account.owner) == TOKEN and len(account.data) == 165:
            token = TokenAccount.from_bytes(bytes(account.data))
            mint = self.svm.get_account(token.mint)
            assert mint is not None
            decimals = Mint.from_bytes(bytes(mint.data)).decimals
        return account.lamports, token, decimals

    def _answer(
        self,
        tx: Transaction,
        keys: list[Pubkey],
        before: list[tuple[int, TokenAccount | None, int | None]],
        after: list[tuple[int, TokenAccount | None, int | None]],
        meta_in: Any,
        err: Any,
    ) -> EncodedConfirmedTransactionWithStatusMeta:
        message = tx.message
        header = message.header
        signed = header.num_required_signatures

        def writable(i: int) -> bool:
            if i < signed:
                return i < signed - header.num_readonly_signed_accounts
            return i < len(keys) - header.num_readonly_unsigned_accounts

        accounts = [
            ParsedAccount(
                key,
                writable(i),
                message.is_signer(i),
                ParsedAccountSource.Transaction,
            )
            for i, key in enumerate(keys)
        ]
        instructions = [
            _parse(keys, ix.program_id_index, list(ix.accounts), bytes(ix.data), None, after)
            for ix in message.instructions
        ]
        inner = []
        for index, group in enumerate(meta_in.inner_instructions()):
            if group:
                inner.append(
                    UiInnerInstructions(
                        index,
                        [
                            _parse(
                                keys,
                                i.instruction().program_id_index,
                                list(i.instruction().accounts),
                                bytes(i.instruction().data),
                                i.stack_height(),
                                after,
                            )
                            for i in group
                        ],
                    )
                )
        meta = UiTransactionStatusMeta(
            err,
            meta_in.fee(),
            [b[0] for b in before],
            [b[0] for b in after],
            inner_instructions=inner,
            log_messages=list(meta_in.logs()),
            pre_token_balances=_token_balances(before),
            post_token_balances=_token_balances(after),
            rewards=[],
            compute_units_consumed=meta_in.compute_units_consumed(),
        )
        ui = UiTransaction(
            list(tx.signatures),
            UiParsedMessage(accounts, message.recent_blockhash, instructions, None),
        )
        return EncodedConfirmedTransactionWithStatusMeta(
            self.slot,
            EncodedTransactionWithStatusMeta(ui, meta, None),
            int(time.time()),
        )

    # -- JSON-RPC -----------------------------------------------------------------------------

    def answer(self, method: str, params: list[Any]) -> Any:
        if method == "getGenesisHash":
            return self.genesis_hash
        if method == "getSlot":
            return self.slot
        if method == "getSignatureStatuses":
            statuses = []
            for signature in params[0]:
                landed = self.landed.get(signature)
                statuses.append(
                    None
                    if landed is None
                    else TransactionStatus(
                        landed.slot,
                        None if landed.level == "finalized" else 1,
                        None,
                        landed.err,
                        _STATUS[landed.level],
                    )
                )
            resp = GetSignatureStatusesResp(statuses, RpcResponseContext(self.slot))
            return json.loads(resp.to_json())["result"]
        if method == "getTransaction":
            options = params[1] if len(params) > 1 else {}
            assert options.get("encoding") == "jsonParsed", options
            assert options.get("maxSupportedTransactionVersion") == 0, options
            wanted = options.get("commitment", "finalized")
            landed = self.landed.get(params[0])
            if landed is None or LEVELS.index(landed.level) < LEVELS.index(wanted):
                return None
            return json.loads(GetTransactionResp(landed.answer).to_json())["result"]
        raise LookupError(method)


def _b58(data: bytes) -> str:
    alphabet = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
    number, text = int.from_bytes(data, "big"), ""
    while number:
        number, digit = divmod(number, 58)
        text = alphabet[digit] + text
    return "1" * (len(data) - len(data.lstrip(b"\0"))) + text


def with_reference(ix: Instruction, reference: str | None) -> Instruction:
    """The instruction with a Solana Pay reference key appended (read-only, not a signer)."""
    if reference is None:
        return ix
    extra = AccountMeta(Pubkey.from_string(reference), is_signer=False, is_writable=False)
    return Instruction(ix.program_id, ix.data, [*ix.accounts, extra])


def _token_balances(
    balances: list[tuple[int, TokenAccount | None, int | None]],
) -> list[UiTransactionTokenBalance]:
    out = []
    for index, (_, token, decimals) in enumerate(balances):
        if token is None or decimals is None:
            continue
        amount = UiTokenAmount(
            token.amount / 10**decimals, decimals, str(token.amount), _ui(token.amount, decimals)
        )
        out.append(
            UiTransactionTokenBalance(index, token.mint, amount, token.owner, TOKEN_PROGRAM_ID)
        )
    return out


def _ui(amount: int, decimals: int) -> str:
    if decimals == 0:
        return str(amount)
    whole, frac = divmod(amount, 10**decimals)
    text = f"{whole}.{frac:0{decimals}d}".rstrip("0").rstrip(".")
    return text


def _parse(
    keys: list[Pubkey],
    program_index: int,
    accounts: list[int],
    data: bytes,
    stack_height: int | None,
    after: list[tuple[int, TokenAccount | None, int | None]],
) -> ParsedInstruction | UiPartiallyDecodedInstruction:
    """An instruction as the RPC's jsonParsed encoding shows it (System transfer and Token
    transfer/transferChecked parsed; anything else partially decoded)."""
    program = keys[program_index]
    named = [str(keys[a]) for a in accounts]
    if str(program) == SYSTEM and len(data) == 12 and data[:4] == (2).to_bytes(4, "little"):
        info = {
            "source": named[0],
            "destination": named[1],
            "lamports": int.from_bytes(data[4:12], "little"),
        }
        return ParsedInstruction(
            "system", program, {"info": info, "type": "transfer"}, stack_height
        )
    if str(program) == TOKEN and data[:1] == b"\x0c" and len(data) == 10:
        amount = int.from_bytes(data[1:9], "little")
        decimals = data[9]
        info = {
            "source": named[0],
            "mint": named[1],
            "destination": named[2],
            "authority": named[3],
            "tokenAmount": {
                "amount": str(amount),
                "decimals": decimals,
                "uiAmount": amount / 10**decimals,
                "uiAmountString": _ui(amount, decimals),
            },
        }
        parsed = {"info": info, "type": "transferChecked"}
        return ParsedInstruction("spl-token", program, parsed, stack_height)
    if str(program) == TOKEN and data[:1] == b"\x03" and len(data) == 9:
        info = {
            "source": named[0],
            "destination": named[1],
            "authority": named[2],
            "amount": str(int.from_bytes(data[1:9], "little")),
        }
        return ParsedInstruction(
            "spl-token", program, {"info": info, "type": "transfer"}, stack_height
        )
    return UiPartiallyDecodedInstruction(
        program, [keys[a] for a in accounts], _b58(data), stack_height
    )


def rpc_app(cluster: FakeCluster) -> Starlette:
    async def endpoint(request: Request) -> JSONResponse:
        body = await request.json()
        try:
            result = cluster.answer(body["method"], body.get("params") or [])
        except LookupError:
            return JSONResponse(
                {
                    "jsonrpc": "2.0",
                    "error": {"code": -32601, "message": "Method not found"},
                    "id": body.get("id"),
                }
            )
        return JSONResponse({"jsonrpc": "2.0", "result": result, "id": body.get("id")})

    return Starlette(routes=[Route("/", endpoint, methods=["POST"])])


@contextlib.asynccontextmanager
async def serving(cluster: FakeCluster) -> AsyncIterator[str]:
    """The cluster's RPC on a free loopback port; yields its URL."""
    import asyncio

    import uvicorn

    config = uvicorn.Config(
        rpc_app(cluster), host="127.0.0.1", port=0, log_level="warning", lifespan="off"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


__all__ = ["ASSOCIATED_TOKEN_PROGRAM_ID", "FakeCluster", "rpc_app", "serving"]
