"""`infdit convert`: key map, inferred config, refusal of bad input without partial output."""

import pytest
import torch
from conftest import DATA, run_cli
from safetensors import safe_open

from infdit_cli.errors import ConvertError
from infdit_cli.model.config import InfDiTConfig
from infdit_cli.weights.convert import convert_checkpoint


def test_converted_file_describes_itself(official_file):
    with safe_open(str(official_file), "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    cfg = InfDiTConfig.from_json(meta["infdit_config"])
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.head_dim) == (64, 3, 4, 16)
    assert (cfg.patch_size, cfg.block_size, cfg.vector_dim, cfg.rope_table_size) == (4, 128, 32, 128)
    assert (cfg.lr_block, cfg.sr_scale, cfg.time_channels, cfg.mlp_ratio) == (16, 4, 192, 4)
    assert cfg.clip.width == 64 and cfg.clip.layers == 2 and cfg.clip.image_size == 224
    assert cfg.clip.head_width == 32 and cfg.clip.embed_dim == 32 and cfg.clip.patch_size == 14
    assert "clip.visual.conv1.weight" in keys  # the CLIP tower travels in the converted file
    dropped = meta["infdit_dropped"].split(",")
    assert "mixins.adaln_layer.k_layer_norm.0.weight" in dropped
    assert "transformer.position_embeddings.weight" in dropped
    assert len(dropped) == 13  # 11 unused parameters + the 2 RoPE table buffers


def _expect_refusal(tmp_path, ckpt, fragment):
    out = tmp_path / "out.safetensors"
    res = run_cli("convert", ckpt, "-o", out)
    assert res.returncode == 1, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert fragment in lines[0]
    assert "Traceback" not in res.stderr
    assert list(tmp_path.iterdir()) == [ckpt] or not out.exists()
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_refuses_non_pickle(tmp_path):
    bad = tmp_path / "notes.pt"
    bad.write_text("hello, not a checkpoint\n")
    _expect_refusal(tmp_path, bad, "cannot read")


def test_refuses_truncated(tmp_path):
    bad = tmp_path / "trunc.pt"
    bad.write_bytes((DATA / "checkpoint.pt").read_bytes()[:200_000])
    _expect_refusal(tmp_path, bad, "cannot read")


def test_refuses_pickle_without_module(tmp_path):
    bad = tmp_path / "nomodule.pt"
    torch.save({"state_dict": {"a": torch.zeros(1)}}, bad)
    _expect_refusal(tmp_path, bad, "module")


def test_refuses_other_model(tmp_path):
    bad = tmp_path / "resnet.pt"
    torch.save({"module": {"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.bias": torch.zeros(10)}}, bad)
    _expect_refusal(tmp_path, bad, "not an Inf-DiT checkpoint")


def test_refuses_missing_output_dir_parent_not_writable(tmp_path):
    res = run_cli("convert", DATA / "checkpoint.pt", "-o", tmp_path / "x.bin")
    assert res.returncode == 1 and "must end in .safetensors" in res.stderr


def test_never_overwrites_without_flag(tmp_path):
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"precious")
    res = run_cli("convert", DATA / "checkpoint.pt", "-o", out, "--clip-head-width", "32")
    assert res.returncode == 1 and "--overwrite" in res.stderr
    assert out.read_bytes() == b"precious"


def _official_sd():
    return torch.load(DATA / "checkpoint.pt", map_location="cpu", weights_only=True)["module"]


@pytest.mark.parametrize("change", ["unknown", "missing", "shape"])
def test_unknown_missing_or_misshapen_key_is_named(tmp_path, change):
    sd = dict(_official_sd())
    if change == "unknown":
        sd["mixins.adaln_layer.surprise.weight"] = torch.zeros(3)
        name = "mixins.adaln_layer.surprise.weight"
    elif change == "missing":
        del sd["transformer.layers.1.mlp.dense_4h_to_h.bias"]
        name = "blocks.1.fc2.bias"
    else:
        sd["mixins.adaln_layer.cross_attention.dense.weight"] = torch.zeros(64, 32)
        name = "lr_cross.proj.weight"
    path = tmp_path / "c.pt"
    torch.save({"module": sd}, path)
    with pytest.raises(ConvertError, match=name.replace(".", r"\.")):
        convert_checkpoint(path, clip_head_width=32)


def test_rope_table_is_verified(tmp_path):
    sd = dict(_official_sd())
    sd["mixins.adaln_layer.rope.freqs_cos"] = sd["mixins.adaln_layer.rope.freqs_cos"].flip(0)
    path = tmp_path / "c.pt"
    torch.save({"module": sd}, path)
    with pytest.raises(ConvertError, match="RoPE"):
        convert_checkpoint(path, clip_head_width=32)
