"""Latent diffusion over autoencoder latents (LD4LG): the denoiser, the noise schedule, the samplers.

- Forward process: z_t = α_t·x + σ_t·ε with α_t² = sigmoid(λ_t), σ_t² = sigmoid(-λ_t), and the cosine
  schedule in λ form, λ(t) = -2·log tan(π t / 2) (+ shift), clipped to [logsnr_min, logsnr_max].
- The denoiser predicts v = α_t·ε − σ_t·x (v-prediction); then x̂ = α_t·z − σ_t·v̂ and ε̂ = σ_t·z + α_t·v̂.
- Self-conditioning: the denoiser also sees its own x̂ from the previous sampling step (zeros at the
  first), and in training half of the time an x̂ from a no-grad first pass.
- Classes: label ``num_classes`` is "no class"; training drops labels to it (classifier-free guidance).
- Samplers: DDPM (ancestral) and DDIM (deterministic, η = 0) on a uniform time grid from t=1 to t=0;
  optional gradient guidance from a classifier on noisy latents (DGLM-style attribute steering).

Shapes: latents (B, L, k); t in [0, 1] of shape (B,); labels (B,) long.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.autoencoder import Block


# ----------------------------------------------------------------------------- schedule


def logsnr_cosine(t, logsnr_min: float = -15.0, logsnr_max: float = 15.0, shift: float = 0.0):
    """λ(t) of the cosine schedule, -2·log tan(π t / 2), clipped to [logsnr_min, logsnr_max] by
    reparametrising t (λ(0) = logsnr_max, λ(1) = logsnr_min), plus ``shift``."""
    b = math.atan(math.exp(-0.5 * logsnr_max))
    a = math.atan(math.exp(-0.5 * logsnr_min)) - b
    return -2.0 * torch.log(torch.tan(a * t + b)) + shift


def alpha_sigma(logsnr):
    """(α, σ) with α² = sigmoid(λ) and σ² = sigmoid(−λ)."""
    return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()


def timestep_embedding(x, dim: int, max_period: float = 10_000.0):
    """Sinusoidal features (B, dim) of a scalar per example (B,)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device, dtype=torch.float32) / half)
    args = x.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


# ----------------------------------------------------------------------------- denoiser


class Denoiser(nn.Module):
    """Pre-LN transformer over the L latent vectors, predicting v.

    Noise level (λ, as sinusoidal features through an MLP) and class embedding are added to every
    position; layer i of the second half receives the output of layer (n-1-i) of the first half through
    a dense skip connection (concatenation + linear), as in U-Net / U-ViT.
    """

    def __init__(self, latent_dim: int, num_latents: int, width: int, layers: int, heads: int, num_classes: int):
        super().__init__()
        self.latent_dim, self.num_classes = latent_dim, num_classes
        self.proj_in = nn.Linear(2 * latent_dim, width)  # [z_t, self-conditioning x̂]
        self.pos = nn.Parameter(torch.randn(num_latents, width) * 0.02)
        self.time_mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.SiLU(), nn.Linear(4 * width, width))
        self.class_emb = nn.Embedding(num_classes + 1, width)  # the last is "no class"
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.skips = nn.ModuleList(nn.Linear(2 * width, width) for _ in range(layers // 2))
        self.ln_out = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, latent_dim)
        nn.init.zeros_(self.proj_out.weight)  # start by predicting v = 0
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, z, logsnr, labels, x_self_cond=None):
        if x_self_cond is None:
            x_self_cond = torch.zeros_like(z)
        cond = self.time_mlp(timestep_embedding(logsnr, self.pos.shape[1], max_period=1_000.0)) + self.class_emb(labels)
        h = self.proj_in(torch.cat([z, x_self_cond], dim=-1)) + self.pos + cond[:, None]
        n_skip = len(self.skips)
        saved = []
        for i, block in enumerate(self.blocks):
            j = i - (len(self.blocks) - n_skip)
            if j >= 0:
                h = self.skips[j](torch.cat([h, saved.pop()], dim=-1))
            h = block(h)
            if i < n_skip:
                saved.append(h)
        return self.proj_out(self.ln_out(h)).float()


class LatentDiffusion(nn.Module):
    """The denoiser with its schedule: training loss and samplers."""

    def __init__(self, denoiser: Denoiser, logsnr_min: float = -15.0, logsnr_max: float = 15.0, logsnr_shift: float = 0.0):
        super().__init__()
        self.denoiser = denoiser
        self.logsnr_min, self.logsnr_max, self.logsnr_shift = logsnr_min, logsnr_max, logsnr_shift

    @property
    def null_class(self) -> int:
        return self.denoiser.num_classes

    def logsnr(self, t):
        return logsnr_cosine(t, self.logsnr_min, self.logsnr_max, self.logsnr_shift)

    def predict(self, z, logsnr, labels, x_self_cond=None):
        """(x̂, ε̂, v̂) at noisy latents ``z``."""
        v = self.denoiser(z, logsnr, labels, x_self_cond)
        alpha, sigma = (s[:, None, None] for s in alpha_sigma(logsnr))
        return alpha * z - sigma * v, sigma * z + alpha * v, v

    def loss(self, x, labels, *, self_condition_p: float = 0.5, class_dropout: float = 0.1,
             generator: torch.Generator | None = None):
        """Mean squared error of v̂ on a batch of clean latents ``x`` (labels: class ids or the null class)."""
        B = x.shape[0]
        t = torch.rand(B, generator=generator, device=x.device)
        eps = torch.randn(x.shape, generator=generator, device=x.device)
        logsnr = self.logsnr(t)
        alpha, sigma = (s[:, None, None] for s in alpha_sigma(logsnr))
        z = alpha * x + sigma * eps
        drop = torch.rand(B, generator=generator, device=x.device) < class_dropout
        labels = torch.where(drop, torch.full_like(labels, self.null_class), labels)
        x_self_cond = None
        if torch.rand((), generator=generator, device=x.device).item() < self_condition_p:
            with torch.no_grad():
                x_self_cond = self.predict(z, logsnr, labels)[0].detach()
        v_pred = self.denoiser(z, logsnr, labels, x_self_cond)
        return F.mse_loss(v_pred, alpha * eps - sigma * x)

    def guided_predict(self, z, logsnr, labels, x_self_cond, guidance_scale: float,
                       classifier: Callable | None = None, classifier_scale: float = 0.0, target=None):
        """(x̂, ε̂) with classifier-free guidance (w = guidance_scale; 1 = conditional only, 0 = unconditional)
        and, when given, gradient guidance toward ``target`` by ``classifier(z, logsnr) -> logits``."""
        null = torch.full_like(labels, self.null_class)
        if guidance_scale == 1.0 or bool((labels == null).all()):
            x_hat, eps, _ = self.predict(z, logsnr, labels, x_self_cond)
        elif guidance_scale == 0.0:
            x_hat, eps, _ = self.predict(z, logsnr, null, x_self_cond)
        else:
            both = self.predict(torch.cat([z, z]), torch.cat([logsnr, logsnr]), torch.cat([labels, null]),
                                None if x_self_cond is None else torch.cat([x_self_cond, x_self_cond]))[1]
            eps_c, eps_u = both.chunk(2)
            eps = eps_u + guidance_scale * (eps_c - eps_u)
            alpha, sigma = (s[:, None, None] for s in alpha_sigma(logsnr))
            x_hat = (z - sigma * eps) / alpha
        if classifier is not None and classifier_scale > 0:
            with torch.enable_grad():
                zg = z.detach().requires_grad_(True)
                log_p = F.log_softmax(classifier(zg, logsnr).float(), dim=-1).gather(1, target[:, None]).sum()
                grad = torch.autograd.grad(log_p, zg)[0]
            alpha, sigma = (s[:, None, None] for s in alpha_sigma(logsnr))
            eps = eps - classifier_scale * sigma * grad  # ε̂ − σ∇log p(y|z): score of p(z|y)
            x_hat = (z - sigma * eps) / alpha
        return x_hat, eps

    @torch.no_grad()
    def sample(self, shape, labels, *, steps: int = 50, sampler: str = "ddim", guidance_scale: float = 1.0,
               generator: torch.Generator | None = None, classifier: Callable | None = None,
               classifier_scale: float = 0.0, target=None, clip_x: float | None = None):
        """Clean latents (B, L, k) from noise by ``steps`` DDPM or DDIM steps from t=1 to t=0."""
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"unknown sampler {sampler!r}")
        device = labels.device
        z = torch.randn(shape, generator=generator, device=device)
        ts = torch.linspace(1.0, 0.0, steps + 1, device=device)
        x_hat = None
        for i in range(steps):
            t, s = ts[i].expand(shape[0]), ts[i + 1].expand(shape[0])
            lt, ls = self.logsnr(t), self.logsnr(s)
            x_hat, eps = self.guided_predict(z, lt, labels, x_hat, guidance_scale, classifier, classifier_scale, target)
            if clip_x is not None:
                x_hat = x_hat.clamp(-clip_x, clip_x)
            a_t, s_t = (u[:, None, None] for u in alpha_sigma(lt))
            a_s, s_s = (u[:, None, None] for u in alpha_sigma(ls))
            if i == steps - 1:
                z = x_hat
            elif sampler == "ddim":
                eps = (z - a_t * x_hat) / s_t  # consistent with a clipped x̂
                z = a_s * x_hat + s_s * eps
            else:
                # posterior q(z_s | z_t, x̂): α_{t|s} = α_t/α_s, σ²_{t|s} = σ_t² − α_{t|s}² σ_s²
                a_ts = a_t / a_s
                var_ts = s_t ** 2 - a_ts ** 2 * s_s ** 2
                mean = a_ts * s_s ** 2 / s_t ** 2 * z + a_s * var_ts / s_t ** 2 * x_hat
                std = (var_ts * s_s ** 2 / s_t ** 2).clamp(min=0).sqrt()
                z = mean + std * torch.randn(shape, generator=generator, device=device)
        return z


class LatentClassifier(nn.Module):
    """p(class | z_t, λ): a small transformer on noisy latents, for gradient guidance (DGLM idea)."""

    def __init__(self, latent_dim: int, num_latents: int, width: int, layers: int, heads: int, num_classes: int):
        super().__init__()
        self.proj_in = nn.Linear(latent_dim, width)
        self.pos = nn.Parameter(torch.randn(num_latents, width) * 0.02)
        self.time_mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln_out = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, z, logsnr):
        h = self.proj_in(z) + self.pos + self.time_mlp(timestep_embedding(logsnr, self.pos.shape[1], 1_000.0))[:, None]
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_out(h).mean(dim=1)).float()


class EMA:
    """Exponential moving average of a module's weights, with the usual warm-up of the decay."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay, self.model = decay, copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1 - d)
