"""The causal Wan transformer: block-causal attention over a rolling per-session KV cache.

:class:`CausalWanTransformer` *is* diffusers' ``WanTransformer3DModel`` (same modules, same
parameter names, so the same checkpoints load) with a second forward, :meth:`forward_causal`,
that generates video autoregressively, one block of latent frames per call:

* **The cache window** (:class:`CacheWindow`): a block attends to itself and the cached frames,
  at most ``frames`` frames in all: the first ``sinks`` frames ever cached and the most recent
  ones. When a block does not fit, the oldest non-sink frames go (Scope's rolling caches)::

      cached   0 1 2 | 3 4 5 | 6 7 8 | 9 10 11 | 12 13 14     window 12, sinks 3
      seen by  x x x | . . . | x x x | x  x  x |  x  x  x     (block 12..14)

  Within a call every frame sees every other: a call is a block.
* **KV cache** (:class:`KVCache`): per layer, the keys (after RoPE) and values of the frames
  in the window; ``write=True`` replaces it by the window the call saw.
* **RoPE positions** are the caller's (``rope_start``): absolute frame indices for longlive and
  streamdiffusionv2, cache slots for Krea, which rebuilds its cache at positions 0-2 every block.
* **Per-frame timesteps**: ``timesteps`` is ``[B, F]``; modulation is per frame.
* **Cached cross-attention**: :meth:`cross_kv` turns a prompt embedding into per-layer keys and
  values once; the pipeline keeps them while the prompt stays.
* **Attention bias** (Krea's ``kv_cache_attention_bias``): ``log(bias)`` is added to the scores
  of cached keys, except the first cached frame (Scope's krea causal_model).
* Without a cache, :meth:`forward_causal` is one pass over a whole sequence, block-causal under
  a window when ``blocks`` is given: the reference the cached path must equal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel

Tensor = torch.Tensor
#: diffusers' model classes carry decorators mypy cannot follow: treat the base as dynamic.
_WanBase: Any = WanTransformer3DModel


@dataclass(frozen=True)
class CacheWindow:
    """What a block attends to, in latent frames (see the module doc)."""

    frames: int = -1  # <= 0: unbounded
    sinks: int = 0

    def keep(self, n: int) -> list[int] | None:
        """Which of ``n`` frames (oldest first) the window keeps; None: all of them."""
        if self.frames <= 0 or n <= self.frames:
            return None
        return list(range(self.sinks)) + list(range(n - (self.frames - self.sinks), n))

    def visible(self, block_frames: int, query_frames: Tensor, key_frames: Tensor) -> Tensor:
        """``[Q, K]`` bool for one pass over uniform blocks: may frame ``q`` see frame ``k``."""
        q = query_frames.view(-1, 1)
        k = key_frames.view(1, -1)
        block_end = (q // block_frames + 1) * block_frames
        ok = k < block_end
        if self.frames > 0:
            ok &= (k >= block_end - (self.frames - self.sinks)) | (k < self.sinks)
        return ok


@dataclass(eq=False)
class KVCache:
    """One session's self-attention cache: per layer ``(k, v)`` ``[B, tokens, heads, dim]``,
    and the RoPE position of each cached frame."""

    window: CacheWindow
    layers: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    resets: int = 0

    def reset(self) -> None:
        self.layers.clear()
        self.positions.clear()
        self.resets += 1

    def keep_first(self, n: int) -> None:
        """Drop all but the first ``n`` cached frames (longlive keeps its sinks on a recache)."""
        if self.layers:
            tokens = n * (self.layers[0][0].shape[1] // len(self.positions))
            self.layers = [(k[:, :tokens], v[:, :tokens]) for k, v in self.layers]
        self.positions = self.positions[:n]

    def __len__(self) -> int:
        return len(self.positions)


class CausalWanTransformer(_WanBase):
    """WanTransformer3DModel with a block-causal, KV-cached forward (see the module doc)."""

    #: The compiled per-layer step, once :meth:`compile_blocks` ran.
    _compiled_block: Any = None

    def compile_blocks(self, **options: Any) -> None:
        """``torch.compile`` the per-layer step. Regional compilation: every layer runs the same
        graph (the layer's weights are its inputs), so it compiles once rather than once per
        layer; shapes are dynamic because the cache grows block by block until the window is
        full (a few variants: with and without a cache or a mask)."""
        self._compiled_block = torch.compile(self._block, dynamic=True, **options)

    # ------------------------------------------------------------ pieces

    def _rope(self, frames: Tensor, pph: int, ppw: int) -> tuple[Tensor, Tensor]:
        """cos/sin ``[1, F*pph*ppw, 1, head_dim]`` at absolute frame positions ``frames``."""
        rope = self.rope
        sizes = [rope.t_dim, rope.h_dim, rope.w_dim]
        out = []
        for table in (rope.freqs_cos, rope.freqs_sin):
            t_part, h_part, w_part = table.split(sizes, dim=1)
            n = frames.numel()
            parts = (
                t_part[frames].view(n, 1, 1, -1).expand(n, pph, ppw, -1),
                h_part[:pph].view(1, pph, 1, -1).expand(n, pph, ppw, -1),
                w_part[:ppw].view(1, 1, ppw, -1).expand(n, pph, ppw, -1),
            )
            out.append(torch.cat(parts, dim=-1).reshape(1, n * pph * ppw, 1, -1))
        return out[0], out[1]

    @staticmethod
    def _apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        # Wan's rotary layout: channel pairs (0, 1), (2, 3), … rotate together.
        x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        c, s = cos[..., 0::2].float(), sin[..., 1::2].float()
        return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2).type_as(x)

    def cross_kv(self, context: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Prompt embedding ``[B, L, text_dim]`` -> per-layer cross-attention keys/values."""
        ctx = self.condition_embedder.text_embedder(context.to(self.dtype))
        out = []
        for block in self.blocks:
            attn = block.attn2
            k = attn.norm_k(attn.to_k(ctx)).unflatten(2, (attn.heads, -1))
            v = attn.to_v(ctx).unflatten(2, (attn.heads, -1))
            out.append((k, v))
        return out

    def _time(self, timesteps: Tensor) -> tuple[Tensor, Tensor]:
        """``[B, F]`` timesteps -> temb ``[B, F, D]`` and modulation ``[B, F, 6, D]``."""
        ce = self.condition_embedder
        b, f = timesteps.shape
        proj = ce.timesteps_proj(timesteps.flatten().float())
        weight_dtype = next(iter(ce.time_embedder.parameters())).dtype
        temb = ce.time_embedder(proj.to(weight_dtype))
        mod = ce.time_proj(ce.act_fn(temb))
        return temb.view(b, f, -1), mod.view(b, f, 6, -1)

    # ------------------------------------------------------------ the forward

    def forward_causal(
        self,
        latents: Tensor,
        timesteps: Tensor,
        cross: list[tuple[Tensor, Tensor]],
        *,
        cache: KVCache | None = None,
        rope_start: int = 0,
        write: bool = False,
        attention_bias: float = 1.0,
        blocks: tuple[int, CacheWindow] | None = None,
    ) -> Tensor:
        """Flow prediction for ``latents`` ``[B, C, F, H, W]`` at per-frame ``timesteps``, the
        frames at RoPE positions ``rope_start…``.

        With ``cache``: the frames are one block; they attend to the cached window and
        themselves, with ``log(attention_bias)`` on the cached keys but the first, and with
        ``write`` the window becomes the cache. Without: one pass over the whole sequence, with
        ``blocks = (block_frames, window)`` block-causal, else every frame sees every frame.
        """
        b, _, n_frames, height, width = latents.shape
        p_t, p_h, p_w = self.config.patch_size
        pph, ppw = height // p_h, width // p_w
        tokens_per_frame = pph * ppw
        n = n_frames // p_t
        positions = list(range(rope_start, rope_start + n))
        cos, sin = self._rope(torch.tensor(positions, device=latents.device), pph, ppw)

        x = self.patch_embedding(latents.to(self.dtype)).flatten(2).transpose(1, 2).contiguous()
        temb, mod = self._time(timesteps)

        keep: Tensor | None = None
        mask: Tensor | None = None
        slots: list[int] | None = None  # the window's frames of cache + block; None: all
        if cache is not None:
            cached = len(cache)
            slots = cache.window.keep(cached + n)
            if slots is not None:
                frame_keep = torch.tensor(slots, device=latents.device)
                keep = (
                    frame_keep.view(-1, 1) * tokens_per_frame
                    + torch.arange(tokens_per_frame, device=latents.device)
                ).flatten()
            seen = cached + n if slots is None else len(slots)
            past = seen - n  # cached frames in the window
            if attention_bias != 1.0 and past > 1:
                mask = torch.zeros(1, seen * tokens_per_frame, dtype=x.dtype, device=x.device)
                mask[:, tokens_per_frame : past * tokens_per_frame] = math.log(attention_bias)
        elif blocks is not None:
            block_frames, window = blocks
            frames = torch.arange(n, device=latents.device).repeat_interleave(tokens_per_frame)
            visible = window.visible(block_frames, frames, frames)
            mask = None if bool(visible.all()) else visible

        step = self._compiled_block or self._block
        windows: list[tuple[Tensor, Tensor]] = []
        for i, block in enumerate(self.blocks):
            past_kv = cache.layers[i] if cache is not None and cache.layers else None
            x, kv = step(block, x, mod, tokens_per_frame, (cos, sin), cross[i], past_kv, keep, mask)
            windows.append(kv)

        if cache is not None and write:
            cache.layers = windows
            all_positions = cache.positions + positions
            cache.positions = all_positions if slots is None else [all_positions[j] for j in slots]

        shift, scale = (self.scale_shift_table.view(1, 1, 2, -1) + temb.unsqueeze(2)).unbind(2)
        h = self.norm_out(x.float()).view(b, -1, tokens_per_frame, x.shape[-1])
        h = (h * (1 + scale.unsqueeze(2)) + shift.unsqueeze(2)).flatten(1, 2).type_as(x)
        h = self.proj_out(h)
        h = h.reshape(b, n, pph, ppw, p_t, p_h, p_w, -1)
        h = h.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return h.flatten(6, 7).flatten(4, 5).flatten(2, 3)

    def _block(
        self,
        block: Any,
        x: Tensor,
        mod: Tensor,
        tokens_per_frame: int,
        rope: tuple[Tensor, Tensor],
        cross: tuple[Tensor, Tensor],
        past: tuple[Tensor, Tensor] | None,
        keep: Tensor | None,
        mask: Tensor | None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """One transformer layer; returns the new ``x`` and the layer's keys/values in the
        window this call attended to (the cache after a write)."""
        b, n, d = x.shape
        e = (block.scale_shift_table.view(1, 1, 6, -1) + mod.float()).unsqueeze(2)
        shift, scale, gate, c_shift, c_scale, c_gate = e.unbind(3)  # [B, F, 1, D] each

        def per_frame(t: Tensor) -> Tensor:
            return t.view(b, -1, tokens_per_frame, d)

        def tokens(t: Tensor) -> Tensor:
            return t.reshape(b, n, d)

        # 1. Self-attention over the cache and this block.
        attn = block.attn1
        h = tokens(per_frame(block.norm1(x.float())) * (1 + scale) + shift).type_as(x)
        q = attn.norm_q(attn.to_q(h)).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(attn.to_k(h)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(h).unflatten(2, (attn.heads, -1))
        q = self._apply_rope(q, *rope)
        k = self._apply_rope(k, *rope)
        k_all, v_all = (
            (k, v) if past is None else (torch.cat([past[0], k], 1), torch.cat([past[1], v], 1))
        )
        if keep is not None:
            k_all, v_all = k_all[:, keep], v_all[:, keep]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k_all.transpose(1, 2), v_all.transpose(1, 2), attn_mask=mask
        )
        out = attn.to_out[0](out.transpose(1, 2).flatten(2).type_as(x))
        x = tokens(per_frame(x.float()) + per_frame(out.float()) * gate).type_as(x)

        # 2. Cross-attention to the (cached) prompt keys/values.
        attn2 = block.attn2
        h = block.norm2(x.float()).type_as(x)
        q = attn2.norm_q(attn2.to_q(h)).unflatten(2, (attn2.heads, -1))
        ck, cv = cross
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            ck.expand(b, -1, -1, -1).transpose(1, 2),
            cv.expand(b, -1, -1, -1).transpose(1, 2),
        )
        x = x + attn2.to_out[0](out.transpose(1, 2).flatten(2).type_as(x))

        # 3. Feed-forward.
        h = tokens(per_frame(block.norm3(x.float())) * (1 + c_scale) + c_shift).type_as(x)
        ff = block.ffn(h)
        x = tokens(per_frame(x.float()) + per_frame(ff.float()) * c_gate).type_as(x)
        return x, (k_all, v_all)
