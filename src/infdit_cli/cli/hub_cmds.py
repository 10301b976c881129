"""`infdit download` and `infdit info`."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from . import _options as O

DOWNLOAD_EXAMPLES = """Examples:

  infdit download                                  # the default model (needs --repo or INFDIT_REPO)

  infdit download my-org/infdit-4x/infdit-4x.safetensors@main
"""


def download(
    model: Annotated[Optional[str], typer.Argument(
        help="Registry name, or org/repo[/file][@revision] (default: infdit-4x).")] = None,
    repo: O.Repo = None,
    revision: Annotated[Optional[str], typer.Option(help="Branch, tag or commit (default: the manifest's).")] = None,
    offline: O.Offline = False,
    quiet: O.Quiet = False,
) -> None:
    """Download model weights into the Hugging Face cache (HF_HOME), verifying sha256 when known.

    Honours HF_HOME, HF_HUB_OFFLINE, HF_TOKEN and HF_ENDPOINT. Nothing is unpickled: infdit only loads
    safetensors. Interrupted downloads resume when the command is run again.
    """
    from ..hub import resolve_weights

    tqdm_class = None
    if quiet:
        from tqdm.auto import tqdm as _tqdm

        class tqdm_class(_tqdm):  # noqa: N801 - silenced progress
            def __init__(self, *a, **k):
                k["disable"] = True
                super().__init__(*a, **k)

    path = resolve_weights(model, repo=repo, revision=revision, offline=offline or None, tqdm_class=tqdm_class)
    typer.echo(str(path))


def info(
    weights: Annotated[Optional[str], typer.Argument(
        help="A .safetensors file, Hub reference or registry name (default: infdit-4x).")] = None,
    repo: O.Repo = None,
    offline: O.Offline = False,
    json_: O.Json = False,
) -> None:
    """Show a model's config, parameter counts, dtype, file size, origin and memory estimates."""
    import torch
    from safetensors import safe_open

    from ..hub import resolve_weights
    from ..planner import estimate, format_bytes, param_count
    from ..weights import inspect_file

    path = resolve_weights(weights, repo=repo, offline=offline or None)
    cfg, _ = inspect_file(path)
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata() or {}
        dtypes = sorted({str(f.get_slice(k).get_dtype()) for k in keys})
        clip_params = sum(_numel(f.get_slice(k).get_shape()) for k in keys if k.startswith("clip."))
    total = param_count(cfg)
    sizes = [1024, 2048, 4096, 8192, 16384]
    est = {}
    for s in sizes:
        e = estimate(cfg, (s, s), 1, dtype=torch.bfloat16, device_type="cuda", cache_on_host=True,
                     state_on_host=True)
        w = estimate(cfg, (s, s), None, dtype=torch.bfloat16, device_type="cuda")
        est[s] = {"n1_host_cache_bytes": e.total, "whole_image_bytes": w.total}
    data = {
        "path": str(path), "source": meta.get("infdit_source"), "file_bytes": path.stat().st_size,
        "dtypes": dtypes, "parameters": total, "dit_parameters": total - clip_params,
        "clip_parameters": clip_params, "config": json.loads(cfg.to_json()), "bf16_cuda_estimates": est,
    }
    if json_:
        typer.echo(json.dumps(data))
        return
    typer.echo(f"{path}  ({format_bytes(data['file_bytes'])}, {', '.join(dtypes)})")
    if data["source"]:
        typer.echo(f"converted from: {data['source']}")
    typer.echo(f"parameters: {total / 1e6:.1f} M (DiT {data['dit_parameters'] / 1e6:.1f} M, "
               f"CLIP vision {clip_params / 1e6:.1f} M)")
    typer.echo(f"hidden {cfg.hidden_size}, {cfg.num_layers} layers, {cfg.num_heads} heads x {cfg.head_dim}, "
               f"patch {cfg.patch_size}, block {cfg.block_size} px, vector {cfg.vector_dim}, "
               f"RoPE table {cfg.rope_table_size}")
    typer.echo("predicted peak device memory, bf16 on CUDA (square outputs):")
    for s in sizes:
        typer.echo(f"  {s:>5} px: whole image {format_bytes(est[s]['whole_image_bytes']):>10}   "
                   f"n=1, cache+state on host {format_bytes(est[s]['n1_host_cache_bytes']):>10}")


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
