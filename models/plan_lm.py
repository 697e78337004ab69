"""DGLM's plan-conditioned language model: a causal LM that reads a *semantic plan* (the sentence embedding of the
text it is about to write) through a soft prompt spliced between the prefix and the continuation.

    plan space   e = MiniLM(continuation), unit norm;  x = (e - mean) / std   (per dimension, training statistics)
    noise        z = α·x + σ·ε,  α² + σ² = 1;  training: α² = sigmoid(λ(t) + shift), t ~ U(0, 1), shift 2·ln 3
                 (mostly mild noise); inference: the plan re-noised to α² = 0.95
    generator    PlanPromptGenerator(z, α²) -> soft (B, k, d_lm): a linear path D -> k·d_lm plus a residual (Linear D ->
                 k·D, reshape (k, D), Linear D -> width, FiLM transformer layers conditioned on 1000·α², Linear width
                 -> d_lm, zero at init), each vector RMS-normalised to the LM's token-embedding scale
    LM input     [prefix tokens][k soft vectors][continuation tokens]; loss on the tokens (never on soft positions)

The splice and the sampler take any soft prompt, so the class-conditional reference model (``ClassPrompt``: one
control vector per attribute at the same place) and STAR-LDM (issue 17) reuse them. Shapes: plans (B, D); token
ids lists of ints; soft prompts (B, k, d_lm); logits (B, T, V).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.autoencoder import MLP, Attention
from models.diffusion import alpha_sigma, logsnr_cosine, timestep_embedding
from models.kv_cache import cache_keyword, cpu_bf16_attention, new_cache
from models.train import kept_token_nll, per_token_nll

REFERENCE_SHIFT = 2 * math.log(3)  # the reference decoder stage's log-SNR shift of the training noise levels


# ----------------------------------------------------------------------------- plan space


class PlanSpace:
    """Standardisation of unit-norm sentence embeddings with per-dimension training statistics."""

    def __init__(self, mean: np.ndarray | torch.Tensor, std: np.ndarray | torch.Tensor):
        self.mean = torch.as_tensor(mean, dtype=torch.float32)
        self.std = torch.as_tensor(std, dtype=torch.float32)

    @classmethod
    def fit(cls, embeddings: np.ndarray, floor: float = 1e-4) -> "PlanSpace":
        return cls(embeddings.mean(0), np.maximum(embeddings.std(0), floor))

    @property
    def dim(self) -> int:
        return self.mean.numel()

    def standardize(self, e: torch.Tensor) -> torch.Tensor:
        return (e - self.mean.to(e.device)) / self.std.to(e.device)

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        """The unit-norm sentence embedding a standardised plan stands for."""
        return F.normalize(x * self.std.to(x.device) + self.mean.to(x.device), dim=-1)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """A sampled plan put back on the encoder's sphere, re-standardised (what the decoder saw in training)."""
        return self.standardize(self.embedding(x))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "std": self.std}


# ----------------------------------------------------------------------------- noise augmentation


def noise_levels(n: int, shift: float = REFERENCE_SHIFT, *, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """α² of ``n`` training examples: the cosine schedule at t ~ U(0, 1), log-SNR shifted by ``shift``."""
    t = torch.rand(n, generator=generator, device=device)
    return torch.sigmoid(logsnr_cosine(t, shift=shift))


def noise_plan(x: torch.Tensor, alpha2: torch.Tensor | float, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """z = α·x + σ·ε with α² = ``alpha2`` (a float or one per row of x (B, D))."""
    a2 = torch.as_tensor(alpha2, dtype=torch.float32, device=x.device).expand(x.shape[0])[:, None]
    eps = torch.randn(x.shape, generator=generator, device=x.device)
    return a2.sqrt() * x + (1 - a2).sqrt() * eps


def alpha2_of(logsnr: torch.Tensor) -> torch.Tensor:
    return alpha_sigma(logsnr)[0] ** 2


# ----------------------------------------------------------------------------- soft prompts


class FiLMBlock(nn.Module):
    """Pre-LN transformer block (non-causal) whose norms are scaled and shifted by a conditioning vector (FiLM)."""

    def __init__(self, d: int, heads: int, d_cond: int):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(d, elementwise_affine=False), Attention(d, heads)
        self.ln2, self.mlp = nn.LayerNorm(d, elementwise_affine=False), MLP(d)
        self.film = nn.Linear(d_cond, 4 * d)
        nn.init.zeros_(self.film.weight)  # starts as a plain pre-LN block
        nn.init.zeros_(self.film.bias)

    def forward(self, x, cond):
        s1, b1, s2, b2 = self.film(cond)[:, None].chunk(4, dim=-1)
        h = self.ln1(x) * (1 + s1) + b1
        x = x + self.attn(h, h)
        return x + self.mlp(self.ln2(x) * (1 + s2) + b2)


class PlanPromptGenerator(nn.Module):
    """A noisy plan z (B, D) and its noise level α² (B,) -> k soft-prompt vectors (B, k, d_lm).

    soft = token_rms · RMSNorm(direct(z) + transformer(z, α²)): a linear path carries the plan to every soft
    vector from the first step, the FiLM transformer adds a noise-aware residual (its output starts at zero), and
    each vector is held at the RMS of the LM's token embeddings (``token_rms``, a buffer). Without the linear path
    and the fixed scale the fine-tune grew a near-constant prompt of ~15x the token norm and the LM ignored the plan
    (held-out NLL equal with the true, a shuffled and no plan)."""

    def __init__(self, plan_dim: int, soft_tokens: int, width: int, layers: int, heads: int, d_lm: int,
                 token_rms: float = 1.0):
        super().__init__()
        self.plan_dim, self.soft_tokens, self.d_lm = plan_dim, soft_tokens, d_lm
        self.direct = nn.Linear(plan_dim, soft_tokens * d_lm)
        nn.init.normal_(self.direct.weight, std=plan_dim ** -0.5)  # unit-variance outputs for a standardised plan
        nn.init.zeros_(self.direct.bias)
        self.expand = nn.Linear(plan_dim, soft_tokens * plan_dim)
        self.proj_in = nn.Linear(plan_dim, width)
        self.pos = nn.Parameter(torch.randn(soft_tokens, width) * 0.02)
        self.time_mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.SiLU(), nn.Linear(4 * width, width))
        self.blocks = nn.ModuleList(FiLMBlock(width, heads, width) for _ in range(layers))
        self.ln_out = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, d_lm)
        nn.init.zeros_(self.proj_out.weight)  # the residual starts at zero: the plan's linear image first
        nn.init.zeros_(self.proj_out.bias)
        self.register_buffer("token_rms", torch.tensor(float(token_rms)))
        self.bow_log_scale = nn.Parameter(torch.tensor(math.log(10.0)))  # logit scale of the bag-of-words readout

    def forward(self, z, alpha2):
        B = z.shape[0]
        h = self.proj_in(self.expand(z).view(B, self.soft_tokens, self.plan_dim)) + self.pos
        cond = self.time_mlp(timestep_embedding(1000.0 * alpha2, self.pos.shape[1], max_period=10_000.0))
        for block in self.blocks:
            h = block(h, cond)
        out = self.direct(z).view(B, self.soft_tokens, self.d_lm) + self.proj_out(self.ln_out(h))
        return out * torch.rsqrt(out.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(out.dtype) * self.token_rms


    def bag_of_words_nll(self, soft: torch.Tensor, token_embeddings: torch.Tensor, frequencies: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the continuation's token frequencies (B, V) under each soft vector (B, k, d_lm) read
        through the LM's (frozen here) token embeddings (V, d_lm) as a distribution over the vocabulary, averaged
        over the k vectors: the auxiliary loss that makes the soft prompt carry the words the plan is about."""
        logits = self.bow_log_scale.exp() * soft.float() @ token_embeddings.detach().float().T
        return -(torch.log_softmax(logits, -1) * frequencies[:, None]).sum(-1).mean()


def token_frequencies(sequences: list[list[int]], vocab_size: int) -> torch.Tensor:
    """Each sequence's token frequencies (B, V), rows summing to 1."""
    out = torch.zeros(len(sequences), vocab_size)
    for i, seq in enumerate(sequences):
        out[i].index_add_(0, torch.tensor(seq, dtype=torch.long), torch.full((len(seq),), 1.0 / max(len(seq), 1)))
    return out


def token_rms(lm) -> float:
    """Root-mean-square entry of the LM's input token embeddings: the scale a soft vector is held at."""
    return float(lm.get_input_embeddings().weight.detach().float().pow(2).mean().sqrt())


class ClassPrompt(nn.Module):
    """Control vectors of a class-conditional LM: one per attribute, from its class id (the last id of each
    attribute is "unknown"); labels (B, A) -> (B, A, d_lm)."""

    def __init__(self, classes_per_attribute: list[int], d_lm: int):
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(n + 1, d_lm) for n in classes_per_attribute)
        for t in self.tables:
            nn.init.normal_(t.weight, std=0.02)

    @property
    def soft_tokens(self) -> int:
        return len(self.tables)

    def forward(self, labels):
        return torch.stack([t(labels[:, a]) for a, t in enumerate(self.tables)], dim=1)


# ----------------------------------------------------------------------------- the splice


def training_batch(prefixes: list[list[int]], continuations: list[list[int]], soft_tokens: int, pad_id: int,
                   train_prefix: bool = True) -> dict[str, torch.Tensor]:
    """Right-padded rows ``[prefix][soft × k][continuation][pad]``: ids (B, T) (pad at soft positions),
    soft (B, T) bool, target (B, T) bool (the token at that position is trained: continuation tokens, and the
    prefix's tokens after its first when ``train_prefix``), continuation (B, T) bool."""
    T = max(len(p) + soft_tokens + len(c) for p, c in zip(prefixes, continuations))
    B = len(prefixes)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    soft = torch.zeros((B, T), dtype=torch.bool)
    target = torch.zeros((B, T), dtype=torch.bool)
    cont = torch.zeros((B, T), dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prefixes, continuations)):
        P, k, C = len(p), soft_tokens, len(c)
        ids[i, :P] = torch.tensor(p, dtype=torch.long)
        ids[i, P + k:P + k + C] = torch.tensor(c, dtype=torch.long)
        soft[i, P:P + k] = True
        cont[i, P + k:P + k + C] = True
        target[i, 1:P] = train_prefix
    target |= cont
    return {"ids": ids, "soft": soft, "target": target, "continuation": cont}


def spliced_embeddings(lm, ids: torch.Tensor, soft_mask: torch.Tensor, soft: torch.Tensor | None) -> torch.Tensor:
    """The LM's input embeddings of ``ids`` with the soft vectors (B, k, d) written at ``soft_mask`` (row order)."""
    emb = lm.get_input_embeddings()(ids)
    if soft is None:
        return emb
    return emb.masked_scatter(soft_mask[..., None], soft.to(emb.dtype))


def token_nll(lm, batch: dict[str, torch.Tensor], soft: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(next-token cross-entropy (B, T-1), the position's token is a target (B, T-1)) of a :func:`training_batch`
    on the LM's device, with ``soft`` (B, k, d_lm) spliced in (None: the batch was built with k = 0)."""
    emb = spliced_embeddings(lm, batch["ids"], batch["soft"], soft)
    logits = lm(inputs_embeds=emb).logits[:, :-1]
    nll = per_token_nll(logits, batch["ids"][:, 1:])
    return nll, batch["target"][:, 1:]


def target_nll(lm, hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token NLL of a :func:`training_batch`'s target tokens, from the LM body's final hidden states
    (B, T, d). The output layer and the softmax run at the target positions only: in the demo's batches the
    prefixes, soft tokens and padding are two thirds of the positions and are not trained. The same figure as
    scoring every position and masking, for half the output layer's work of a training step."""
    keep = batch["target"][:, 1:]
    return kept_token_nll(lm, hidden, batch["ids"], keep).sum() / keep.sum().clamp(min=1)


def mean_nll(lm, batch: dict[str, torch.Tensor], soft: torch.Tensor | None) -> torch.Tensor:
    """Mean next-token NLL of a :func:`training_batch`'s target tokens with ``soft`` spliced in (training's loss)."""
    emb = spliced_embeddings(lm, batch["ids"], batch["soft"], soft)
    return target_nll(lm, lm.base_model(inputs_embeds=emb).last_hidden_state, batch)


# ----------------------------------------------------------------------------- sampling


def nucleus(probs: torch.Tensor, top_p: float, candidates: int = 64) -> torch.Tensor:
    """``probs`` (B, V) restricted to each row's smallest set of most likely tokens reaching ``top_p`` (not
    renormalised: multinomial does not need it). A row's set is looked for among its ``candidates`` most likely
    tokens, which hold it whenever they reach ``top_p`` (most rows at most steps of a trained LM); only the other
    rows sort the whole vocabulary. Same set either way, up to the order of equally likely tokens at the cut."""
    top, order = probs.topk(min(candidates, probs.shape[-1]), dim=-1)
    out = torch.zeros_like(probs).scatter(1, order, top.masked_fill(top.cumsum(-1) - top > top_p, 0.0))
    short = (top.sum(-1) < top_p).nonzero().squeeze(1)
    if len(short):
        top, order = probs[short].sort(dim=-1, descending=True)
        drop = top.cumsum(-1) - top > top_p  # keep the smallest set reaching top_p
        out[short] = torch.zeros_like(top).scatter(1, order, top.masked_fill(drop, 0.0))
    return out


def sample_index(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index (B, 1) per row of unnormalised ``probs`` (B, V), drawn by inverting the row's cumulative sum: the
    distribution of ``torch.multinomial(probs, 1)`` (a zero-probability index is never drawn) at 1/40 of its time
    on the CPU for a 4,096-token vocabulary."""
    cdf = probs.float().cumsum(-1)
    total = cdf[:, -1:]
    u = torch.rand(total.shape, generator=generator, device=probs.device) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # u < total after rounding too
    return torch.searchsorted(cdf, u, right=True).clamp(max=probs.shape[-1] - 1)


@torch.no_grad()
def sample_continuations(lm, prefixes: list[list[int]], soft: torch.Tensor | None, *, max_new_tokens: int,
                         pad_id: int, top_p: float = 0.9, temperature: float = 1.0, repetition_penalty: float = 1.2,
                         logit_bias: torch.Tensor | None = None, banned: list[int] = (),
                         generator: torch.Generator | None = None, prefix_state=None) -> torch.Tensor:
    """``max_new_tokens`` sampled tokens (B, N) after each ``[prefix][soft]`` (left-padded, KV cache).

    ``prefix_state``: the same prefixes already encoded (``models.star.PrefixState``: left-padded ``ids`` and
    ``mask``, per-layer ``layers`` of keys and values), e.g. by the thought before the writing; the first pass then
    runs over the soft prompt only, against a copy of those keys and values (the prefix never attends to it).

    Per step: repetition penalty (CTRL's: positive logits divided, negative multiplied, over the prefix and the
    tokens so far), then ``logit_bias`` added ((V,) or (B, V): attribute-word boosting), ``banned`` ids removed
    (e.g. end-of-text, so every continuation has N tokens), temperature, nucleus (top-p) sampling."""
    device = next(lm.parameters()).device
    B, k = len(prefixes), 0 if soft is None else soft.shape[1]
    L = max(len(p) for p in prefixes) + k
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    soft_mask = torch.zeros((B, L), dtype=torch.bool)
    for i, p in enumerate(prefixes):
        start = L - len(p) - k
        ids[i, start:L - k] = torch.tensor(p, dtype=torch.long)
        mask[i, start:] = 1
        soft_mask[i, L - k:] = True
    ids, mask, soft_mask = ids.to(device), mask.to(device), soft_mask.to(device)
    V = lm.get_output_embeddings().weight.shape[0]
    seen = torch.zeros((B, V), dtype=torch.bool, device=device)
    seen.scatter_(1, ids, mask.bool())  # prefix tokens count for the repetition penalty, pads do not
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache, cache_arg = new_cache(lm.config, growing=True), cache_keyword(lm)
    with cpu_bf16_attention(lm):
        if prefix_state is None:
            out = lm(inputs_embeds=spliced_embeddings(lm, ids, soft_mask, soft), attention_mask=mask,
                     position_ids=positions, use_cache=True, logits_to_keep=1, **{cache_arg: cache})
        else:
            P = L - k
            if k == 0 or prefix_state.ids.shape != (B, P) or not (torch.equal(prefix_state.ids, ids[:, :P])
                                                                   and torch.equal(prefix_state.mask, mask[:, :P])):
                raise ValueError("prefix_state must hold these prefixes, and a soft prompt must follow them")
            for i, (key, value) in enumerate(prefix_state.layers):
                cache.update(key, value, i)
            out = lm(inputs_embeds=soft.to(lm.get_input_embeddings().weight.dtype), attention_mask=mask,
                     position_ids=positions[:, P:], use_cache=True, logits_to_keep=1, **{cache_arg: cache})
        tokens = []
        for _ in range(max_new_tokens):
            logits = out.logits[:, -1].float()
            if repetition_penalty != 1.0:
                penalised = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
                logits = torch.where(seen, penalised, logits)
            if logit_bias is not None:
                logits = logits + logit_bias.to(device)
            if banned:
                logits[:, list(banned)] = float("-inf")
            probs = torch.softmax(logits / temperature, dim=-1)
            if top_p < 1.0:
                probs = nucleus(probs, top_p)
            tok = sample_index(probs, generator)  # (B, 1)
            tokens.append(tok)
            seen.scatter_(1, tok, True)
            mask = torch.cat([mask, torch.ones_like(tok)], dim=1)
            positions = positions[:, -1:] + 1
            out = lm(input_ids=tok, attention_mask=mask, position_ids=positions, use_cache=True, **{cache_arg: cache})
    return torch.cat(tokens, dim=1).cpu()
