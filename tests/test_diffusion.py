"""Latent diffusion (LD4LG): text extraction, schedule and samplers, autoencoder checkpoints, metrics, CLI errors."""

import argparse
import json
import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from models.diffusion import Denoiser, LatentDiffusion, alpha_sigma, logsnr_cosine
from models.train import load_trainer_state
from schemas.diffusion_configs import AutoencoderConfig, DiffusionConfig, LatentDiffusionFlowConfig, TrainingBudget
from schemas.errors import UserInputError
from schemas.shards import DOCUMENT_SCHEMA
from tasks import diffusion as ld
from tasks import evaluate_diffusion as ev
from tasks.shardio import write_table_atomic

torch.set_num_threads(1)


def _shard(path, docs):
    rows = [{"doc_id": d, "text": t, "content_hash": d, "source": "t", "url": None, "category": c, "metadata": None,
             "source_file": "f", "source_line": i + 1, "run_id": "r"} for i, (d, t, c) in enumerate(docs)]
    return write_table_atomic(pa.Table.from_pylist(rows, schema=DOCUMENT_SCHEMA), str(path))


def _words(texts):
    return [len(t.split()) for t in texts]


# ----------------------------------------------------------------------------- texts


def test_pack_units_respects_max_tokens_and_drops_overlong_sentences():
    sentences = ["a b.", "c d e.", "f g h i j k l m n o p.", "q."]
    counts = _words(sentences)
    units, dropped = ld.pack_units(sentences, counts, max_tokens=8, pack=True)
    assert units == ["a b. c d e.", "q."]  # 2 + 3 + 2 specials fits 8; the 11-word sentence alone does not
    assert dropped == 1
    single, _ = ld.pack_units(sentences, counts, max_tokens=8, pack=False)
    assert single == ["a b.", "c d e.", "q."]


def test_paragraph_sentences_split_on_sentence_ends_and_blank_lines():
    text = "Ann Lee is a chemist. She was born in 1950.\n\nLee won the Gold Prize! Was it deserved? Yes."
    assert ld.paragraph_sentences(text) == [["Ann Lee is a chemist.", "She was born in 1950."],
                                            ["Lee won the Gold Prize!", "Was it deserved?", "Yes."]]


def test_extract_texts_keeps_labels_and_holds_out_whole_documents(tmp_path):
    docs = [(f"doc-{i}", f"Person {i} is a painter. They live in Town {i}.", "arts" if i % 2 else "law") for i in range(60)]
    shard = _shard(tmp_path / "d.parquet", docs)
    train, holdout, stats = ld.extract_texts([shard], count_tokens=_words, max_tokens=8, holdout_fraction=0.3)
    assert stats["documents"] == 60 and len(train.texts) + len(holdout.texts) == 120  # 2 sentences each, unpacked by length
    by_doc = {f"Person {i} is a painter.": ("arts" if i % 2 else "law") for i in range(60)}
    for split in (train, holdout):
        for text, label in zip(split.texts, split.labels):
            if text in by_doc:
                assert label == by_doc[text]
    held = {t.split(" is ")[0] for t in holdout.texts if " is " in t}
    assert held and not held & {t.split(" is ")[0] for t in train.texts if " is " in t}  # no document on both sides
    again = ld.extract_texts([shard], count_tokens=_words, max_tokens=8, holdout_fraction=0.3)
    assert again[1].texts == holdout.texts  # hash split: every rerun agrees


def test_extract_texts_errors_name_the_input(tmp_path):
    with pytest.raises(UserInputError, match="no document shards"):
        ld.extract_texts([], count_tokens=_words, max_tokens=8)
    shard = _shard(tmp_path / "d.parquet", [("a", "One sentence here.", None)])
    with pytest.raises(UserInputError, match="label_column"):
        ld.extract_texts([shard], count_tokens=_words, max_tokens=8, label_column="sentiment")


# ----------------------------------------------------------------------------- schedule and samplers


def test_cosine_schedule_spans_the_configured_logsnr_range_and_preserves_variance():
    t = torch.linspace(0, 1, 101)
    lam = logsnr_cosine(t, -15.0, 15.0)
    assert lam[0].item() == pytest.approx(15.0, abs=1e-3) and lam[-1].item() == pytest.approx(-15.0, abs=1e-3)
    assert bool((lam[1:] < lam[:-1]).all())
    alpha, sigma = alpha_sigma(lam)
    assert torch.allclose(alpha ** 2 + sigma ** 2, torch.ones_like(alpha), atol=1e-5)
    assert logsnr_cosine(torch.tensor([0.5])).item() == pytest.approx(0.0, abs=1e-4)  # cosine midpoint: SNR 1


class OracleDenoiser(torch.nn.Module):
    """Predicts the exact v for data concentrated at ``point`` (the Bayes-optimal denoiser of that data)."""

    def __init__(self, point, num_classes=2):
        super().__init__()
        self.point, self.num_classes = point, num_classes
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, z, logsnr, labels, x_self_cond=None):
        alpha, sigma = (s[:, None, None] for s in alpha_sigma(logsnr))
        eps = (z - alpha * self.point) / sigma
        return alpha * eps - sigma * self.point


@pytest.mark.parametrize("sampler,steps", [("ddim", 10), ("ddpm", 25)])
def test_samplers_reach_the_data_with_an_exact_denoiser(sampler, steps):
    point = torch.randn(1, 4, 3)
    model = LatentDiffusion(OracleDenoiser(point))
    out = model.sample((5, 4, 3), torch.zeros(5, dtype=torch.long), steps=steps, sampler=sampler,
                       generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, point.expand(5, -1, -1), atol=1e-4)


def test_v_prediction_recovers_clean_latents_and_noise():
    point = torch.randn(1, 4, 3)
    model = LatentDiffusion(OracleDenoiser(point))
    logsnr = torch.tensor([2.0, -3.0])
    alpha, sigma = (s[:, None, None] for s in alpha_sigma(logsnr))
    eps = torch.randn(2, 4, 3)
    x_hat, eps_hat, _ = model.predict(alpha * point + sigma * eps, logsnr, torch.zeros(2, dtype=torch.long))
    assert torch.allclose(x_hat, point.expand(2, -1, -1), atol=1e-5) and torch.allclose(eps_hat, eps, atol=1e-5)


def test_guidance_scale_zero_is_unconditional_and_one_is_conditional():
    torch.manual_seed(0)
    den = Denoiser(latent_dim=3, num_latents=4, width=16, layers=2, heads=2, num_classes=3)
    torch.nn.init.normal_(den.proj_out.weight)  # a non-zero output, so classes differ
    model = LatentDiffusion(den).eval()
    z, lam, labels = torch.randn(2, 4, 3), torch.tensor([0.5, 0.5]), torch.tensor([1, 2])
    null = torch.full_like(labels, 3)
    assert torch.allclose(model.guided_predict(z, lam, labels, None, 0.0)[0], model.predict(z, lam, null)[0], atol=1e-5)
    assert torch.allclose(model.guided_predict(z, lam, labels, None, 1.0)[0], model.predict(z, lam, labels)[0], atol=1e-5)
    cond, uncond = model.predict(z, lam, labels)[1], model.predict(z, lam, null)[1]
    guided = model.guided_predict(z, lam, labels, None, 3.0)[1]
    assert torch.allclose(guided, uncond + 3.0 * (cond - uncond), atol=1e-4)


def test_classifier_gradient_pulls_samples_toward_the_target_class():
    point = torch.zeros(1, 2, 2)
    model = LatentDiffusion(OracleDenoiser(point, num_classes=1))
    classifier = lambda z, logsnr: torch.stack([-z.sum((1, 2)), z.sum((1, 2))], dim=1)  # noqa: E731 - class 1: larger sum
    labels = torch.full((64,), 1, dtype=torch.long)
    kw = dict(steps=20, sampler="ddim", classifier=classifier, classifier_scale=2.0)
    up = model.sample((64, 2, 2), labels, generator=torch.Generator().manual_seed(0), target=torch.ones(64, dtype=torch.long), **kw)
    down = model.sample((64, 2, 2), labels, generator=torch.Generator().manual_seed(0), target=torch.zeros(64, dtype=torch.long), **kw)
    assert up.sum() > down.sum()


def test_diffusion_training_learns_a_single_point_distribution():
    torch.manual_seed(0)
    data = torch.randn(1, 4, 3).expand(8, -1, -1)  # v is then predictable at every noise level
    model = LatentDiffusion(Denoiser(3, 4, 32, 2, 2, 2))
    labels = torch.tensor([0, 1] * 4)
    gen = torch.Generator().manual_seed(0)
    before = sum(model.loss(data, labels, generator=gen).item() for _ in range(8))
    ld.fit(model, lambda step: model.loss(data, labels, generator=torch.Generator().manual_seed(step)),
           TrainingBudget(steps=150, lr=3e-3, warmup_steps=10, log_every=1000), save=lambda *a: None, log=lambda m: None)
    gen = torch.Generator().manual_seed(0)
    after = sum(model.loss(data, labels, generator=gen).item() for _ in range(8))
    assert after < 0.5 * before


# ----------------------------------------------------------------------------- autoencoder


TINY_AE = dict(width=32, heads=2, perceiver_layers=1, reconstruction_layers=1, decoder_layers=1, num_latents=8,
               latent_dim=8, latent_noise=0.0)
TEXTS = ["Ann Lee is a chemist.", "Bob Day is a painter.", "Cy Fox is a judge.", "Di Oak is a nurse."]


@pytest.fixture(scope="module")
def encoder():
    from models.autoencoder import MiniLMEncoder

    return MiniLMEncoder()


@pytest.mark.parametrize("decoder", ["parallel", "autoregressive"])
def test_autoencoder_learns_to_reconstruct_and_reloads_identically(tmp_path, encoder, decoder):
    cfg = AutoencoderConfig(**TINY_AE, decoder=decoder, train=TrainingBudget(steps=250, batch_size=8, lr=5e-3, warmup_steps=10,
                                                                             log_every=1000, checkpoint_every=1000))
    train = ld.TextSplit(TEXTS, ["science", "arts", "law", "medicine"])
    ae, report = ld.train_autoencoder(train, cfg, str(tmp_path / "ae"), max_tokens=16, encoder=encoder, log=lambda m: None)
    scores = ev.reconstruction_scores(ae, TEXTS)
    assert scores["exact_match"] == 1.0 and scores["bleu"] == pytest.approx(100.0)
    assert scores["bleu_reference"] == "original text, lower-cased (uncased decoder)"
    assert scores["examples"][0]["reconstruction"] == "ann lee is a chemist."  # the uncased MiniLM vocabulary
    loaded = ld.load_autoencoder(str(tmp_path / "ae"))
    assert loaded.decode(ae.encode_texts(TEXTS)) == ae.normalize(TEXTS)
    again, second = ld.train_autoencoder(train, cfg, str(tmp_path / "ae"), max_tokens=16, encoder=encoder, log=lambda m: None)
    assert second["reused"] and not report["reused"]


def test_autoencoder_training_resumes_exactly(tmp_path, encoder):
    train = ld.TextSplit(TEXTS, [None] * 4)
    budget = dict(steps=12, batch_size=4, lr=1e-3, warmup_steps=2, log_every=1000)
    straight, _ = ld.train_autoencoder(train, AutoencoderConfig(**TINY_AE, train=TrainingBudget(**budget, checkpoint_every=1000)),
                                       str(tmp_path / "a"), max_tokens=16, encoder=encoder, log=lambda m: None)
    cfg = AutoencoderConfig(**TINY_AE, train=TrainingBudget(**budget, checkpoint_every=5))
    calls = []

    def crash_at_step_7(step):
        calls.append(step)
        if step == 7:
            raise KeyboardInterrupt

    original = ld.fit
    with pytest.raises(KeyboardInterrupt):
        ld.fit = lambda *a, **kw: original(*a, **{**kw, "after_step": crash_at_step_7})
        try:
            ld.train_autoencoder(train, cfg, str(tmp_path / "b"), max_tokens=16, encoder=encoder, log=lambda m: None)
        finally:
            ld.fit = original
    assert load_trainer_state(str(tmp_path / "b"))["step"] == 5
    resumed, _ = ld.train_autoencoder(train, cfg, str(tmp_path / "b"), max_tokens=16, encoder=encoder, log=lambda m: None)
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_autoencoder_refuses_a_folder_trained_with_another_config(tmp_path, encoder):
    train = ld.TextSplit(TEXTS, [None] * 4)
    budget = TrainingBudget(steps=2, batch_size=2, log_every=1000)
    ld.train_autoencoder(train, AutoencoderConfig(**TINY_AE, train=budget), str(tmp_path / "ae"), max_tokens=16,
                         encoder=encoder, log=lambda m: None)
    other = AutoencoderConfig(**{**TINY_AE, "latent_dim": 4}, train=budget)
    with pytest.raises(UserInputError, match="another config"):
        ld.train_autoencoder(train, other, str(tmp_path / "ae"), max_tokens=16, encoder=encoder, log=lambda m: None)


def test_hub_seq2seq_backbone_trains_through_a_frozen_encoder_decoder(tmp_path, encoder):
    """The BART / FLAN-T5 code path, on a tiny randomly initialised BART (the real ones need the hub)."""
    from transformers import BartConfig, BartForConditionalGeneration

    from models.autoencoder import HubSeq2Seq

    tok = encoder.tokenizer
    bart = BartForConditionalGeneration(BartConfig(
        vocab_size=len(tok), d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
        decoder_start_token_id=tok.cls_token_id, forced_eos_token_id=None))
    hub = HubSeq2Seq(model=bart, tokenizer=tok, max_new_tokens=8)
    frozen = {k: v.clone() for k, v in bart.state_dict().items()}
    cfg = AutoencoderConfig(**TINY_AE, backbone="tiny-bart", train=TrainingBudget(steps=5, batch_size=4, log_every=1000))
    ae, report = ld.train_autoencoder(ld.TextSplit(TEXTS, [None] * 4), cfg, str(tmp_path / "ae"), max_tokens=16, encoder=hub,
                                      log=lambda m: None)
    assert report["steps"] == 5 and ae.model.decoder is None
    assert all(torch.equal(v, bart.state_dict()[k]) for k, v in frozen.items())  # encoder and decoder stay frozen
    assert len(ae.decode(ae.encode_texts(TEXTS[:2]))) == 2


def test_parallel_decoder_is_trained_up_to_the_first_end_of_text_only():
    from models.autoencoder import LatentAutoencoder, parallel_targets

    targets = parallel_targets([[5, 6, 7], [8]], eos=0, max_length=6)
    assert targets.tolist() == [[5, 6, 7, 0, -100, -100], [8, 0, -100, -100, -100, -100]]
    torch.manual_seed(0)
    model = LatentAutoencoder(8, 4, 8, 16, 2, 1, 1, vocab_size=10, decoder_layers=1, max_length=6)
    latents = torch.randn(2, 4, 8)
    logits = model.decoder(model.reconstruction(latents))  # the loss is the cross-entropy at the target positions only
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    assert model.reconstruction_loss(latents, None, targets).item() == pytest.approx(expected.item(), rel=1e-5)


def test_ar_baseline_samples_follow_their_class(encoder):
    from models.autoencoder import CompactVocabulary

    train = ld.TextSplit(["the river is wide and cold."] * 8 + ["the market opens at nine."] * 8, ["geo"] * 8 + ["biz"] * 8)
    vocab = CompactVocabulary.build(encoder.tokenizer, train.texts)
    model, report = ev.train_ar_baseline(train, ["biz", "geo"], vocab, TrainingBudget(steps=60, batch_size=16, lr=5e-3, warmup_steps=5,
                                         log_every=1000), width=32, layers=1, heads=2, max_length=12, log=lambda m: None)
    assert report["steps"] == 60
    biz = ev.sample_ar(model, vocab, 0, 4, temperature=0.5)
    geo = ev.sample_ar(model, vocab, 1, 4, temperature=0.5)
    assert all("market" in t for t in biz) and all("river" in t for t in geo)


def test_autoregressive_decoder_teacher_forces_from_the_targets_alone():
    from models.autoencoder import LatentAutoencoder, shifted_targets

    torch.manual_seed(0)
    model = LatentAutoencoder(8, 4, 8, 16, 2, 1, 1, vocab_size=10, decoder_layers=1, max_length=6, parallel=False)
    latents = torch.randn(2, 4, 8)
    inputs, targets = shifted_targets([[5, 6, 7], [8]], eos=0, max_length=6)
    given = model.reconstruction_loss(latents, inputs, targets)
    assert model.reconstruction_loss(latents, None, targets, eos=0).item() == pytest.approx(given.item(), rel=1e-6)


# ----------------------------------------------------------------------------- metrics


def test_text_classifier_reads_the_class_vocabulary_of_unseen_texts():
    names = ["Ann", "Bob", "Cy", "Di", "Ed", "Flo", "Gus", "Hal"]
    fields = {"science": ["chemist", "physicist", "geologist"], "arts": ["painter", "poet", "sculptor"],
              "law": ["judge", "barrister", "solicitor"]}
    texts, labels = [], []
    for c, jobs in fields.items():
        for i, name in enumerate(names):
            texts.append(f"{name} was born in a small town and works as a {jobs[i % 2]}.")
            labels.append(c)
    judge = ev.TextClassifier(texts, labels)
    # new names and word order: only the occupation tells the class
    unseen = [f"A {jobs[0]} named Yan lives in a small town." for jobs in fields.values()]
    assert judge.predict(unseen) == list(fields) and judge.accuracy(unseen, list(fields)) == 1.0


def test_bleu_is_100_for_identical_text_and_0_without_shared_4grams():
    refs = ["the cat sat on the mat .", "a dog ran in the park ."]
    assert ev.corpus_bleu(refs, refs) == pytest.approx(100.0)
    assert ev.corpus_bleu(["x y z w v", "q r s t u"], refs) == 0.0
    assert 0 < ev.corpus_bleu(["the cat sat on the mat", "a dog ran in the park ."], refs) < 100


def test_reconstruction_bleu_is_against_the_original_text_so_words_outside_the_vocabulary_count_as_misses():
    class Echo:  # an autoencoder whose decoder writes back what the encoder's vocabulary kept, lower-cased
        hub = None

        def encode_texts(self, texts):
            return texts

        def decode(self, latents):
            return [t.lower().replace("zyxq", "") for t in latents]

        def normalize(self, texts):
            return self.decode(texts)

    texts = ["Ann Lee is a zyxq chemist in Port Ellen, born 1950."] * 3
    scores = ev.reconstruction_scores(Echo(), texts)
    assert scores["bleu_vocabulary"] == pytest.approx(100.0)  # the older figure: unseen words removed first
    assert scores["bleu"] < 90 and scores["exact_match"] == 0.0


def test_draws_take_equal_seeded_subsets_and_summaries_give_mean_and_std():
    first, again, second = ev.draw_indices(100, 40, 0, 25), ev.draw_indices(100, 40, 0, 25), ev.draw_indices(100, 40, 1, 25)
    assert first == again and len(first) == len(set(first)) == 40 and first != second
    assert ev.draw_indices(10, 40, 0, 25) == list(range(10))  # fewer texts than asked: all of them
    rows = ev.summarize_draws([{"generator": "g", "mauve": 0.6, "samples": 40, "perplexity": None},
                               {"generator": "g", "mauve": 0.8, "samples": 40, "perplexity": None}])
    assert rows["generator"] == "g" and rows["mauve"] == pytest.approx(0.7) and rows["mauve_std"] == pytest.approx(0.1414, abs=1e-4)
    assert rows["samples"] == 40 and rows["samples_std"] == 0.0 and rows["perplexity"] is None
    seeds = ev.combine_seeds([[{"generator": "g", "mauve": 0.5, "mauve_std": 0.2}], [{"generator": "g", "mauve": 0.7, "mauve_std": 0.1}]])
    assert seeds[0]["mauve"] == pytest.approx(0.6) and seeds[0]["mauve_std"] == pytest.approx(0.1414, abs=1e-4)


def test_each_training_seed_moves_both_seeds_and_trains_in_a_folder_of_its_own(tmp_path):
    from flows.diffusion import seed_config

    config = LatentDiffusionFlowConfig(workdir=str(tmp_path), seeds=3)
    assert seed_config(config, 0) is config
    second = seed_config(config, 2)
    assert second.workdir == str(tmp_path / "seed-2")
    assert (second.autoencoder.seed, second.diffusion.seed) == (2, 2) and second.sampling == config.sampling


def test_diversity_and_memorisation():
    repeated = ["the same words again and again"] * 4
    varied = ["one two three four", "five six seven eight", "nine ten eleven twelve", "a b c d"]
    assert ev.diversity(varied) == pytest.approx(1.0) and ev.diversity(repeated) < 0.3
    m = ev.memorisation(["The cat sat.", "A new sentence here."], ["Yesterday the cat sat. It was warm."])
    assert m["verbatim"] == 0.5
    assert 0 < m["train_4grams"] < 1


def _people(rng, n):
    jobs = ["painter", "baker", "pilot", "chemist", "poet", "farmer", "lawyer", "nurse"]
    towns = ["Ashford", "Brill", "Cobham", "Dunmore", "Elston", "Fenwick", "Garth", "Hale"]
    return [f"{rng.choice(['Anna', 'Ben', 'Cara', 'Dev', 'Eli'])} {rng.choice(['Moss', 'Reed', 'Lane'])} is a "
            f"{rng.choice(jobs)} in {rng.choice(towns)}, born in {rng.randint(1900, 1999)}." for _ in range(n)]


def test_mauve_is_high_for_the_same_distribution_and_floor_for_unrelated_text():
    # what MAUVE resolves whatever clusters k-means finds on this CPU: two draws of one distribution share
    # every cluster (high), unrelated text shares none (the floor); 100 points per side, 10 clusters
    import random

    rng = random.Random(0)
    references, same = _people(rng, 100), _people(rng, 100)
    other = [f"The {i}th recipe uses flour, {i % 7 + 1} eggs and a pinch of salt." for i in range(100)]
    matching, unrelated = ev.mauve_score(same, references), ev.mauve_score(other, references)
    assert matching > 0.5 > 0.1 > unrelated
    # averaging clusterings: the mean of the single-clustering scores at seeds seed + 1000 k
    from models.embed import embed

    features = embed(references)
    one = [ev.mauve_score(same, references, seed=7 + 1000 * k, reference_features=features) for k in range(3)]
    assert ev.mauve_score(same, references, seed=7, reference_features=features, kmeans_seeds=3) == pytest.approx(np.mean(one))


def test_native_warnings_repeated_per_clustering_are_written_once_with_their_count(capfd):
    import os

    with ev.native_stderr_counted():
        os.write(2, b"WARNING clustering 200 points\nWARNING clustering 200 points\nother\n")
    assert capfd.readouterr().err == "WARNING clustering 200 points (x2)\nother\n"


# ----------------------------------------------------------------------------- CLI


def _parser():
    from flows.diffusion_cli import add_diffusion_commands

    parser = argparse.ArgumentParser(prog="lmlm")
    add_diffusion_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def test_sample_command_errors_name_the_checkpoint_and_the_classes(tmp_path):
    args = _parser().parse_args(["sample", "--checkpoint", str(tmp_path), "--class", "arts", "--n", "2"])
    with pytest.raises(UserInputError, match="no autoencoder/ folder"):
        args.func(args)
    dm = ld.DiffusionModel(None, DiffusionConfig(), ["arts", "law"])
    with pytest.raises(UserInputError, match="choose one of arts, law"):
        dm.class_id("sports")


def test_train_command_builds_the_config_from_flags(tmp_path):
    from flows.diffusion_cli import _config_from_args

    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"max_tokens": 24, "diffusion": {"width": 64}}))
    args = _parser().parse_args(["diffusion", "train", "--config", str(cfg_file), "--workdir", str(tmp_path / "w"),
                                 "--ae-steps", "7", "--no-eval", "--device", "cpu"])
    config = _config_from_args(args)
    assert (config.max_tokens, config.diffusion.width, config.autoencoder.train.steps) == (24, 64, 7)
    assert config.device == "cpu"
    assert config.evaluation is None and config.workdir == str(tmp_path / "w")
    bad = _parser().parse_args(["diffusion", "train", "--config", str(cfg_file), "--ae-steps", "0"])
    with pytest.raises(UserInputError, match="autoencoder.train.steps"):
        _config_from_args(bad)


def test_device_auto_is_the_cpu_without_a_gpu_and_a_missing_gpu_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ld.resolve_device("auto") == torch.device("cpu") == ld.resolve_device(None)
    with pytest.raises(UserInputError, match="device 'cuda:1': PyTorch sees no CUDA GPU here; use device auto or cpu"):
        ld.resolve_device("cuda:1")
    with pytest.raises(UserInputError, match="device 'gpu': not a torch device"):
        ld.resolve_device("gpu")


@pytest.mark.slow
def test_latent_diffusion_flow_end_to_end(tmp_path, prefect_harness):
    """The whole job on a tiny synthetic corpus: checkpoints, report, evaluation table, and `lmlm sample`."""
    from flows.diffusion import latent_diffusion

    config = LatentDiffusionFlowConfig.model_validate({
        "workdir": str(tmp_path), "holdout_fraction": 0.3, "threads": 1,
        "synthetic": {"n_people": 40, "n_organisation_docs": 2, "n_city_docs": 2, "n_no_fact_docs": 2},
        "autoencoder": {**TINY_AE, "train": {"steps": 20, "batch_size": 16, "checkpoint_every": 10}},
        "diffusion": {"width": 32, "layers": 2, "train": {"steps": 20, "batch_size": 16}},
        "sampling": {"steps": 4},
        "evaluation": {"samples_per_draw": 12, "draws": 2, "latent_classifier": {"steps": 5}, "ar_baseline": {"steps": 5}}})
    report = latent_diffusion(config)
    generators = [r["generator"] for r in report["evaluation"]["rows"]]
    assert generators[0] == "diffusion" and "AR baseline (class-conditional)" in generators
    assert "diffusion, CFG w=3" in generators  # the default further guidance weight gets its own row
    assert json.loads((tmp_path / "report.json").read_text())["autoencoder"]["steps"] == 20
    texts = ld.sample_texts(str(tmp_path), 3, report["diffusion"]["classes"][0])
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    assert not math.isnan(report["evaluation"]["rows"][0]["mauve"])
    evaluation = report["evaluation"]
    n = evaluation["samples_per_draw"]
    assert evaluation["draws"] == 2 and n == min(12, evaluation["reference_texts"])
    assert all(r["samples"] == n for r in evaluation["rows"])  # every generator: as many samples as references
    assert "mauve_std" in evaluation["rows"][0] and "not independent" in evaluation["mauve_features"]  # no reference LM
