"""Encode-time search: latents moved so that their quantized codes decode closer to the input.

An encoder maps its input in one pass and is trained through a straight-through estimate of
the quantizer, so it cannot tell which nearby code decodes better. Following the gradient of the
actual reconstruction error through the quantizer and decoder finds better codes for the same
weights and the same token format, at the price of a decoder forward and backward per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

# error(latents, target) -> per-item reconstruction error [B], differentiable in the latents
ErrorFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def search_latents(
    latents: torch.Tensor, target: torch.Tensor, error: ErrorFn, steps: int, lr: float
) -> torch.Tensor:
    """``steps`` Adam steps on a copy of latents [B, ...] against ``error``, the step size
    annealed by a cosine; each item keeps the latents of its lowest error seen (the start
    included), so the search never makes an item worse. Items do not interact: Adam is
    elementwise and each item's error depends on its own latents only. Runs under inference
    mode too; no weight receives a gradient."""
    with torch.inference_mode(False), torch.enable_grad():
        target = target.float().clone()  # an inference-mode tensor cannot enter autograd
        current = latents.float().clone().requires_grad_(True)
        best = current.detach().clone()
        best_error = torch.full((len(current),), math.inf, device=current.device)
        optimizer = torch.optim.Adam([current], lr=lr)
        item_shape = (-1, *[1] * (current.dim() - 1))
        for step in range(steps + 1):
            errors = error(current, target)
            improved = errors.detach() < best_error
            best_error = torch.where(improved, errors.detach(), best_error)
            best = torch.where(improved.view(item_shape), current.detach(), best)
            if step == steps:
                break
            (current.grad,) = torch.autograd.grad(errors.sum(), current)
            optimizer.param_groups[0]["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            optimizer.step()
    return best
