"""STAR-LDM: the joint loss, thinking with a cached prefix (exactly the uncached thought), guidance on the noisy plan,
re-planning at sentence ends, a tiny trained workdir (resume, generation, CLI errors) and the flow end to end (slow)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from models.lmlm import build_model
from models.plan_lm import PlanPromptGenerator, PlanSpace, sample_continuations, training_batch
from models.star import (
    NoisyAttribute,
    NoisyGuidance,
    PrefixState,
    ScoreHead,
    StarLDM,
    clear_step_graphs,
    sigmoid_weight,
    step_graphs,
    think,
)

torch.set_num_threads(1)
D = 16


def _model(seed: int = 0, k: int = 3) -> StarLDM:
    torch.manual_seed(seed)
    lm = build_model("micro", 300, context_length=128, eos_token_id=0).eval()
    d = lm.config.hidden_size
    model = StarLDM(lm, PlanPromptGenerator(D, k, 32, 1, 2, d), ScoreHead(d, k, D, 32, 1, 2))
    torch.nn.init.normal_(model.head.proj_out.weight, std=0.05)  # a trained head reads the LM; zero-init would not
    return model.eval()


def test_the_sigmoid_weighting_averages_one_over_uniform_time_and_peaks_at_equal_signal_and_noise():
    from models.diffusion import logsnr_cosine

    t = (torch.arange(100_000) + 0.5) / 100_000
    w = sigmoid_weight(logsnr_cosine(t))
    assert abs(float(w.mean()) - 1.0) < 0.01
    assert float(sigmoid_weight(torch.tensor([0.0]))) == pytest.approx(math.pi / 2)
    assert float(sigmoid_weight(torch.tensor([10.0]))) < 0.03 and float(sigmoid_weight(torch.tensor([-10.0]))) < 0.03


def test_a_shifted_training_schedule_keeps_the_v_loss_objective_of_the_unshifted_one():
    from models.diffusion import logsnr_cosine

    t = (torch.arange(200_000) + 0.5) / 200_000
    shift = 2 * math.log(3)
    plain, shifted = logsnr_cosine(t), logsnr_cosine(t, shift=shift)
    assert float(torch.sigmoid(shifted).median()) > 0.85 > float(torch.sigmoid(plain).median())  # mostly mild noise
    for f in (lambda lam: torch.ones_like(lam), torch.sigmoid, lambda lam: lam.clamp(-5, 5) ** 2):
        expected = float((sigmoid_weight(plain) * f(plain)).mean())
        assert float((sigmoid_weight(shifted, shift) * f(shifted)).mean()) == pytest.approx(expected, rel=0.02)


def test_both_losses_train_and_the_null_rows_do_not_see_the_lm():
    model = _model().train()
    P, C = [[0, 5, 6, 7], [8, 9]], [[10, 11, 12], [13, 14, 15, 16]]
    batch = training_batch(P, C, 3, 0, train_prefix=False)
    x, eps, t = torch.randn(2, D), torch.randn(2, D), torch.tensor([0.3, 0.6])
    nll, v_loss, soft = model.losses(batch, x, t, eps, torch.tensor([False, False]))
    assert soft.shape == (2, 3, model.lm.config.hidden_size)
    (nll + 5 * v_loss).backward()
    assert model.head.proj_in.weight.grad.abs().sum() > 0 and model.prompt.direct.weight.grad.abs().sum() > 0
    lm_grad = next(model.lm.base_model.layers[0].parameters()).grad
    assert lm_grad is not None and lm_grad.abs().sum() > 0
    model.zero_grad()
    _, v_null, _ = model.losses(batch, x, t, eps, torch.tensor([True, True]))
    v_null.backward()  # the head sees the null features: no gradient reaches the LM's layers through the v-loss
    lm_grad = next(model.lm.base_model.layers[0].parameters()).grad
    assert lm_grad is None or lm_grad.abs().sum() == 0
    masked = model.losses(batch, x, t, eps, torch.tensor([False, False]), torch.tensor([True, False]))[1]
    assert torch.isfinite(masked)


def test_extra_noise_draws_against_the_cached_prefix_score_as_full_passes_would():
    model = _model()
    P, C = [[0, 5, 6, 7], [8, 9]], [[10, 11, 12], [13, 14, 15, 16]]  # ragged: right padding in the batch
    batch = training_batch(P, C, 3, 0, train_prefix=False)
    x = torch.randn(2, D)
    draws = [(torch.tensor([0.3, 0.6]), torch.randn(2, D), torch.tensor([False, True])),
             (torch.tensor([0.8, 0.1]), torch.randn(2, D), torch.tensor([False, False]))]
    with torch.no_grad():
        alone = [model.losses(batch, x, *d)[1] for d in draws]
        together = model.losses(batch, x, *draws[0], extra=[draws[1]])
    assert torch.allclose(together[1], (alone[0] + alone[1]) / 2, atol=1e-5)
    assert torch.allclose(together[0], model.losses(batch, x, *draws[0])[0])  # the NLL is the main draw's


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_a_thought_with_the_cached_prefix_is_the_uncached_thought(cfg_scale):
    model = _model()
    prefixes = [[0, 5, 6, 7, 8, 9], [0, 11, 12], [20, 21, 22, 23]]  # ragged: left padding in the cache
    state = PrefixState(model, prefixes, pad_id=0)
    with torch.no_grad():
        soft = torch.randn(3, 3, model.lm.config.hidden_size)
        assert torch.allclose(state.soft_hidden(soft), state.soft_hidden_uncached(soft), atol=1e-5)
        # every step writes its soft tokens over the last step's: a later step sees the prefix only, and the
        # prefix's own cache is untouched
        kept = [(key.clone(), value.clone()) for key, value in state.layers]
        later = torch.randn(3, 3, model.lm.config.hidden_size)
        assert torch.allclose(state.soft_hidden(later), state.soft_hidden_uncached(later), atol=1e-5)
        assert torch.allclose(state.soft_hidden(soft), state.soft_hidden_uncached(soft), atol=1e-5)
        assert all(torch.equal(k0, k1) and torch.equal(v0, v1) for (k0, v0), (k1, v1) in zip(kept, state.layers))
        plans = [think(model, state, steps=6, cfg_scale=cfg_scale, generator=torch.Generator().manual_seed(3), cached=c)
                 for c in (True, False)]
    assert torch.allclose(plans[0], plans[1], atol=1e-4)
    with torch.no_grad():  # and the prefix matters: another prefix, another plan
        other = think(model, PrefixState(model, [[0, 40, 41], [0, 42], [43]], 0), steps=6, cfg_scale=cfg_scale,
                      generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(plans[0], other, atol=1e-3)


def test_the_graph_step_thinks_what_the_cached_step_does_and_reloads_every_prefix_batch():
    """The static-buffer step a GPU replays as a CUDA graph (run eagerly here): prefixes padded to the bucket, the
    same plans; one step object per shape, reloaded with each batch's prefixes, never the previous batch's."""
    model = _model()
    batches = [[[0, 5, 6, 7, 8, 9], [0, 11, 12], [20, 21, 22, 23]], [[0, 40, 41], [0, 42], [43, 44, 45, 46, 47]]]
    with torch.no_grad():
        for prefixes in batches + batches[:1]:
            state = PrefixState(model, prefixes, 0)
            plain, graph = (think(model, state, steps=6, generator=torch.Generator().manual_seed(3), graphs=g)
                            for g in (False, True))
            assert torch.allclose(plain, graph, atol=1e-5)
    assert len(step_graphs(model)) == 1
    clear_step_graphs(model)
    assert step_graphs(model) == []


def test_a_mauve_lead_counts_only_beyond_two_standard_errors_of_the_draws():
    from tasks.evaluate_star import margin_over_draws

    tied = margin_over_draws([0.80, 0.85, 0.76, 0.81], [0.79, 0.84, 0.77, 0.80])  # ahead on the mean, inside the noise
    assert tied["margin"] > 0 and not tied["clear"]
    clear = margin_over_draws([0.80, 0.81, 0.79, 0.80], [0.70, 0.71, 0.69, 0.72])
    assert clear["clear"] and clear["margin"] > 2 * clear["standard_error"]
    assert not margin_over_draws([0.9], [0.1])["clear"]  # one draw cannot tell


def test_writing_after_a_thought_reuses_its_prefix_encoding_and_writes_what_a_fresh_pass_would():
    model = _model()
    prefixes = [[0, 5, 6, 7, 8, 9], [0, 11, 12], [20, 21, 22, 23]]
    state = PrefixState(model, prefixes, pad_id=0)
    soft = torch.randn(3, 3, model.lm.config.hidden_size)
    greedy = dict(max_new_tokens=6, pad_id=0, top_p=1e-6, repetition_penalty=1.2)
    fresh = sample_continuations(model.lm, prefixes, soft, **greedy)
    reused = [sample_continuations(model.lm, prefixes, soft, prefix_state=state, **greedy) for _ in range(2)]
    assert torch.equal(fresh, reused[0]) and torch.equal(fresh, reused[1])  # the state is left as it was
    with pytest.raises(ValueError, match="prefix_state"):
        sample_continuations(model.lm, [[0, 5, 6, 7, 8, 9], [0, 11, 13], [20, 21, 22, 23]], soft, prefix_state=state,
                             **greedy)


def test_a_single_prefix_thinks_the_same_alone_as_in_a_padded_batch():
    model = _model()
    with torch.no_grad():
        alone = PrefixState(model, [[0, 11, 12]], 0).soft_hidden(torch.ones(1, 3, model.lm.config.hidden_size))
        batched = PrefixState(model, [[0, 5, 6, 7, 8, 9], [0, 11, 12]], 0).soft_hidden(
            torch.ones(2, 3, model.lm.config.hidden_size))
    assert torch.allclose(alone[0], batched[1], atol=1e-5)


def _classifier(seed: int = 0) -> NoisyAttribute:
    torch.manual_seed(seed)
    return NoisyAttribute("mood", ["no", "yes"], D, width=32, blocks=1)


def test_guidance_on_the_noisy_plan_moves_the_thought_toward_the_class():
    model, attribute = _model(), _classifier()
    state = PrefixState(model, [[0, 5, 6]] * 32, 0)
    probe = torch.tensor(0.0)

    def p_yes(x):
        with torch.no_grad():
            return float(torch.softmax(attribute(x, probe.expand(len(x))), -1)[:, 1].mean())

    rates = []
    for scale in (0.0, 3.0, 30.0):
        guidance = NoisyGuidance([(attribute, torch.tensor(1), scale)]) if scale else None
        with torch.no_grad():
            x = think(model, state, steps=8, guidance=guidance, generator=torch.Generator().manual_seed(0))
        rates.append(p_yes(x))
    assert rates[0] < rates[1] < rates[2]


def test_guidance_losses_of_attributes_add_up():
    a, b = _classifier(0), _classifier(1)
    z, lam = torch.randn(5, D), torch.zeros(5)
    both = NoisyGuidance([(a, torch.tensor(1), 2.0), (b, torch.tensor(0), 0.5)])(z, lam)
    one = NoisyGuidance([(a, torch.tensor(1), 2.0)])(z, lam)
    two = NoisyGuidance([(b, torch.tensor(0), 0.5)])(z, lam)
    assert torch.allclose(both, one + two, atol=1e-6)


def test_a_sentence_ends_after_its_stop_and_before_the_next_words_space():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<eos>", "The", "Ġhotel", "Ġwas", "Ġquiet", ".", "ĠIt", "Ġ3", "Ġ5", "Ġgood"])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    from tasks.star import sentence_end

    ids = [vocab[w] for w in ["Ġhotel", "Ġwas", "Ġquiet", ".", "ĠIt", "Ġwas", "Ġgood", "."]]
    assert sentence_end(tokenizer, ids, 2) == 4
    assert sentence_end(tokenizer, ids, 5) is None  # the last stop has no next word: the row writes on
    decimal = [vocab[w] for w in ["Ġwas", "Ġ3", ".", "Ġ5"]]
    assert sentence_end(tokenizer, decimal[:3] + [vocab["Ġgood"]], 1) == 3


def test_plan_space_projection_is_what_the_writer_reads():
    space = PlanSpace(torch.zeros(D), torch.ones(D))
    x = torch.randn(4, D) * 3
    assert torch.allclose(space.project(x).norm(dim=-1), torch.ones(4), atol=1e-5)


# ----------------------------------------------------------------------------- a tiny trained workdir


from test_guided import TINY as GUIDED_TINY  # noqa: E402  (tests/ is on sys.path)
from test_guided import train_shared_stages

TINY = {
    **{k: v for k, v in GUIDED_TINY.items() if k not in ("class_lm", "prior")},
    "star": {"soft_tokens": 3, "width": 32, "layers": 1, "heads": 2, "head_width": 32, "head_layers": 1,
             "train": {"steps": 6, "batch_size": 4, "warmup_steps": 1, "log_every": 100, "checkpoint_every": 100}},
    "star_classifier": {"width": 32, "blocks": 1, "train": {"steps": 20, "batch_size": 32, "warmup_steps": 2,
                                                           "log_every": 100, "checkpoint_every": 100}},
    "star_sampling": {"steps": 4, "max_new_tokens": 8, "batch_size": 64},
    "evaluation": {**GUIDED_TINY["evaluation"], "prefixes": 6},
    "star_evaluation": {"guidance_scales": [0, 3], "open_prefixes": 12, "draws": 2, "step_ablation": [2], "cost_batch": 2},
}


def _quiet(_):
    pass


@pytest.fixture(scope="module")
def star_workdir(tmp_path_factory):
    """A STAR-LDM workdir trained by the stage functions alone (no Prefect)."""
    from schemas.star_configs import StarFlowConfig
    from tasks import guided, star

    config = StarFlowConfig.model_validate({**TINY, "workdir": str(tmp_path_factory.mktemp("star"))})
    shards = train_shared_stages(config)
    guided.train_soft_prompt_lm("plan", config, device="cpu", log=_quiet)  # where star.init (plan_lm) starts
    star.train_star(config, device="cpu", log=_quiet)
    star.train_noisy_classifiers(config, device="cpu", log=_quiet)
    return config, shards


def _sha(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_star_training_resumes_exactly_after_an_interruption(star_workdir, tmp_path):
    from tasks import star

    config, _ = star_workdir
    work = Path(config.workdir)

    def run(folder: Path, checkpoint_every: int, crash_at: int | None = None):
        cfg = config.model_copy(update={"workdir": str(folder), "star": config.star.model_copy(
            update={"train": config.star.train.model_copy(update={"checkpoint_every": checkpoint_every})})})
        for sub in ("tokenizer", "lm", "plans", "plan_lm"):
            if not (folder / sub).exists():
                (folder / sub).parent.mkdir(parents=True, exist_ok=True)
                (folder / sub).symlink_to(work / sub)
        original = star.fit

        def crashing(after_step):
            def step_done(step):
                if after_step is not None:
                    after_step(step)  # the EMA's update
                if step == crash_at:
                    raise KeyboardInterrupt
            return step_done

        star.fit = lambda *a, **kw: original(*a, **{**kw, "after_step": crashing(kw.get("after_step"))})
        try:
            return star.train_star(cfg, device="cpu", log=_quiet)
        finally:
            star.fit = original

    run(tmp_path / "straight", 100)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", 3, crash_at=4)
    from safetensors.torch import load_file

    checkpoint = tmp_path / "resumed" / "star"  # sampled from: the EMA's weights; resumed from: the training ones
    ema_head, training = load_file(checkpoint / "head.safetensors"), load_file(checkpoint / "training.safetensors")
    assert any(not torch.equal(v, training[f"head.{k}"]) for k, v in ema_head.items())
    report = run(tmp_path / "resumed", 3)
    assert report["steps"] == 6 and not report["reused"]
    for name in ("prompt.safetensors", "head.safetensors", "lm/model.safetensors"):
        assert _sha(tmp_path / "straight" / "star" / name) == _sha(tmp_path / "resumed" / "star" / name), name
    assert not (tmp_path / "resumed" / "star" / "training.safetensors").exists()  # only checkpoints keep it
    assert run(tmp_path / "resumed", 3)["reused"]


def test_star_starts_from_dglms_plan_lm_and_says_what_is_missing_or_mismatched(star_workdir, tmp_path):
    from transformers import AutoModelForCausalLM

    from flows.star import _shared_stages_missing
    from schemas.errors import UserInputError
    from schemas.star_configs import StarFlowConfig
    from tasks import guided, star

    config, _ = star_workdir
    for sub in ("tokenizer", "lm", "reference_lm", "plans"):
        (tmp_path / sub).symlink_to(Path(config.workdir) / sub)
    cfg = StarFlowConfig.model_validate({**TINY, "workdir": str(tmp_path)})  # star.init: plan_lm, the default
    assert cfg.star.init == "plan_lm"
    assert _shared_stages_missing(cfg) == ["plan_lm"]  # the flow trains DGLM's plan LM first
    with pytest.raises(UserInputError, match="no finished DGLM plan LM.*lmlm guided train --stage plan_lm"):
        star.train_star(cfg, device="cpu", log=_quiet)
    guided.train_soft_prompt_lm("plan", cfg, device="cpu", log=_quiet)
    assert _shared_stages_missing(cfg) == []
    wider = cfg.model_copy(update={"star": cfg.star.model_copy(update={"width": 64})})
    with pytest.raises(UserInputError, match="star.width is 64 but DGLM's plan LM .* has 32"):
        star.train_star(wider, device="cpu", log=_quiet)

    def start_of(c) -> dict:  # the weights the joint training starts from
        seen, original = {}, star.fit

        def first_weights(model, *a, **kw):
            seen.update({k: v.detach().clone() for k, v in model.state_dict().items()})
            return original(model, *a, **kw)

        star.fit = first_weights
        try:
            star.train_star(c, device="cpu", log=_quiet)
        finally:
            star.fit = original
        return seen

    seen = start_of(cfg)
    plan_lm, _ = guided.load_soft_prompt_lm(guided.folder(str(tmp_path), "plan"), "cpu")
    for name, w in {**{f"lm.{k}": v for k, v in plan_lm.lm.state_dict().items()},
                    **{f"prompt.{k}": v for k, v in plan_lm.prompt.state_dict().items()}}.items():
        assert torch.equal(seen[name], w), name
    (tmp_path / "plain").mkdir()
    for sub in ("tokenizer", "lm", "plans"):
        (tmp_path / "plain" / sub).symlink_to(Path(config.workdir) / sub)
    plain = start_of(cfg.model_copy(update={"workdir": str(tmp_path / "plain"),
                                            "star": cfg.star.model_copy(update={"init": "lm"})}))
    base = AutoModelForCausalLM.from_pretrained(guided.base_lm_checkpoint(config.workdir)).state_dict()
    assert all(torch.equal(plain[f"lm.{k}"], v) for k, v in base.items())  # init: lm, the pretrained plain LM
    assert not all(torch.equal(plain[f"lm.{k}"], v) for k, v in plan_lm.lm.state_dict().items())


@pytest.mark.parametrize("mode", ["once", "every-sentence", "off"])
def test_every_think_mode_writes_the_asked_number_of_tokens(star_workdir, mode):
    from schemas.star_configs import StarSamplingConfig
    from tasks import star

    config, _ = star_workdir
    s = star.load_star_workdir(config.workdir, "cpu")
    prefixes = [[s.eos] + s.tokenizer(t, add_special_tokens=False)["input_ids"]
                for t in ("The hotel sits on a quiet street.", "She studied law", "We ate")]
    sampling = StarSamplingConfig(steps=3, max_new_tokens=10, think=mode, min_sentence_tokens=1)
    guidance = star.star_guidance(s, {"sentiment": "positive"}, {"sentiment": 3.0})
    out = star.star_continuations(s, prefixes, sampling, guidance, seed=0)
    assert [len(t) for t in out] == [10, 10, 10]
    assert out == star.star_continuations(s, prefixes, sampling, guidance, seed=0)  # seeded: reproducible


def test_unknown_star_attributes_are_one_line_errors_and_the_cli_generates(star_workdir, capsys):
    from flows import cli
    from schemas.errors import UserInputError
    from tasks import star

    config, _ = star_workdir
    s = star.load_star_workdir(config.workdir, "cpu")
    with pytest.raises(UserInputError, match="attribute 'mood': no STAR classifier; known: sentiment, topic"):
        star.star_guidance(s, {"mood": "happy"}, {})
    with pytest.raises(UserInputError, match="sentiment=neutral: not a class.*negative, positive"):
        star.star_guidance(s, {"sentiment": "neutral"}, {})
    assert cli.main(["star", "generate", "The hotel sits on a quiet street.", "--workdir", config.workdir,
                     "--think", "every-sentence", "--attribute", "topic=hotel", "--scale", "3", "--n", "2",
                     "--steps", "3", "--max-new-tokens", "5", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.count("The hotel sits on a quiet street.") == 2
    assert cli.main(["star", "generate", "x", "--workdir", str(Path(config.workdir) / "nothing")]) == 2
    assert "no STAR-LDM model here; run `lmlm star train` first" in capsys.readouterr().err


@pytest.mark.slow
def test_star_flow_end_to_end(tmp_path, prefect_harness):
    """Shared stages, STAR-LDM and its classifiers, the evaluation, through the Prefect flows; a rerun reuses them."""
    from flows.star import star_demo, star_training
    from schemas.star_configs import StarFlowConfig

    config = StarFlowConfig.model_validate({**TINY, "workdir": str(tmp_path)})
    result = star_demo(config)
    evaluation = result["evaluation"]
    systems = {(r["attribute"], r["system"], r["setting"]) for r in evaluation["control"]["rows"]}
    for attribute in ("topic", "sentiment"):
        assert (attribute, "STAR-LDM", "guidance scale 3") in systems
        assert (attribute, "uncontrolled LM", "pretrained LM, top-p sampling") in systems
    opened = evaluation["open_ended"]["systems"]
    assert {"plain LM", "STAR-LDM, think once", "STAR-LDM, thinking off (null plan)", "STAR-LDM, think once, 2 steps",
            "STAR-LDM, think every sentence"} <= set(opened)
    assert len(opened["STAR-LDM, think once"]["mauve"]["draws"]) == 2
    assert len(opened["STAR-LDM, think once, 2 steps"]["mauve"]["draws"]) == 1
    assert evaluation["cost"]["thought_cached_s"] > 0 and "skipped" in evaluation["judge"]
    assert (tmp_path / "star_evaluation" / "tables.md").read_text().startswith("| attribute | system")
    again = star_training(config)
    assert again["star"]["reused"] and all(c["reused"] for c in again["classifiers"])


def test_star_reaches_dglm_when_a_star_point_has_its_rate_at_no_more_than_five_percent_more_perplexity():
    from schemas.reports import GuidedRow, Interval
    from tasks.evaluate_star import star_vs_dglm

    def row(system, ppl, rate):
        i = lambda v: Interval(value=v, low=v, high=v)  # noqa: E731
        return GuidedRow(attribute="topic", system=system, setting="", knob=None, continuations=1, attribute_rate=i(rate),
                         perplexity=i(ppl), dist_1=i(0.5), dist_2=i(0.5), dist_3=i(0.5), seconds=1.0)

    rows = [row("DGLM", 4.0, 0.6), row("DGLM", 5.0, 0.8), row("STAR-LDM", 4.1, 0.65), row("STAR-LDM", 6.0, 0.9)]
    out = star_vs_dglm(rows)
    assert [p["at_least"] for p in out["points"]] == [True, False] and out["met"] == "1/2"
