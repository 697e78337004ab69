"""DGLM's plan prior and plug-and-play control: a v-prediction diffusion model over the plan, conditioned on the
prefix's sentence embedding, steered by linear attribute classifiers on the plan space.

- ``PlanDenoiser``: a FiLM residual MLP (the CPU-scale stand-in for the reference's 12-layer transformer) on the
  noisy plan, conditioned on noise level and prefix embedding. The prefix embedding is the only prefix information
  the prior gets. An all-zero condition is the null condition of classifier-free guidance (a real embedding has
  unit norm), replaced by a learned vector.
- ``PlanDiffusion``: the LD4LG schedule, EMA and DDPM/DDIM samplers of :class:`models.diffusion.LatentDiffusion`
  with the condition dropped in training (CFG) and DGLM's classifier guidance: ε̂ ← ε̂ + s·σ_t·∇_{z_t} L(x̂₀(z_t)),
  the gradient taken through the denoiser.
- ``LinearAttribute``: a logistic regression (softmax over classes) on unit-norm embeddings.
- ``PlanGuidance``: the guidance loss of any number of attributes, summed with a scale each:
  L_a = −log mean_s p_a(target | normalise(unstandardise(x₀ˢ))), x₀ˢ ~ N(x̂₀, σ²/α²·I) (s = 1..S), a Monte-Carlo
  estimate of −log p(target | z_t) under a Gaussian posterior (the reference takes a log-mean-exp over posterior
  samples too). At high noise the samples scatter and the gradient fades by itself.

Shapes: plans (B, 1, D) inside the diffusion model (the latent layout of ``LatentDiffusion``), conditions (B, D_c).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.diffusion import LatentDiffusion, alpha_sigma, timestep_embedding
from models.plan_lm import PlanSpace


class FiLMResBlock(nn.Module):
    """x + MLP(FiLM(LN(x), cond)), the FiLM projection zero-initialised."""

    def __init__(self, width: int, d_cond: int):
        super().__init__()
        self.ln = nn.LayerNorm(width, elementwise_affine=False)
        self.film = nn.Linear(d_cond, 2 * width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.SiLU(), nn.Linear(2 * width, width))
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, x, cond):
        scale, shift = self.film(cond).chunk(2, dim=-1)
        return x + self.mlp(self.ln(x) * (1 + scale) + shift)


class PlanDenoiser(nn.Module):
    """v̂ (B, 1, D) of a noisy plan z (B, 1, D) at log-SNR λ (B,) given the prefix embedding (B, D_c)."""

    def __init__(self, plan_dim: int, cond_dim: int, width: int, blocks: int):
        super().__init__()
        self.plan_in = nn.Linear(plan_dim, width)
        self.cond_in = nn.Linear(cond_dim, width)
        self.null_cond = nn.Parameter(torch.zeros(width))
        self.time_mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.SiLU(), nn.Linear(2 * width, width))
        self.blocks = nn.ModuleList(FiLMResBlock(width, width) for _ in range(blocks))
        self.ln_out = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, plan_dim)
        nn.init.zeros_(self.proj_out.weight)  # start by predicting v = 0
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, z, logsnr, cond, x_self_cond=None):  # no self-conditioning (as the reference)
        null = (cond == 0).all(dim=-1, keepdim=True)
        c = torch.where(null, self.null_cond.to(cond.dtype), self.cond_in(cond))
        emb = self.time_mlp(timestep_embedding(logsnr, self.null_cond.shape[0], max_period=1_000.0)) + c
        h = self.plan_in(z[:, 0]) + c
        for block in self.blocks:
            h = block(h, emb)
        return self.proj_out(self.ln_out(h))[:, None].float()


class PlanDiffusion(LatentDiffusion):
    """The plan prior: ``LatentDiffusion``'s schedule and samplers; labels are prefix embeddings (zeros: none)."""

    def loss(self, x, cond, *, cond_dropout: float = 0.1, generator: torch.Generator | None = None, **_):
        """v-MSE on clean plans ``x`` (B, 1, D) given prefix embeddings ``cond`` (B, D_c), each condition
        dropped to the null one with probability ``cond_dropout``."""
        B = x.shape[0]
        t = torch.rand(B, generator=generator, device=x.device)
        eps = torch.randn(x.shape, generator=generator, device=x.device)
        logsnr = self.logsnr(t)
        alpha, sigma = (s[:, None, None] for s in alpha_sigma(logsnr))
        drop = torch.rand(B, generator=generator, device=x.device) < cond_dropout
        cond = torch.where(drop[:, None], torch.zeros_like(cond), cond)
        v = self.denoiser(alpha * x + sigma * eps, logsnr, cond)
        return F.mse_loss(v, alpha * eps - sigma * x)

    def guided_predict(self, z, logsnr, cond, x_self_cond, guidance_scale: float, classifier=None,
                       classifier_scale: float = 0.0, target=None):
        """(x̂, ε̂) with classifier-free guidance ``guidance_scale`` (1: conditional, 0: unconditional) and, when
        ``classifier`` (a :class:`PlanGuidance`, or any ``f(x̂, λ) -> loss per row``) is given, its gradient with
        respect to z_t through the denoiser, times ``classifier_scale``."""
        steer = classifier is not None and classifier_scale > 0
        alpha, sigma = (s[:, None, None] for s in alpha_sigma(logsnr))
        with torch.enable_grad() if steer else contextlib.nullcontext():
            zg = z.detach().requires_grad_(steer)
            if guidance_scale == 1.0:
                eps = self.predict(zg, logsnr, cond)[1]
            elif guidance_scale == 0.0:
                eps = self.predict(zg, logsnr, torch.zeros_like(cond))[1]
            else:
                both = self.predict(torch.cat([zg, zg]), torch.cat([logsnr, logsnr]),
                                    torch.cat([cond, torch.zeros_like(cond)]))[1]
                eps_c, eps_u = both.chunk(2)
                eps = eps_u + guidance_scale * (eps_c - eps_u)
            x_hat = (zg - sigma * eps) / alpha
            if steer:
                grad = torch.autograd.grad(classifier(x_hat, logsnr).sum(), zg)[0]
        if steer:
            eps = eps.detach() + classifier_scale * sigma * grad
            x_hat = (z - sigma * eps) / alpha
        return x_hat.detach(), eps.detach()


class LinearAttribute(nn.Module):
    """p(class | e) = softmax(W e + b) on unit-norm sentence embeddings e (a logistic regression)."""

    def __init__(self, name: str, classes: list[str], weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.name, self.classes = name, list(classes)
        self.register_buffer("weight", torch.as_tensor(weight, dtype=torch.float32))  # (C, D)
        self.register_buffer("bias", torch.as_tensor(bias, dtype=torch.float32))  # (C,)

    @classmethod
    def from_sklearn(cls, name: str, model) -> "LinearAttribute":
        """From a fitted ``sklearn.linear_model.LogisticRegression`` (a binary one becomes two classes, logits 0 and
        w·e + b, the same probabilities)."""
        w, b = torch.as_tensor(model.coef_), torch.as_tensor(model.intercept_)
        if len(model.classes_) == 2 and w.shape[0] == 1:
            w, b = torch.cat([torch.zeros_like(w), w]), torch.cat([torch.zeros_like(b), b])
        return cls(name, [str(c) for c in model.classes_], w, b)

    def index(self, value: str) -> int:
        if value not in self.classes:
            raise KeyError(value)
        return self.classes.index(value)

    def forward(self, e):
        return e @ self.weight.T + self.bias

    def log_prob(self, e, target: torch.Tensor):
        """log p(target | e) for e (..., D) and targets broadcastable to e's leading shape."""
        return self.target_log_prob(self(e), target)

    @staticmethod
    def target_log_prob(logits, target: torch.Tensor):
        """log softmax(logits)[target] for logits (..., C) and targets broadcastable to their leading shape."""
        return F.log_softmax(logits, dim=-1).gather(-1, target.expand(logits.shape[:-1])[..., None])[..., 0]


class PlanGuidance(nn.Module):
    """Σ_a scale_a · L_a(x̂₀): the guidance loss per row of standardised plan estimates x̂₀ (B, 1, D) at log-SNR λ."""

    def __init__(self, space: PlanSpace, terms: list[tuple[LinearAttribute, torch.Tensor | int, float]], *,
                 samples: int = 32, generator: torch.Generator | None = None):
        super().__init__()
        self.space, self.samples, self.generator = space, samples, generator
        self.attributes = nn.ModuleList(a for a, _, _ in terms)
        self.targets = [torch.as_tensor(t, dtype=torch.long) for _, t, _ in terms]  # () or (B,)
        self.scales = [float(s) for _, _, s in terms]

    def forward(self, x_hat, logsnr):
        """The posterior samples x₀ = x̂₀ + (σ/α)·n_s, s = 1..S, share their S draws n_s across the rows of the batch
        (each row's estimate has the distribution of independent draws), and the linear classifiers are read in closed
        form: with u = unstandardise(x̂₀) and c_s = std ∘ n_s, the sample's embedding is (u + r·c_s) / |u + r·c_s|, so
        W·e_s = (W·u + r·W·c_s) / sqrt(|u|² + 2r·u·c_s + r²·|c_s|²). Nothing of size (B, S, D) is made, and the draws
        are S·D numbers per step instead of B·S·D: the same loss as normalising every sample, at a fraction of the cost."""
        device = x_hat.device
        with torch.autocast(device.type, enabled=False):
            alpha, sigma = alpha_sigma(logsnr.float())
            r = (sigma / alpha)[:, None]  # (B, 1)
            std, mean = self.space.std.to(device), self.space.mean.to(device)
            u = x_hat[:, 0].float() * std + mean  # (B, D)
            c = torch.randn((self.samples, x_hat.shape[-1]), generator=self.generator, device=device) * std  # (S, D)
            sq = (u * u).sum(-1, keepdim=True) + 2 * r * (u @ c.T) + r * r * (c * c).sum(-1)  # (B, S)
            norm = sq.clamp_min(1e-24).sqrt()[..., None]
            loss = torch.zeros(len(u), device=device)
            for attribute, target, scale in zip(self.attributes, self.targets, self.scales):
                w, b = attribute.weight, attribute.bias
                logits = ((u @ w.T)[:, None] + r[..., None] * (c @ w.T)[None]) / norm + b  # (B, S, C)
                t = target.to(device).reshape(-1, 1) if target.dim() else target.to(device)
                log_p = attribute.target_log_prob(logits, t)  # (B, S)
                loss = loss - scale * (torch.logsumexp(log_p, dim=1) - math.log(self.samples))
        return loss

    @torch.no_grad()
    def probabilities(self, x) -> list[torch.Tensor]:
        """p_a(target_a | plan) of clean standardised plans x (B, 1, D) or (B, D), one tensor (B,) per attribute."""
        e = self.space.embedding(x.reshape(x.shape[0], -1))
        out = []
        for attribute, target in zip(self.attributes, self.targets):
            t = target.to(e.device).expand(e.shape[0]) if target.dim() == 0 else target.to(e.device)
            out.append(attribute.log_prob(e, t).exp())
        return out
