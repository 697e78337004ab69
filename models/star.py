"""STAR-LDM (issue 17): one causal LM that stops, thinks by diffusion in the plan space, then autoregresses.

    plan space   DGLM's (``models.plan_lm.PlanSpace``): the standardised MiniLM embedding of the continuation
    one pass     z_t = α·x + σ·ε  ->  soft = PlanPromptGenerator(z_t, α²)  ->  LM over [prefix][soft][continuation]
                 -> next-token NLL on the continuation, and the final hidden states at the k soft positions with the
                 soft vectors themselves -> ScoreHead -> v̂ (the plan's v-target αε − σx)
    loss         NLL + w · weight(λ) · |v̂ − v|² / D, w = 5 (reference); one noise level per example, seen by both;
                 weight(λ) = (π/2)·sech(λ/2): the "sigmoid" weighting (ε-space sigmoid(−λ)) in v-space with the
                 importance correction of the cosine schedule's λ density, mean 1 over t ~ U(0, 1)
    CFG          the LM's features at the soft positions replaced by a learned null in ``null_share`` of examples: the
                 head then sees the soft vectors only (the unconditional score)
    thinking     the prefix is encoded once into a KV cache; every denoising step runs the LM over the k soft tokens
                 only, attending to that cache (the prefix never attends to the soft tokens, so this is exact), and
                 the head; DDPM/DDIM from ``models.diffusion``; the plan is put back on the sphere, re-noised to
                 α² = 0.95 and spliced after the prefix for writing
    control      ``NoisyAttribute``: an MLP on z_t with FiLM on the noise level; its gradient (through the classifier
                 only, never the LM) is added to ε̂ at every step

Shapes: plans (B, D); soft prompts (B, k, d_lm); prefixes lists of token ids; latents inside the sampler (B, 1, D).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.diffusion import LatentDiffusion, alpha_sigma, timestep_embedding
from models.kv_cache import PrefixSlots, cache_keyword, new_cache
from models.plan_lm import FiLMBlock, PlanPromptGenerator, spliced_embeddings, target_nll
from models.plan_prior import FiLMResBlock


def sigmoid_weight(logsnr: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
    """v-space weight of the sigmoid weighting under the cosine schedule: (π/2)·sech(λ/2) (mean 1 for t ~ U(0, 1)).
    ``shift``: λ was drawn from the cosine schedule shifted by it, whose density is sech((λ − shift)/2) up to the
    same constant; the weight is multiplied by the ratio of the densities, cosh((λ − shift)/2) / cosh(λ/2), so the
    loss's expectation is the unshifted one (mean 1 again) while the draws fall where the shift puts them."""
    lam = logsnr.float()
    return (math.pi / 2) * torch.cosh((lam - shift) / 2) / torch.cosh(lam / 2) ** 2


class ScoreHead(nn.Module):
    """[soft ; LM hidden] at the k soft positions (B, k, 2·d_lm) and λ (B,) -> v̂ (B, D). Rows of ``null`` (B,) bool
    see a learned null in place of the LM's features (classifier-free guidance)."""

    def __init__(self, d_lm: int, soft_tokens: int, plan_dim: int, width: int, layers: int, heads: int):
        super().__init__()
        self.soft_tokens, self.width = soft_tokens, width
        self.null = nn.Parameter(torch.randn(soft_tokens, d_lm) * 0.02)
        self.proj_in = nn.Linear(2 * d_lm, width)
        self.pos = nn.Parameter(torch.randn(soft_tokens, width) * 0.02)
        self.time_mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.SiLU(), nn.Linear(4 * width, width))
        self.blocks = nn.ModuleList(FiLMBlock(width, heads, width) for _ in range(layers))
        self.ln_out = nn.LayerNorm(width)
        self.proj_out = nn.Linear(soft_tokens * width, plan_dim)
        nn.init.zeros_(self.proj_out.weight)  # start by predicting v = 0
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, soft, hidden, logsnr, null=None):
        if null is not None:
            hidden = torch.where(null[:, None, None], self.null.to(hidden.dtype), hidden)
        h = self.proj_in(torch.cat([soft.to(hidden.dtype), hidden], dim=-1)) + self.pos
        cond = self.time_mlp(timestep_embedding(logsnr, self.width, max_period=1_000.0))
        for block in self.blocks:
            h = block(h, cond)
        return self.proj_out(self.ln_out(h).flatten(1)).float()


class StarLDM(nn.Module):
    """The causal LM, the plan's soft-prompt generator and the score head: one model, two losses."""

    def __init__(self, lm, prompt: PlanPromptGenerator, head: ScoreHead):
        super().__init__()
        self.lm, self.prompt, self.head = lm, prompt, head

    @property
    def soft_tokens(self) -> int:
        return self.prompt.soft_tokens

    def hidden(self, **kw):
        """Final hidden states (after the last norm) of the LM's body."""
        return self.lm.base_model(**kw).last_hidden_state

    def losses(self, batch: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
               null: torch.Tensor, diffusion_rows: torch.Tensor | None = None,
               extra: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = (), noise_shift: float = 0.0,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean NLL of the target tokens, weighted v-MSE, the soft prompt) of a ``plan_lm.training_batch`` with clean
        plans ``x`` (B, D) noised at t (B,) with noise ``eps`` (B, D) (cosine schedule, shifted by ``noise_shift``,
        the v-loss importance-weighted back to the unshifted schedule's objective); ``null`` (B,) rows
        give the head the null features; ``diffusion_rows`` (B,) bool: rows whose v-loss counts (all if None).

        ``extra``: more (t, eps, null) draws of the same plans for the v-loss alone. Each runs the LM over the k soft
        tokens only, attending to the prefix's keys and values of the main pass (the prefix never attends to the soft
        tokens, so this is what a full pass would give): more diffusion samples per example for a fraction of a pass."""
        from models.diffusion import logsnr_cosine

        logsnr = logsnr_cosine(t, shift=noise_shift)
        alpha, sigma = (s[:, None] for s in alpha_sigma(logsnr))
        soft = self.prompt(alpha * x + sigma * eps, alpha[:, 0] ** 2)
        emb = spliced_embeddings(self.lm, batch["ids"], batch["soft"], soft)
        if extra:
            cache = new_cache(self.lm.config)
            h = self.hidden(inputs_embeds=emb, use_cache=True, **{cache_keyword(self.lm.base_model): cache})
        else:
            h = self.hidden(inputs_embeds=emb)
        nll = target_nll(self.lm, h, batch)
        v_loss = self._v_loss(soft, h[batch["soft"]].view(len(x), self.soft_tokens, -1), x, logsnr, eps, null,
                              noise_shift)
        if extra:
            B, T, k = len(x), batch["ids"].shape[1], self.soft_tokens
            start = batch["soft"].float().argmax(-1)  # the prefix's length = where the soft tokens start
            prefix_mask = (torch.arange(T, device=x.device)[None] < start[:, None]).long()
            mask = torch.cat([prefix_mask, torch.ones((B, k), dtype=torch.long, device=x.device)], 1)
            positions = start[:, None] + torch.arange(k, device=x.device)
            layers = [(layer.keys, layer.values) for layer in cache.layers]
            for t_r, eps_r, null_r in extra:
                lam = logsnr_cosine(t_r, shift=noise_shift)
                a, s = (u[:, None] for u in alpha_sigma(lam))
                soft_r = self.prompt(a * x + s * eps_r, a[:, 0] ** 2)
                h_r = features_after(self, layers, mask, positions, soft_r, cache_keyword(self.lm.base_model))
                v_loss = v_loss + self._v_loss(soft_r, h_r, x, lam, eps_r, null_r, noise_shift)
            v_loss = v_loss / (1 + len(extra))
        if diffusion_rows is not None:
            return nll, (v_loss * diffusion_rows).sum() / diffusion_rows.sum().clamp(min=1), soft
        return nll, v_loss.mean(), soft

    def _v_loss(self, soft, hidden, x, logsnr, eps, null, noise_shift: float = 0.0) -> torch.Tensor:
        """Sigmoid-weighted v-MSE per row (λ drawn from the cosine schedule shifted by ``noise_shift``)."""
        alpha, sigma = (s[:, None] for s in alpha_sigma(logsnr))
        v_hat = self.head(soft, hidden, logsnr, null)
        return sigmoid_weight(logsnr, noise_shift) * (v_hat - (alpha * eps - sigma * x)).pow(2).mean(-1)


# ----------------------------------------------------------------------------- thinking with a cached prefix


def features_after(model: StarLDM, layers: list[tuple[torch.Tensor, torch.Tensor]] | PrefixSlots, mask: torch.Tensor,
                   positions: torch.Tensor, soft: torch.Tensor, cache_arg: str) -> torch.Tensor:
    """The LM's final hidden states (B, k, d) at the soft vectors (B, k, d) after a prefix given by its per-layer keys
    and values (or by :class:`PrefixSlots` holding them, which a step writes into instead of copying the prefix);
    ``mask`` (B, P + k) covers prefix and soft positions, ``positions`` (B, k) are the soft ones'."""
    if isinstance(layers, PrefixSlots):
        cache = layers.cache(model.lm.config)
    else:
        cache = new_cache(model.lm.config)
        for i, (key, value) in enumerate(layers):
            cache.update(key, value, i)
    return model.hidden(inputs_embeds=soft.to(model.lm.dtype), attention_mask=mask, position_ids=positions,
                        use_cache=True, **{cache_arg: cache})


class PrefixState:
    """Left-padded prefixes encoded once: the per-layer keys/values, the attention mask and the next position."""

    def __init__(self, model: StarLDM, prefixes: list[list[int]], pad_id: int):
        device = next(model.parameters()).device
        B, P = len(prefixes), max(len(p) for p in prefixes)
        ids = torch.full((B, P), pad_id, dtype=torch.long)
        mask = torch.zeros((B, P), dtype=torch.long)
        for i, p in enumerate(prefixes):
            ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, P - len(p):] = 1
        self.model, self.prefixes, self.pad_id = model, prefixes, pad_id
        self.ids, self.mask = ids.to(device), mask.to(device)
        self.positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        cache, self.cache_arg = new_cache(model.lm.config), cache_keyword(model.lm.base_model)
        model.lm.base_model(input_ids=self.ids, attention_mask=self.mask, position_ids=self.positions, use_cache=True,
                            **{self.cache_arg: cache})
        self.layers = [(layer.keys, layer.values) for layer in cache.layers]
        self._slots = None  # PrefixSlots of the steps over all rows, made at the first

    def __len__(self) -> int:
        return len(self.prefixes)

    def soft_hidden(self, soft: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """LM features (B', k, d) at k soft vectors (B', k, d) placed after the cached prefixes of ``rows``. For all
        rows (a thought's steps) the prefix sits in buffers with room for the soft tokens, made at the first step."""
        k = soft.shape[1]
        if rows is None:
            if self._slots is None or self._slots.room != k:
                self._slots = PrefixSlots(self.layers, k)
            layers, mask, positions = self._slots, self.mask, self.positions
        else:
            layers = [(key[rows], value[rows]) for key, value in self.layers]
            mask, positions = self.mask[rows], self.positions[rows]
        mask = torch.cat([mask, torch.ones((soft.shape[0], k), dtype=torch.long, device=soft.device)], 1)
        pos = positions[:, -1:] + 1 + torch.arange(k, device=soft.device)
        return features_after(self.model, layers, mask, pos, soft, self.cache_arg)

    def soft_hidden_uncached(self, soft: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The same features from a full pass over [prefix][soft] (what the reference does at every step)."""
        k = soft.shape[1]
        select = (lambda t: t) if rows is None else (lambda t: t[rows])
        ids = torch.cat([select(self.ids), torch.full((soft.shape[0], k), self.pad_id, device=soft.device)], 1)
        mask = torch.cat([select(self.mask), torch.ones((soft.shape[0], k), dtype=torch.long, device=soft.device)], 1)
        soft_mask = torch.zeros_like(ids, dtype=torch.bool)
        soft_mask[:, -k:] = True
        emb = spliced_embeddings(self.model.lm, ids, soft_mask, soft)
        h = self.model.hidden(inputs_embeds=emb, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
        return h[:, -k:]


class StepGraph:
    """The conditional denoising step (prompt generator, the LM over the k soft tokens against the prefix cache, the
    head) over static buffers for one (batch, prefix-length bucket), captured as one CUDA graph and replayed at every
    step of every thought of that shape. Eager PyTorch launches several hundred small kernels per step, which on a
    GPU at the demo's size cost more than their arithmetic (a step took 1.8x a written token on an H200); a replay
    launches them at once. Prefixes are left-padded to the bucket (masked, so the features are the same). Where no
    graph is captured (a CPU) the same static-buffer step runs eagerly."""

    BUCKET = 32  # prefix positions are padded up to a multiple of this, so graphs are shared across batches

    def __init__(self, model: StarLDM, batch: int, length: int, layers: list[tuple[torch.Tensor, torch.Tensor]]):
        device = next(model.parameters()).device
        k = model.soft_tokens
        self.model, self.length, self.graph, self.out, self.error = model, length, None, None, None
        self.cache_arg = cache_keyword(model.lm.base_model)
        self.z = torch.zeros(batch, model.head.proj_out.out_features, device=device)
        self.logsnr = torch.zeros(batch, device=device)
        self.layers = [(key.new_zeros(*key.shape[:2], length, key.shape[3]),
                        value.new_zeros(*value.shape[:2], length, value.shape[3])) for key, value in layers]
        self.mask = torch.ones(batch, length + k, dtype=torch.long, device=device)
        self.pos = torch.zeros(batch, k, dtype=torch.long, device=device)

    def load(self, state: PrefixState) -> "StepGraph":
        """Copy ``state``'s prefix cache, mask and soft positions into the static buffers (right-aligned)."""
        P, L = state.ids.shape[1], self.length
        for (static_k, static_v), (key, value) in zip(self.layers, state.layers):
            static_k[:, :, L - P:].copy_(key)
            static_v[:, :, L - P:].copy_(value)
        self.mask[:, :L - P] = 0
        self.mask[:, L - P:L].copy_(state.mask)
        self.pos.copy_(state.positions[:, -1:] + 1 + torch.arange(self.pos.shape[1], device=self.pos.device))
        return self

    def _step(self) -> torch.Tensor:
        soft = self.model.prompt(self.z, torch.sigmoid(self.logsnr))
        hidden = features_after(self.model, self.layers, self.mask, self.pos, soft, self.cache_arg)
        return self.model.head(soft, hidden.to(soft.dtype), self.logsnr)

    def capture(self) -> None:
        """Warm up on a side stream, then record one step (autocast's weight cache off, as graph capture needs)."""
        amp = torch.is_autocast_enabled("cuda")
        with torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=amp, cache_enabled=False):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.out = self._step()
        self.graph = graph

    def __call__(self, z: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        """v̂ (B, D) of z (B, D) at λ (B,) for the loaded prefixes."""
        self.z.copy_(z)
        self.logsnr.copy_(logsnr)
        if self.graph is None:
            return self._step()
        self.graph.replay()
        return self.out.clone()


_GRAPHS = "_step_graphs"  # where a model keeps its step graphs (not a module or a buffer: never saved)


def step_graphs(model: StarLDM) -> list[StepGraph]:
    """The step graphs kept on ``model``, least recently used first."""
    return list(model.__dict__.get(_GRAPHS, {}).values())


def clear_step_graphs(model: StarLDM) -> None:
    """Drop the step graphs kept on ``model`` (the next thought of each shape captures again)."""
    model.__dict__.pop(_GRAPHS, None)


def step_graph(model: StarLDM, state: PrefixState) -> StepGraph:
    """The model's step graph for ``state``'s shape (kept on the model, the 8 most recent shapes), loaded with it;
    captured on a GPU, run eagerly elsewhere."""
    length = -(-state.ids.shape[1] // StepGraph.BUCKET) * StepGraph.BUCKET
    amp = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
    key = (len(state), length, amp, next(model.parameters()).data_ptr())  # weights moved (another device): a new one
    graphs = model.__dict__.setdefault(_GRAPHS, {})
    found = graphs.pop(key, None)
    if found is None:
        found = StepGraph(model, len(state), length, state.layers)
        if state.ids.device.type == "cuda":
            try:
                found.load(state).capture()
            except Exception as exc:  # a library version whose step cannot be captured: the same step, eagerly
                found.graph, found.error = None, f"{type(exc).__name__}: {exc}"[:300]
                warnings.warn(f"STAR-LDM: a thought's step could not be captured as a CUDA graph ({found.error}); "
                              "thinking eagerly")
        while len(graphs) >= 8:
            graphs.pop(next(iter(graphs)))
    graphs[key] = found  # most recent last
    return found.load(state)


class ThoughtDenoiser(nn.Module):
    """The denoiser ``LatentDiffusion`` samples with: v̂ (B, 1, D) of z (B, 1, D) at λ (B,); ``labels`` (B,) 1 = the
    cached prefix's features (row i of the prefixes, i counted among the conditional rows), 0 = the null features.
    ``graph``: every row conditional (no classifier-free guidance), each step replayed from it."""

    def __init__(self, model: StarLDM, state: PrefixState, cached: bool = True, graph: StepGraph | None = None):
        super().__init__()
        self.model, self.state, self.cached, self.graph = model, state, cached, graph
        self.num_classes = 0  # LatentDiffusion's null class: label 0

    def forward(self, z, logsnr, labels, x_self_cond=None):
        z = z[:, 0]
        if self.graph is not None:
            return self.graph(z, logsnr)[:, None]
        soft = self.model.prompt(z, torch.sigmoid(logsnr))
        cond = labels.bool()
        hidden = torch.zeros((len(z), self.model.soft_tokens, soft.shape[-1]), device=z.device, dtype=soft.dtype)
        if bool(cond.any()):
            if int(cond.sum()) != len(self.state):
                raise ValueError("conditional rows must be one per cached prefix")
            features = self.state.soft_hidden if self.cached else self.state.soft_hidden_uncached
            hidden[cond] = features(soft[cond]).to(hidden.dtype)
        return self.model.head(soft, hidden, logsnr, ~cond)[:, None]


class StarDiffusion(LatentDiffusion):
    """``LatentDiffusion``'s schedule and samplers over a :class:`ThoughtDenoiser`, with attribute guidance by a
    per-row loss on z_t (``NoisyGuidance``), its gradient taken through the classifiers only."""

    def guided_predict(self, z, logsnr, labels, x_self_cond, guidance_scale: float, classifier=None,
                       classifier_scale: float = 0.0, target=None):
        x_hat, eps = super().guided_predict(z, logsnr, labels, x_self_cond, guidance_scale)
        if classifier is not None and classifier_scale > 0:
            with torch.enable_grad():
                zg = z.detach().float().requires_grad_(True)
                grad = torch.autograd.grad(classifier(zg[:, 0], logsnr).sum(), zg)[0]
            alpha, sigma = (s[:, None, None] for s in alpha_sigma(logsnr))
            eps = eps + classifier_scale * sigma * grad
            x_hat = (z - sigma * eps) / alpha
        return x_hat, eps


def think(model: StarLDM, state: PrefixState, *, steps: int = 50, sampler: str = "ddpm", cfg_scale: float = 1.0,
          logsnr_shift: float = 2 * math.log(3), guidance=None, generator: torch.Generator | None = None,
          cached: bool = True, graphs: bool | None = None) -> torch.Tensor:
    """Standardised plans (B, D) for the cached prefixes by ``steps`` denoising steps (not yet projected).
    ``graphs``: replay each step from a CUDA graph (:class:`StepGraph`); None = on GPUs, for cached thoughts without
    classifier-free guidance (where every row is conditional); True off a GPU runs the static-buffer step eagerly."""
    if graphs is None:
        graphs = state.ids.device.type == "cuda"
    graph = step_graph(model, state) if graphs and cached and cfg_scale == 1.0 else None
    diffusion = StarDiffusion(ThoughtDenoiser(model, state, cached, graph), logsnr_shift=logsnr_shift)
    B, D = len(state), model.head.proj_out.out_features
    labels = torch.ones(B, dtype=torch.long, device=state.ids.device)
    x = diffusion.sample((B, 1, D), labels, steps=steps, sampler=sampler, guidance_scale=cfg_scale,
                         generator=generator, classifier=guidance, classifier_scale=1.0 if guidance is not None else 0.0)
    return x[:, 0].float()


# ----------------------------------------------------------------------------- control on the noisy plan


class NoisyAttribute(nn.Module):
    """p(class | z_t, λ): Linear D -> width, residual FiLM blocks conditioned on λ, a linear read-out."""

    def __init__(self, name: str, classes: list[str], plan_dim: int, width: int = 384, blocks: int = 4):
        super().__init__()
        self.name, self.classes = name, list(classes)
        self.proj_in = nn.Linear(plan_dim, width)
        self.time_mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.SiLU(), nn.Linear(2 * width, width))
        self.blocks = nn.ModuleList(FiLMResBlock(width, width) for _ in range(blocks))
        self.ln_out = nn.LayerNorm(width)
        self.out = nn.Linear(width, len(classes))

    def index(self, value: str) -> int:
        if value not in self.classes:
            raise KeyError(value)
        return self.classes.index(value)

    def forward(self, z, logsnr):
        cond = self.time_mlp(timestep_embedding(logsnr, self.out.in_features, max_period=1_000.0))
        h = self.proj_in(z)
        for block in self.blocks:
            h = block(h, cond)
        return self.out(self.ln_out(h)).float()


class NoisyGuidance(nn.Module):
    """Σ_a scale_a · (−log p_a(target_a | z_t, λ)) per row of z_t (B, D): the loss whose gradient steers a thought."""

    def __init__(self, terms: list[tuple[NoisyAttribute, torch.Tensor | int, float]]):
        super().__init__()
        self.attributes = nn.ModuleList(a for a, _, _ in terms)
        self.targets = [torch.as_tensor(t, dtype=torch.long) for _, t, _ in terms]
        self.scales = [float(s) for _, _, s in terms]

    def forward(self, z, logsnr):
        loss = torch.zeros(len(z), device=z.device)
        for attribute, target, scale in zip(self.attributes, self.targets, self.scales):
            t = target.to(z.device).expand(len(z)) if target.dim() == 0 else target.to(z.device)
            loss = loss - scale * F.log_softmax(attribute(z, logsnr), -1).gather(1, t[:, None])[:, 0]
        return loss
