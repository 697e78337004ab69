"""The tokenizer promises of models/tokenizer.py: one id per lookup token, text around calls tokenized
as without them, escaped markup inert, Hugging Face round trip, deterministic training."""

import json
import random

import pytest

from models.tokenizer import END_OF_TEXT, add_lookup_tokens, load_tokenizer, lookup_token_ids, train_tokenizer
from schemas.errors import UserInputError
from schemas.markup import DB_END, SPECIAL_TOKENS, Annotated, LookupCall, PlacedCall, escape, render, strip

_NAMES = ["Napoleon Bonaparte", "Ada Lovelace", "Marie Curie", "Alan Turing", "Grace Hopper", "Emmy Noether"]
_CITIES = ["Ajaccio", "London", "Warsaw", "Maida Vale", "New York City", "Erlangen"]
_JOBS = ["emperor", "mathematician", "physicist", "computer scientist", "rear admiral", "algebraist"]


def annotated_corpus(n: int = 120, seed: int = 0) -> list[str]:
    """Small biographies in canonical markup, calls placed before the space that precedes the value."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        name, city, job = rng.choice(_NAMES), rng.choice(_CITIES), rng.choice(_JOBS)
        head = f"{name} was born in"
        text = f"{head} {city}. {name.split()[-1]} worked as a {job} for {rng.randint(2, 40)} years.\n\nDoc {i}."
        job_at = text.index(f" {job}")
        calls = (
            PlacedCall(len(head), LookupCall(name, "birthplace", city)),
            PlacedCall(job_at, LookupCall(name, "occupation", job)),
        )
        docs.append(render(Annotated(text, calls)))
    return docs


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return annotated_corpus()


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory):
    return train_tokenizer([strip(t) for t in corpus], 400, str(tmp_path_factory.mktemp("tok")))


def test_each_lookup_token_is_one_special_id(tokenizer):
    ids = lookup_token_ids(tokenizer)
    assert len(set(ids)) == 4
    for token, token_id in zip(SPECIAL_TOKENS, ids):
        assert tokenizer.encode(token, add_special_tokens=False) == [token_id]
        assert token in tokenizer.all_special_tokens
    assert tokenizer.eos_token == END_OF_TEXT
    assert tokenizer.eos_token_id not in ids


def test_text_around_calls_tokenizes_as_without_them(tokenizer, corpus):
    ids = lookup_token_ids(tokenizer)
    for doc in corpus[:40]:
        annotated = tokenizer.encode(doc, add_special_tokens=False)
        # drop every call span, <|db_entity|> .. <|db_end|> inclusive
        kept, inside = [], False
        for t in annotated:
            if t == ids.entity:
                inside = True
            if not inside:
                kept.append(t)
            if t == ids.end:
                inside = False
        assert kept == tokenizer.encode(strip(doc), add_special_tokens=False)


def test_value_after_db_end_keeps_its_leading_space_token(tokenizer):
    plain = tokenizer.encode(" Ajaccio", add_special_tokens=False)
    after_call = tokenizer.encode(f"{DB_END} Ajaccio", add_special_tokens=False)
    assert after_call[1:] == plain
    assert tokenizer.convert_ids_to_tokens(plain)[0].startswith("\u0120")  # the byte-level space marker


def test_escaped_markup_never_yields_lookup_ids(tokenizer):
    source = "A page quoting <|db_entity|> X<|db_relationship|> y<|db_return|> z<|db_end|> literally."
    escaped = escape(source)
    ids = tokenizer.encode(escaped, add_special_tokens=False)
    assert not set(ids) & set(lookup_token_ids(tokenizer))
    assert tokenizer.decode(ids) == escaped


def test_saved_tokenizer_loads_identically_and_reads_in_transformers_4_form(tokenizer, corpus):
    path = tokenizer.name_or_path
    loaded = load_tokenizer(path)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded(corpus[:5], add_special_tokens=False)["input_ids"] == tokenizer(corpus[:5], add_special_tokens=False)["input_ids"]
    config = json.load(open(f"{path}/tokenizer_config.json"))
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["additional_special_tokens"] == list(SPECIAL_TOKENS)


def test_training_is_deterministic(corpus):
    # the LMLM and the standard baseline each train their tokenizer; they must get the same one
    texts = [strip(t) for t in corpus]
    assert train_tokenizer(texts, 350).get_vocab() == train_tokenizer(texts, 350).get_vocab()


def test_tokenizer_without_lookup_tokens_gets_them_added():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bare = Tokenizer(models.BPE())
    bare.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bare.train_from_iterator(["plain text only"] * 10, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bare)
    before = len(tok)
    assert add_lookup_tokens(tok) == 5  # end-of-text and the four lookup tokens
    assert len(tok) == before + 5
    assert tok.eos_token == END_OF_TEXT
    lookup_token_ids(tok)
    assert add_lookup_tokens(tok) == 0


def test_bad_inputs_are_user_errors(tmp_path):
    with pytest.raises(UserInputError, match="vocab_size"):
        train_tokenizer(["some text"], 100)
    with pytest.raises(UserInputError, match="no texts"):
        train_tokenizer([], 1000)
    with pytest.raises(UserInputError, match="cannot load"):
        load_tokenizer(str(tmp_path / "missing"))
