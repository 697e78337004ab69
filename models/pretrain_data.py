"""The pretraining data stream: documents from shards packed into fixed-length blocks, resumable.

Documents (tokenized, end-of-text after each) are packed into blocks of ``block_length`` tokens;
consecutive blocks overlap by one token so every token is a target exactly once. The stream's
position (epoch, shard, row, the tokens carried over) is part of every pretraining checkpoint
(``models.train``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import numpy as np
import torch

from models.lmlm import loss_mask
from models.tokenizer import LookupTokenIds
from schemas.errors import UserInputError


class PackedBlocks:
    """An endless, resumable stream of (input_ids, mask) blocks of ``block_length`` tokens.

    Each epoch visits the shards in a seeded random order and the rows of each shard in a seeded
    random order; this process takes every ``world_size``-th row from ``rank``. ``read_texts(shard)``
    returns the shard's training texts (the caller picks the column and drops held-out documents).
    ``state_dict()`` / ``load_state_dict()`` capture the exact position.
    """

    def __init__(
        self,
        shards: list[str],
        read_texts: Callable[[str], list[str]],
        tokenizer,
        block_length: int,
        *,
        special_ids: LookupTokenIds | None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        tokenize_batch: int = 256,
    ):
        if not shards:
            raise UserInputError("no training shards given; pass annotated shard files")
        if block_length < 2:
            raise UserInputError(f"block length {block_length}: must be at least 2 tokens")
        self.shards, self.read_texts, self.tokenizer = list(shards), read_texts, tokenizer
        self.block_length, self.special_ids = block_length, special_ids
        self.seed, self.rank, self.world_size, self.tokenize_batch = seed, rank, world_size, tokenize_batch
        self.eos = tokenizer.eos_token_id
        self.epoch, self.shard_pos, self.row_pos = 0, 0, 0
        self._carry = np.zeros(0, np.int64), np.zeros(0, bool)  # tokens read but not yet consumed
        self._rows: list[str] | None = None  # this rank's texts of the current shard, in epoch order
        self._pending: deque[tuple[np.ndarray, np.ndarray]] = deque()  # tokenized rows not yet in the carry
        self._docs_this_epoch = 0

    def state_dict(self) -> dict:
        ids, mask = self._carry
        return {
            "epoch": self.epoch, "shard_pos": self.shard_pos, "row_pos": self.row_pos,
            "carry_ids": torch.from_numpy(ids.copy()), "carry_mask": torch.from_numpy(mask.copy()),
            "docs_this_epoch": self._docs_this_epoch,
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.shard_pos, self.row_pos = state["epoch"], state["shard_pos"], state["row_pos"]
        self._carry = state["carry_ids"].numpy().astype(np.int64), state["carry_mask"].numpy().astype(bool)
        self._docs_this_epoch = state["docs_this_epoch"]
        self._rows, self._pending = None, deque()  # re-read and re-tokenized from the saved row on demand

    def _shard_order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.shards))

    def _load_rows(self) -> None:
        shard_index = int(self._shard_order()[self.shard_pos])
        texts = self.read_texts(self.shards[shard_index])
        order = np.random.default_rng([self.seed, self.epoch, shard_index]).permutation(len(texts))
        self._rows = [texts[i] for i in order[self.rank::self.world_size]]

    def _next_document(self) -> tuple[np.ndarray, np.ndarray]:
        while True:
            if self._rows is None:
                self._load_rows()
            if self.row_pos < len(self._rows):
                break
            self.shard_pos, self.row_pos, self._rows, self._pending = self.shard_pos + 1, 0, None, deque()
            if self.shard_pos == len(self.shards):
                if self._docs_this_epoch == 0:
                    raise UserInputError(
                        f"training shards hold no documents for process {self.rank} of {self.world_size}; "
                        "check the shards (and holdout_fraction) or use fewer processes"
                    )
                self.epoch, self.shard_pos, self._docs_this_epoch = self.epoch + 1, 0, 0
        if not self._pending:
            texts = self._rows[self.row_pos:self.row_pos + self.tokenize_batch]
            for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]:
                doc = torch.tensor([*ids, self.eos], dtype=torch.long)
                self._pending.append((doc.numpy(), loss_mask(doc, self.special_ids).numpy()))
        self.row_pos += 1
        self._docs_this_epoch += 1
        return self._pending.popleft()

    def next_block(self) -> tuple[np.ndarray, np.ndarray]:
        T = self.block_length
        ids, mask = self._carry
        parts_ids, parts_mask, n = [ids], [mask], len(ids)
        while n < T:
            d_ids, d_mask = self._next_document()
            parts_ids.append(d_ids), parts_mask.append(d_mask)
            n += len(d_ids)
        ids, mask = np.concatenate(parts_ids), np.concatenate(parts_mask)
        self._carry = ids[T - 1:], mask[T - 1:]  # the block's last token starts the next block
        return ids[:T], mask[:T]

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, mask), both (batch_size, block_length)."""
        blocks = [self.next_block() for _ in range(batch_size)]
        return torch.from_numpy(np.stack([b[0] for b in blocks])), torch.from_numpy(np.stack([b[1] for b in blocks]))
