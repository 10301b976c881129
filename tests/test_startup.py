"""Start-up (issue 31): `infdit --help`, `COMMAND --help`, `--version` and usage errors never import torch
or the other heavy modules (they took ~2.5 s before anything was said); `--version` says infdit's and
torch's versions and whether CUDA is available, as torch itself would."""

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "numpy", "PIL", "open_clip", "fastapi", "uvicorn", "safetensors")


def test_the_cli_answers_help_and_usage_errors_without_torch(tmp_path):
    """A fresh interpreter (sys.modules is the point): importing the CLI, then --help, a command's --help,
    --version and two usage errors (click's own, and the missing target found in the command's body)."""
    code = ("import json, sys\nimport infdit_cli.cli.app as A\n"
            "after_import = sorted(m for m in HEAVY if m in sys.modules)\ncodes = []\n"
            "for argv in ARGVS:\n    sys.argv = ['infdit', *argv]\n    try:\n        A.main()\n"
            "    except SystemExit as e:\n        codes.append(e.code)\n"
            "print(json.dumps({'import': after_import, 'codes': codes, "
            "'heavy': sorted(m for m in HEAVY if m in sys.modules)}))\n")
    photo = tmp_path / "photo.png"
    photo.write_bytes(b"not read: the usage error comes first")
    argvs = [["--help"], ["upscale", "--help"], ["serve", "--help"], ["--version"], ["upscale"],
             ["upscale", str(photo)], ["batch", str(tmp_path), "--res", "64", "--scale", "2"],
             ["upscale", str(photo), "--res", "64", "--mem-budget", "junk"],
             ["batch", str(tmp_path), "--res", "64", "--mem-budget", "0"], ["serve", "--max-bytes", "xx"]]
    res = subprocess.run([sys.executable, "-c", f"HEAVY = {HEAVY!r}\nARGVS = {argvs!r}\n{code}"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["import"] == [] and got["heavy"] == [], got
    assert got["codes"] == [0, 0, 0, 0, 2, 2, 2, 2, 2, 2], (got, res.stderr)
    assert "error: give a target: --res 4096" in res.stderr
    assert "error: --mem-budget: not a memory size: 'junk'" in res.stderr
    assert "error: --max-bytes must be a size like 100MB or 2GB, got 'xx'" in res.stderr


def test_version_says_infdit_torch_and_cuda_as_torch_does(monkeypatch, capsys):
    import torch

    from infdit_cli import __version__
    from infdit_cli.cli.app import main

    monkeypatch.setattr(sys, "argv", ["infdit", "--version"])
    with pytest.raises(SystemExit) as e:
        main()
    out, err = capsys.readouterr()
    assert e.value.code == 0 and err == ""
    line, = out.splitlines()
    assert line.startswith(f"infdit {__version__}; torch {torch.__version__}; ")
    says = line.split("; ", 2)[2]
    assert says.startswith("CUDA available (" if torch.cuda.is_available() else "CUDA not available ("), line
    if torch.version.cuda is None:
        assert says == "CUDA not available (this torch is built without CUDA)"
    else:
        assert f"torch built for CUDA {torch.version.cuda})" in says
        if torch.cuda.is_available():
            assert says.startswith(f"CUDA available ({torch.cuda.device_count()} device")


def test_the_light_copy_of_the_pixel_limit_is_the_library_s():
    from infdit_cli.cli import _checks
    from infdit_cli.images import load as images

    assert _checks.DEFAULT_MAX_PIXELS == images.DEFAULT_MAX_PIXELS
