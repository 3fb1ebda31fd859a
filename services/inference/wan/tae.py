"""TAEHV's tiny autoencoder for the Wan 2.1 latent space, streamed: ``vae_type`` ``tae`` and
``lighttae``.

The network (madebyollin/taehv's ``taew2_1.pth``; LightX2V's ``lighttaew2_1.pth`` holds other
weights for the same network) is made of 2D convolutions over single frames. Time enters in three
kinds of layer only:

* a **memory block** sees each frame's input beside the input of the frame before it, at the same
  depth (zeros before the first frame): causal, one frame back;
* a **time pool** (encoder) stacks ``stride`` consecutive frames along the channels and mixes
  them with a 1×1 convolution: twice stride 2, so four frames make one latent;
* a **time grow** (decoder) does the opposite: a 1×1 convolution to ``stride`` times the
  channels, split into ``stride`` frames: one latent makes four frames.

So a stream needs, per memory block, only the last frame that entered it: :class:`TaeStream`
keeps those (``memory``) for each session and runs every new block of frames or latents through
the network in one batch, the block's first frame looking back at the memory. A block decoded
this way equals the same latents decoded in one call, as long as each encoder call brings whole
groups of four frames (a call with fewer is padded, below).

Frame counts, as Scope uses it (scope:wan2_1/vae/tae.py): decoding ``n`` latents makes ``4·n``
frames, and a stream drops its first three, so a stream's first block of ``n`` latents gives
``4·n − 3`` frames and every later one ``4·n``, the Wan VAE's counts. Encoding pads each call to
a multiple of four frames by repeating its last frame, so a stream's first block of ``1 + 4·k``
frames gives ``k + 1`` latents and every later ``4·k`` frames ``k`` latents, again the Wan VAE's.

Latents: ``taew2_1`` works on the latents the diffusion model sees, Wan's normalised ones
(``(z − mean) / std``): the original's diffusers example gives it the pipeline's latents with
``latents_mean = 0, latents_std = 1``; ``lighttaew2_1`` works on the Wan VAE's raw latents, so
its stream converts on the way in and out (Scope's ``use_lighttae``). RGB is ``[0, 1]`` inside
the network and ``[-1, 1]`` at :class:`TaeStream`'s edges, as :class:`~.vae.VaeStream`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

Tensor = torch.Tensor

LATENT_CHANNELS = 16
#: Frames per latent, and how many a stream's first decoded latent gives fewer.
TIME_SCALE = 4
STARTUP_FRAMES = TIME_SCALE - 1
SPACE_SCALE = 8

#: The Wan 2.1 VAE's per-channel latent statistics (its config's ``latents_mean`` and
#: ``latents_std``): ``lighttae`` converts between the normalised latents and its raw ones.
WAN_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


# ---------------------------------------------------------------- layers
#
# Every layer takes and returns ``[B, T, C, H, W]``. Attribute names and positions in the two
# ``nn.Sequential`` stacks are the checkpoint's key names (``decoder.3.conv.0.weight``).


def _conv3x3(n_in: int, n_out: int, *, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=bias)


class Framewise(nn.Module):
    """A 2D layer applied to every frame on its own."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x.flatten(0, 1)).unflatten(0, x.shape[:2])


class Conv(nn.Conv2d):
    """A 3×3 (padded) convolution per frame; the checkpoint keys its weight directly."""

    def __init__(self, n_in: int, n_out: int, *, stride: int = 1, bias: bool = True) -> None:
        super().__init__(n_in, n_out, 3, stride=stride, padding=1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.flatten(0, 1)).unflatten(0, x.shape[:2])


class SoftClamp(nn.Module):
    """``3·tanh(x / 3)``: keeps the decoder's input within ±3."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x / 3.0) * 3.0


class MemoryBlock(nn.Module):
    """``relu(convs([x_t, x_{t−1}]) + x_t)``: each frame beside the one before it.

    ``forward`` takes the block's frames and the frame before the first (``before``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            _conv3x3(2 * channels, channels),
            nn.ReLU(),
            _conv3x3(channels, channels),
            nn.ReLU(),
            _conv3x3(channels, channels),
        )

    def forward(self, x: Tensor, before: Tensor) -> Tensor:
        past = torch.cat([before, x[:, :-1]], dim=1)
        both = torch.cat([x, past], dim=2).flatten(0, 1)
        out = self.conv(both).unflatten(0, x.shape[:2])
        return torch.relu(out + x)


class TimePool(nn.Module):
    """``stride`` consecutive frames -> one: stacked along the channels, mixed by a 1×1 conv."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels * stride, channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c, h, w = x.shape
        if t % self.stride:
            raise ValueError(f"time pool: {t} frames is not a multiple of {self.stride}")
        stacked = x.reshape(b * (t // self.stride), self.stride * c, h, w)
        return self.conv(stacked).unflatten(0, (b, t // self.stride))


class TimeGrow(nn.Module):
    """One frame -> ``stride``: a 1×1 conv to ``stride`` times the channels, split in time."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels, channels * stride, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c, h, w = x.shape
        grown = self.conv(x.flatten(0, 1))
        return grown.reshape(b, t * self.stride, c, h, w)


def _encoder() -> nn.Sequential:
    """RGB frames -> latents: three stages of (time pool, strided conv, three memory blocks);
    the first two pools halve time, the last keeps it."""
    layers: list[nn.Module] = [Conv(3, 64), Framewise(nn.ReLU())]
    for stride in (2, 2, 1):
        layers += [TimePool(64, stride), Conv(64, 64, stride=2, bias=False)]
        layers += [MemoryBlock(64) for _ in range(3)]
    layers.append(Conv(64, LATENT_CHANNELS))
    return nn.Sequential(*layers)


def _decoder() -> nn.Sequential:
    """Latents -> RGB frames: three stages of (three memory blocks, ×2 nearest upsampling, time
    grow, conv to the next width); the first grow keeps time, the next two double it."""
    widths = (256, 128, 64, 64)
    layers: list[nn.Module] = [SoftClamp(), Conv(LATENT_CHANNELS, widths[0]), Framewise(nn.ReLU())]
    for stage, stride in enumerate((1, 2, 2)):
        width, following = widths[stage], widths[stage + 1]
        layers += [MemoryBlock(width) for _ in range(3)]
        layers += [Framewise(nn.Upsample(scale_factor=2)), TimeGrow(width, stride)]
        layers.append(Conv(width, following, bias=False))
    layers += [Framewise(nn.ReLU()), Conv(widths[3], 3)]
    return nn.Sequential(*layers)


def run(net: nn.Sequential, x: Tensor, memory: list[Tensor | None]) -> Tensor:
    """``x`` ``[B, T, C, H, W]`` through ``net``; ``memory`` holds, per layer, the last frame
    that entered each memory block (None: the stream starts here) and is updated in place."""
    for i, layer in enumerate(net):
        if isinstance(layer, MemoryBlock):
            before = memory[i]
            if before is None:
                before = torch.zeros_like(x[:, :1])
            memory[i] = x[:, -1:].clone()  # a copy: a view would keep the whole block alive
            x = layer(x, before)
        else:
            x = layer(x)
    return x


class TinyAutoencoder(nn.Module):
    """The network, with the original checkpoint's key names (``encoder.N…``, ``decoder.N…``)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = _encoder()
        self.decoder = _decoder()

    @classmethod
    def load(cls, path: Path, dtype: torch.dtype, device: torch.device) -> TinyAutoencoder:
        """Read a checkpoint (the original's ``.pth`` state dict, or its ``.safetensors``);
        every key must fit, or the error names the file and what does not."""
        from services.inference.wan.convert import read_checkpoint

        state = read_checkpoint(path)
        model = cls()
        own = model.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or wrong:
            raise ValueError(
                f"{path} is not a Wan 2.1 TAEHV checkpoint: missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}, wrong shapes {wrong[:3]}"
            )
        model.load_state_dict(state)
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


@dataclass(eq=False)
class TaeStream:
    """One session's encoder and decoder memories; :class:`~.vae.VaeStream`'s interface.

    ``raw_latents``: the weights work on the Wan VAE's raw latents (``lighttae``)."""

    model: TinyAutoencoder
    raw_latents: bool = False
    enc_memory: list[Tensor | None] = field(default_factory=list)
    dec_memory: list[Tensor | None] = field(default_factory=list)
    decoded_latents: int = 0

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.enc_memory = [None] * len(self.model.encoder)
        self.dec_memory = [None] * len(self.model.decoder)
        self.decoded_latents = 0

    def _stats(self, z: Tensor) -> tuple[Tensor, Tensor]:
        def column(values: tuple[float, ...]) -> Tensor:
            return torch.tensor(values, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)

        return column(WAN_LATENTS_MEAN), column(WAN_LATENTS_STD)

    @torch.inference_mode()
    def encode(self, video: Tensor) -> Tensor:
        """``[B, 3, T, H, W]`` in [-1, 1] -> normalised latents ``[B, 16, ⌈T/4⌉, H/8, W/8]``;
        a call whose frames are not a multiple of four is padded with its last frame."""
        x = video.to(self.model.dtype).add(1.0).div(2.0).transpose(1, 2)
        short = -x.shape[1] % TIME_SCALE
        if short:
            x = torch.cat([x, x[:, -1:].expand(-1, short, -1, -1, -1)], dim=1)
        z = run(self.model.encoder, x, self.enc_memory).transpose(1, 2).float()
        if self.raw_latents:
            mean, std = self._stats(z)
            z = (z - mean) / std
        return z

    @torch.inference_mode()
    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents ``[B, 16, F, h, w]`` -> video ``[B, 3, T, 8h, 8w]`` in [-1, 1]:
        ``T = 4·F``, less three at the stream's start."""
        z = latents.float()
        if self.raw_latents:
            mean, std = self._stats(z)
            z = z * std + mean
        x = run(self.model.decoder, z.to(self.model.dtype).transpose(1, 2), self.dec_memory)
        if self.decoded_latents == 0:
            x = x[:, STARTUP_FRAMES:]
        self.decoded_latents += latents.shape[2]
        return x.transpose(1, 2).clamp(0.0, 1.0).mul(2.0).sub(1.0)
