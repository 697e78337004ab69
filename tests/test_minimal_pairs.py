"""Minimal-pair probes: pairs differ in one place, use names no corpus document uses, stay out of the training
text, cancel a preference for frequent words, and are scored by whole-sentence log-probability."""

import zlib

import pytest
import torch

from tasks.ground_truth import GroundTruth
from tasks.minimal_pairs import FIELD_COHERENCE, PHENOMENA, minimal_pair_report, minimal_pairs, score_pairs, seen_in


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
    assert [p.phenomenon for p in pairs] == [ph for ph in (*PHENOMENA, FIELD_COHERENCE) for _ in range(12)]
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


@pytest.mark.parametrize("phenomenon", ["common_knowledge", "field_coherence"])
def test_knowledge_pairs_are_mirrored_so_a_preference_for_frequent_words_scores_one_half(phenomenon):
    """Each swapped word is once the right and once the wrong one (the pairs come in mirrored twos), so a model
    that only likes some words better, whatever the sentence, scores exactly one half."""
    pairs = [p for p in minimal_pairs(world(), 60, seed=3) if p.phenomenon == phenomenon]
    assert len(pairs) == 60
    for first, mirror in zip(pairs[::2], pairs[1::2]):
        right, wrong = _diff(first.good, first.bad)
        assert (right, wrong) == _diff(mirror.bad, mirror.good) and right != wrong
    tails = {p.good: _diff(p.good, p.bad)[0] for p in pairs} | {p.bad: _diff(p.good, p.bad)[1] for p in pairs}

    def likes_some_words(texts):  # a fixed preference per swapped word, blind to the rest of the sentence
        return [float(zlib.crc32(tails[t].encode())) for t in texts]

    assert sum(score_pairs(pairs, likes_some_words)) == len(pairs) / 2


def test_the_lmlm_reads_each_pair_in_its_own_format_too():
    from schemas.markup import parse, strip

    pairs = minimal_pairs(world(), 8, seed=0)
    for p in pairs:
        assert strip(p.good_markup) == p.good and strip(p.bad_markup) == p.bad  # the calls are pure insertions
    born = next(p for p in pairs if p.template == "one subject")
    [placed] = parse(born.good_markup).calls
    assert (placed.call.relation, placed.call.value) == ("Birth City", "Lake Mira")
    assert placed.call.entity == born.good.split(" was ")[0]
    statements = [p for p in pairs if p.phenomenon == "common_knowledge"]
    assert all(p.good_markup == p.good for p in statements)  # everyday prose: nothing to look up


def test_report_scores_the_share_of_pairs_where_the_good_sentence_wins():
    gt = world()
    goods = {p.good for d in range(3) for p in minimal_pairs(gt, 5, seed=7 * 1000 + d)}
    markup_goods = {p.good_markup for d in range(3) for p in minimal_pairs(gt, 5, seed=7 * 1000 + d)}
    knows = minimal_pair_report(gt, lambda texts: [0.0 if t in goods else -1.0 for t in texts],
                                n_per_phenomenon=5, draws=3, seed=7,
                                markup_logprob=lambda texts: [-1.0 if t in markup_goods else 0.0 for t in texts])
    assert knows["accuracy"] == 1.0 and knows["accuracy_std"] == 0.0 and knows["pairs_per_draw"] == 20
    assert set(knows["by_phenomenon"]) == {*PHENOMENA, FIELD_COHERENCE} and knows["examples"]
    assert knows["with_lookups"]["accuracy"] == 0.0 and set(knows["with_lookups"]["by_phenomenon"]) == set(PHENOMENA)
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


def test_in_its_own_format_the_looked_up_value_is_context_not_a_target():
    from transformers import GPT2Config, GPT2LMHeadModel

    from models.lmlm import loss_mask, text_logprobs
    from models.tokenizer import lookup_token_ids, train_tokenizer

    text = "Ada Vance was born in<|db_entity|> Ada Vance<|db_relationship|> Birth City<|db_return|> Lake Mira<|db_end|> Lake Mira."
    tok = train_tokenizer([text, "Ada Vance was born in Lake Mira."], vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=1, n_head=2)).eval()
    ids = torch.tensor([tok.eos_token_id, *tok(text, add_special_tokens=False)["input_ids"]])
    keep = loss_mask(ids, lookup_token_ids(tok))[1:]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids[None]).logits[0, :-1], dim=-1).gather(-1, ids[1:, None])[:, 0]
    assert 0 < int((~keep).sum()) < len(keep)  # " Lake Mira" inside the call and <|db_end|> are not scored
    [got] = text_logprobs(model, tok, [text], lookup_calls=True)
    assert got == pytest.approx(float(logp[keep].sum()), rel=1e-4)
    assert text_logprobs(model, tok, [text])[0] == pytest.approx(float(logp.sum()), rel=1e-4)
