"""Inf-DiT: the memory-efficient diffusion-transformer upsampler (Yang et al., ECCV 2024, arXiv 2405.04312).

All of the network in plain PyTorch. Equivalent to THUDM/Inf-DiT `dit/model.py` (`DiffusionEngine` with
`AdaLNMixin`, `FinalLayerMixin`, `ImagePatchEmbeddingMixin`) on SwissArmyTransformer's pre-LN transformer,
with the official flags `--nogate --qk-ln --re-position --cross-lr --image-condition --input-time adaln`.

`InfDiT.forward` is the denoiser on the whole image, D(x; sigma) in one differentiable pass written top
to bottom (its loop calls `layer`, under activation checkpointing when `grad_checkpointing` is set):
training's forward, and the reference the block engine is tested against. The same network also
comes in pieces that work on a *rectangle of blocks* (block rows and columns as `range`s): `embed`, `rope`,
`lr_context`, `layer_qkv`, `layer_out`, `head`. `engine.py` drives the layer loop with them, n x n blocks
at a time in bounded memory, and between `layer_qkv` and `layer_out` hands each layer the keys/values of
the rectangle's left, top and top-left neighbours (from its cache, or replicate padding at the image edge).
The model holds no state between calls and knows nothing of caches, traversal, or devices other than its
own.

The file reads top to bottom: the parts (the layers' modules), the model, then the kernels (functions of
tensors the model and the engine share).

Letters in shape comments: B batch, Gh/Gw blocks of the rectangle (the whole grid in `forward`), T tokens
per block, H heads, d head dim, D hidden, W = (3 lr_block)^2 LR tokens of a block's window,
P = patch*patch*out_channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import block_attention, cross_attention, lr_windows
from .clip import ClipImageEncoder
from .config import InfDiTConfig
from .layers import apply_rope, edm_scalings, rope_cos_sin, signed_sin, timestep_embedding

__all__ = ["InfDiT", "StepCond", "out_kernel", "qkv_into", "qkv_kernel", "random_model", "uniba_segments"]


@dataclass(frozen=True)
class StepCond:
    """Per-sigma constants: EDM scalings, time/condition embedding, every layer's modulation."""

    c_skip: torch.Tensor  # (B,) float32
    c_out: torch.Tensor  # (B,)
    c_in: torch.Tensor  # (B,)
    # Per layer (shift_msa, gain_msa, shift_mlp, gain_mlp), each (B, 1, 1, 1, D), gain = 1 + scale.
    layer_mods: list[tuple[torch.Tensor, ...]]
    final_mod: tuple[torch.Tensor, torch.Tensor]  # (shift, gain), each (B, 1, 1, 1, D)


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
        self.grad_checkpointing = False  # forward: recompute each layer in backward (training's memory)

    @property
    def device(self) -> torch.device:
        return self.x_embedder.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.weight.dtype

    # ---- the whole image in one differentiable pass --------------------------------------------------

    def forward(self, x: torch.Tensor, sigma: float | torch.Tensor, lr_up: torch.Tensor, lr: torch.Tensor,
                vector: torch.Tensor, *, origin: tuple[int, int] = (0, 0)) -> torch.Tensor:
        """The EDM denoiser on the whole image: D(x; sigma) = c_skip x + c_out F(c_in [x, lr_up]; c_noise,
        vector, lr), differentiable in every weight but the CLIP tower's (training).

        Args:
            x, lr_up: (B, 3, H, W) the noisy image and the upsampled LR image, H and W multiples of
                `block_size` (the engine pads other sizes; this does not).
            sigma: (B,) or a float, the noise level (rounded to float32, as the engine does).
            lr: (B, 3, H/sr_scale, W/sr_scale) the LR image, for the layer-0 cross-attention.
            vector: (B, vector_dim) its CLIP vector (`encode_image`).
            origin: (row, column) position of the image's first token for RoPE; (0, 0) at inference,
                a random offset in training (the official `--random-position`).

        Returns:
            D: (B, 3, H, W) in float32 (float64 for a float64 model), on the model's device.

        The engine computes the same numbers n x n blocks at a time with a K/V cache, in bounded memory and
        without autograd; this is the reference it is tested against.
        """
        cfg, dev, dt = self.config, self.device, self.dtype
        b, _, hh, ww = x.shape
        bs, lb, lp = cfg.block_size, cfg.lr_block, cfg.lr_patch_size
        if hh % bs or ww % bs:
            raise ValueError(f"x {tuple(x.shape)}: H and W must be multiples of block_size {bs} "
                             "(engine.pad_to_blocks pads)")
        if lr_up.shape != x.shape:
            raise ValueError(f"lr_up {tuple(lr_up.shape)} must match x {tuple(x.shape)}")
        gh, gw = hh // bs, ww // bs
        if tuple(lr.shape[-2:]) != (gh * lb * lp, gw * lb * lp):
            raise ValueError(f"lr {tuple(lr.shape)} does not match x {tuple(x.shape)}: "
                             f"lr must be (B, 3, {hh // cfg.sr_scale}, {ww // cfg.sr_scale})")

        # Conditioning: EDM scalings, the time + CLIP-vector embedding, every layer's adaLN modulation.
        sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1).expand(b)  # (B,)
        step = self.condition(sigma, vector)
        pdt = torch.promote_types(dt, torch.float32)  # the preconditioning's precision
        c_in, c_out, c_skip = (c.to(dev, pdt).view(-1, 1, 1, 1) for c in (step.c_in, step.c_out, step.c_skip))
        x = x.to(dev, pdt)  # (B, 3, H, W)
        xin = torch.cat([x, lr_up.to(dev, pdt)], dim=1) * c_in  # (B, 6, H, W), the LR channels scaled too

        # Embedding: patches -> tokens, block by block; RoPE angles; the LR tokens' keys/values per block.
        h = self.embed(xin.to(dt))  # (B, Gh, Gw, T, D)
        cos, ssin = self.rope(range(gh), range(gw), origin)  # (Gh, Gw, T, d) each
        blocks = torch.arange(gh * gw, device=dev)  # (N,) row-major
        lr_ctx = self.lr_context(lr, range(gh), range(gw), gh * lb, gw * lb)  # (B, (Gh+2)lb, (Gw+2)lb, D) x2
        lr_k, lr_v = (t.unflatten(1, (gh, gw))  # (B, Gh, Gw, W, H, d) each, W = (3 lb)^2
                      for t in self.lr_windows(lr_ctx, blocks // gw, blocks % gw))

        # The transformer layers (`layer`), each with its adaLN modulation.
        for i in range(len(self.blocks)):
            mods = step.layer_mods[i]  # (shift_msa, gain_msa, shift_mlp, gain_mlp), each (B, 1, 1, 1, D)
            if self.grad_checkpointing and torch.is_grad_enabled():
                # Activation checkpointing: keep only the layer's inputs and run the layer again in
                # backward (one layer's activations alive at a time, for about a third more compute).
                h = checkpoint(self.layer, i, h, mods, cos, ssin, lr_k, lr_v, use_reentrant=False)
            else:
                h = self.layer(i, h, mods, cos, ssin, lr_k, lr_v)  # (B, Gh, Gw, T, D)

        f = self.head(h, step).to(pdt)  # (B, 3, H, W) the network output F
        return f * c_out + x * c_skip  # (B, 3, H, W)

    def layer(self, i: int, h: torch.Tensor, mods: tuple[torch.Tensor, ...], cos: torch.Tensor,
              ssin: torch.Tensor, lr_k: torch.Tensor, lr_v: torch.Tensor) -> torch.Tensor:
        """Transformer layer i of `forward` on the whole grid: h (B, Gh, Gw, T, D) -> h, out of place."""
        blk, eps = self.blocks[i], self.config.layernorm_eps
        nh, hd = self.config.num_heads, self.config.head_dim
        shift_msa, gain_msa, shift_mlp, gain_mlp = mods  # (B, 1, 1, 1, D) each
        # UniBA self-attention: each block against itself and its top-left, left and top neighbours.
        a = _ln_mod(h, shift_msa, gain_msa, eps)  # (B, Gh, Gw, T, D)
        q, k, v = blk.qkv(a).unflatten(-1, (3, nh, hd)).unbind(-3)  # (B, Gh, Gw, T, H, d) each
        q = apply_rope(blk.q_norm(q), cos, ssin)  # (B, Gh, Gw, T, H, d)
        k = apply_rope(blk.q_norm(k), cos, ssin)  # the QUERY LayerNorm: the official model's quirk
        k = uniba_segments(k) + self.re_pos_embed[i][:, None]  # (B, Gh, Gw, 4, T, H, d), per-segment
        v = uniba_segments(v)  # (B, Gh, Gw, 4, T, H, d)
        att = block_attention(q, k.flatten(3, 4), v.flatten(3, 4))  # (B, Gh, Gw, T, H, d)
        h = h + blk.proj(att.flatten(-2))  # (B, Gh, Gw, T, D)
        if i == 0:
            # Layer 0: cross-attention to the 3x3 LR blocks around each block; its MLP input is
            # modulated after the cross-attention's own affine LayerNorm.
            h = h + self._lr_cross_attention(_ln(h, eps), lr_k, lr_v)  # (B, Gh, Gw, T, D)
            m = torch.addcmul(shift_mlp, self.lr_cross.post_norm(h), gain_mlp)  # (B, Gh, Gw, T, D)
        else:
            m = _ln_mod(h, shift_mlp, gain_mlp, eps)  # (B, Gh, Gw, T, D)
        return h + blk.fc2(F.gelu(blk.fc1(m), approximate="tanh"))  # (B, Gh, Gw, T, D)

    # ---- per-call constants -----------------------------------------------------------------------------

    @torch.no_grad()
    def encode_image(self, lr: torch.Tensor) -> torch.Tensor:
        """CLIP vector of the LR image (B, 3, h, w) in [-1, 1] -> (B, vector_dim) float32."""
        if self.clip is None:
            raise ValueError("this model file has no CLIP vision tower; pass `vector=` explicitly")
        return self.clip(lr.to(self.device)).float()

    @torch.no_grad()
    def prepare_step(self, sigma: torch.Tensor, vector: torch.Tensor) -> StepCond:
        """`condition` without autograd: the engine's per-call constants."""
        return self.condition(sigma, vector)

    def condition(self, sigma: torch.Tensor, vector: torch.Tensor) -> StepCond:
        """Per-sigma constants. `sigma` (B,) float32, `vector` (B, vector_dim) the CLIP vector.

        Differentiable in the embedders' and modulations' weights (`forward`); sigma is a constant. The EDM
        scalings are computed on the CPU in float64 and rounded once to float32, wherever sigma and
        the state live, so a state on the host and one on the GPU see the same constants to the bit.
        """
        cfg = self.config
        scalings = edm_scalings(sigma.detach().to("cpu", torch.float64), cfg.sigma_data)
        c_skip, c_out, c_in, c_noise = (c.float() for c in scalings)
        dev, dt = self.device, self.dtype
        emb = self.t_embedder(timestep_embedding(c_noise.to(dev), cfg.time_channels).to(dt))
        emb = emb + self.y_embedder(vector.to(dev, dt))
        emb = F.silu(emb)  # `model_forward`; each modulation applies SiLU once more
        e = F.silu(emb)
        return StepCond(
            c_skip=c_skip, c_out=c_out, c_in=c_in,
            layer_mods=[_shift_gain(blk.adaLN_modulation(e), cfg.hidden_size) for blk in self.blocks],
            final_mod=_shift_gain(self.final_layer.adaLN_modulation(e), cfg.hidden_size),
        )

    # ---- the network on a rectangle of blocks, piece by piece (the engine drives the layer loop) ---------

    def embed(self, xin: torch.Tensor) -> torch.Tensor:
        """(B, 6, Gh*bs, Gw*bs) `cat(x, lr_up) * c_in` -> tokens (B, Gh, Gw, T, D), row-major in a block.

        `x_embedder` is a convolution with stride = kernel = p, so it is one matmul over the image's
        p x p patches (the same sums; no 32-bit index limit on a (D, H/p, W/p) output of billions of
        elements, and the tokens come out in block order directly).
        """
        cfg, bt, p = self.config, self.config.block_tokens, self.config.patch_size
        b, c, hh, ww = xin.shape
        gh, gw = hh // (bt * p), ww // (bt * p)
        # (B, Gh, Gw, bt, bt, C, p, p)
        patches = xin.reshape(b, c, gh, bt, p, gw, bt, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
        patches = patches.reshape(b, gh, gw, bt * bt, c * p * p)
        w = self.x_embedder.weight.reshape(cfg.hidden_size, c * p * p)
        return F.linear(patches, w, self.x_embedder.bias)

    def rope(self, rows: range, cols: range, origin: tuple[int, int] = (0, 0)
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and pair-signed sin (`layers.signed_sin`) of the token positions of block rows `rows` and
        columns `cols`, (Gh, Gw, T, d), in the compute dtype, computed once per rectangle for every layer.

        A token's position is `origin` (row, column, in tokens) plus its place in the block grid.
        """
        cfg = self.config
        bt = cfg.block_tokens
        gh, gw = len(rows), len(cols)
        pos_r = torch.arange(rows.start * bt, rows.stop * bt, device=self.device) + origin[0]
        pos_c = torch.arange(cols.start * bt, cols.stop * bt, device=self.device) + origin[1]
        grid_r, grid_c = torch.meshgrid(pos_r, pos_c, indexing="ij")
        cos, sin = rope_cos_sin(grid_r, grid_c, cfg.head_dim, cfg.rope_table_size)  # (Gh*bt, Gw*bt, d)
        return tuple(_to_blocks(t, gh, gw, bt).to(self.dtype) for t in (cos, signed_sin(sin)))

    def lr_context(self, lr_pixels: torch.Tensor, rows: range, cols: range, hl: int, wl: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer-0 cross-attention keys/values of the LR tokens around the rectangle, from LR *pixels*.

        Args:
            lr_pixels: (B, 3, h', w') the LR pixels under the rectangle plus one LR block all round, clipped
                to the (block-padded) LR image: `engine.lr_pixel_region`.
            rows, cols: the rectangle's block rows and columns; hl, wl: the LR token map's size (padded
                image / lr_patch_size).

        Returns:
            (k, v): (B, (Gh+2) lb, (Gw+2) lb, D) each, k normalised; `lr_windows` cuts the blocks' windows.

        The official model projects the whole LR image (`proj_lr`, a stride=kernel convolution, so local)
        and zero-pads the *projected* map (`Unfold(padding=16)`); projecting just this region and padding
        it with zero tokens gives the same numbers without an (image area x hidden) map.
        """
        x, lb = self.lr_cross, self.config.lr_block
        nh, hd = self.config.num_heads, self.config.head_dim
        tok = x.lr_embedder(lr_pixels.to(self.device, self.dtype)).permute(0, 2, 3, 1)  # (B, h'/2, w'/2, D)
        r0, r1 = (rows.start - 1) * lb, (rows.stop + 1) * lb
        c0, c1 = (cols.start - 1) * lb, (cols.stop + 1) * lb
        pad = (0, 0, max(-c0, 0), max(c1 - wl, 0), max(-r0, 0), max(r1 - hl, 0))
        region = F.pad(tok, pad) if any(pad) else tok  # (B, (Gh+2)lb, (Gw+2)lb, D)
        k, v = x.kv(region).chunk(2, dim=-1)  # (B, Hr, Wr, D) each
        k = x.k_norm(k.unflatten(-1, (nh, hd))).flatten(-2)  # per-token LN commutes with the window cut
        return k, v

    def lr_windows(self, ctx: tuple[torch.Tensor, torch.Tensor], rows: torch.Tensor, cols: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """The LR windows of blocks (rows[i], cols[i]) of the rectangle `ctx` (`lr_context`) belongs to:
        keys (with `k_pos`) and values, (B, N, W, H, d) each, W = (3 lb)^2."""
        x, lb = self.lr_cross, self.config.lr_block
        nh, hd = self.config.num_heads, self.config.head_dim
        k = lr_windows(ctx[0], lb, rows, cols).unflatten(-1, (nh, hd)) + x.k_pos
        v = lr_windows(ctx[1], lb, rows, cols).unflatten(-1, (nh, hd))
        return k, v

    def layer_qkv(self, i: int, h: torch.Tensor, step: StepCond, rope: tuple[torch.Tensor, torch.Tensor],
                  out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, kernel=None):
        """Layer i's queries and keys (normalised, rotated) and values for blocks of the rectangle.

        h: (B, Gh, Gw, T, D) (any block axes that broadcast against `rope`'s); `out`: optional (q, k, v)
        tensors of the result's shape (B, Gh, Gw, T, H, d) to write into (views of the engine's buffers);
        `kernel`: a stand-in for `qkv_into` (its `torch.compile`d self), called with `out`'s tensors as its
        last three arguments.
        """
        blk, cfg = self.blocks[i], self.config
        shift, gain = step.layer_mods[i][:2]
        args = (h, shift, gain, blk.qkv.weight, blk.qkv.bias, blk.q_norm.weight, blk.q_norm.bias, *rope,
                cfg.num_heads, cfg.layernorm_eps, blk.q_norm.eps)
        if kernel is None:
            return qkv_kernel(*args, out=out)
        kernel(*args, *out)
        return out

    def layer_out(self, i: int, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  step: StepCond, lr_ctx: tuple[torch.Tensor, torch.Tensor], kernel=None) -> torch.Tensor:
        """Finish layer i *in place on h*: UniBA attention over the gathered keys/values
        (B, Gh, Gw, 4T, H, d), which already carry the layer's `re_pos_embed` offsets, then (layer 0) LR
        cross-attention, then the MLP. Returns h. `kernel`: a stand-in for `out_kernel` (layers >= 1)."""
        blk, eps = self.blocks[i], self.config.layernorm_eps
        shift, gain = step.layer_mods[i][2:]
        mlp = (blk.fc1.weight, blk.fc1.bias, blk.fc2.weight, blk.fc2.bias)
        if i > 0:
            return (kernel or out_kernel)(h, q, k, v, blk.proj.weight, blk.proj.bias, shift, gain, *mlp, eps)
        h += blk.proj(block_attention(q, k, v).flatten(-2))
        h += self._lr_cross_attention(_ln(h, eps), *lr_ctx)
        return _mlp_residual(h, torch.addcmul(shift, self.lr_cross.post_norm(h), gain), *mlp)

    def head(self, h: torch.Tensor, step: StepCond) -> torch.Tensor:
        """Final layer: tokens (B, Gh, Gw, T, D) -> network output F (B, out_channels, Gh*bs, Gw*bs)."""
        cfg = self.config
        b, gh, gw = h.shape[:3]
        bt, p, c = cfg.block_tokens, cfg.patch_size, cfg.out_channels
        # SAT's final_layernorm, then FinalLayerMixin's norm_final: two non-affine LayerNorms in a row.
        shift, gain = step.final_mod
        h = _ln_mod(_ln(h, cfg.layernorm_eps), shift, gain, cfg.layernorm_eps)
        out = self.final_layer.linear(h)  # (B, Gh, Gw, T, P), P ordered (p, q, c)
        out = out.reshape(b, gh, gw, bt, bt, p, p, c).permute(0, 7, 1, 3, 5, 2, 4, 6)  # (B,c,Gh,bt,p,Gw,bt,p)
        return out.reshape(b, c, gh * bt * p, gw * bt * p)

    def _lr_cross_attention(self, h: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """`cross_attention_forward`: block queries (B, Gh, Gw, T, D) against their LR windows."""
        x = self.lr_cross
        nh, hd = self.config.num_heads, self.config.head_dim
        q = x.q_norm(x.q(h).unflatten(-1, (nh, hd))) + x.q_pos  # (B, Gh, Gw, T, H, d)
        return x.proj(cross_attention(q, k, v).flatten(-2))


# --------------------------------------------------------------------------------------------------------
# Kernels: UniBA's neighbourhood on a whole grid (`forward`), and a layer's per-token work as functions of
# tensors (the engine may run them through torch.compile: with the weights as arguments, every layer
# shares one compiled graph)
# --------------------------------------------------------------------------------------------------------


def uniba_segments(t: torch.Tensor) -> torch.Tensor:
    """The 4 key (or value) segments each block of a whole grid attends to, in the official order [self,
    top-left, left, top], the grid replicate-padded at its top and left edges (`get_cat_layer_left_top`):
    (B, Gh, Gw, T, ...) -> (B, Gh, Gw, 4, T, ...). `attention.neighbour_index` says the same for a
    rectangle whose neighbours come from the engine's cache."""
    p = torch.cat([t[:, :1], t], dim=1)  # (B, Gh+1, Gw, T, ...): row 0 repeated above
    p = torch.cat([p[:, :, :1], p], dim=2)  # (B, Gh+1, Gw+1, T, ...): column 0 repeated on the left
    return torch.stack([p[:, 1:, 1:], p[:, :-1, :-1], p[:, 1:, :-1], p[:, :-1, 1:]], dim=3)


def qkv_kernel(h, shift, gain, w_qkv, b_qkv, w_qn, b_qn, cos, ssin, heads: int, eps: float, qn_eps: float,
               out=None):
    """Modulated LayerNorm, the qkv projection, q/k LayerNorm and RoPE -> (q, k, v) (B, Gh, Gw, T, H, d)."""
    a = _ln_mod(h, shift, gain, eps)
    q, k, v = F.linear(a, w_qkv, b_qkv).unflatten(-1, (3, heads, -1)).unbind(-3)
    # Kept for exactness: the official model normalises the keys with the *query* LayerNorm
    # (`key_layernorm = origin.q_layer_norm[layer_id]`); its k_layer_norm weights are never used.
    qo, ko, vo = out if out is not None else (None, None, None)
    q = apply_rope(F.layer_norm(q, q.shape[-1:], w_qn, b_qn, qn_eps), cos, ssin, out=qo)
    k = apply_rope(F.layer_norm(k, k.shape[-1:], w_qn, b_qn, qn_eps), cos, ssin, out=ko)
    return q, k, (v if vo is None else vo.copy_(v))


def qkv_into(h, shift, gain, w_qkv, b_qkv, w_qn, b_qn, cos, ssin, heads: int, eps: float, qn_eps: float,
             qo, ko, vo) -> None:
    """`qkv_kernel` writing its results into (qo, ko, vo): compiled, the copies are the generated kernels'
    own stores into the engine's buffers, not three extra passes over them."""
    q, k, v = qkv_kernel(h, shift, gain, w_qkv, b_qkv, w_qn, b_qn, cos, ssin, heads, eps, qn_eps)
    qo.copy_(q)
    ko.copy_(k)
    vo.copy_(v)


def out_kernel(h, q, k, v, w_proj, b_proj, shift, gain, w_fc1, b_fc1, w_fc2, b_fc2, eps: float):
    """A layer without cross-attention (every layer but 0), in place on h: UniBA attention, its projection
    and residual, then the modulated LayerNorm and the MLP residual."""
    h += F.linear(block_attention(q, k, v).flatten(-2), w_proj, b_proj)
    return _mlp_residual(h, _ln_mod(h, shift, gain, eps), w_fc1, b_fc1, w_fc2, b_fc2)


def _mlp_residual(h, m, w_fc1, b_fc1, w_fc2, b_fc2):
    h += F.linear(F.gelu(F.linear(m, w_fc1, b_fc1), approximate="tanh"), w_fc2, b_fc2)
    return h


def _ln(t: torch.Tensor, eps: float) -> torch.Tensor:
    """SAT's non-affine LayerNorm."""
    return F.layer_norm(t, t.shape[-1:], eps=eps)


def _ln_mod(t: torch.Tensor, shift: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    """adaLN modulation of the non-affine LayerNorm, `_ln(t) * gain + shift` (the official
    `modulate(x, shift, scale) = x * (1 + scale) + shift`, gain = 1 + scale); for one image, one LayerNorm
    with gain and shift as its affine weight and bias."""
    if shift.shape[0] == 1:
        return F.layer_norm(t, t.shape[-1:], gain.reshape(-1), shift.reshape(-1), eps)
    return torch.addcmul(shift, _ln(t, eps), gain)


def _shift_gain(mod: torch.Tensor, d: int) -> tuple[torch.Tensor, ...]:
    """An adaLN output (B, 2k*D), chunks (shift, scale) k times -> (shift, 1 + scale, ...), each
    (B, 1, 1, 1, D)."""
    parts = [p[:, None, None, None, :] for p in mod.split(d, dim=-1)]
    return tuple(p if j % 2 == 0 else 1 + p for j, p in enumerate(parts))


def _to_blocks(t: torch.Tensor, gh: int, gw: int, bt: int) -> torch.Tensor:
    """(Gh*bt, Gw*bt, C) -> (Gh, Gw, bt*bt, C)."""
    return t.unflatten(0, (gh, bt)).unflatten(2, (gw, bt)).permute(0, 2, 1, 3, 4).flatten(2, 3)


def random_model(cfg: InfDiTConfig, *, seed: int = 0, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
    """An `InfDiT` with every tensor seeded-random and non-zero (tests, benchmarks, `--random-weights`).

    Weights use std 1/sqrt(fan_in) so activations stay O(1) at any width; LayerNorm gains sit near 1.
    Built and drawn on `device` with that device's generator (a 1 B-parameter model in about a second on a
    GPU, where the CPU's serial generator takes ~10 s): the same seed gives the same model on one kind of
    device, not across kinds.
    """
    device = torch.device(device)
    gen = torch.Generator(device).manual_seed(seed)
    with torch.device(device):
        model = InfDiT(cfg, dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name or ".ln_" in name):
                std, mean = (0.1, 1.0) if name.endswith("weight") else (0.1, 0.0)
            elif p.ndim >= 2 and "pos" not in name and "embedding" not in name:
                std, mean = p[0].numel() ** -0.5, 0.0
            else:
                std, mean = 0.1, 0.0
            p.copy_(torch.randn(p.shape, generator=gen, device=device) * std + mean)
    return model.eval().requires_grad_(False)
