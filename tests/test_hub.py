"""The real download path (`huggingface_hub`) against a local stand-in for the Hub; no internet."""

import hashlib
import json
import os

import pytest
from conftest import run_cli
from hubserver import FakeHub, Repo


@pytest.fixture
def hub(tiny_weights, tmp_path):
    fake = FakeHub()
    data = tiny_weights.read_bytes()
    fake.repos["acme/infdit-tiny"] = Repo({"tiny.safetensors": data, "model.safetensors": data})
    fake.repos["acme/private"] = Repo({"model.safetensors": data}, token="hf_secret")
    url = fake.start()
    env = {**os.environ, "HF_ENDPOINT": url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0",
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "5"}
    env.pop("HF_TOKEN", None)
    yield fake, env, data
    try:
        fake.stop()
    except Exception:
        pass


def _one_line(res):
    lines = res.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error:") and "Traceback" not in res.stderr, res.stderr
    return lines[-1]


def test_download_then_cached_then_offline(hub, tmp_path):
    fake, env, data = hub
    res = run_cli("download", "acme/infdit-tiny/tiny.safetensors", "--quiet", env=env)
    assert res.returncode == 0, res.stderr
    path = res.stdout.strip().splitlines()[-1]
    assert path.startswith(str(tmp_path / "hf")) and open(path, "rb").read() == data
    assert any(m == "GET" for m, _, _ in fake.log)

    fake.stop()  # the Hub is gone: the cached copy still serves
    res = run_cli("info", "acme/infdit-tiny/tiny.safetensors", "--json", env=env)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["config"]["hidden_size"] == 32

    off = {**env, "HF_HUB_OFFLINE": "1"}
    assert run_cli("download", "acme/infdit-tiny/tiny.safetensors", env=off).returncode == 0
    res = run_cli("download", "acme/infdit-tiny/model.safetensors", env=off)
    assert res.returncode == 1 and "offline" in _one_line(res)


def test_unreachable_hub_explains(hub):
    fake, env, _ = hub
    fake.stop()
    res = run_cli("download", "acme/infdit-tiny/tiny.safetensors", env=env)
    assert res.returncode == 1
    line = _one_line(res)
    assert "could not reach the Hub" in line and "--weights FILE" in line


@pytest.mark.parametrize("ref,fragment", [
    ("acme/nothere/model.safetensors", "repository acme/nothere not found"),
    ("acme/infdit-tiny/nope.safetensors", "'nope.safetensors' not found in acme/infdit-tiny"),
    ("acme/infdit-tiny/tiny.safetensors@v9", "revision 'v9' not found"),
    ("acme/private/model.safetensors", "401 unauthorized"),
])
def test_hub_errors_name_what_failed(hub, ref, fragment):
    _, env, _ = hub
    res = run_cli("download", ref, env=env)
    assert res.returncode == 1
    assert fragment in _one_line(res)


def test_token_opens_private_repo(hub):
    _, env, data = hub
    res = run_cli("download", "acme/private", "--quiet", env={**env, "HF_TOKEN": "hf_secret"})
    assert res.returncode == 0, res.stderr
    assert open(res.stdout.strip().splitlines()[-1], "rb").read() == data


def test_interrupted_download_resumes(hub):
    fake, env, data = hub
    fake.cut_next_get_at = len(data) // 2
    first = run_cli("download", "acme/infdit-tiny/tiny.safetensors", "--quiet", env=env)
    if first.returncode != 0:  # the client gave up on the dropped connection: one clear line
        assert "run the command again" in _one_line(first), first.stderr
        second = run_cli("download", "acme/infdit-tiny/tiny.safetensors", "--quiet", env=env)
        assert second.returncode == 0, second.stderr
        path = second.stdout.strip().splitlines()[-1]
    else:
        path = first.stdout.strip().splitlines()[-1]
    assert open(path, "rb").read() == data  # complete and intact either way
    gets = [r for m, _, r in fake.log if m == "GET"]
    assert len(gets) >= 2, fake.log  # the cut-off transfer really happened and was followed by another


def test_checksum_mismatch_removes_cached_file(hub, tmp_path):
    _, env, data = hub
    reg = tmp_path / "registry"
    reg.mkdir()
    manifest = {"name": "tiny-test", "repo_id": "acme/infdit-tiny", "filename": "tiny.safetensors",
                "revision": "main", "sha256": "0" * 64, "size": len(data), "license": "test",
                "source": "test", "conversion": "test"}
    (reg / "tiny-test.json").write_text(json.dumps(manifest))
    env = {**env, "INFDIT_REGISTRY": str(reg)}
    res = run_cli("download", "tiny-test", env=env)
    assert res.returncode == 1 and "sha256" in _one_line(res)
    blobs = list((tmp_path / "hf").rglob("blobs/*"))
    assert not [b for b in blobs if b.is_file() and b.stat().st_size == len(data)]

    manifest["sha256"] = hashlib.sha256(data).hexdigest()
    (reg / "tiny-test.json").write_text(json.dumps(manifest))
    res = run_cli("download", "tiny-test", "--quiet", env=env)
    assert res.returncode == 0, res.stderr


@pytest.mark.slow
def test_no_weights_names_the_one_command(tmp_path):
    """Nothing downloaded, no Hub repo: the error is exactly the command that fixes it."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "INFDIT_CACHE": str(tmp_path / "cache")}
    env.pop("INFDIT_REPO", None)
    env.pop("INFDIT_WEIGHTS", None)
    img = tmp_path / "in.png"
    from PIL import Image

    Image.new("RGB", (16, 12)).save(img)
    res = run_cli("upscale", img, "--res", "64", "--device", "cpu", env=env)
    assert res.returncode == 1
    assert _one_line(res) == "error: no weights for infdit-4x yet: run `infdit download`"
    # resolving never creates or fetches anything (the plan's time calibration, kept unless taken under
    # load, is the cache's only file)
    cache = tmp_path / "cache"
    assert not cache.exists() or {p.name for p in cache.iterdir()} <= {"calibration.json"}
    assert not (tmp_path / "hf").exists()


@pytest.mark.slow
def test_clip_tower_from_hub_when_file_has_none(hub, tmp_path, tiny_model, tiny_weights):
    """A converted file without the CLIP tower gets open_clip's weights from the Hub (here: a tiny tower
    under the same manifest mechanism), and upscales exactly like the file that carries them."""
    import numpy as np
    from PIL import Image
    from safetensors.torch import save_file

    from infdit_cli.weights.format import save_model_file

    fake, env, _ = hub
    cfg = tiny_model.config
    sd = tiny_model.state_dict()
    noclip = tmp_path / "noclip.safetensors"
    save_model_file(noclip, {k: v for k, v in sd.items() if not k.startswith("clip.")}, cfg.with_(clip=None))
    tower = tmp_path / "tower.safetensors"
    save_file({k.removeprefix("clip."): v.contiguous() for k, v in sd.items()
               if k.startswith("clip.visual.")},
              tower)
    fake.repos["laion/tiny-clip"] = Repo({"open_clip_model.safetensors": tower.read_bytes()})
    reg = tmp_path / "registry"
    reg.mkdir()
    c = cfg.clip
    (reg / "clip.json").write_text(json.dumps({
        "name": "clip-vit-l-14-datacomp", "repo_id": "laion/tiny-clip",
        "filename": "open_clip_model.safetensors",
        "revision": None, "sha256": None, "size": None, "license": "test", "source": "test",
        "conversion": "none", "clip_config": {"embed_dim": c.embed_dim, "width": c.width, "layers": c.layers,
                        "head_width": c.head_width, "patch_size": c.patch_size, "image_size": c.image_size}}))
    env = {**env, "INFDIT_REGISTRY": str(reg)}
    src = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(0).random((12, 16, 3)) * 255).astype(np.uint8)).save(src)
    outs = []
    for name, weights in (("a.png", noclip), ("b.png", tiny_weights)):
        res = run_cli("upscale", src, "-o", tmp_path / name, "--scale", "2", "--steps", "2", "--device",
                      "cpu", "--weights", weights, env=env)
        assert res.returncode == 0, res.stderr
        outs.append(np.asarray(Image.open(tmp_path / name)))
    assert np.array_equal(outs[0], outs[1])
    assert any("tiny-clip" in path for _, path, _ in fake.log)
