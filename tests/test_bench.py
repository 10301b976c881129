"""`infdit bench` as a user meets it, and the dtype choices it shares with `upscale`."""

import pytest
import torch

from conftest import run_cli
from infdit_cli.errors import BadRequest
from infdit_cli.upscaler import resolve_dtype


@pytest.mark.parametrize("name", ["fp16", "float16", "half"])
def test_fp16_is_refused_with_a_reason(name):
    with pytest.raises(BadRequest, match="use bf16"):
        resolve_dtype(name, torch.device("cuda"))


def test_auto_never_picks_fp16():
    for dev in ("cpu", "cuda", "mps"):
        assert resolve_dtype("auto", torch.device(dev)) in (torch.bfloat16, torch.float32)
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16


def test_fp16_on_the_command_line_is_one_line_exit_2(tiny_weights, tmp_path):
    src = tmp_path / "in.png"
    from PIL import Image

    Image.new("RGB", (16, 16), (10, 200, 30)).save(src)
    res = run_cli("upscale", src, "--scale", "2", "--dtype", "fp16", "--device", "cpu", "--weights", tiny_weights)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1 and lines[0].startswith("error:") and "bf16" in lines[0] and "overflow" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png"]
