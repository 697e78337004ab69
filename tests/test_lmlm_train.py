"""The LMLM loss mask, packing, normalized perplexity, and the pretraining loop (exact resume, both
variants on equal terms, data parallel over gloo)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_tokenizer import annotated_corpus

from models.lmlm import MODEL_SHAPES, build_model, count_parameters, flop_parameters, loss_mask, masked_nll, normalized_perplexity
from models.tokenizer import LookupTokenIds, lookup_token_ids, train_tokenizer
from models.pretrain import PackedBlocks
from models.train import list_checkpoints, load_trainer_state
from schemas.configs import PretrainConfig
from schemas.errors import UserInputError
from schemas.markup import strip
from schemas.shards import ANNOTATED_SCHEMA, rows_to_table
from tasks.pretrain import pretrain
from tasks.shardio import write_table_atomic

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDS = LookupTokenIds(entity=1, relationship=2, ret=3, end=4)


def reference_mask(row: list[int], ids: LookupTokenIds) -> list[bool]:
    """The loss mask written as a plain loop over one row (the specification)."""
    first = next((t for t in row if t in (ids.ret, ids.end)), None)
    inside = first == ids.end  # a row cut inside a value starts masked
    out = []
    for t in row:
        out.append(not inside)
        if t == ids.ret:
            inside = True
        elif t == ids.end:
            inside = False
    return out


def test_loss_mask_skips_values_and_db_end_only():
    #        text ENT  e   REL r  RET v1  v2  END v1  text
    row = [9, 1, 11, 2, 12, 3, 13, 14, 4, 13, 15]
    expect = [True, True, True, True, True, True, False, False, False, True, True]
    assert loss_mask(torch.tensor([row]), IDS)[0].tolist() == expect
    assert loss_mask(torch.tensor([row]), None).all()


def test_loss_mask_row_cut_inside_a_value():
    row = [13, 14, 4, 13, 15, 1, 11, 2, 12, 3, 13]  # starts in a value, ends in the next one
    assert loss_mask(torch.tensor(row), IDS).tolist() == [False, False, False, True, True, True, True, True, True, True, False]


def test_loss_mask_matches_the_loop_on_random_rows():
    rng = np.random.default_rng(0)
    rows = torch.tensor(rng.choice([1, 2, 3, 4, 20, 21, 22, 23], size=(64, 40), p=[.05, .05, .1, .1, .2, .2, .15, .15]))
    got = loss_mask(rows, IDS)
    for row, mask in zip(rows.tolist(), got.tolist()):
        assert mask == reference_mask(row, IDS)


def test_masked_nll_is_the_shifted_cross_entropy_of_hugging_face():
    torch.manual_seed(0)
    model = build_model("micro", 64, context_length=32)
    ids = torch.randint(5, 64, (2, 16))
    ids[:, 5], ids[:, 8] = IDS.ret, IDS.end
    mask = loss_mask(ids, IDS)
    labels = torch.where(mask, ids, -100)
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
        total, n = masked_nll(out.logits, ids, mask)
    assert int(n) == int(mask[:, 1:].sum())
    assert torch.allclose(total / n, out.loss, atol=1e-5)


@pytest.fixture(scope="module")
def corpus():
    return annotated_corpus(160, seed=1)


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return train_tokenizer([strip(t) for t in corpus], 300)


@pytest.fixture(scope="module")
def shards(corpus, tmp_path_factory):
    """Two ANNOTATED_SCHEMA shards of the hand-made corpus."""
    folder = tmp_path_factory.mktemp("annotated")
    rows = [
        dict(doc_id=f"doc-{i:04d}", text=strip(t), annotated_text=t, n_calls=t.count("<|db_end|>"), text_version=0,
             annotator="gold", annotator_version="test", run_id="test")
        for i, t in enumerate(corpus)
    ]
    paths = []
    for k, part in enumerate((rows[:90], rows[90:])):
        paths.append(write_table_atomic(rows_to_table(part, ANNOTATED_SCHEMA), str(folder / f"part-{k}.parquet")))
    return paths


def _stream(corpus, tokenizer, **kw) -> PackedBlocks:
    halves = {"a": corpus[:70], "b": corpus[70:]}
    return PackedBlocks(list(halves), halves.__getitem__, tokenizer, 24, special_ids=lookup_token_ids(tokenizer), **kw)


def test_packing_covers_each_document_once_per_epoch(corpus, tokenizer):
    stream = _stream(corpus, tokenizer)
    eos = tokenizer.eos_token_id
    docs = tokenizer(corpus, add_special_tokens=False)["input_ids"]
    n_tokens = sum(len(d) + 1 for d in docs)
    ids, masks = [], []
    while len(ids) < n_tokens:  # blocks overlap by one token: drop each block's first
        block, mask = stream.next_block()
        assert block.shape == mask.shape == (24,)
        start = 0 if not ids else 1
        ids.extend(block[start:].tolist()), masks.extend(mask[start:].tolist())
    ids, masks = ids[:n_tokens], masks[:n_tokens]
    # split the stream back into documents at end-of-text
    seen, cur, cur_mask = [], [], []
    for t, m in zip(ids, masks):
        if t == eos:
            seen.append(tuple(cur))
            assert cur_mask + [True] == loss_mask(torch.tensor(cur + [eos]), lookup_token_ids(tokenizer)).tolist()
            cur, cur_mask = [], []
        else:
            cur.append(t), cur_mask.append(m)
    assert sorted(seen) == sorted(tuple(d) for d in docs)


def test_ranks_read_disjoint_documents_that_cover_the_corpus(corpus, tokenizer):
    rows = []
    for rank in (0, 1):
        stream = _stream(corpus, tokenizer, rank=rank, world_size=2)
        stream._load_rows()
        mine = list(stream._rows)
        stream.shard_pos = 1
        stream._load_rows()
        rows.append(mine + list(stream._rows))
    assert not set(rows[0]) & set(rows[1])
    assert sorted(rows[0] + rows[1]) == sorted(corpus)


def test_stream_position_resumes_exactly(corpus, tokenizer):
    stream = _stream(corpus, tokenizer, seed=3)
    while stream.shard_pos == 0:  # save in the second shard, mid-document
        stream.next_block()
    state = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in stream.state_dict().items()}
    ahead = []
    while stream.epoch == 0 or len(ahead) < 500:  # into the next epoch
        ahead.append(stream.next_block()[0])
    resumed = _stream(corpus, tokenizer, seed=3)
    resumed.load_state_dict(state)
    again = [resumed.next_block()[0] for _ in ahead]
    assert len(state["carry_ids"]) > 0
    assert all(np.array_equal(a, b) for a, b in zip(ahead, again))


def test_normalized_perplexity_counts_every_token_once_and_normalises_by_source_tokens(corpus, tokenizer):
    torch.manual_seed(0)
    model = build_model("micro", len(tokenizer), context_length=64, eos_token_id=tokenizer.eos_token_id)
    docs = corpus[:6]
    short = normalized_perplexity(model, tokenizer, docs, context_length=9)
    full = normalized_perplexity(model, tokenizer, docs, context_length=64)
    ids = lookup_token_ids(tokenizer)
    expect_trained = sum(
        int(loss_mask(torch.tensor(d), ids).sum()) for d in tokenizer(docs, add_special_tokens=False)["input_ids"]
    )
    assert short.trained_tokens == full.trained_tokens == expect_trained  # windows overlap by exactly one token
    assert full.source_tokens == sum(len(d) for d in tokenizer([strip(t) for t in docs], add_special_tokens=False)["input_ids"])
    assert full.source_tokens < full.trained_tokens  # the calls' entity and relation tokens are trained
    assert full.normalized == pytest.approx(np.exp(full.nll_sum / full.source_tokens))
    plain = normalized_perplexity(model, tokenizer, [strip(t) for t in docs], lookup_calls=False, context_length=64)
    assert plain.trained_tokens == plain.source_tokens  # standard text: normalized perplexity is perplexity
    assert plain.normalized == pytest.approx(np.exp(plain.loss))


def test_reference_shapes_have_their_published_sizes():
    with torch.device("meta"):  # shapes only, no memory
        sizes = {
            "gpt2-124m": count_parameters(build_model("gpt2-124m", 50257)),
            "llama2-176m": count_parameters(build_model("llama2-176m", 32000)),
            "llama2-382m": count_parameters(build_model("llama2-382m", 32000)),
        }
        untied = build_model("llama2-176m", 32000)
    assert sizes["gpt2-124m"] == pytest.approx(124.4e6, rel=0.01)
    assert sizes["llama2-176m"] == pytest.approx(176e6, rel=0.01)
    assert sizes["llama2-382m"] == pytest.approx(382e6, rel=0.01)
    assert flop_parameters(untied) == count_parameters(untied) - 32000 * 512  # the input lookup table does no matmul


def _cfg(**kw) -> PretrainConfig:
    base = dict(model="micro", vocab_size=300, context_length=32, batch_size=2, grad_accum=2, lr=3e-3, min_lr=3e-4,
                warmup_steps=2, max_steps=6, bf16=False, checkpoint_every=2, keep_checkpoints=10, eval_every=3,
                eval_docs=8, log_every=1, holdout_fraction=0.1)
    return PretrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def straight_run(shards, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("straight"))
    return pretrain(_cfg(), shards, out, "lmlm")


def test_resume_equals_training_straight_through(shards, straight_run, tmp_path):
    out = str(tmp_path / "resumed")
    first = pretrain(_cfg(), shards, out, "lmlm", stop_after=3)
    assert first.steps == 3
    second = pretrain(_cfg(), shards, out, "lmlm")
    assert second.steps == 6
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(straight_run.checkpoint).state_dict()
    b = AutoModelForCausalLM.from_pretrained(second.checkpoint).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h for h in second.history if "loss" in h] == [h for h in straight_run.history if "loss" in h]
    sa, sb = load_trainer_state(straight_run.checkpoint), load_trainer_state(second.checkpoint)
    assert torch.equal(sa["data"][0]["carry_ids"], sb["data"][0]["carry_ids"])
    assert sa["scheduler"] == sb["scheduler"]


def test_run_writes_loadable_checkpoints_and_a_loss_curve(straight_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = os.path.dirname(straight_run.checkpoint)
    assert [os.path.basename(c) for c in list_checkpoints(out)] == [f"checkpoint-{s:07d}" for s in (2, 4, 6)]
    assert os.path.isfile(os.path.join(straight_run.checkpoint, "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(straight_run.checkpoint)
    tok = AutoTokenizer.from_pretrained(straight_run.checkpoint)
    assert len(tok) == model.get_input_embeddings().num_embeddings == straight_run.vocab_size
    lookup_token_ids(tok)
    with open(straight_run.loss_curve, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["steps"] == 6 and report["holdout_normalized_perplexity"] > 1
    assert straight_run.tokens == 6 * 2 * 2 * 32
    assert [h["step"] for h in straight_run.history if "holdout_loss" in h] == [3, 6]


def test_standard_baseline_matches_the_lmlm_on_size_tokenizer_and_budget(shards, straight_run, tmp_path):
    std = pretrain(_cfg(), shards, str(tmp_path / "standard"), "standard")
    assert std.parameters == straight_run.parameters
    assert std.tokens == straight_run.tokens and std.steps == straight_run.steps
    assert std.train_docs == straight_run.train_docs and std.holdout_docs == straight_run.holdout_docs
    lm_tok = json.load(open(os.path.join(straight_run.tokenizer, "tokenizer.json")))["model"]["vocab"]
    std_tok = json.load(open(os.path.join(std.tokenizer, "tokenizer.json")))["model"]["vocab"]
    assert lm_tok == std_tok


def test_user_errors_name_the_input_and_the_fix(shards, straight_run, tmp_path):
    out = os.path.dirname(straight_run.checkpoint)
    with pytest.raises(UserInputError, match="resume true"):
        pretrain(_cfg(resume=False), shards, out, "lmlm")
    with pytest.raises(UserInputError, match="batch_size"):
        pretrain(_cfg(batch_size=3), shards, out, "lmlm")
    bad = str(tmp_path / "docs.parquet")
    import pyarrow as pa

    write_table_atomic(pa.table({"doc_id": ["a"], "text": ["x"]}), bad)
    with pytest.raises(UserInputError, match="annotated_text"):
        pretrain(_cfg(), [bad], str(tmp_path / "o"), "lmlm")
    with pytest.raises(UserInputError, match="cannot read"):
        pretrain(_cfg(), [str(tmp_path / "missing.parquet")], str(tmp_path / "o"), "lmlm")
    with pytest.raises(UserInputError, match="not a known shape"):
        pretrain(_cfg(model="huge"), shards, str(tmp_path / "o2"), "lmlm")


@pytest.mark.slow
def test_two_processes_over_gloo(shards, tmp_path):
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tasks.pretrain", "--out", out, "--variant", "lmlm",
           "--set", "model=micro", "--set", "vocab_size=300", "--set", "context_length=32", "--set", "batch_size=2",
           "--set", "max_steps=3", "--set", "bf16=false", "--set", "checkpoint_every=3", "--set", "eval_every=3", *shards]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["world_size"] == 2 and report["steps"] == 3
    assert report["tokens"] == 3 * 2 * 2 * 32  # steps x processes x batch x block
    state = load_trainer_state(report["checkpoint"])
    assert state["world_size"] == 2 and len(state["data"]) == 2


def test_pretrained_model_folder_gets_the_lookup_tokens_and_resized_embeddings(shards, corpus, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    bare = Tokenizer(models.BPE())
    bare.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bare.train_from_iterator([strip(t) for t in corpus], trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    base = str(tmp_path / "base")  # stands for a hub model whose tokenizer lacks the lookup tokens
    PreTrainedTokenizerFast(tokenizer_object=bare).save_pretrained(base)
    build_model("micro", bare.get_vocab_size(), context_length=32).save_pretrained(base)
    report = pretrain(_cfg(model=base, max_steps=1), shards, str(tmp_path / "out"), "lmlm")
    assert report.vocab_size == bare.get_vocab_size() + 5 and report.tokenizer == base
    trained = AutoModelForCausalLM.from_pretrained(report.checkpoint)
    assert trained.get_input_embeddings().num_embeddings == report.vocab_size
