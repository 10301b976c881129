"""`infdit convert`: the official checkpoint -> a self-describing safetensors file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import ConvertError
from ._text import safe

EXAMPLES = "infdit convert mp_rank_00_model_states.pt -o infdit-4x.safetensors"


def convert(
    checkpoint: Annotated[Path, typer.Argument(help="The official mp_rank_00_model_states.pt.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="The .safetensors file to write.")],
    clip_head_width: Annotated[int, typer.Option(
        min=1, max=16384,
        help="CLIP vision tower width per attention head (not recoverable from weight shapes; "
             "64 for ViT-L-14 and every open_clip ViT).")] = 64,
    overwrite: Annotated[bool, typer.Option(help="Replace OUTPUT if it exists.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing on success.")] = False,
) -> None:
    """Convert the official Inf-DiT checkpoint to safetensors.

    The checkpoint is a pickle; it is read with torch.load(weights_only=True), which loads tensors only
    and runs no code from the file. This is the only place infdit opens a pickle: every other command
    takes the safetensors file written here. Keys the official model never uses are dropped and listed;
    every hyper-parameter is inferred from tensor shapes and stored in the file's metadata.
    """
    from ..weights.convert import CONVERTER, convert_checkpoint  # kept off start-up (torch)
    from ..weights.format import save_model_file

    if output.suffix != ".safetensors":
        raise ConvertError(f"output must end in .safetensors: {output}")
    if output.exists() and not overwrite:
        raise ConvertError(f"{output} exists; pass --overwrite to replace it")
    result = convert_checkpoint(checkpoint, clip_head_width=clip_head_width)
    meta = {"infdit_source": checkpoint.name, "infdit_converter": CONVERTER,
            "infdit_dropped": ",".join(result.dropped)}
    save_model_file(output, result.tensors, result.config, meta, overwrite=overwrite)
    if not quiet:
        from rich.console import Console
        from rich.text import Text

        n = sum(t.numel() for t in result.tensors.values())
        c = result.config
        Console(stderr=True, highlight=False).print(Text(safe(
            f"wrote {output}: {n / 1e6:.1f} M parameters, hidden {c.hidden_size}, {c.num_layers} layers, "
            f"{c.num_heads} heads, RoPE table {c.rope_table_size}; dropped {len(result.dropped)} unused "
            f"tensor(s): {', '.join(result.dropped) or 'none'}"
        )))
