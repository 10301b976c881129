"""`infdit download` and `infdit info`."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated, Optional

import typer

from ..errors import WeightsNotFound
from ..events import BytesDone, Notice
from ..settings import settings
from ..units import format_bytes
from ..weights.hub import DEFAULT_MODEL, PACKAGED_SOURCE, download_command, registry, resolve_weights
from ..weights.hub import download as download_model
from . import _options as O
from ._text import safe


def _models() -> str:
    try:
        return "\n\n".join(f"  {name}: {spec.description or spec.source}"
                           for name, spec in registry().items())
    except Exception:  # noqa: BLE001 - help must show even with a broken manifest
        return "  (the registry could not be read)"


DOWNLOAD_EXAMPLES = f"""Models in the registry:

{_models()}

Examples:

  infdit download                                  # infdit-4x: the official release, converted once

  infdit download https://example.org/mp_rank_00_model_states.pt --sha256 HEX

  infdit download my-org/infdit-4x/infdit-4x.safetensors@main
"""


class _DownloadDisplay:
    """Bytes, speed and ETA of a download (rich, on a TTY stderr); notices as plain lines."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.console = Console(stderr=True, highlight=False)
        self.progress = Progress(TextColumn("downloading"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(),
                                 TimeRemainingColumn(), console=self.console, transient=True)
        self.task = None

    def __call__(self, event: object) -> None:
        if isinstance(event, BytesDone):
            if self.task is None:
                self.progress.start()
                self.task = self.progress.add_task("", total=event.total)
            self.progress.update(self.task, completed=event.done, total=event.total)
        elif isinstance(event, Notice):
            self.stop()
            from rich.text import Text

            self.console.print(Text(safe(event.text)))

    def stop(self) -> None:
        if self.task is not None:
            self.progress.stop()
            self.task = None


def download(
    source: Annotated[Optional[str], typer.Argument(
        help="Registry name (default: infdit-4x), org/repo[/file][@revision], or the http(s) URL of an "
             "official-format checkpoint.")] = None,
    repo: O.Repo = None,
    revision: Annotated[Optional[str],
                        typer.Option(help="Branch, tag or commit (default: the manifest's).")] = None,
    sha256: Annotated[Optional[str], typer.Option(
        help="Expected sha256 of the downloaded file (64 hex digits, any case); "
        "default: the manifest's.")] = None,
    clip_head_width: Annotated[Optional[int], typer.Option(
        min=1, max=16384, help="CLIP width per attention head for converting an official checkpoint "
                    "(default: the manifest's, else 64).")] = None,
    keep: Annotated[bool, typer.Option("--keep", help="Keep the downloaded official checkpoint in the cache "
                                                      "after converting it.")] = False,
    offline: O.Offline = False,
    json_: O.Json = False,
    quiet: O.Quiet = False,
) -> None:
    """Download a model once into the cache, verified; later runs find it (also offline).

    Official-format checkpoints stream to a partial file, resume after an interruption (HTTP Range), are
    checked against the sha256 while they stream, converted to safetensors (provenance in the metadata)
    and the pickle is deleted. The cache is $INFDIT_CACHE, else $HF_HOME/infdit; Hub files go to the
    Hugging Face cache (HF_HOME, HF_HUB_OFFLINE, HF_TOKEN, HF_ENDPOINT are honoured). Prints the path.
    """
    import sys

    show = not quiet and sys.stderr.isatty()
    display = _DownloadDisplay() if show else None
    tqdm_class = None if show else _silent_tqdm()
    try:
        got = download_model(source, repo=repo, revision=revision, sha256=sha256,
                             clip_head_width=clip_head_width,
                             keep=keep, offline=offline or None, on_event=display, tqdm_class=tqdm_class)
    finally:
        if display is not None:
            display.stop()
    if json_:
        typer.echo(json.dumps({"path": str(got.path), "sha256": got.sha256, "source": got.source,
                               "source_sha256": got.source_sha256, "cached": got.cached}))
    else:
        if got.source.startswith(PACKAGED_SOURCE) and not quiet:
            typer.echo(safe(f"{source} ships with infdit: nothing to download"), err=True)
        typer.echo(safe(got.path))


def _silent_tqdm():
    from tqdm.auto import tqdm as _tqdm

    class Silent(_tqdm):
        def __init__(self, *a, **k):
            k["disable"] = True
            super().__init__(*a, **k)

    return Silent


def info(
    weights: Annotated[Optional[str], typer.Argument(
        help="A .safetensors file, Hub reference or registry name (default: infdit-4x).")] = None,
    repo: O.Repo = None,
    offline: O.Offline = False,
    json_: O.Json = False,
) -> None:
    """Show a model's config, parameter counts, dtype, file size, origin and memory estimates."""
    import torch  # torch, safetensors and the library: kept off start-up (--help, usage errors)
    from safetensors import safe_open

    from ..plan.planner import estimate, param_count
    from ..weights.format import inspect_file

    try:
        path = resolve_weights(weights, repo=repo, offline=offline or None)
    except WeightsNotFound:
        spec = registry().get(weights or settings().weights or DEFAULT_MODEL)
        if spec is None:
            raise
        return _show_manifest(spec, json_)
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
        "training": json.loads(meta["infdit_train"]) if meta.get("infdit_train") else None,
    }
    if json_:
        typer.echo(json.dumps(data))
        return
    typer.echo(safe(f"{path}  ({format_bytes(data['file_bytes'])}, {', '.join(dtypes)})"))
    if data["source"]:
        typer.echo(safe(f"converted from: {data['source']}"
                        + (f" (sha256 {meta['infdit_source_sha256']})"
                           if meta.get("infdit_source_sha256") else "")))
    if data["training"]:
        typer.echo(safe("trained: " + ", ".join(f"{k} {v}" for k, v in data["training"].items())))
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


def _show_manifest(spec, json_: bool) -> None:
    """A registry model that is not downloaded yet: what it is, where it comes from, how to get it."""
    cmd = download_command(spec.name)
    if json_:
        typer.echo(json.dumps({"name": spec.name, "downloaded": False, "download": cmd,
                               "manifest": asdict(spec)}))
        return
    typer.echo(f"{spec.name}: {spec.description}")
    typer.echo(f"license: {spec.license}")
    if spec.repo_id:
        typer.echo(f"Hub: {spec.repo_id}/{spec.filename}" + (f"@{spec.revision}" if spec.revision else ""))
    if spec.release_url:
        digest = spec.release_sha256 or "not pinned (pass --sha256 to verify)"
        typer.echo(f"official release: {spec.release_url} (sha256 {digest})")
    typer.echo(f"not downloaded yet: run `{cmd}`")
