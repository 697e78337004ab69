"""Where models run: one resolver for every flow's ``device`` setting (imports only torch and our errors,
so code that trains on a bare GPU box can use it)."""

from __future__ import annotations

import torch

from schemas.errors import UserInputError


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or None): the first CUDA GPU when PyTorch sees one, else the CPU; otherwise the named device."""
    if isinstance(name, torch.device):
        return name
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserInputError(f"device {name!r}: not a torch device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError(f"device {name!r}: PyTorch sees no CUDA GPU here; use device auto or cpu")
    return device


def device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device
