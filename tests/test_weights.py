"""Loading refuses every malformed file with one clear error; the CLI never shows a traceback."""

import json
import struct

import pytest
import torch
from conftest import DATA, run_cli
from safetensors.torch import save_file

from infdit_cli.errors import WeightsError
from infdit_cli.weights.format import load_model


def _write_raw(path, header: dict, payload: bytes = b""):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + payload)


@pytest.fixture
def tiny_sd(tiny_model):
    return {k: v.clone() for k, v in tiny_model.state_dict().items()}


def test_roundtrip(tiny_weights, tiny_model):
    m = load_model(tiny_weights)
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(m.state_dict()[k], v)
    assert not m.training


@pytest.mark.parametrize("case", ["short", "header_longer_than_file", "bad_json", "truncated_data",
                                  "no_config", "int_dtype", "wrong_shape", "missing_key", "extra_key",
                                  "pickle", "bad_config"])
def test_malformed_files_are_refused(tmp_path, tiny_weights, tiny_sd, tiny_config, case):
    p = tmp_path / "m.safetensors"
    meta = {"infdit_config": tiny_config.to_json()}
    if case == "short":
        p.write_bytes(b"\x01\x02")
    elif case == "header_longer_than_file":
        p.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    elif case == "bad_json":
        p.write_bytes(struct.pack("<Q", 5) + b"{nope")
    elif case == "truncated_data":
        p.write_bytes(tiny_weights.read_bytes()[:-1000])
    elif case == "no_config":
        save_file(tiny_sd, p)
    elif case == "int_dtype":
        tiny_sd["x_embedder.bias"] = tiny_sd["x_embedder.bias"].to(torch.int32)
        save_file(tiny_sd, p, metadata=meta)
    elif case == "wrong_shape":
        tiny_sd["blocks.0.qkv.weight"] = torch.zeros(5, 5)
        save_file(tiny_sd, p, metadata=meta)
    elif case == "missing_key":
        del tiny_sd["re_pos_embed"]
        save_file(tiny_sd, p, metadata=meta)
    elif case == "extra_key":
        tiny_sd["surprise"] = torch.zeros(1)
        save_file(tiny_sd, p, metadata=meta)
    elif case == "pickle":
        p = tmp_path / "m.pt"
        p.write_bytes((DATA / "checkpoint.pt").read_bytes())
    elif case == "bad_config":
        save_file(tiny_sd, p, metadata={"infdit_config": json.dumps({"hidden_size": 33, "num_heads": 2})})
    with pytest.raises(WeightsError) as err:
        load_model(p)
    msg = str(err.value)
    expected = {"wrong_shape": "blocks.0.qkv.weight", "missing_key": "re_pos_embed", "extra_key": "surprise",
                "pickle": "infdit convert", "int_dtype": "x_embedder.bias", "truncated_data": "truncated",
                "header_longer_than_file": "exceeds the file", "no_config": "infdit convert",
                "short": "too short", "bad_json": "unreadable header",
                "bad_config": "not divisible by num_heads"}
    assert expected[case] in msg
    res = run_cli("info", p)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in res.stderr


def test_missing_file(tmp_path):
    res = run_cli("info", tmp_path / "absent.safetensors")
    assert res.returncode == 1 and "no such weights file" in res.stderr
