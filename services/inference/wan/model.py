"""The causal Wan transformer: block-causal attention over a rolling per-session KV cache.

:class:`CausalWanTransformer` *is* diffusers' ``WanTransformer3DModel`` (same modules, same
parameter names, so the same checkpoints load) with a second forward, :meth:`forward_causal`,
that generates video autoregressively in blocks of ``block_frames`` latent frames:

* **Block-causal self-attention.** Latent frame ``i`` sees frame ``j`` when ``j``'s block is
  not after ``i``'s, and ``j`` lies in the local window (the last ``local_attn_frames`` frames up
  to the end of ``i``'s block) or is a sink frame (``j < sink_frames``)::

      frames   0 1 2 | 3 4 5 | 6 7 8 | 9 10 11        block 3, window 6, sink 3
      seen by  x x x | . . . | x x x | x  x  x        (9..11: own block; 6..8: window; 0..2: sink)

  :class:`AttentionPolicy.visible` is the one definition; the full-sequence mask and what the
  cache keeps both derive from it, so cached generation equals one masked pass.
* **KV cache** (:class:`KVCache`): per layer, the keys (after RoPE) and values of earlier
  frames, trimmed after each write to what the next block can see.
* **RoPE at absolute frame positions**: a block starting at frame ``f`` uses temporal positions
  ``f, f+1, …``; the table is ``rope_max_seq_len`` long and :meth:`KVCache.overflows` tells the
  pipeline to reset before it runs out.
* **Per-frame timesteps**: ``timesteps`` is ``[B, F]``; modulation is per frame.
* **Cached cross-attention**: :meth:`cross_kv` turns a prompt embedding into per-layer keys and
  values once; the pipeline keeps them while the prompt stays.
* **Attention bias** (``kv_cache_attention_bias``): ``log(bias)`` is added to the scores of keys
  in earlier blocks, except the first frame (Krea Realtime Video's knob on past reliance).
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
class AttentionPolicy:
    """Which earlier frames a block attends to (all counts in latent frames)."""

    block_frames: int
    local_attn_frames: int = -1  # <= 0: unbounded
    sink_frames: int = 0
    attention_bias: float = 1.0  # 1.0: none

    def visible(self, query_frames: Tensor, key_frames: Tensor) -> Tensor:
        """``[Q, K]`` bool: may a token of frame ``query_frames[q]`` see frame ``key_frames[k]``."""
        q = query_frames.view(-1, 1)
        k = key_frames.view(1, -1)
        block_end = (q // self.block_frames + 1) * self.block_frames
        ok = k < block_end
        if self.local_attn_frames > 0:
            ok &= (k >= block_end - self.local_attn_frames) | (k < self.sink_frames)
        return ok

    def bias(self, query_frames: Tensor, key_frames: Tensor) -> Tensor | None:
        """``[Q, K]`` additive scores: ``log(bias)`` on past blocks' keys except frame 0."""
        if self.attention_bias == 1.0:
            return None
        q = query_frames.view(-1, 1)
        k = key_frames.view(1, -1)
        past = (k < (q // self.block_frames) * self.block_frames) & (k > 0)
        return past.float() * math.log(self.attention_bias)

    def mask(self, query_frames: Tensor, key_frames: Tensor, dtype: torch.dtype) -> Tensor | None:
        """The SDPA mask: None when everything is visible and unbiased (the fast path)."""
        ok = self.visible(query_frames, key_frames)
        bias = self.bias(query_frames, key_frames)
        if bias is None:
            return None if bool(ok.all()) else ok
        return bias.to(dtype).masked_fill(~ok, float("-inf"))

    def keep_for(self, next_block_start: int, frames: Tensor) -> Tensor:
        """Which cached frames a block starting at ``next_block_start`` can still see."""
        q = torch.tensor([next_block_start], device=frames.device)
        return self.visible(q, frames)[0]


@dataclass(eq=False)
class KVCache:
    """One session's self-attention cache: per layer ``(k, v)`` ``[B, tokens, heads, dim]``,
    and the absolute latent frame index of each cached frame."""

    policy: AttentionPolicy
    rope_frames: int
    layers: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    frames: list[int] = field(default_factory=list)
    next_frame: int = 0  # absolute index of the next frame to generate
    resets: int = 0

    def reset(self) -> None:
        self.layers.clear()
        self.frames.clear()
        self.next_frame = 0
        self.resets += 1

    def overflows(self, n_frames: int) -> bool:
        """Would ``n_frames`` more frames run past the RoPE table?"""
        return self.next_frame + n_frames > self.rope_frames

    def __len__(self) -> int:
        return len(self.frames)


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
        policy: AttentionPolicy,
        *,
        cache: KVCache | None = None,
        write: bool = False,
        start_frame: int | None = None,
    ) -> Tensor:
        """Flow prediction for ``latents`` ``[B, C, F, H, W]`` at per-frame ``timesteps``.

        Without ``cache``: one pass over the whole sequence (frames ``start_frame…``) with the
        block-causal mask. With ``cache``: the frames are the next ones after the cache (at
        ``cache.next_frame``), attend to the cache and themselves, and with ``write`` their
        keys/values join the cache (which is then trimmed to the next block's view).
        """
        b, _, n_frames, height, width = latents.shape
        p_t, p_h, p_w = self.config.patch_size
        pph, ppw = height // p_h, width // p_w
        tokens_per_frame = pph * ppw
        first = cache.next_frame if cache is not None else (start_frame or 0)
        frames = torch.arange(first, first + n_frames // p_t, device=latents.device)
        cos, sin = self._rope(frames, pph, ppw)

        x = self.patch_embedding(latents.to(self.dtype)).flatten(2).transpose(1, 2).contiguous()
        temb, mod = self._time(timesteps)

        q_frames = frames.repeat_interleave(tokens_per_frame)
        if cache is not None and cache.frames:
            past = torch.tensor(cache.frames, device=latents.device)
            k_frames = torch.cat([past.repeat_interleave(tokens_per_frame), q_frames])
        else:
            k_frames = q_frames
        mask = policy.mask(q_frames, k_frames, x.dtype)

        step = self._compiled_block or self._block
        new_layers: list[tuple[Tensor, Tensor]] = []
        for i, block in enumerate(self.blocks):
            past_kv = cache.layers[i] if cache is not None and cache.layers else None
            x, kv = step(block, x, mod, tokens_per_frame, (cos, sin), cross[i], past_kv, mask)
            new_layers.append(kv)

        if cache is not None and write:
            self._write(cache, policy, new_layers, frames.tolist(), tokens_per_frame)

        shift, scale = (self.scale_shift_table.view(1, 1, 2, -1) + temb.unsqueeze(2)).unbind(2)
        h = self.norm_out(x.float()).view(b, -1, tokens_per_frame, x.shape[-1])
        h = (h * (1 + scale.unsqueeze(2)) + shift.unsqueeze(2)).flatten(1, 2).type_as(x)
        h = self.proj_out(h)
        h = h.reshape(b, n_frames // p_t, pph, ppw, p_t, p_h, p_w, -1)
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
        mask: Tensor | None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
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
        return x, (k, v)

    @staticmethod
    def _write(
        cache: KVCache,
        policy: AttentionPolicy,
        new: list[tuple[Tensor, Tensor]],
        frames: list[int],
        tokens_per_frame: int,
    ) -> None:
        if cache.layers:
            cache.layers = [
                (torch.cat([k0, k1], 1), torch.cat([v0, v1], 1))
                for (k0, v0), (k1, v1) in zip(cache.layers, new, strict=True)
            ]
        else:
            cache.layers = [(k.clone(), v.clone()) for k, v in new]
        cache.frames.extend(frames)
        cache.next_frame = frames[-1] + 1
        all_frames = torch.tensor(cache.frames)
        keep = policy.keep_for(cache.next_frame, all_frames)
        if not bool(keep.all()):
            token_keep = keep.repeat_interleave(tokens_per_frame).to(cache.layers[0][0].device)
            cache.layers = [(k[:, token_keep], v[:, token_keep]) for k, v in cache.layers]
            cache.frames = [f for f, kept in zip(cache.frames, keep.tolist(), strict=True) if kept]
