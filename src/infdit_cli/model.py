"""Inf-DiT: the memory-efficient diffusion-transformer upsampler (Yang et al., ECCV 2024, arXiv 2405.04312).

All of the network in plain PyTorch. Equivalent to THUDM/Inf-DiT `dit/model.py` (`DiffusionEngine` with
`AdaLNMixin`, `FinalLayerMixin`, `ImagePatchEmbeddingMixin`) on SwissArmyTransformer's pre-LN transformer,
with the official flags `--nogate --qk-ln --re-position --cross-lr --image-condition --input-time adaln`.

The network works on a *rectangle of blocks* at a time (`forward_rect`); the whole-image pass is the
rectangle that covers the grid. Keys/values of blocks outside the rectangle come from a `KVCache`, which is
how `engine.py` runs n x n block batches in raster order with the same numbers.

Letters in shape comments: B batch, Gh/Gw blocks of the rectangle, T tokens per block, H heads, d head dim,
D hidden, P = patch*patch*out_channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import KVCache, Prefetcher, block_attention, cross_attention, gather_neighbours, lr_windows
from .clip import ClipImageEncoder
from .config import InfDiTConfig
from .layers import apply_rope, edm_scalings, modulate, rope_cos_sin, timestep_embedding
from .schedule import BlockBatch

__all__ = ["InfDiT", "ImageCond", "StepCond"]


@dataclass(frozen=True)
class ImageCond:
    """Per-image constants: the CLIP vector and the projected LR tokens (computed once per image)."""

    vector: torch.Tensor  # (B, vector_dim)
    lr_tokens: torch.Tensor  # (B, h/8, w/8, D): proj_lr(lr), channels last, on the state device


@dataclass(frozen=True)
class StepCond:
    """Per-sigma constants: EDM scalings, time/condition embedding, every layer's modulation."""

    c_skip: torch.Tensor  # (B,) float32
    c_out: torch.Tensor  # (B,)
    c_in: torch.Tensor  # (B,)
    layer_mods: list[torch.Tensor]  # per layer (B, 4D): shift_msa, scale_msa, shift_mlp, scale_mlp
    final_mod: torch.Tensor  # (B, 2D): shift, scale


def _mlp(d_in: int, d: int, dd: dict) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d, **dd), nn.SiLU(), nn.Linear(d, d, **dd))


# --------------------------------------------------------------------------------------------------------
# Transformer layer and final layer
# --------------------------------------------------------------------------------------------------------


class InfDiTBlock(nn.Module):
    """One pre-LN adaLN layer without gates: UniBA self-attention, then the MLP."""

    def __init__(self, cfg: InfDiTConfig, dd: dict) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.adaLN_modulation = nn.Linear(d, 4 * d, **dd)  # applied to SiLU(emb)
        self.qkv = nn.Linear(d, 3 * d, **dd)
        self.q_norm = nn.LayerNorm(cfg.head_dim, eps=1e-6, **dd)  # normalises q AND k (see forward)
        self.proj = nn.Linear(d, d, **dd)
        self.fc1 = nn.Linear(d, cfg.mlp_ratio * d, **dd)
        self.fc2 = nn.Linear(cfg.mlp_ratio * d, d, **dd)


class LRCrossAttention(nn.Module):
    """Layer-0 cross-attention from each HR block to the 3x3 LR-block neighbourhood around it."""

    def __init__(self, cfg: InfDiTConfig, dd: dict) -> None:
        super().__init__()
        d, h, hd = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        self.lr_embedder = nn.Conv2d(3, d, cfg.lr_patch_size, stride=cfg.lr_patch_size, **dd)  # proj_lr
        self.q = nn.Linear(d, d, **dd)
        self.kv = nn.Linear(d, 2 * d, **dd)
        self.proj = nn.Linear(d, d, **dd)
        self.q_norm = nn.LayerNorm(hd, eps=1e-6, **dd)
        self.k_norm = nn.LayerNorm(hd, eps=1e-6, **dd)
        self.q_pos = nn.Parameter(torch.zeros(1, cfg.block_tokens**2, h, hd, **dd))
        self.k_pos = nn.Parameter(torch.zeros(1, (3 * cfg.lr_block) ** 2, h, hd, **dd))
        self.post_norm = nn.LayerNorm(d, eps=cfg.layernorm_eps, **dd)  # affine, unlike the others


class FinalLayer(nn.Module):
    def __init__(self, cfg: InfDiTConfig, dd: dict) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.adaLN_modulation = nn.Linear(d, 2 * d, **dd)
        self.linear = nn.Linear(d, cfg.patch_size**2 * cfg.out_channels, **dd)


# --------------------------------------------------------------------------------------------------------
# Core model
# --------------------------------------------------------------------------------------------------------


class InfDiT(nn.Module):
    """The Inf-DiT denoiser with EDM preconditioning and its CLIP image encoder."""

    def __init__(self, config: InfDiTConfig, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        cfg = self.config = config
        d = cfg.hidden_size
        self.x_embedder = nn.Conv2d(cfg.in_channels, d, cfg.patch_size, stride=cfg.patch_size, **dd)
        self.t_embedder = _mlp(cfg.time_channels, d, dd)
        self.y_embedder = _mlp(cfg.vector_dim, d, dd)  # CLIP vector condition (`cond_embed.map_vector`)
        self.blocks = nn.ModuleList(InfDiTBlock(cfg, dd) for _ in range(cfg.num_layers))
        self.re_pos_embed = nn.Parameter(torch.zeros(cfg.num_layers, 4, cfg.num_heads, cfg.head_dim, **dd))
        self.lr_cross = LRCrossAttention(cfg, dd)
        self.final_layer = FinalLayer(cfg, dd)
        self.clip = ClipImageEncoder(cfg.clip).to(**dd) if cfg.clip is not None else None

    @property
    def device(self) -> torch.device:
        return self.x_embedder.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.weight.dtype

    # ---- per-image and per-step constants ---------------------------------------------------------------

    @torch.no_grad()
    def encode_image(self, lr: torch.Tensor) -> torch.Tensor:
        """CLIP vector of the LR image (B, 3, h, w) in [-1, 1] -> (B, vector_dim) float32."""
        if self.clip is None:
            raise ValueError("this model file has no CLIP vision tower; pass `vector=` explicitly")
        return self.clip(lr.to(self.device)).float()

    @torch.no_grad()
    def prepare_image(self, lr: torch.Tensor, vector: torch.Tensor | None = None,
                      state_device: torch.device | None = None) -> ImageCond:
        """Per-image constants. `lr` (B, 3, h, w) in [-1, 1]; the LR tokens live on `state_device`."""
        from .engine import pad_to_blocks

        vector = self.encode_image(lr) if vector is None else vector
        state_device = lr.device if state_device is None else state_device
        lr = pad_to_blocks(lr, self.config.block_size // self.config.sr_scale)  # as the HR image is padded
        w = self.lr_cross.lr_embedder
        rows = []  # project in row strips (<= 256 MiB of tokens each): a 16K image's LR map is ~10 GiB
        lp, d = self.config.lr_patch_size, self.config.hidden_size
        row_bytes = max(1, lr.shape[-1] // lp) * d * self.x_embedder.weight.element_size()
        strip = max(1, 2**28 // row_bytes) * lp
        for r in range(0, lr.shape[-2], strip):
            part = lr[..., r : r + strip, :].to(self.device, self.dtype)
            rows.append(w(part).permute(0, 2, 3, 1).to(state_device))  # (B, h/8, w/8, D)
        return ImageCond(vector=vector.float(), lr_tokens=torch.cat(rows, dim=1))

    @torch.no_grad()
    def prepare_step(self, sigma: torch.Tensor, vector: torch.Tensor) -> StepCond:
        """Per-sigma constants. `sigma` (B,) float32."""
        cfg = self.config
        c_skip, c_out, c_in, c_noise = edm_scalings(sigma, cfg.sigma_data)
        dev, dt = self.device, self.dtype
        emb = self.t_embedder(timestep_embedding(c_noise.to(dev), cfg.time_channels).to(dt))
        emb = emb + self.y_embedder(vector.to(dev, dt))
        emb = F.silu(emb)  # `model_forward`; each modulation applies SiLU once more
        e = F.silu(emb)
        return StepCond(
            c_skip=c_skip, c_out=c_out, c_in=c_in,
            layer_mods=[blk.adaLN_modulation(e) for blk in self.blocks],
            final_mod=self.final_layer.adaLN_modulation(e),
        )

    # ---- the network on a rectangle of blocks -----------------------------------------------------------

    def forward_rect(self, xin: torch.Tensor, lr_region: torch.Tensor, rect: BlockBatch, step: StepCond,
                     cache: KVCache | None = None) -> torch.Tensor:
        """Network output F for the blocks of `rect` (before the EDM output scaling).

        Args:
            xin: (B, 6, Gh*bs, Gw*bs) `cat(x, lr_up) * c_in` over the rectangle, model dtype and device.
            lr_region: (B, (Gh+2)*lb, (Gw+2)*lb, D) LR tokens around the rectangle, zero outside the image.
            rect: the rectangle's block rows [r0, r1) and columns [c0, c1) in the image's block grid.
            step: per-sigma constants.
            cache: K/V of earlier rectangles; blocks that later rectangles need are stored into it.
                None: the rectangle is the whole image.

        Returns:
            (B, out_channels, Gh*bs, Gw*bs).
        """
        cfg = self.config
        bt, hd, nh = cfg.block_tokens, cfg.head_dim, cfg.num_heads
        gh, gw = rect.r1 - rect.r0, rect.c1 - rect.c0
        h = self.x_embedder(xin)  # (B, D, Gh*bt, Gw*bt)
        b = h.shape[0]
        h = h.unflatten(2, (gh, bt)).unflatten(4, (gw, bt)).permute(0, 2, 4, 3, 5, 1)  # (B,Gh,Gw,bt,bt,D)
        h = h.flatten(3, 4)  # (B, Gh, Gw, T, D), tokens row-major inside a block

        rows = torch.arange(rect.r0 * bt, rect.r1 * bt, device=h.device)
        cols = torch.arange(rect.c0 * bt, rect.c1 * bt, device=h.device)
        grid_r, grid_c = torch.meshgrid(rows, cols, indexing="ij")
        cos, sin = rope_cos_sin(grid_r, grid_c, hd, cfg.rope_table_size)  # (Gh*bt, Gw*bt, d)
        cos, sin = (_to_blocks(t, gh, gw, bt) for t in (cos, sin))  # (Gh, Gw, T, d)

        prefetch = None
        if cache is not None:
            host_cache = cache.device is not None and cache.device.type == "cpu" and h.device.type == "cuda"
            prefetch = Prefetcher(lambda layer: _neighbours_from_cache(cache, rect, layer, h.device),
                                  cfg.num_layers, h.device, enabled=host_cache)

        def ln(t: torch.Tensor) -> torch.Tensor:  # SAT's non-affine LayerNorm
            return F.layer_norm(t, t.shape[-1:], eps=cfg.layernorm_eps)

        for i, blk in enumerate(self.blocks):
            mods = step.layer_mods[i][:, None, None, None, :]  # (B, 1, 1, 1, 4D)
            shift_msa, scale_msa, shift_mlp, scale_mlp = mods.chunk(4, dim=-1)
            a = modulate(ln(h), shift_msa, scale_msa)
            q, k, v = blk.qkv(a).unflatten(-1, (3, nh, hd)).unbind(-3)  # each (B, Gh, Gw, T, H, d)
            # Kept for exactness: the official model normalises the keys with the *query* LayerNorm
            # (`key_layernorm = origin.q_layer_norm[layer_id]`); its k_layer_norm weights are never used.
            q, k = blk.q_norm(q), blk.q_norm(k)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            if cache is None:
                left_k = left_v = top_k = top_v = None
            else:
                left_k, left_v, top_k, top_v = prefetch.get(i)
                _store(cache, rect, i, cfg.num_layers, k, v)
            k = gather_neighbours(k, left_k, top_k)  # (B, Gh, Gw, 4T, H, d)
            v = gather_neighbours(v, left_v, top_v)
            o = block_attention(q, k, v, self.re_pos_embed[i])  # (B, Gh, Gw, T, H, d)
            h = h + blk.proj(o.flatten(-2))
            if i == 0:
                h = h + self._lr_cross_attention(ln(h), lr_region, gh, gw)
                m = self.lr_cross.post_norm(h)
            else:
                m = ln(h)
            h = h + blk.fc2(F.gelu(blk.fc1(modulate(m, shift_mlp, scale_mlp)), approximate="tanh"))

        # SAT's final_layernorm, then FinalLayerMixin's norm_final: two non-affine LayerNorms in a row.
        shift, scale = step.final_mod[:, None, None, None, :].chunk(2, dim=-1)
        h = modulate(ln(ln(h)), shift, scale)
        out = self.final_layer.linear(h)  # (B, Gh, Gw, T, P), P ordered (p, q, c)
        p, c = cfg.patch_size, cfg.out_channels
        out = out.reshape(b, gh, gw, bt, bt, p, p, c).permute(0, 7, 1, 3, 5, 2, 4, 6)  # (B,c,Gh,bt,p,Gw,bt,p)
        return out.reshape(b, c, gh * bt * p, gw * bt * p)

    def _lr_cross_attention(self, h: torch.Tensor, lr_region: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
        """`cross_attention_forward`: (B, Gh, Gw, T, D) queries against their LR windows -> (B, Gh, Gw, T, D)."""
        x = self.lr_cross
        nh, hd = self.config.num_heads, self.config.head_dim
        q = x.q_norm(x.q(h).unflatten(-1, (nh, hd))) + x.q_pos  # (B, Gh, Gw, T, H, d)
        k, v = x.kv(lr_region).chunk(2, dim=-1)  # (B, Hr, Wr, D) each
        k = x.k_norm(k.unflatten(-1, (nh, hd))).flatten(-2)  # per-token LN commutes with the window cut
        k = lr_windows(k, self.config.lr_block).unflatten(-1, (nh, hd)) + x.k_pos  # (B, Gh, Gw, W, H, d)
        v = lr_windows(v, self.config.lr_block).unflatten(-1, (nh, hd))
        return x.proj(cross_attention(q, k, v).flatten(-2))

    # ---- EDM denoiser -----------------------------------------------------------------------------------

    @torch.no_grad()
    def denoise(self, x: torch.Tensor, sigma: float | torch.Tensor, *, lr_up: torch.Tensor,
                lr: torch.Tensor | None = None, vector: torch.Tensor | None = None,
                image: ImageCond | None = None, block_batch: int | str | None = None, **engine_kw) -> torch.Tensor:
        """One EDM denoiser call D(x; sigma) = c_skip x + c_out F(c_in [x, lr_up]; c_noise).

        Args:
            x, lr_up: (B, 3, H, W) in [-1, 1]; any H, W (padded to whole blocks internally, cropped back).
            lr: (B, 3, H/4, W/4) LR image; not needed when `image` holds the prepared constants.
            vector: (B, vector_dim) CLIP vector of `lr`; computed when omitted.
            image: per-image constants from `prepare_image` (what a sampler loop passes).
            block_batch: None for the whole-image pass, n for n x n block batches with a K/V cache,
                "auto" to choose n from `mem_budget` (see `engine.denoise`).
            **engine_kw: `order`, `cache_device`, `mem_budget`, `on_batch` (see `engine.denoise`).

        Returns:
            (B, 3, H, W) float32 on x's device.
        """
        from .engine import denoise as engine_denoise

        if image is None:
            if lr is None:
                raise ValueError("denoise needs `lr` (or prepared `image` constants)")
            image = self.prepare_image(lr, vector, state_device=x.device)
        return engine_denoise(self, x, sigma, lr_up=lr_up, image=image, block_batch=block_batch, **engine_kw)


def _to_blocks(t: torch.Tensor, gh: int, gw: int, bt: int) -> torch.Tensor:
    """(Gh*bt, Gw*bt, C) -> (Gh, Gw, bt*bt, C)."""
    return t.unflatten(0, (gh, bt)).unflatten(2, (gw, bt)).permute(0, 2, 1, 3, 4).flatten(2, 3)


def _neighbours_from_cache(cache: KVCache, rect: BlockBatch, layer: int, device: torch.device):
    """Left column (rows r0..r1-1 at c0-1) and top row (row r0-1, columns c0-1..c1-1) from the cache.

    At the image's left/top edge the grid is replicate-padded: None lets `gather_neighbours` pad, and the
    top row's first entry is clamped to column 0.
    """
    left_k = left_v = top_k = top_v = None
    if rect.c0 > 0:
        kv = [cache.get((r, rect.c0 - 1), layer, device) for r in range(rect.r0, rect.r1)]
        left_k, left_v = torch.stack([k for k, _ in kv], 1), torch.stack([v for _, v in kv], 1)
    if rect.r0 > 0:
        kv = [cache.get((rect.r0 - 1, max(c, 0)), layer, device) for c in range(rect.c0 - 1, rect.c1)]
        top_k, top_v = torch.stack([k for k, _ in kv], 1), torch.stack([v for _, v in kv], 1)
    return left_k, left_v, top_k, top_v


def _store(cache: KVCache, rect: BlockBatch, layer: int, layers: int, k: torch.Tensor, v: torch.Tensor) -> None:
    """Cache the rectangle's blocks that a later rectangle reads: its last row and last column."""
    for r, c in rect.blocks_needed_later():
        i, j = r - rect.r0, c - rect.c0
        cache.put((r, c), layer, layers, k[:, i, j], v[:, i, j])
