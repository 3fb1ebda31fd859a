"""Weight-only fp8 (``float8_e4m3fn``) for the transformer's linear layers.

Each weight is stored in fp8 with one float32 scale per output row and widened to the compute
dtype inside the matmul: about half the weight memory of bf16 (the 14B Krea model in < 40 GB)
for a small per-call cost. Activations stay in the compute dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


class Fp8Linear(torch.nn.Module):
    def __init__(self, linear: torch.nn.Linear, compute_dtype: torch.dtype) -> None:
        super().__init__()
        w = linear.weight.data.float()
        scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / FP8_MAX
        self.weight: torch.Tensor
        self.scale: torch.Tensor
        self.register_buffer("weight", (w / scale).to(FP8))
        self.register_buffer("scale", scale)
        self.bias = linear.bias
        self.compute_dtype = compute_dtype
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = (self.weight.to(torch.float32) * self.scale).to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return F.linear(x.to(self.compute_dtype), w, bias)


def quantize_linears(module: torch.nn.Module, compute_dtype: torch.dtype) -> int:
    """Replace every ``nn.Linear`` under ``module`` by an :class:`Fp8Linear`; returns how many."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.Linear):
            setattr(module, name, Fp8Linear(child, compute_dtype))
            count += 1
        else:
            count += quantize_linears(child, compute_dtype)
    return count
