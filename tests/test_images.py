import torch

from infdit_cli.images.load import fill_transparent


def test_fill_transparent_bleeds_nearest_visible_colour():
    rgb = torch.zeros(1, 3, 8, 8)
    alpha = torch.zeros(1, 1, 8, 8)
    rgb[:, 0, :, :4] = 1.0  # opaque red on the left half
    alpha[:, :, :, :4] = 1.0
    out = fill_transparent(rgb, alpha)
    assert torch.equal(out[..., :4], rgb[..., :4])  # visible pixels untouched
    assert out[:, 0, :, 4:].min() > 0.99 and out[:, 1:, :, 4:].abs().max() < 1e-6  # red, not black


def test_fill_transparent_noop_when_opaque():
    rgb = torch.rand(1, 3, 5, 7)
    assert torch.equal(fill_transparent(rgb, torch.ones(1, 1, 5, 7)), rgb)


# --- files in and out -------------------------------------------------------------------------------------

import os  # noqa: E402
import stat  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from infdit_cli.errors import BadImage, OutputError  # noqa: E402
from infdit_cli.images.load import load_image, probe_size, resize  # noqa: E402
from infdit_cli.images.save import check_output, save_image  # noqa: E402


def _rgb(h=6, w=8):
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_outputs_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        out = save_image(tmp_path / "x.png", _rgb())
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == mode


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    def boom(self, *a, **k):
        raise KeyboardInterrupt  # Ctrl-C in the middle of encoding

    monkeypatch.setattr(Image.Image, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        save_image(tmp_path / "x.png", _rgb())
    assert list(tmp_path.iterdir()) == []


def test_tiff_layout_tags_never_reach_another_format(tmp_path):
    src = tmp_path / "scan.tif"
    Image.fromarray((np.random.default_rng(0).random((6, 8, 3)) * 255).astype(np.uint8)).save(
        src, compression="tiff_lzw", tiffinfo={0x0131: "ScanSoft 9", 0x0112: 1})
    img = load_image(src)
    ex = Image.Exif()
    ex.load(img.exif)
    assert ex.get(0x0131) == "ScanSoft 9" and ex.get(0x0112) == 1
    assert not any(t in ex for t in (256, 257, 258, 259, 262, 273, 277, 278, 279, 284))


def test_libtiff_and_pillow_chatter_is_silenced(tmp_path, capfd):
    import struct

    src = tmp_path / "bad-lzw.tif"
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(src)
    d = bytearray(src.read_bytes())
    ifd = struct.unpack("<I", d[4:8])[0]
    for i in range(struct.unpack("<H", d[ifd : ifd + 2])[0]):
        e = ifd + 2 + 12 * i
        if struct.unpack("<H", d[e : e + 2])[0] == 259:
            d[e + 8 : e + 10] = struct.pack("<H", 5)  # says LZW, holds raw pixels: libtiff complains on fd 2
    src.write_bytes(bytes(d))
    capfd.readouterr()
    with pytest.raises(BadImage, match="damaged or truncated"):
        load_image(src)
    save_image(tmp_path / "out.tif", _rgb())
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_resize_keeps_one_pixel_sides():
    assert resize(torch.rand(1, 3, 9, 1), (4, 0)).shape[-2:] == (4, 1)


def test_probe_size_applies_orientation(tmp_path):
    src = tmp_path / "r.jpg"
    ex = Image.Exif()
    ex[0x0112] = 6
    Image.new("RGB", (40, 24)).save(src, exif=ex.tobytes())
    assert probe_size(src) == (40, 24)  # (h, w) upright: 24 wide, 40 high
    assert load_image(src).size == (40, 24)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes anywhere")
def test_read_only_folder_refused_before_work(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="permission denied"):
            check_output(folder / "x.png", overwrite=False)
    finally:
        folder.chmod(0o755)


def test_progress_shows_file_name_and_units():
    from rich.console import Console

    from infdit_cli.cli._progress import RichDisplay
    from infdit_cli.events import BatchDone, Notice, PassStarted
    from infdit_cli.jobs.pipeline import Pass

    console = Console(record=True, width=120, force_terminal=False)
    d = RichDisplay(console=console)
    d.calls_per_pass = 3
    d.image("[b]cat.png")
    d(PassStarted(1, 1, Pass(4, (8, 8), (32, 32), (32, 32)), 1))
    d(BatchDone(1, 4, 1, 0))
    d(Notice("[b]cat.png has 2 frames; only the first is upscaled"))
    console.print(d.steps, d.blocks)
    text = console.export_text()
    assert "[b]cat.png: pass 1/1 4x 8x8 -> 32x32" in text and "0/3 calls" in text
    assert "1/4 batches" in text and "warning: [b]cat.png has 2 frames" in text and "?" not in text
