"""Every boundary answers in one line: names on the terminal, downloads, model files, option values,
inputs and outputs. Each case goes through the CLI as a user would meet it; the answer is the documented
exit code and one stderr line with no raw control character and no third party's text."""

import hashlib
import json
import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import CKPT, RELEASE, run_cli
from PIL import Image

FAST = ["--steps", "2", "--device", "cpu"]
CONTROL = {chr(c) for c in [*range(0, 32), *range(0x7F, 0xA0)]} - {"\n"}
SHOWN = {  # a file name as created, and as infdit must print it
    "esc\x1b[31mRED.png": "esc\\x1b[31mRED.png",
    "osc\x1b]0;TITLE\x07.png": "osc\\x1b]0;TITLE\\x07.png",
    "bell\x07.png": "bell\\x07.png",
    "cr\rover.png": "cr\\rover.png",
    "new\nline.png": "new\\nline.png",
}
NAMES = list(SHOWN)


def _here(monkeypatch, capsys, *args) -> subprocess.CompletedProcess:
    """`infdit ARGS` through the CLI's own `main`, in this process (no interpreter start per case)."""
    from infdit_cli.cli.app import main

    monkeypatch.setattr(sys, "argv", ["infdit", *map(str, args)])
    monkeypatch.delenv("INFDIT_DEBUG", raising=False)
    with pytest.raises(SystemExit) as e:
        main()
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, e.value.code, out, err)


def _line(res, code: int) -> str:
    """The one stderr line of a failure with exit `code`, checked for raw control characters."""
    assert res.returncode == code, (res.returncode, res.stderr)
    lines = res.stderr.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert not CONTROL & set(res.stderr), repr(res.stderr)
    assert "Traceback" not in res.stderr
    return lines[0]


def _png(path: Path, h=12, w=16, seed=0) -> Path:
    Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)).save(path, "PNG")
    return path


# -- 1. names on the terminal ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_names_with_control_characters_are_escaped_in_errors(tmp_path, monkeypatch, capsys, name):
    missing = tmp_path / name
    line = _line(_here(monkeypatch, capsys, "upscale", missing, "--scale", "2"), 1)
    assert line.endswith(SHOWN[name]), line


def test_success_line_and_batch_table_escape_names(tmp_path, tiny_weights):
    """A real upscale and a real batch over files named with ESC, OSC, BEL, CR and newline: every line
    printed (the success line, the table, the summary) shows them escaped."""
    folder = tmp_path / "in"
    folder.mkdir()
    for i, name in enumerate(NAMES):
        _png(folder / name, seed=i)
    res = run_cli("upscale", folder / NAMES[0], "--scale", "2", *FAST, "--weights", tiny_weights)
    assert res.returncode == 0, res.stderr
    assert not CONTROL & set(res.stderr + res.stdout), repr(res.stderr)
    assert "wrote" in res.stderr and "esc\\x1b[31mRED_infdit.png" in res.stderr
    res = run_cli("batch", folder, "-o", tmp_path / "out", "--scale", "2", *FAST, "--weights", tiny_weights)
    assert res.returncode == 0, res.stderr
    assert not CONTROL & set(res.stderr + res.stdout), repr(res.stderr)
    assert "osc\\x1b]0;TITLE\\x07.png" in res.stderr and "new\\nline.png" in res.stderr
    assert "[31m" in res.stderr  # rich markup and the rest of a name stay literal


def test_json_output_stays_raw(tmp_path, tiny_weights):
    src = _png(tmp_path / NAMES[0])
    res = run_cli("upscale", src, "--scale", "2", *FAST, "--weights", tiny_weights, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["input"] == str(src)  # JSON escapes by itself; the name is exact


# -- 2. downloads ------------------------------------------------------------------------------------------

def _part(tmp_path) -> list[Path]:
    return list((tmp_path / "cache").rglob("*.part"))


def test_a_206_from_the_wrong_offset_restarts_cleanly(release):
    """A 206 that does not start where the partial file ends is never appended: the download starts over
    and the result is the whole, right file."""
    fake, url, env, tmp_path = release
    fake.cut_next_get_at = 5000  # the first transfer breaks off; the resume is answered 1000 bytes early
    fake.range_offset = -1000
    res = run_cli("download", url, "--sha256", hashlib.sha256(CKPT).hexdigest(), env=env)
    assert res.returncode == 0, res.stderr  # the whole, right file (its sha256 checked while it streamed)
    ranges = [r for m, _, r in fake.log if m == "GET"]
    assert ranges == [None, "bytes=5000-", None]  # the wrong 206 dropped, the file asked for from the start


def test_more_than_the_free_disk_is_refused_before_any_byte(release):
    fake, url, env, tmp_path = release
    fake.claim_length = 10**12
    res = run_cli("download", url, env=env)
    line = _line(res, 1)
    assert "needs" in line and "free" in line and len(line) < 300
    assert [p.stat().st_size for p in _part(tmp_path)] in ([], [0])


def test_a_stalled_transfer_keeps_what_it_received(release, monkeypatch):
    """The server sends 300 KB then stalls past the read timeout: those bytes stay in the partial file
    (a read of what has arrived, not of a whole MiB), and the next attempt resumes after them."""
    fake, url, env, tmp_path = release
    fake.stall_next_get_at, fake.stall_s = 300_000, 3.0
    env = {**env, "INFDIT_DOWNLOAD_TIMEOUT": "1"}
    res = run_cli("download", url, env=env, process=True)  # the timeout is read when infdit imports
    assert res.returncode == 0, res.stderr
    ranges = [r for m, _, r in fake.log if m == "GET"]
    assert ranges[:2] == [None, "bytes=300000-"], ranges


def test_a_non_checkpoint_download_says_so_in_our_words(release):
    fake, url, env, tmp_path = release
    import pickle
    from fractions import Fraction

    fake.plain[RELEASE] = pickle.dumps({"module": {"w": Fraction(1, 3)}})  # a pickle of a foreign class
    line = _line(run_cli("download", url, env=env), 1)
    assert "weights_only" not in line and "arbitrary code" not in line and "never unpickles" in line


# -- 3. model files and manifests --------------------------------------------------------------------------

def _with_config(tmp_path: Path, tiny_weights: Path, edit) -> Path:
    """A copy of the tiny model file with its infdit_config edited by `edit(dict)`."""
    raw = tiny_weights.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    cfg = json.loads(header["__metadata__"]["infdit_config"])
    edit(cfg)
    header["__metadata__"]["infdit_config"] = json.dumps(cfg)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    out = tmp_path / "edited.safetensors"
    out.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
    return out


@pytest.mark.parametrize("field,value", [
    ("num_heads", 0), ("patch_size", 0), ("hidden_size", -32), ("num_layers", 30000),
    ("rope_table_size", 10**9), ("clip.head_width", 0), ("num_heads", "2"), ("layernorm_eps", -1),
])
def test_crafted_configs_are_one_line_before_anything_is_built(tmp_path, tiny_weights, monkeypatch, capsys,
                                                               field, value):
    def edit(cfg):
        if field.startswith("clip."):
            cfg["clip"][field[5:]] = value
        else:
            cfg[field] = value

    path = _with_config(tmp_path, tiny_weights, edit)
    for args in (["info", path],
                 ["upscale", _png(tmp_path / "in.png"), "--scale", "2", *FAST, "--weights", path]):
        line = _line(_here(monkeypatch, capsys, *args), 1)
        assert str(path) in line and field.split(".")[-1] in line


def test_a_manifest_with_a_path_for_a_file_name_is_one_line(tmp_path, monkeypatch, capsys):
    reg = tmp_path / "registry"
    reg.mkdir()
    spec = {"name": "evil", "repo_id": "org/repo", "filename": "../../x", "revision": None, "sha256": None,
            "size": None, "license": "-", "source": "-", "conversion": "-"}
    (reg / "evil.json").write_text(json.dumps(spec))
    monkeypatch.setenv("INFDIT_REGISTRY", str(reg))
    line = _line(_here(monkeypatch, capsys, "info", "evil"), 1)
    assert "evil.json" in line and "filename" in line


def test_a_folder_named_like_the_model_does_not_shadow_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "infdit-4x").mkdir()
    monkeypatch.setenv("INFDIT_CACHE", str(tmp_path / "cache"))
    line = _line(_here(monkeypatch, capsys, "upscale", _png(tmp_path / "in.png"), "--scale", "2",
                       "--offline"), 1)
    assert "infdit download" in line  # the registry model, not "no such weights file: infdit-4x"


# -- 4. option values --------------------------------------------------------------------------------------

@pytest.mark.parametrize("opts", [
    ["--seed", "99999999999999999999"], ["--seed", "-1"], ["--scale", "1e308"], ["--scale", "1e300"],
    ["--scale", "nan"], ["--max-pixels", "0"], ["--max-pixels", "-1"], ["--res", "99999999999999999999999"],
    ["--res", "70000x10"], ["--steps", "0"], ["--quality", "101"],
])
def test_bad_option_values_are_usage_errors(tmp_path, tiny_weights, monkeypatch, capsys, opts):
    src = _png(tmp_path / "in.png")
    args = ["upscale", src, *FAST, "--weights", tiny_weights, *opts]
    if "--scale" not in opts and "--res" not in opts:
        args += ["--scale", "2"]
    line = _line(_here(monkeypatch, capsys, *args), 2)
    assert len(line) < 240 and not any(len(tok) > 30 for tok in line.split())  # short numbers


def test_dry_run_refuses_what_the_real_run_would(tmp_path, tiny_weights, monkeypatch, capsys):
    src = _png(tmp_path / "in.png", 100, 100)
    for extra in (["--dry-run"], []):
        line = _line(_here(monkeypatch, capsys, "upscale", src, "-o", tmp_path / "out.webp", "--res", "17000",
                           *FAST, "--weights", tiny_weights, *extra), 2)
        assert "WEBP cannot hold 17000x17000" in line


# -- 5. inputs and outputs ---------------------------------------------------------------------------------

def test_output_that_is_the_input_is_refused_even_with_overwrite(tmp_path, tiny_weights, monkeypatch, capsys):
    src = _png(tmp_path / "in.png")
    before = src.read_bytes()
    link = tmp_path / "link.png"
    link.symlink_to(src)
    hard = tmp_path / "hard.png"
    os.link(src, hard)
    for out in (src, link, hard, tmp_path / "." / "in.png"):
        line = _line(_here(monkeypatch, capsys, "upscale", src, "-o", out, "--scale", "2", "--overwrite",
                           *FAST, "--weights", tiny_weights), 2)
        assert "is the input" in line
    assert src.read_bytes() == before


def test_a_dangling_link_as_output_is_an_existing_path(tmp_path, tiny_weights, monkeypatch, capsys):
    """A dangling symlink at -o (issue 30 item 7) is refused without --overwrite (the link stays, nothing is
    created at its target); with --overwrite the link itself is replaced by the output, never its target."""
    src = _png(tmp_path / "in.png")
    target = tmp_path / "elsewhere" / "never.png"  # its folder does not exist: following the link would fail
    out = tmp_path / "out.png"
    out.symlink_to(target)
    line = _line(_here(monkeypatch, capsys, "upscale", src, "-o", out, "--scale", "2", *FAST, "--weights",
                       tiny_weights), 1)
    assert line == f"error: {out} exists; pass --overwrite to replace it"
    assert out.is_symlink() and os.readlink(out) == str(target) and not target.parent.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "in.png", "out.png"][1:]
    target.parent.mkdir()  # now the target could be created: with --overwrite it still is not
    res = _here(monkeypatch, capsys, "upscale", src, "-o", out, "--scale", "2", "--overwrite", *FAST,
                "--weights", tiny_weights)
    assert res.returncode == 0, res.stderr
    assert not out.is_symlink() and Image.open(out).size == (32, 24)
    assert list(target.parent.iterdir()) == []


def test_batch_skips_its_own_earlier_outputs(tmp_path, tiny_weights):
    folder = tmp_path / "photos"
    folder.mkdir()
    _png(folder / "a.png")
    first = run_cli("upscale", folder / "a.png", "--scale", "2", *FAST, "--weights", tiny_weights)
    assert first.returncode == 0 and (folder / "a_infdit.png").exists(), first.stderr
    res = run_cli("batch", folder, "-o", tmp_path / "out", "--scale", "2", *FAST, "--weights", tiny_weights,
                  "--json")
    assert res.returncode == 0, res.stderr
    items = {Path(i["input"]).name: i for i in json.loads(res.stdout)["items"]}
    assert items["a.png"]["status"] == "done"
    assert items["a_infdit.png"]["status"] == "skipped" and "infdit output" in items["a_infdit.png"]["reason"]


def _fuzzed_psd(path: Path) -> Path:
    """A PSD that Pillow opens but cannot decode: one layer with a negative size ("negative tile size"),
    like Pillow's own psd-oob-write-overflow.psd."""
    rec = struct.pack(">iiii", 0, 0, -5, -5) + struct.pack(">H", 1) + struct.pack(">hI", 0, 2)
    rec += b"8BIMnorm" + bytes([255, 0, 0, 0])
    extra = struct.pack(">II", 0, 0) + b"\x00\x00\x00\x00"
    rec += struct.pack(">I", len(extra)) + extra
    layers = struct.pack(">h", 1) + rec + struct.pack(">H", 0)
    blob = struct.pack(">I", len(layers)) + layers
    head = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, 8, 8, 8, 3) + struct.pack(">II", 0, 0)
    path.write_bytes(head + struct.pack(">I", len(blob)) + blob + struct.pack(">H", 0) + bytes(3 * 64))
    return path


def test_a_fuzzed_psd_is_damaged_not_an_internal_error(tmp_path, tiny_weights, monkeypatch, capsys):
    psd = _fuzzed_psd(tmp_path / "fuzzed.psd")
    Image.open(psd)  # Pillow opens it ...
    line = _line(_here(monkeypatch, capsys, "upscale", psd, "-o", tmp_path / "o.png", "--scale", "2", *FAST,
                       "--weights", tiny_weights), 1)
    assert "damaged or unsupported" in line and "negative tile size" in line and "internal" not in line


# -- fuzz --------------------------------------------------------------------------------------------------

def test_fuzzed_options_and_headers_stay_inside_the_contract(tmp_path, tiny_weights, monkeypatch, capsys):
    """A few hundred random option values and random edits of a model file's header, through the CLI's
    main (in process, fixed seed): never a traceback, never an internal error, exit codes 0, 1 or 2 only.
    Every run stops before computing (--dry-run, or a bad value), so the whole test is seconds."""
    rng = random.Random(1234)
    src = _png(tmp_path / "in.png")
    numbers = ["0", "-1", "1", "2", "1e308", "-1e308", "nan", "inf", "1e-300", "99999999999999999999", "3.5",
               "0x10", "", " ", "1_000", "2" * 400, "4096x", "x4096", "10x10x10", "\x1b[2J", "１２"]
    options = ["--seed", "--scale", "--res", "--steps", "--max-pixels", "--block-batch", "--mem-budget",
               "--quality"]
    codes = []
    for _ in range(250):
        args = ["upscale", src, "--dry-run", "--weights", tiny_weights, "--device", "cpu"]
        for opt in rng.sample(options, rng.randint(1, 3)):
            args += [opt, rng.choice(numbers)]
        if "--res" not in args and "--scale" not in args:
            args += ["--scale", "2"]
        res = _here(monkeypatch, capsys, *args)
        codes.append(res.returncode)
        assert res.returncode in (0, 2), (args, res.stderr)
        assert "Traceback" not in res.stderr and "internal error" not in res.stderr, (args, res.stderr)
        if res.returncode:
            _line(res, res.returncode)
    assert 0 in codes and 2 in codes
    raw = tiny_weights.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    for _ in range(150):
        header = bytearray(raw[8 : 8 + n])
        for _ in range(rng.randint(1, 4)):
            header[rng.randrange(len(header))] = rng.randrange(32, 127)
        path = tmp_path / "fuzzed.safetensors"
        path.write_bytes(raw[:8] + bytes(header) + raw[8 + n :])
        res = _here(monkeypatch, capsys, "info", path)
        assert res.returncode in (0, 1), res.stderr
        assert "Traceback" not in res.stderr and "internal error" not in res.stderr, res.stderr
        if res.returncode:
            _line(res, 1)
