"""Minimal-pair probes: pairs differ in one place, use names no corpus document uses, stay out of the training
text, cancel a preference for frequent words, and are scored by whole-sentence log-probability."""

import zlib

import pytest
import torch

from tasks.ground_truth import GroundTruth
from tasks.minimal_pairs import PHENOMENA, minimal_pair_report, minimal_pairs, score_pairs, seen_in


def world() -> GroundTruth:
    facts = {"Ada Vance": {"Birth City": "Lake Mira"}, "Lake Mira": {"State": "Ohio"}, "Gale University": {}}
    types = {"Ada Vance": "person", "Lake Mira": "city", "Gale University": "university"}
    return GroundTruth(facts, types, [("Ada Vance", "doc-0")], {})


def _diff(a: str, b: str) -> tuple[str, str]:
    """The differing middle of two strings (common prefix and suffix removed)."""
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    j = 0
    while j < min(len(a), len(b)) - i and a[-1 - j] == b[-1 - j]:
        j += 1
    return a[i:len(a) - j], b[i:len(b) - j]


def test_every_phenomenon_gets_its_pairs_and_each_pair_differs_in_one_place():
    pairs = minimal_pairs(world(), 12, seed=0)
    assert [p.phenomenon for p in pairs] == [ph for ph in PHENOMENA for _ in range(12)]
    for p in pairs:
        good, bad = _diff(p.good, p.bad)
        assert p.good != p.bad and len(good.split()) <= 6 and len(bad.split()) <= 6, p
        assert "Ada Vance" not in p.good  # corpus names are not reused: the sentences are new to the model
    assert minimal_pairs(world(), 12, seed=0) == pairs and minimal_pairs(world(), 12, seed=1) != pairs


def test_pairs_seen_in_the_training_text_are_left_out():
    first = minimal_pairs(world(), 4, seed=0)
    training = [f"Some document. {first[0].good} More text.", first[5].bad]
    again = minimal_pairs(world(), 4, seed=0, seen=seen_in(training))
    assert len(again) == len(first)
    assert not any(p.good in training[0] or p.bad == training[1] for p in again)
    assert first[0] not in again and first[5] not in again


def test_common_knowledge_pairs_cancel_a_preference_for_frequent_words():
    """Each field word is once the right and once the wrong ending, so a model that only likes some words better
    (whatever the occupation) scores exactly one half."""
    pairs = [p for p in minimal_pairs(world(), 60, seed=3) if p.phenomenon == "common_knowledge"]

    def likes_some_words(texts):  # a fixed preference per final word, blind to the rest of the sentence
        return [float(zlib.crc32(t.rsplit(",", 1)[-1].encode())) for t in texts]

    assert sum(score_pairs(pairs, likes_some_words)) == len(pairs) / 2


def test_report_scores_the_share_of_pairs_where_the_good_sentence_wins():
    gt = world()
    goods = {p.good for d in range(3) for p in minimal_pairs(gt, 5, seed=7 * 1000 + d)}
    knows = minimal_pair_report(gt, lambda texts: [0.0 if t in goods else -1.0 for t in texts],
                                n_per_phenomenon=5, draws=3, seed=7)
    assert knows["accuracy"] == 1.0 and knows["accuracy_std"] == 0.0 and knows["pairs_per_draw"] == 20
    assert set(knows["by_phenomenon"]) == set(PHENOMENA) and knows["examples"]
    backwards = minimal_pair_report(gt, lambda texts: [-1.0 if t in goods else 0.0 for t in texts],
                                    n_per_phenomenon=5, draws=3, seed=7)
    assert backwards["accuracy"] == 0.0


def test_text_logprobs_sum_the_token_log_probabilities_after_an_end_of_text_token():
    from transformers import GPT2Config, GPT2LMHeadModel

    from models.lmlm import text_logprobs
    from models.tokenizer import train_tokenizer

    tok = train_tokenizer(["Ada Vance was born in Lake Mira.", "She studied at Gale University."], vocab_size=300,
                          min_frequency=1)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=1, n_head=2)).eval()
    texts = ["Ada Vance was born in Lake Mira.", "She studied at Gale University.", "Ada"]
    got = text_logprobs(model, tok, texts, batch_size=2)  # batched with padding: must equal one at a time
    for text, value in zip(texts, got):
        ids = torch.tensor([[tok.eos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss  # mean over the tokens after the first
        assert value == pytest.approx(-float(loss) * (ids.shape[1] - 1), rel=1e-4)
