"""Perplexity of the latent-diffusion evaluation under a reference causal LM: the standard model of an
`lmlm lmlm pretrain` run found from its workdir, variant folder or checkpoint folder; bad input named."""

import argparse
import json
import math
import os
import random

import pytest
import torch

from schemas.configs import PretrainConfig
from schemas.errors import UserInputError
from schemas.shards import ANNOTATED_SCHEMA, rows_to_table
from tasks import reference_lm as ev  # the reference LM: perplexity, features
from tasks.pretrain import pretrain
from tasks.shardio import write_table_atomic

torch.set_num_threads(1)

_ANIMALS = ["cat", "dog", "fox", "owl", "hen"]
_PLACES = ["mat", "rug", "bed", "box", "log"]


def _sentence(rng: random.Random) -> str:
    """A fixed template, so word order is all the model needs to learn."""
    return f"the {rng.choice(_ANIMALS)} sat on the {rng.choice(_PLACES)} and the {rng.choice(_ANIMALS)} ran to the {rng.choice(_PLACES)} ."


def _shuffled(text: str, rng: random.Random) -> str:
    words = text.split()
    rng.shuffle(words)
    return " ".join(words)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A workdir laid out as `lmlm lmlm pretrain` leaves it: <workdir>/lmlm/{standard,lmlm}/checkpoint-*.
    The LMLM variant is a copy trained on other text, so picking it instead of the standard model shows."""
    rng = random.Random(0)
    rows = [dict(doc_id=f"doc-{i:04d}", text=" ".join(_sentence(rng) for _ in range(3)), n_calls=0, text_version=0,
                 annotator="gold", annotator_version="test", run_id="test") for i in range(120)]
    for row in rows:
        row["annotated_text"] = row["text"]
    root = tmp_path_factory.mktemp("pretrain")
    shard = write_table_atomic(rows_to_table(rows, ANNOTATED_SCHEMA), str(root / "part-0.parquet"))
    cfg = PretrainConfig(model="micro", vocab_size=300, context_length=32, batch_size=8, lr=3e-3, min_lr=3e-4,
                         warmup_steps=5, max_steps=60, bf16=False, compile=False, checkpoint_every=30, keep_checkpoints=2,
                         eval_every=1000, eval_docs=4, log_every=1000, holdout_fraction=0.05)
    out = root / "work" / "lmlm"
    report = pretrain(cfg, [shard], str(out / "standard"), "standard")
    # an older checkpoint next to the newest one: the newest must win
    assert os.path.isdir(out / "standard" / "checkpoint-0000030")
    other = pretrain(cfg.model_copy(update={"max_steps": 2}), [shard], str(out / "lmlm"), "lmlm")
    return {"workdir": str(root / "work"), "checkpoint": report.checkpoint, "lmlm_checkpoint": other.checkpoint}


@pytest.fixture(scope="module")
def texts():
    rng = random.Random(1)
    in_order = [" ".join(_sentence(rng) for _ in range(2)) for _ in range(12)]
    return in_order, [_shuffled(t, rng) for t in in_order]


def test_in_distribution_text_scores_lower_than_the_same_words_shuffled(workdir, texts):
    lm = ev.load_reference_lm(workdir["checkpoint"], "cpu")
    in_order, shuffled = texts
    assert ev.perplexity(in_order, lm) * 3 < ev.perplexity(shuffled, lm)


def test_workdir_output_folder_variant_folder_and_checkpoint_give_the_same_perplexity(workdir, texts):
    in_order, _ = texts
    standard = os.path.dirname(workdir["checkpoint"])
    names = [workdir["workdir"], os.path.dirname(standard), standard, workdir["checkpoint"]]
    assert [ev.resolve_reference_lm(n) for n in names] == [workdir["checkpoint"]] * 4  # the newest standard one
    scores = {n: ev.perplexity(in_order, n) for n in names}
    assert len(set(scores.values())) == 1, scores
    # the LMLM variant, named directly, is another model with another score: the lookup above did not pick it
    assert ev.perplexity(in_order, os.path.dirname(workdir["lmlm_checkpoint"])) != scores[names[0]]


def test_a_loaded_lm_scores_as_its_path_whatever_the_batching_and_skips_empty_texts(workdir, texts):
    in_order, shuffled = texts
    lm = ev.load_reference_lm(workdir["workdir"])
    assert lm.path == workdir["checkpoint"]
    assert ev.perplexity(in_order + ["", "  "], lm) == ev.perplexity(in_order, workdir["checkpoint"])
    mixed = [t[: len(t) // (1 + i % 3)] for i, t in enumerate(in_order + shuffled)]  # ragged lengths: padding in batches
    assert ev.perplexity(mixed, lm, batch_size=5) == pytest.approx(ev.perplexity(mixed, lm, batch_size=1), rel=1e-5)
    assert math.isnan(ev.perplexity(["", " ", "the"], lm))  # no token has a context to be scored in: nan, not a perfect 1


def test_lm_features_are_one_vector_per_text_whatever_the_batching(workdir, texts):
    in_order, shuffled = texts
    lm = ev.load_reference_lm(workdir["checkpoint"], "cpu")
    mixed = [t[: len(t) // (1 + i % 3)] for i, t in enumerate(in_order + shuffled)] + [""]
    one, batched = ev.lm_features(mixed, lm, batch_size=1), ev.lm_features(mixed, lm, batch_size=5)
    assert one.shape == (len(mixed), lm.model.config.hidden_size)
    assert abs(one - batched).max() < 1e-4  # padding does not leak into the mean


def test_a_folder_without_a_model_is_named_in_one_error_line(tmp_path):
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(UserInputError, match=f"reference LM '{bad}'.*make demo-lmlm") as err:
            ev.perplexity(["the cat sat ."], str(bad))
        assert "\n" not in str(err.value)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(UserInputError, match=f"reference LM '{broken}': cannot load"):
        ev.load_reference_lm(str(broken))


def test_a_hub_name_that_cannot_be_loaded_offline_is_a_user_error():
    assert ev.resolve_reference_lm("no-such-model-name") == "no-such-model-name"  # not a local path: a hub name
    with pytest.raises(UserInputError, match="reference LM 'no-such-model-name': cannot load it"):
        ev.load_reference_lm("no-such-model-name")  # the test session is offline (HF_HUB_OFFLINE)


def _train_args(*argv):
    from flows.diffusion_cli import add_diffusion_commands

    parser = argparse.ArgumentParser(prog="lmlm")
    add_diffusion_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["diffusion", "train", *argv])


def test_reference_lm_flag_sets_the_config_and_a_wrong_folder_fails_before_training(workdir, tmp_path):
    from flows.diffusion_cli import _config_from_args

    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"evaluation": {"samples_per_draw": 3}}))
    config = _config_from_args(_train_args("--config", str(cfg_file), "--reference-lm", workdir["workdir"]))
    assert (config.evaluation.reference_lm, config.evaluation.samples_per_draw) == (workdir["workdir"], 3)
    assert _config_from_args(_train_args("--reference-lm", workdir["workdir"], "--no-eval")).evaluation is None
    with pytest.raises(UserInputError, match="no standard-model checkpoint there"):
        _config_from_args(_train_args("--reference-lm", str(tmp_path)))
