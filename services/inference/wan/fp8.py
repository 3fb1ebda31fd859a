"""fp8 (``float8_e4m3fn``) for the transformer's linear layers, through torchao.

On a GPU with fp8 tensor cores (compute capability 8.9 and up: Ada, Hopper, Blackwell) the
layers run fp8 matmuls (torchao's dynamic fp8 activations with per-row fp8 weights, via
``torch._scaled_mm``): half the weight memory of bf16, so Krea's 14B fits in < 40 GB, and
faster matmuls. Elsewhere the weights are stored in fp8 and torchao widens them in its kernel
(weight-only): the memory saving without the speed.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def fp8_matmuls_available(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def quantize_linears(module: torch.nn.Module, device: torch.device) -> str:
    """Quantize every ``nn.Linear`` under ``module`` in place; says which fp8 it chose."""
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8WeightOnlyConfig,
        PerRow,
        quantize_,
    )

    if fp8_matmuls_available(device):
        quantize_(module, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
        kind = "fp8 matmuls (dynamic fp8 activations, per-row fp8 weights)"
    else:
        quantize_(module, Float8WeightOnlyConfig())
        kind = "fp8 weights, widened in the matmul (no fp8 tensor cores here)"
    logger.info("quantized the transformer: %s", kind)
    return kind
