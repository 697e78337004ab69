"""Diffusion-guided language modeling (DGLM): plan-LM shapes and splice, noise augmentation, the sampler, the plan
prior's guidance (toward the class, composable), the metrics, a tiny trained workdir (resume, a new attribute in one
fit with no LM training, generation, CLI errors), and the flow end to end (slow)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from models.kv_cache import cpu_bf16_attention
from models.lmlm import build_model
from models.plan_lm import (
    ClassPrompt,
    PlanPromptGenerator,
    PlanSpace,
    noise_levels,
    noise_plan,
    nucleus,
    sample_continuations,
    sample_index,
    spliced_embeddings,
    token_nll,
    training_batch,
)
from models.plan_prior import LinearAttribute, PlanDenoiser, PlanDiffusion, PlanGuidance
from schemas.errors import UserInputError
from schemas.guided_configs import AttributeConfig, GuidedFlowConfig, GuidedSamplingConfig
from tasks import guided_metrics as gm

torch.set_num_threads(1)
D = 384


def _lm(vocab: int = 300):
    torch.manual_seed(0)
    return build_model("micro", vocab, context_length=128, eos_token_id=0).eval()


# ----------------------------------------------------------------------------- plan LM


def test_generator_makes_k_soft_vectors_of_the_lm_width_and_depends_on_the_noise_level():
    gen = PlanPromptGenerator(D, soft_tokens=6, width=32, layers=2, heads=4, d_lm=64)
    z = torch.randn(3, D)
    a = gen(z, torch.full((3,), 0.95))
    assert a.shape == (3, 6, 64)
    torch.nn.init.normal_(gen.proj_out.weight, std=0.5)  # the residual starts at zero and FiLM at identity: give both
    for block in gen.blocks:                            # a slope to see alpha^2 matter
        torch.nn.init.normal_(block.film.weight, std=0.5)
    assert not torch.allclose(gen(z, torch.full((3,), 0.95)), gen(z, torch.full((3,), 0.2)))
    assert ClassPrompt([3, 2], 64)(torch.tensor([[0, 2], [3, 1]])).shape == (2, 2, 64)


def test_soft_vectors_sit_at_the_token_embedding_scale_and_carry_the_plan_from_the_start():
    """The old generator started ~8x the token norm, with a shared offset, and a fine-tune grew a near-constant prompt
    of ~15x that the LM learned to ignore; now every vector is held at the embeddings' scale and is the plan's linear
    image at initialisation."""
    from models.plan_lm import token_rms

    lm = _lm()
    scale = token_rms(lm)
    torch.manual_seed(0)
    gen = PlanPromptGenerator(D, soft_tokens=4, width=32, layers=1, heads=2, d_lm=lm.config.hidden_size, token_rms=scale)
    z, a2 = torch.randn(64, D), torch.full((64,), 0.95)
    soft = gen(z, a2)
    assert torch.allclose(soft.pow(2).mean(-1).sqrt(), torch.full((64, 4), scale), rtol=1e-3)
    assert torch.allclose(gen(10 * z, a2), soft, atol=1e-5)  # the scale never follows the input's
    spread = (soft.std(0).norm(dim=-1) / soft.mean(0).norm(dim=-1)).min()
    assert spread > 3  # across plans the vectors differ by more than their shared part
    for p in gen.proj_out.parameters():  # however large the residual grows, the output keeps the scale
        torch.nn.init.normal_(p, std=5.0)
    assert torch.allclose(gen(z, a2).pow(2).mean(-1).sqrt(), torch.full((64, 4), scale), rtol=1e-3)


def test_the_bag_of_words_loss_rewards_soft_vectors_that_point_at_the_continuations_words():
    from models.plan_lm import token_frequencies

    torch.manual_seed(0)
    table = torch.randn(50, 16)
    freq = token_frequencies([[3, 3, 7], [9]], 50)
    assert torch.allclose(freq.sum(-1), torch.ones(2)) and float(freq[0, 3]) == pytest.approx(2 / 3)
    gen = PlanPromptGenerator(D, soft_tokens=2, width=16, layers=1, heads=2, d_lm=16)
    aimed = torch.stack([table[[3, 7]], table[[9, 9]]])  # (2, k=2, 16): the words of each continuation
    assert gen.bag_of_words_nll(aimed, table, freq) < gen.bag_of_words_nll(aimed.roll(1, 0), table, freq)
    soft = aimed.clone().requires_grad_()
    gen.bag_of_words_nll(soft, table.requires_grad_(), freq).backward()
    assert soft.grad is not None and table.grad is None  # the LM's embeddings are only read


def _plan_problem(n: int, seed: int):
    """Plans of 8 clusters; the continuation's 4 tokens name the cluster; the prefix is noise."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(8, D, generator=torch.Generator().manual_seed(123))
    cls = torch.randint(0, 8, (n,), generator=g)
    plans = centres[cls] + 0.5 * torch.randn(n, D, generator=g)
    prefixes = torch.randint(10, 100, (n, 6), generator=g).tolist()
    return plans, prefixes, [[100 + 8 * c + j for j in range(4)] for c in cls.tolist()]


def test_a_short_plan_fine_tune_reads_the_plan():
    """The recipe of the plan fine-tune (the generator, its learning-rate scale, continuation-only loss, noised plans,
    the bag-of-words auxiliary loss):
    after 150 steps the held-out NLL with the true plan is well below that with another example's plan."""
    from models.plan_lm import mean_nll, token_frequencies, token_rms
    from models.train import fit
    from schemas.guided_configs import PlanLMConfig
    from tasks.guided import SoftPromptLM

    cfg = PlanLMConfig()
    lm = _lm()
    torch.manual_seed(0)
    gen = PlanPromptGenerator(D, 4, 32, 1, 2, lm.config.hidden_size, token_rms(lm))
    model = SoftPromptLM(lm, gen)
    plans, prefixes, conts = _plan_problem(2000, 0)

    def batch_loss(step):
        g = torch.Generator().manual_seed(step)
        idx = torch.randint(0, len(plans), (16,), generator=g)
        b = training_batch([prefixes[i] for i in idx], [conts[i] for i in idx], 4, 0, cfg.train_prefix)
        a2 = noise_levels(16, cfg.noise_shift, generator=g)
        soft = gen(noise_plan(plans[idx], a2, generator=g), a2)
        table = lm.get_input_embeddings().weight
        words = gen.bag_of_words_nll(soft, table, token_frequencies([conts[i] for i in idx], table.shape[0]))
        return mean_nll(lm, b, soft) + cfg.bag_of_words_weight * words

    budget = cfg.train.model_copy(update={"steps": 150, "batch_size": 16, "warmup_steps": 5, "log_every": 1000,
                                          "checkpoint_every": 1000})
    fit(model, batch_loss, budget, save=lambda *_: None, log=_quiet, lr_scales={"prompt": cfg.prompt_lr_scale})
    plans, prefixes, conts = _plan_problem(256, 1)
    b = training_batch(prefixes, conts, 4, 0, train_prefix=False)
    a2 = torch.full((256,), 0.95)
    nll = {}
    with torch.no_grad():
        for name, x in (("true", plans), ("shuffled", plans.roll(1, 0))):
            per_token, keep = token_nll(lm, b, gen(noise_plan(x, a2, generator=torch.Generator().manual_seed(0)), a2))
            nll[name] = float((per_token * keep).sum() / keep.sum())
    assert nll["true"] < nll["shuffled"] - 0.25, nll


def test_training_batch_splices_soft_positions_between_prefix_and_continuation():
    b = training_batch([[5, 6, 7], [8]], [[9, 10], [11, 12, 13]], soft_tokens=2, pad_id=0)
    assert b["ids"].tolist() == [[5, 6, 7, 0, 0, 9, 10], [8, 0, 0, 11, 12, 13, 0]]
    assert b["soft"].int().tolist() == [[0, 0, 0, 1, 1, 0, 0], [0, 1, 1, 0, 0, 0, 0]]
    assert b["continuation"].int().tolist() == [[0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1, 0]]
    assert b["target"].int().tolist() == [[0, 1, 1, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1, 0]]  # prefix after its first token
    lm = _lm()
    soft = torch.randn(2, 2, lm.config.hidden_size)
    emb = spliced_embeddings(lm, b["ids"], b["soft"], soft)
    assert torch.equal(emb[0, 3:5], soft[0]) and torch.equal(emb[1, 1:3], soft[1])
    assert torch.equal(emb[0, :3], lm.get_input_embeddings()(b["ids"][0, :3]))


def test_the_continuation_loss_reads_the_soft_prompt_and_only_target_positions_count():
    lm = _lm()
    b = training_batch([[5, 6, 7]], [[9, 10, 11]], soft_tokens=2, pad_id=0, train_prefix=False)
    soft = torch.randn(1, 2, lm.config.hidden_size)
    nll, keep = token_nll(lm, b, soft)
    assert keep.int().tolist() == [[0, 0, 0, 0, 1, 1, 1]]  # the 3 continuation tokens, from the last soft position on
    other, _ = token_nll(lm, b, soft + 1.0)
    assert torch.equal(nll[0, :2], other[0, :2])  # the prefix cannot see the soft prompt (causal)
    assert not torch.allclose(nll[0, 4:], other[0, 4:])  # the continuation does


def test_the_training_loss_scores_the_target_tokens_alone_and_equals_the_masked_mean_over_every_position():
    from models.plan_lm import mean_nll

    lm = _lm()
    b = training_batch([[5, 6, 7, 8, 9], [8]], [[9, 10, 11], [11, 12]], soft_tokens=2, pad_id=0, train_prefix=False)
    soft = torch.randn(2, 2, lm.config.hidden_size, requires_grad=True)
    per_token, keep = token_nll(lm, b, soft)
    full = (per_token * keep).sum() / keep.sum()
    loss = mean_nll(lm, b, soft)
    assert torch.allclose(loss, full, atol=1e-5)
    (g_loss,), (g_full,) = torch.autograd.grad(loss, soft), torch.autograd.grad(full, soft)
    assert torch.allclose(g_loss, g_full, atol=1e-6)  # the same gradient reaches the soft prompt
    empty = {**b, "target": torch.zeros_like(b["target"])}
    with torch.no_grad():
        assert float(mean_nll(lm, empty, soft)) == 0.0  # nothing to train: zero, not NaN


def test_label_dropout_trains_unknown_for_each_attribute_and_keeps_the_other_labels():
    from tasks.guided_data import drop_labels

    labels = torch.stack([torch.randint(0, 12, (4000,)), torch.randint(0, 2, (4000,))], dim=1)
    unknown = torch.tensor([12, 2])
    assert torch.equal(drop_labels(labels, unknown, 0.0), labels)
    out = drop_labels(labels, unknown, 0.3, torch.Generator().manual_seed(0))
    dropped = out == unknown
    # each attribute is dropped on its own, about 30% of the time; the rest keep their label
    assert 0.25 < dropped[:, 0].float().mean() < 0.35 and 0.25 < dropped[:, 1].float().mean() < 0.35
    assert 0.02 < (dropped[:, 0] & dropped[:, 1]).float().mean() < 0.16
    assert torch.equal(out[~dropped], labels[~dropped])


def test_prefix_dropout_replaces_a_share_of_prefixes_by_the_document_start_or_another_rows():
    from tasks.guided_data import dropped_prefixes

    prefixes = [[i, i + 1000] for i in range(2000)]
    assert dropped_prefixes(prefixes, 0.0, "swap", 0, np.random.default_rng(0)) == prefixes
    start = dropped_prefixes(prefixes, 0.5, "start", 0, np.random.default_rng(0))
    assert 0.45 < np.mean([p == [0] for p in start]) < 0.55
    assert all(p == [0] or p == q for p, q in zip(start, prefixes))
    swapped = dropped_prefixes(prefixes, 0.5, "swap", 0, np.random.default_rng(0))
    moved = [p != q for p, q in zip(swapped, prefixes)]
    assert 0.45 < np.mean(moved) < 0.55 and all(p in prefixes for p in swapped)  # real prefixes, of other rows

def test_length_grouped_batches_pad_little_draw_every_length_as_often_and_redraw_on_resume():
    from tasks.guided_data import length_grouped_batch

    lengths = np.random.default_rng(0).integers(40, 90, 5000)
    batches = [length_grouped_batch(lengths, 32, 8, 3, step) for step in range(800)]
    assert all(len(b) == 32 for b in batches)
    assert np.array_equal(batches[437], length_grouped_batch(lengths, 32, 8, 3, 437))  # a function of (seed, step)
    padded = sum(32 * lengths[b].max() for b in batches) / sum(lengths[b].sum() for b in batches) - 1
    random = [np.random.default_rng(s).integers(0, 5000, 32) for s in range(800)]
    padded_random = sum(32 * lengths[b].max() for b in random) / sum(lengths[b].sum() for b in random) - 1
    assert padded < 0.05 < 0.2 < padded_random
    drawn = np.concatenate(batches)  # sorting and dealing out keeps the draw uniform: no length is favoured
    assert abs(lengths[drawn].mean() - lengths.mean()) < 0.5
    assert len(np.unique(drawn)) > 0.95 * (1 - np.exp(-len(drawn) / 5000)) * 5000  # as many rows as random draws reach
    assert not np.array_equal(batches[0], length_grouped_batch(lengths, 32, 8, 4, 0))  # the seed matters


def test_noise_augmentation_is_mostly_mild_variance_preserving_and_exact_at_the_ends():
    g = torch.Generator().manual_seed(0)
    a2 = noise_levels(20_000, generator=g)
    assert 0.85 < float(a2.median()) < 0.95  # the reference's shift 2 ln 3: median alpha^2 = 0.9
    assert float((a2 < 0.5).float().mean()) < 0.25 and float(a2.min()) < 0.01
    x = torch.randn(4000, 8)
    z = noise_plan(x, 0.6, generator=g)
    assert abs(float(z.var()) - 1.0) < 0.05
    assert torch.equal(noise_plan(x, 1.0, generator=g), x)
    assert abs(float(torch.corrcoef(torch.stack([noise_plan(x, 0.0, generator=g).flatten(), x.flatten()]))[0, 1])) < 0.05


def test_plan_space_round_trips_unit_embeddings():
    e = torch.nn.functional.normalize(torch.randn(50, D), dim=-1)
    space = PlanSpace.fit(e.numpy())
    x = space.standardize(e)
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 0.05
    assert torch.allclose(space.embedding(x), e, atol=1e-5)
    assert torch.allclose(space.project(x), x, atol=1e-4)
    off = space.project(x * 3 + 1)  # any sampled plan is put back on the sphere, re-standardised
    assert torch.allclose(space.embedding(off).norm(dim=-1), torch.ones(50)) and torch.allclose(space.project(off), off, atol=1e-4)


# nucleus within the 64 candidates, the whole vocabulary, or a batch mixing rows of both kinds
@pytest.mark.parametrize("sharpness", [[0.3], [3.0], [30.0], [0.3, 30.0]])
def test_nucleus_keeps_the_smallest_most_likely_set_reaching_top_p(sharpness):
    scale = torch.tensor(sharpness).repeat(32 // len(sharpness))[:, None]
    probs = torch.softmax(scale * torch.randn(32, 3000, generator=torch.Generator().manual_seed(1)), dim=-1)
    kept = nucleus(probs, 0.9)
    for row, k in zip(probs, kept):
        order = row.argsort(descending=True)
        n = int((row[order].cumsum(0) < 0.9).sum()) + 1  # tokens needed to reach 0.9
        assert torch.equal(k.nonzero().flatten().sort().values, order[:n].sort().values)
        assert torch.equal(k[order[:n]], row[order[:n]])


def test_batched_left_padded_sampling_equals_one_prefix_at_a_time_and_honours_bias_and_bans():
    lm = _lm()
    soft = torch.randn(2, 3, lm.config.hidden_size)
    greedy = dict(max_new_tokens=6, pad_id=0, top_p=1e-6, repetition_penalty=1.2)
    both = sample_continuations(lm, [[1, 2, 3, 4], [7, 8]], soft, **greedy)
    alone = sample_continuations(lm, [[7, 8]], soft[1:], **greedy)
    assert torch.equal(both[1], alone[0])
    gen = torch.Generator().manual_seed(0)
    bias = torch.zeros(300)
    bias[42] = 30.0
    boosted = sample_continuations(lm, [[1, 2]] * 4, None, max_new_tokens=5, pad_id=0, logit_bias=bias, banned=[0],
                                   repetition_penalty=1.0, generator=gen)
    assert (boosted == 42).all()
    banned = sample_continuations(lm, [[1, 2]] * 4, None, max_new_tokens=5, pad_id=0, logit_bias=bias, banned=[42, 0],
                                  generator=gen)
    assert not (banned == 42).any() and not (banned == 0).any()


def test_sample_index_draws_each_token_at_its_probability_and_never_a_removed_one():
    g = torch.Generator().manual_seed(3)
    probs = torch.rand(3, 50, generator=g) * (torch.rand(3, 50, generator=g) > 0.5)  # unnormalised, half removed
    rows = probs.repeat(1_000, 1)  # row i is probs[i % 3]
    draws = torch.cat([sample_index(rows, g) for _ in range(15)])
    for r in range(3):
        got = torch.bincount(draws[r::3, 0], minlength=50).double()
        want = probs[r].double() / probs[r].sum()
        assert got[want == 0].sum() == 0
        n_r = got.sum()
        assert ((got / n_r - want).abs() <= 5 * (want * (1 - want) / n_r).sqrt() + 1e-9).all()


def test_eager_attention_for_bf16_cpu_decoding_and_training_gives_sdpa_logits_and_restores_the_model():
    lm = _lm()
    before = lm.config._attn_implementation
    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = lm(input_ids=ids, attention_mask=mask).logits.float()
        with cpu_bf16_attention(lm):
            inside = lm.config._attn_implementation
            eager = lm(input_ids=ids, attention_mask=mask).logits.float()
    assert inside == ("eager" if before == "sdpa" else before) and lm.config._attn_implementation == before
    assert torch.allclose(plain[mask.bool()], eager[mask.bool()], atol=0.1, rtol=0.05)
    wrapper = torch.nn.ModuleDict({"lm": lm, "head": torch.nn.Linear(4, 4)})  # training: fit hands over its model
    with cpu_bf16_attention(wrapper, torch.bfloat16):  # and its autocast dtype, entered per step inside
        assert lm.config._attn_implementation == ("eager" if before == "sdpa" else before)
    with cpu_bf16_attention(wrapper):  # float32: SDPA stays
        assert lm.config._attn_implementation == before
    assert lm.config._attn_implementation == before


# ----------------------------------------------------------------------------- prior and guidance


def _prior():
    torch.manual_seed(0)
    return PlanDiffusion(PlanDenoiser(D, D, 64, 2))


def _attribute(name: str, seed: int) -> LinearAttribute:
    g = torch.Generator().manual_seed(seed)
    return LinearAttribute(name, ["no", "yes"], torch.randn(2, D, generator=g) * 3, torch.zeros(2))


def test_cfg_scale_zero_is_the_null_condition_and_one_the_prefix_condition():
    prior = _prior()
    for p in prior.parameters():
        torch.nn.init.normal_(p, std=0.05)
    z, lam = torch.randn(3, 1, D), torch.zeros(3)
    cond = torch.nn.functional.normalize(torch.randn(3, D), dim=-1)
    assert torch.allclose(prior.guided_predict(z, lam, cond, None, 0.0)[1], prior.predict(z, lam, torch.zeros_like(cond))[1])
    assert torch.allclose(prior.guided_predict(z, lam, cond, None, 1.0)[1], prior.predict(z, lam, cond)[1])
    assert not torch.allclose(prior.predict(z, lam, cond)[1], prior.predict(z, lam, torch.zeros_like(cond))[1])
    assert float(prior.loss(torch.randn(8, 1, D), cond.repeat(3, 1)[:8]).detach()) > 0


def _sample(prior, terms, n=16, seed=1):
    space = PlanSpace(torch.zeros(D), torch.ones(D))
    cond = torch.nn.functional.normalize(torch.randn(n, D, generator=torch.Generator().manual_seed(2)), dim=-1)
    guide = PlanGuidance(space, terms, samples=8, generator=torch.Generator().manual_seed(3)) if terms else None
    x = prior.sample((n, 1, D), cond, steps=20, sampler="ddpm", generator=torch.Generator().manual_seed(seed),
                     classifier=guide, classifier_scale=1.0 if guide else 0.0)
    return space.project(x[:, 0])


def _p(attribute, x, value="yes"):
    return float(attribute.log_prob(torch.nn.functional.normalize(x, dim=-1), torch.tensor(attribute.index(value))).exp().mean())


def test_guidance_moves_the_plan_toward_the_class_more_with_a_larger_scale():
    prior, a = _prior(), _attribute("a", 0)
    p = [_p(a, _sample(prior, [(a, torch.tensor(1), s)] if s else [])) for s in (0.0, 2.0, 20.0)]
    assert p[0] < p[1] < p[2] and p[2] > 0.9
    assert _p(a, _sample(prior, [(a, torch.tensor(0), 20.0)]), "no") > 0.9  # and toward the other class


def test_the_closed_form_guidance_loss_is_the_loss_of_normalising_every_posterior_sample():
    from models.diffusion import alpha_sigma

    g = torch.Generator().manual_seed(5)
    space = PlanSpace(torch.randn(D, generator=g) * 0.1, torch.rand(D, generator=g) + 0.5)
    a = _attribute("a", 0)
    x = torch.randn(6, 1, D, generator=g, requires_grad=True)
    lam, target, S = torch.linspace(-4, 4, 6), torch.tensor([0, 1, 1, 0, 1, 0]), 16
    fast = PlanGuidance(space, [(a, target, 3.0)], samples=S, generator=torch.Generator().manual_seed(9))(x, lam)
    noise = torch.randn((S, D), generator=torch.Generator().manual_seed(9))  # the draws it shares across rows
    alpha, sigma = alpha_sigma(lam)
    e = space.embedding(x + (sigma / alpha)[:, None, None] * noise[None])  # (B, S, D): every sample normalised
    slow = -3.0 * (torch.logsumexp(a.log_prob(e, target[:, None]), dim=1) - math.log(S))
    assert torch.allclose(fast, slow, atol=1e-4)
    grad_fast, = torch.autograd.grad(fast.sum(), x)
    grad_slow, = torch.autograd.grad(slow.sum(), x)
    assert torch.allclose(grad_fast, grad_slow, atol=1e-4)


def test_attributes_compose_by_summing_their_losses():
    prior, a, b = _prior(), _attribute("a", 0), _attribute("b", 1)
    space = PlanSpace(torch.zeros(D), torch.ones(D))
    x, lam = torch.randn(5, 1, D), torch.zeros(5)
    loss = lambda terms: PlanGuidance(space, terms, samples=4, generator=torch.Generator().manual_seed(0))(x, lam)  # noqa: E731
    both = loss([(a, torch.tensor(1), 2.0), (b, torch.tensor(1), 3.0)])  # the same posterior samples for every term
    assert torch.allclose(both, loss([(a, torch.tensor(1), 2.0)]) + loss([(b, torch.tensor(1), 3.0)]), atol=1e-5)
    alone_a, alone_b = _sample(prior, [(a, torch.tensor(1), 20.0)]), _sample(prior, [(b, torch.tensor(1), 20.0)])
    together = _sample(prior, [(a, torch.tensor(1), 20.0), (b, torch.tensor(1), 20.0)])
    assert _p(a, together) > 0.8 and _p(b, together) > 0.8
    assert _p(b, alone_a) < _p(b, together) and _p(a, alone_b) < _p(a, together)


def test_per_row_targets_steer_each_plan_toward_its_own_class():
    prior, a = _prior(), _attribute("a", 0)
    targets = torch.tensor([0, 1] * 8)
    x = _sample(prior, [(a, targets, 20.0)])
    p_yes = a.log_prob(torch.nn.functional.normalize(x, dim=-1), torch.tensor(1)).exp()
    assert float(p_yes[targets == 1].mean()) > 0.9 > 0.1 > float(p_yes[targets == 0].mean())


def test_a_binary_sklearn_regression_becomes_two_classes_with_the_same_probabilities():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 5))
    y = np.where(X[:, 0] > 0, "pos", "neg")
    model = LogisticRegression().fit(X, y)
    a = LinearAttribute.from_sklearn("s", model)
    assert a.classes == ["neg", "pos"]
    probs = torch.softmax(a(torch.from_numpy(X).float()), -1).numpy()
    assert np.allclose(probs, model.predict_proba(X), atol=1e-5)


# ----------------------------------------------------------------------------- metrics


def test_sentence_windows_are_whole_sentences_that_leave_room_for_a_continuation():
    text = "Aa bb. Cc dd ee. Ff gg hh ii. Jj kk."
    count = lambda s: len(s.split())  # noqa: E731
    assert gm.sentence_windows(text, count, max_tokens=5, min_tokens=2, after_tokens=2) == [
        (0, "Aa bb."), (0, "Aa bb. Cc dd ee."), (17, "Ff gg hh ii.")]


def test_split_points_move_to_sentence_starts_at_the_configured_share():
    from schemas.guided_configs import PlanDataConfig
    from tasks.guided_data import cut_examples, sentence_starts

    text = "Aa bb cc. Dd ee ff gg. Hh ii! Jj kk ll mm nn. Oo pp qq rr ss tt. Uu vv ww xx."
    words = [(m.start(), m.end()) for m in __import__("re").finditer(r"\w+|[.!]", text)]  # word and punctuation tokens
    starts = sentence_starts(text, words)
    assert [text[words[i][0]:words[i][1]] for i in starts] == ["Dd", "Hh", "Jj", "Oo", "Uu"]
    ids = list(range(len(words)))
    rng_cfg = dict(continuation_tokens=4, min_prefix_tokens=2, max_prefix_tokens=6, examples_per_doc=6)
    always = PlanDataConfig(**rng_cfg, sentence_start_fraction=1.0)
    for seed in range(20):
        for prefix, cont in cut_examples(ids, np.random.default_rng(seed), always, eos=-1, starts=starts):
            assert cont[0] in starts and prefix[-1] == cont[0] - 1
    never = PlanDataConfig(**rng_cfg, sentence_start_fraction=0.0)  # the reference's random cuts, drawn as before
    assert cut_examples(ids, np.random.default_rng(3), never, -1, starts) == cut_examples(ids, np.random.default_rng(3), never, -1)
    half = PlanDataConfig(**rng_cfg, sentence_start_fraction=0.5)
    opened = [c[0] in starts for seed in range(200)
              for _, c in cut_examples(ids, np.random.default_rng(seed), half, -1, starts)]
    assert 0.5 < np.mean(opened) < 0.9  # half moved, and some random cuts land on a start by chance (5 of 20 places)


def test_bootstrap_intervals_contain_the_value_and_perplexity_pools_tokens():
    stats = gm.prefix_stats(["a b c", "a a a", "d e f", "d e f"], [True, False, True, True], None,
                            np.array([2.0, 4.0, 1.0, 1.0]), np.array([2, 2, 2, 2]), per_prefix=2)
    figs = gm.bootstrap(stats, 200)
    assert figs["attribute_rate"].value == 0.75 and figs["attribute_rate"].low <= 0.75 <= figs["attribute_rate"].high
    assert math.isclose(figs["perplexity"].value, math.exp(8 / 8), rel_tol=1e-3)
    assert figs["dist_1"].value == 0.5  # 3 distinct of 6 words per prefix


def test_dominance_needs_a_higher_rate_at_no_more_than_five_percent_more_perplexity():
    dglm = [(10.0, 0.5), (12.0, 0.8)]
    checks = gm.dominance(dglm, [(11.5, 0.7), (9.0, 0.3), (20.0, 0.9)])
    assert [c["dominated"] for c in checks] == [True, False, False]
    assert checks[0]["dglm_rate"] == 0.8  # 12.0 <= 1.05 * 11.5


def test_goals_count_apart_the_boost_points_that_score_above_real_text():
    from schemas.reports import GuidedRow, Interval
    from tasks.evaluate_guided import measured_goals

    def row(system, ppl, rate):
        i = lambda v: Interval(value=v, low=v, high=v)  # noqa: E731
        return GuidedRow(attribute="sentiment", system=system, setting="", knob=None, continuations=10,
                         attribute_rate=i(rate), perplexity=i(ppl), dist_1=i(0.5), dist_2=i(0.5), dist_3=i(0.5), seconds=0)

    rows = [row("DGLM", 2.5, 0.91), row("logit boost", 3.9, 0.68), row("logit boost", 8.5, 0.90),
            row("logit boost", 78.0, 0.999), row("class-conditional", 2.7, 0.89)]
    goals = measured_goals(rows, real_text_rate=0.97)
    assert goals["boost_points_dominated"] == "2/3" and not goals["dominates_boosting"]  # the plain count is kept
    assert goals["dominated_within_real_text"] == "2/2"
    assert [c["above_real_text"] for c in goals["dominance"]] == [False, False, True]
    assert "real_text_rate" not in measured_goals(rows)  # STAR-LDM's rows are counted without it


def test_attribute_words_are_the_words_typical_of_the_value():
    texts = ["the soup was cold and bland"] * 6 + ["the soup was hot and lovely"] * 6
    labels = ["negative"] * 6 + ["positive"] * 6
    assert set(gm.attribute_words(texts, labels, "positive", 2)) == {"hot", "lovely"}


def test_the_lexicon_judge_reads_sentiment():
    judge = gm.LexiconSentiment()
    assert judge.predict(["A wonderful, delightful evening.", "A terrible, awful mess.", "The hotel has four floors."]) == \
        ["positive", "negative", "neutral"]


# ----------------------------------------------------------------------------- a tiny trained workdir


TINY = {
    "synthetic": {"n_people": 48, "n_organisation_docs": 2, "n_city_docs": 2, "n_no_fact_docs": 2, "n_review_docs": 60},
    "holdout_fraction": 0.2, "vocab_size": 600, "threads": 1, "parallel": False,
    "lm": {"model": "micro", "context_length": 128, "batch_size": 4, "max_steps": 6, "eval_every": 6,
           "checkpoint_every": 6, "log_every": 3, "eval_docs": 4},
    "reference_lm": {"model": "micro", "context_length": 128, "batch_size": 4, "max_steps": 6, "eval_every": 6,
                     "checkpoint_every": 6, "log_every": 3, "eval_docs": 4, "seed": 1},
    "data": {"examples_per_doc": 2},
    "plan_lm": {"soft_tokens": 3, "width": 32, "layers": 1, "heads": 2,
                "train": {"steps": 6, "batch_size": 4, "warmup_steps": 1, "log_every": 100, "checkpoint_every": 100}},
    "class_lm": {"steps": 4, "batch_size": 4, "warmup_steps": 1, "log_every": 100},
    "prior": {"width": 64, "blocks": 2, "train": {"steps": 20, "batch_size": 32, "warmup_steps": 2, "log_every": 100}},
    "sampling": {"steps": 6, "posterior_samples": 4, "max_new_tokens": 8, "batch_size": 64},
    "evaluation": {"prefixes": 8, "samples_per_prefix": 2, "guidance_scales": [0, 5], "boost_deltas": [4],
                   "bootstrap": 20, "sanity_examples": 16, "alpha2_sweep": [1.0]},
}


def _quiet(_):
    pass


def train_shared_stages(config) -> list[str]:
    """Tokenizer, LM, reference LM and plan examples of ``config``'s workdir by the stage functions (no Prefect): what
    DGLM and STAR-LDM share. Returns the document shards."""
    from tasks import guided
    from tasks.diffusion_texts import document_shards
    from tasks.guided_data import prepare_plan_data
    from tasks.pretrain import pretrain

    shards = document_shards(config)
    tok = guided.train_guided_tokenizer(shards, config.holdout_fraction, config.vocab_size,
                                        guided.folder(config.workdir, "tokenizer"))
    for name in ("lm", "reference_lm"):
        cfg = getattr(config, name).model_copy(update={"tokenizer": tok, "holdout_fraction": config.holdout_fraction})
        pretrain(cfg, shards, guided.folder(config.workdir, name), "standard")
    prepare_plan_data(shards, config.attributes, config.data, tok, guided.folder(config.workdir, "plans"),
                      holdout_fraction=config.holdout_fraction, log=_quiet)
    return shards


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A DGLM workdir trained by the stage functions alone (no Prefect): every folder the flow writes."""
    from tasks import guided

    config = GuidedFlowConfig.model_validate({**TINY, "workdir": str(tmp_path_factory.mktemp("guided"))})
    shards = train_shared_stages(config)
    for kind in ("plan", "class"):
        guided.train_soft_prompt_lm(kind, config, device="cpu", log=_quiet)
    guided.train_plan_prior(config, device="cpu", log=_quiet)
    guided.train_classifiers(config, log=_quiet)
    return config, shards


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_prefix_embeddings_are_made_where_first_read_and_kept(trained, tmp_path):
    """The plans stage embeds the continuations only; the prior's training made prefix.npy, and a plans folder
    without it makes the same embeddings when they are first asked for, then keeps them."""
    import shutil

    from models.embed import embed
    from tasks import guided
    from tasks.guided_data import load_plan_data

    config, _ = trained
    plans = Path(guided.folder(config.workdir, "plans"))
    made = np.load(plans / "prefix.npy")
    copy = tmp_path / "plans"
    shutil.copytree(plans, copy, ignore=shutil.ignore_patterns("prefix.npy"))
    data = load_plan_data(str(copy))
    assert not (copy / "prefix.npy").exists()
    again = data.prefix_embeddings(batch_size=7)
    assert again.shape == (data.table.num_rows, 384) and (copy / "prefix.npy").exists()
    def same(a, b):  # unit vectors; bf16 encoders round differently with another batch's padding
        return bool(((a * b).sum(-1) > 0.99).all())

    assert same(again, made) and same(made[:3], embed(data.column("prefix_text")[:3]))
    assert not same(made[:3], made[3:6])  # and the texts are told apart
    assert np.array_equal(load_plan_data(str(copy)).prefix_embeddings(), again)  # read back, not made again


def test_plan_fine_tune_resumes_exactly_after_an_interruption(trained, tmp_path):
    from tasks import guided

    config, _ = trained
    budget = {"steps": 6, "batch_size": 4, "warmup_steps": 1, "log_every": 100}
    work = Path(config.workdir)

    def run(folder: Path, checkpoint_every: int, crash_at: int | None = None):
        cfg = config.model_copy(update={"workdir": str(folder), "plan_lm": config.plan_lm.model_copy(
            update={"train": config.plan_lm.train.model_copy(update={**budget, "checkpoint_every": checkpoint_every})})})
        for sub in ("tokenizer", "lm", "plans"):
            target = folder / sub
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(work / sub)
        original = guided.fit

        def crash(step):
            if step == crash_at:
                raise KeyboardInterrupt

        guided.fit = lambda *a, **kw: original(*a, **{**kw, "after_step": crash})
        try:
            return guided.train_soft_prompt_lm("plan", cfg, device="cpu", log=_quiet)
        finally:
            guided.fit = original

    run(tmp_path / "straight", 100)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", 3, crash_at=4)
    assert json.loads((tmp_path / "resumed" / "plan_lm" / "config.json").read_text())["step"] == 3
    report = run(tmp_path / "resumed", 3)
    assert report.steps == 6 and not report.reused
    for name in ("prompt.safetensors", "lm/model.safetensors"):
        assert _sha(tmp_path / "straight" / "plan_lm" / name) == _sha(tmp_path / "resumed" / "plan_lm" / name), name
    assert run(tmp_path / "resumed", 3).reused


def test_about_half_of_the_plan_examples_open_a_sentence_with_the_real_tokenizer(trained):
    from tasks.guided import folder
    from tasks.guided_data import load_plan_data

    config, _ = trained
    data = load_plan_data(folder(config.workdir, "plans"))
    prefixes, conts = data.column("prefix_text"), data.column("continuation_text")
    opens = [p.rstrip()[-1:] in ".!?" and c[:1].isspace() and c.lstrip()[:1].isupper() for p, c in zip(prefixes, conts)]
    assert config.data.sentence_start_fraction == 0.5
    assert 0.4 <= np.mean(opens) <= 0.8  # random cuts alone: 0.09 on the demo corpus


def test_a_new_attribute_costs_one_classifier_fit_and_no_lm_training(trained):
    """The biography's field (the category column: nothing was trained to steer it) becomes steerable."""
    from tasks import guided

    config, shards = trained
    work = Path(config.workdir)
    weights = {p: _sha(p) for p in [*work.glob("plan_lm/**/*.safetensors"), *work.glob("prior/*.safetensors")]}
    assert "category" not in guided.load_guided(config.workdir, "cpu").attributes
    report = guided.fit_new_attribute(config.workdir, AttributeConfig(name="category"), shards, log=_quiet)
    assert {"science", "law", "review"} <= set(report.classes) and report.seconds < 30
    assert {p: _sha(p) for p in weights} == weights  # the LM, the generator and the prior are untouched
    g = guided.load_guided(config.workdir, "cpu")
    assert "category" in g.attributes
    cond = torch.nn.functional.normalize(torch.randn(12, D, generator=torch.Generator().manual_seed(0)), dim=-1)
    sampling = GuidedSamplingConfig(steps=10, posterior_samples=8)
    _, p_free = guided.sample_plans(g, cond, guided.guidance_terms(g, {"category": "law"}, {"category": 0.0}), sampling)
    _, p_steered = guided.sample_plans(g, cond, guided.guidance_terms(g, {"category": "law"}, {"category": 30.0}), sampling)
    assert p_steered[0] > max(0.8, p_free[0])
    texts = guided.generate(config.workdir, "She studied", 2, {"category": "law", "sentiment": "positive"},
                            {"category": 5.0, "sentiment": 5.0}, GuidedSamplingConfig(steps=4, max_new_tokens=6), device="cpu")
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_attribute_persistence_scores_the_real_continuation_and_the_lms_own(trained):
    from types import SimpleNamespace

    from models.tokenizer import load_tokenizer
    from tasks.evaluate_guided import attribute_persistence, load_base_lm
    from tasks.guided import folder

    config, _ = trained

    class KeywordJudge:  # says "red" when the text has the word red, else "blue"
        def predict(self, texts):
            return ["red" if "red" in t.split() else "blue" for t in texts]

    doc = lambda label, text: SimpleNamespace(labels={"colour": label}, text=text)  # noqa: E731
    docs = [doc("red", "Ann likes paint. She chose red for the door."), doc("blue", "Bo likes paint. He chose blue."),
            doc("green", "Cy likes paint. He chose green."),  # not a target: skipped
            doc("red", "One sentence only")]  # nothing follows the first sentence: skipped
    tok = load_tokenizer(folder(config.workdir, "tokenizer"))
    out = attribute_persistence(load_base_lm(config.workdir, torch.device("cpu")), docs, "colour", ["red", "blue"],
                                KeywordJudge(), tok, config.sampling, eos=tok.eos_token_id, amp=None, n=10)
    assert out["documents"] == 2 and out["real_text"] == 1.0 and out["chance"] == 0.5
    assert 0.0 <= out["pretrained_lm"] <= 1.0
    assert attribute_persistence(None, docs, "colour", ["purple"], KeywordJudge(), tok, config.sampling,
                                 eos=tok.eos_token_id, amp=None, n=10) == {"documents": 0}


def test_unknown_attributes_and_values_are_one_line_errors(trained):
    from tasks import guided

    config, _ = trained
    g = guided.load_guided(config.workdir, "cpu")
    with pytest.raises(UserInputError, match="attribute 'mood': no classifier; known: (category, )?sentiment, topic"):
        guided.guidance_terms(g, {"mood": "happy"}, {})
    with pytest.raises(UserInputError, match="sentiment=neutral: not a class.*negative, positive"):
        guided.guidance_terms(g, {"sentiment": "neutral"}, {})


def test_the_generate_command_prints_steered_continuations(trained, capsys):
    from flows import cli

    config, _ = trained
    assert cli.main(["guided", "generate", "The hotel sits on a quiet street.", "--workdir", config.workdir,
                     "--attribute", "sentiment=negative", "--scale", "3", "--n", "2", "--steps", "3",
                     "--max-new-tokens", "5", "--device", "cpu"]) == 0
    out = capsys.readouterr().out  # a continuation may hold a newline (the corpus has paragraphs)
    assert out.startswith("The hotel sits on a quiet street.") and out.count("The hotel sits on a quiet street.") == 2
    assert cli.main(["guided", "generate", "x", "--workdir", config.workdir, "--attribute", "sentiment"]) == 2
    assert "write NAME=VALUE" in capsys.readouterr().err


def test_sanity_checks_score_every_plan_setting(trained):
    from tasks import guided
    from tasks.evaluate_guided import load_base_lm, sanity_checks
    from tasks.guided_data import load_plan_data

    config, _ = trained
    g = guided.load_guided(config.workdir, "cpu")
    data = load_plan_data(guided.folder(config.workdir, "plans"))
    out = sanity_checks(g, load_base_lm(config.workdir, g.device), data, 12, [0.8, 1.0], seed=0)
    assert set(out["nll"]) == {"true plan", "shuffled plan", "no plan (alpha^2 = 0)", "true plan, alpha^2 = 0.8",
                               "true plan, alpha^2 = 1", "pretrained LM, no soft prompt"}
    assert all(math.isfinite(v) for v in out["nll"].values()) and out["examples"] == 12


# ----------------------------------------------------------------------------- the flow


@pytest.mark.slow
def test_guided_flow_end_to_end(tmp_path, prefect_harness):
    """Train every stage and evaluate on a tiny corpus through the Prefect flow; a rerun reuses every stage."""
    from flows.guided import guided_demo, guided_training

    config = GuidedFlowConfig.model_validate({**TINY, "workdir": str(tmp_path)})
    result = guided_demo(config)
    training, evaluation = result["training"], result["evaluation"]
    assert training["plan_lm"]["soft_tokens"] == 3 and training["class_lm"]["soft_tokens"] == 2
    systems = {(r["attribute"], r["system"], r["setting"]) for r in evaluation["rows"]}
    for attribute in ("topic", "sentiment"):
        assert (attribute, "uncontrolled LM", "pretrained LM, top-p sampling") in systems
        assert (attribute, "DGLM", "guidance scale 5") in systems
        assert any(s[:2] == (attribute, "logit boost") for s in systems)
        assert any(s[:2] == (attribute, "class-conditional") for s in systems)
    row = evaluation["rows"][0]
    assert row["attribute_rate"]["low"] <= row["attribute_rate"]["value"] <= row["attribute_rate"]["high"]
    assert "sentiment" in evaluation["goals"] and evaluation["sanity"]["cosine"]["texts"] > 0
    assert (tmp_path / "evaluation" / "table.md").read_text().startswith("| attribute | system")
    again = guided_training(config)
    assert again["plan_lm"]["reused"] and again["prior"]["reused"] and again["plans"]["reused"]
    guided_training(config, ["classifiers"])  # one stage again: the report keeps the others' entries
    kept = json.loads((tmp_path / "training-report.json").read_text())
    assert kept["plan_lm"]["soft_tokens"] == 3 and kept["prior"]["reused"] and "classifiers" in kept["stage_seconds"]


def test_train_takes_several_stages_and_all_by_default(monkeypatch, tmp_path):
    import flows.guided
    from flows import cli

    asked = []

    def fake_training(config, stages):  # records what the command asks the flow for, trains nothing
        asked.append(stages)
        raise KeyboardInterrupt

    monkeypatch.setattr(flows.guided, "guided_training", fake_training)
    for argv, stages in ((["--stage", "prior", "--stage", "classifiers", "--stage", "prior"], ["prior", "classifiers"]),
                         ([], None), (["--stage", "prior", "--stage", "all"], None)):
        with pytest.raises(KeyboardInterrupt):
            cli.main(["guided", "train", "--workdir", str(tmp_path), *argv])
        assert asked.pop() == stages


def test_conditional_perplexity_sums_the_reference_lms_nll_over_the_continuations_tokens_alone(trained):
    from tasks.evaluate_star import latest_checkpoint, load_reference_lm
    from tasks.guided import folder

    config, _ = trained
    ref = load_reference_lm(latest_checkpoint(folder(config.workdir, "reference_lm")), torch.device("cpu"))
    prefixes, conts = ["The room was small.", "We ate at noon and"], [" The staff were kind.", " left soon after."]
    sums, counts = gm.conditional_nll(ref, prefixes, conts, bf16=False)
    tok = ref.tokenizer
    for prefix, cont, total, n in zip(prefixes, conts, sums, counts):  # one text at a time, every position scored
        pre = tok(prefix, add_special_tokens=False)["input_ids"]
        full = tok(prefix + cont, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(ref.model(input_ids=torch.tensor([full])).logits[0, :-1].float(), -1)
        want = -logp[torch.arange(len(full) - 1), torch.tensor(full[1:])][len(pre) - 1:]
        assert n == len(full) - len(pre) and total == pytest.approx(float(want.sum()), rel=1e-4)
