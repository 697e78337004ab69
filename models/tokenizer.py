"""Tokenizers for LMLM pretraining: a byte-level BPE trained on the corpus, or a hub tokenizer,
both with the four lookup tokens of :mod:`schemas.markup` as special tokens.

Promises kept by every tokenizer returned here:

- each lookup token encodes to exactly one id, and only the literal token does (escaped source
  text, ``<`` + U+2060 + ``|db_...``, never produces a lookup id);
- text around a lookup token tokenizes as it would without it, because a call sits at a
  pre-token boundary: ``<|db_end|> Ajaccio`` keeps the leading-space token `` Ajaccio``;
- there is an end-of-text token, used as document separator when packing.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from typing import NamedTuple

from schemas.errors import UserInputError
from schemas.markup import DB_END, DB_ENTITY, DB_RELATIONSHIP, DB_RETURN, SPECIAL_TOKENS

log = logging.getLogger(__name__)

END_OF_TEXT = "<|endoftext|>"
MIN_VOCAB_SIZE = 256 + 1 + len(SPECIAL_TOKENS)  # the byte alphabet, end-of-text, the lookup tokens


class LookupTokenIds(NamedTuple):
    """Ids of the four lookup tokens in one tokenizer."""

    entity: int
    relationship: int
    ret: int  # <|db_return|>
    end: int


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: str | None = None,
    *,
    min_frequency: int = 2,
    model_max_length: int | None = None,
):
    """A byte-level BPE (GPT-2 pre-tokenization) trained on ``texts``, with end-of-text and the four
    lookup tokens as special tokens; saved in Hugging Face format to ``out_dir`` when given.

    Train it on call-free source text (the ``text`` column) so the LMLM and the standard baseline
    share one tokenizer and their perplexities are comparable.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < MIN_VOCAB_SIZE:
        raise UserInputError(f"vocab_size {vocab_size}: too small for a byte-level BPE; use at least {MIN_VOCAB_SIZE}")
    specials = [END_OF_TEXT, *SPECIAL_TOKENS]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable, whatever the corpus
        show_progress=False,
    )
    seen = 0

    def counted(it: Iterable[str]):
        nonlocal seen
        for t in it:
            seen += 1
            yield t

    bpe.train_from_iterator(counted(texts), trainer)
    if seen == 0:
        raise UserInputError("train_tokenizer: no texts given; pass the corpus's source texts or a tokenizer name")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=END_OF_TEXT,
        bos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        extra_special_tokens=list(SPECIAL_TOKENS),
        model_max_length=model_max_length or 10**30,
    )
    if out_dir is not None:
        save_tokenizer(tokenizer, out_dir)
        tokenizer.name_or_path = out_dir
    return tokenizer


def save_tokenizer(tokenizer, out_dir: str) -> str:
    """Save in Hugging Face format (``tokenizer.json`` + ``tokenizer_config.json``), readable by
    transformers 4.x as well (vLLM pins its own); returns ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    path = os.path.join(out_dir, "tokenizer_config.json")
    with open(path) as f:
        config = json.load(f)
    # transformers 5 writes a class name and a list-valued field that 4.x cannot read; both read these
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if isinstance(config.get("extra_special_tokens"), list):
        config["additional_special_tokens"] = config.pop("extra_special_tokens")
    for machine_local in ("is_local", "local_files_only"):
        config.pop(machine_local, None)
    with open(path, "w") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    return out_dir


def load_tokenizer(name_or_path: str):
    """A tokenizer from a local folder or a hub name, with end-of-text and the four lookup tokens.

    A tokenizer that lacked some of them gets them added at the end of its vocabulary; a model
    made for it must then have its embeddings resized to ``len(tokenizer)`` (``build_model`` does).
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        raise UserInputError(
            f"tokenizer {name_or_path!r}: cannot load it ({str(exc).splitlines()[0]}); pass a folder holding "
            "tokenizer.json, a reachable hub name, or leave it unset to train one on the corpus"
        ) from exc
    if not getattr(tokenizer, "is_fast", False):
        raise UserInputError(f"tokenizer {name_or_path!r}: a fast (tokenizers-backed) tokenizer is needed")
    added = add_lookup_tokens(tokenizer)
    if added:
        log.warning(
            "tokenizer %s: added %d special token(s); resize the model's embeddings to %d", name_or_path, added, len(tokenizer)
        )
    return tokenizer


def add_lookup_tokens(tokenizer) -> int:
    """Add whichever of end-of-text and the four lookup tokens ``tokenizer`` lacks; returns how many were added."""
    from tokenizers import AddedToken

    added = 0
    if tokenizer.eos_token is None:
        added += tokenizer.add_special_tokens({"eos_token": AddedToken(END_OF_TEXT, special=True, normalized=False)})
    vocab = tokenizer.get_vocab()
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        added += tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    lookup_token_ids(tokenizer)  # the promises of the module docstring, checked once
    return added


def lookup_token_ids(tokenizer) -> LookupTokenIds:
    """The ids of the four lookup tokens; raises when one of them does not encode to a single id."""
    ids = []
    for token in (DB_ENTITY, DB_RELATIONSHIP, DB_RETURN, DB_END):
        encoded = tokenizer.encode(token, add_special_tokens=False)
        if len(encoded) != 1:
            raise UserInputError(
                f"tokenizer {tokenizer.name_or_path!r}: {token} encodes to {len(encoded)} ids; it must be one "
                "special token (load the tokenizer through models.tokenizer.load_tokenizer)"
            )
        ids.append(encoded[0])
    return LookupTokenIds(*ids)
