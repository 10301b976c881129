"""16-bit in, 16-bit out: 16-bit RGB PNG and RGBA TIFF (made here, with a gradient 8 bits would band) are
read at full depth and written 16-bit by default; 8-bit stays 8-bit; --depth chooses; ICC, EXIF and DPI are
carried."""

import numpy as np
import png
import pytest
import tifffile
from conftest import run_cli
from PIL import Image

FAST = ["--steps", "2", "--device", "cpu"]
H, W = 16, 320  # 320 columns of a 0..65535 ramp: 320 levels, more than 8 bits hold


def _ramp(channels: int) -> np.ndarray:
    x = np.linspace(0, 65535, W).round().astype(np.uint16)
    planes = [np.tile(x, (H, 1)), np.tile(x[::-1], (H, 1)),
              np.tile((x // 2 + 16384).astype(np.uint16), (H, 1))]
    if channels == 4:
        planes.append(np.full((H, W), 65535, np.uint16)
                      - np.tile(x // 4, (H, 1)))  # alpha 0.75..1, a gradient too
    return np.ascontiguousarray(np.stack(planes, -1))


def _read16(path):
    """(H, W, C) samples as stored, and the bit depth, by the 16-bit libraries themselves."""
    if path.suffix == ".png":
        w, h, rows, info = png.Reader(filename=str(path)).asDirect()
        arr = np.vstack([np.asarray(r) for r in rows]).reshape(h, w, info["planes"])
        return arr, info["bitdepth"]
    arr = tifffile.imread(str(path))
    return arr, arr.dtype.itemsize * 8


def _levels(arr) -> list[int]:
    return [len(np.unique(arr[..., c])) for c in range(arr.shape[-1])]


@pytest.fixture
def w(tiny_weights):
    return ["--weights", str(tiny_weights)]


@pytest.fixture
def rgb16_png(tmp_path):
    src = tmp_path / "scan.png"
    arr = _ramp(3)
    with open(src, "wb") as f:
        png.Writer(W, H, greyscale=False, bitdepth=16).write_array(f, arr.reshape(-1))
    return src


@pytest.fixture
def rgba16_tif(tmp_path):
    src = tmp_path / "export.tif"
    tifffile.imwrite(src, _ramp(4), photometric="rgb", extrasamples=("unassalpha",),
                     iccprofile=b"\0" * 128 + b"x",
                     resolution=(300.0, 300.0), resolutionunit="INCH",
                     extratags=[(271, "s", 0, "ScanCo", True)])
    return src


def test_rgb16_png_comes_out_16bit(rgb16_png, tmp_path, w):
    out = tmp_path / "up.png"
    res = run_cli("upscale", rgb16_png, "-o", out, "--scale", "2", *FAST, *w)
    assert res.returncode == 0, res.stderr
    arr, depth = _read16(out)
    assert depth == 16 and arr.shape == (2 * H, 2 * W, 3)
    assert min(_levels(arr)) > 256, _levels(arr)  # the ramp's levels survived both ends


def test_rgba16_tiff_comes_out_16bit_with_metadata(rgba16_tif, tmp_path, w):
    out = tmp_path / "up.tif"
    res = run_cli("upscale", rgba16_tif, "-o", out, "--scale", "2", *FAST, *w)
    assert res.returncode == 0, res.stderr
    arr, depth = _read16(out)
    assert depth == 16 and arr.shape == (2 * H, 2 * W, 4)
    assert min(_levels(arr)) > 256, _levels(arr)
    with tifffile.TiffFile(out) as t:
        tags = t.pages[0].tags
        assert tags["InterColorProfile"].value == b"\0" * 128 + b"x"
        assert tags["Software"].value == "infdit" and tags["Make"].value == "ScanCo"
        assert tags["XResolution"].value == (600, 1) and tags["ResolutionUnit"].value == 2
        assert tuple(tags["ExtraSamples"].value) == (2,)  # unassociated alpha, as the input


def test_png16_carries_icc_exif_dpi(tmp_path, w):
    """The 16-bit PNG writer adds iCCP, pHYs and eXIf itself: Pillow reads them back."""
    src = tmp_path / "in.png"
    Image.fromarray(np.zeros((H, 32), np.uint16) + 40000).save(src)  # 16-bit grey, saved with metadata below
    exif = Image.Exif()
    exif[0x010F] = "infdit-test-camera"
    im = Image.open(src)
    im.save(src, icc_profile=b"\0" * 128 + b"icc", dpi=(300, 300), exif=exif.tobytes())
    arr = _ramp(4)[:, :32]
    with open(tmp_path / "rgba.png", "wb") as f:  # same metadata on a 16-bit RGBA file, spliced by our writer
        png.Writer(32, H, alpha=True, bitdepth=16).write_array(f, arr.reshape(-1))
    from infdit_cli.images.load import load_image
    from infdit_cli.images.save import save_image

    img = load_image(src)
    deep = load_image(tmp_path / "rgba.png")
    out = save_image(tmp_path / "out.png", deep.rgb, alpha=deep.alpha, bits=16, icc=img.icc, exif=img.exif,
                     dpi=img.dpi)
    with Image.open(out) as im:
        assert im.info["icc_profile"] == b"\0" * 128 + b"icc"
        assert abs(im.info["dpi"][0] - 300) < 0.01
        assert im.getexif()[0x010F] == "infdit-test-camera" and im.getexif()[0x0131] == "infdit"
    assert _read16(out)[1] == 16


def test_8bit_stays_8bit_and_depth_overrides(rgb16_png, tmp_path, w):
    src8 = tmp_path / "photo.png"
    Image.fromarray((_ramp(3) >> 8).astype(np.uint8)).save(src8)
    assert run_cli("upscale", src8, "-o", tmp_path / "a.png", "--scale", "2", *FAST, *w).returncode == 0
    assert _read16(tmp_path / "a.png")[1] == 8
    assert run_cli("upscale", src8, "-o", tmp_path / "b.png", "--scale", "2", "--depth", "16", *FAST,
                   *w).returncode == 0
    assert _read16(tmp_path / "b.png")[1] == 16
    assert run_cli("upscale", rgb16_png, "-o", tmp_path / "c.png", "--scale", "2", "--depth", "8", *FAST,
                   *w).returncode == 0
    assert _read16(tmp_path / "c.png")[1] == 8


@pytest.mark.parametrize("args", [("-o", "x.jpg", "--depth", "16"), ("-o", "x.webp", "--depth", "16"),
                                  ("-o", "x.png", "--depth", "12")])
def test_depth_refused_where_it_cannot_hold(rgb16_png, tmp_path, w, args):
    args = tuple(str(tmp_path / a) if a.startswith("x.") else a for a in args)
    res = run_cli("upscale", rgb16_png, *args, "--scale", "2", *FAST, *w)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and \
        "depth" in lines[0], res.stderr


def test_model_sees_the_full_depth(rgb16_png):
    """The LR tensor is the 16-bit samples / 65535, not a quantised 8-bit copy."""
    from infdit_cli.images.load import load_image

    img = load_image(rgb16_png)
    assert img.bits == 16 and not img.notices
    want = _ramp(3).astype(np.float32) / 65535
    assert np.abs(img.rgb[0].permute(1, 2, 0).numpy() - want).max() < 1e-6


def test_batch_keeps_16bit(rgb16_png, rgba16_tif, tmp_path, w):
    out = tmp_path / "out"
    res = run_cli("batch", tmp_path, "-o", out, "--scale", "2", *FAST, *w, "--json")
    assert res.returncode == 0, res.stderr
    for name in ("scan.png", "export.tif"):
        arr, depth = _read16(out / name)
        assert depth == 16 and min(_levels(arr)) > 256, name


def test_batch_depth_8(rgb16_png, tmp_path, w):
    """--depth 8 in batch writes a 16-bit input as 8-bit."""
    out = tmp_path / "out"
    res = run_cli("batch", tmp_path, "-o", out, "--scale", "2", "--depth", "8", *FAST, *w, "--json")
    assert res.returncode == 0, res.stderr
    assert _read16(out / "scan.png")[1] == 8
