"""The kinds of files cameras, scanners and editors write, generated here with Pillow (and one PNG by hand),
each through `upscale` (the library, in-process) and all of them through one `batch` (the CLI): each gives
a correct image (size, mode, alpha, orientation) or one line with the right exit code."""

import json
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image

from infdit_cli.errors import InfditError
from infdit_cli.events import Notice
from infdit_cli.jobs.pipeline import UpscaleOptions
from infdit_cli.jobs.upscaler import Upscaler

H, W = 12, 16  # stored size of most inputs; --scale 2 makes 24x32
RNG = np.random.default_rng(0)
NOISE = (RNG.random((H, W, 3)) * 200 + 30).astype(np.uint8)  # no pixel equals a colour key below


def exif_bytes(entries: list[tuple[int, int, int, bytes]]) -> bytes:
    """A little-endian EXIF block with one IFD: (tag, TIFF type, count, value bytes), as cameras write it."""
    head = b"II*\x00" + struct.pack("<I", 8)
    body, extra = struct.pack("<H", len(entries)), b""
    data_at = 8 + 2 + 12 * len(entries) + 4
    for tag, typ, count, val in sorted(entries):
        if len(val) <= 4:
            body += struct.pack("<HHI", tag, typ, count) + val.ljust(4, b"\x00")
        else:
            body += struct.pack("<HHII", tag, typ, count, data_at + len(extra))
            extra += val
    return b"Exif\x00\x00" + head + body + struct.pack("<I", 0) + extra


def chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_rgb16(path: Path, arr: np.ndarray) -> None:
    """A 16-bit RGB PNG written by hand (Pillow cannot write one), as scanners and raw converters do."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


GREY, GREY_ALPHA = 0, 4  # PNG colour types


def png_grey(path: Path, arr: np.ndarray, depth: int, key: int | None = None) -> None:
    """A grey PNG of `depth` bits written chunk by chunk (no library), with a tRNS colour key if `key`."""
    h, w = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2" if depth == 16 else "u1").tobytes() for y in range(h))
    trns = chunk(b"tRNS", struct.pack(">H", key)) if key is not None else b""
    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, GREY, 0, 0, 0))
    idat = chunk(b"IDAT", zlib.compress(raw))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + ihdr + trns + idat + chunk(b"IEND", b""))


def png_header(path: Path) -> tuple[int, int]:
    """(bit depth, colour type) from a PNG's IHDR, as the file says (Pillow shows 16-bit grey+alpha as
    RGBA)."""
    data = path.read_bytes()
    assert data[12:16] == b"IHDR"
    return data[24], data[25]


def keyed(mode: str):
    """An image whose left half is exactly the colour key and whose right half never is."""
    if mode == "RGB":
        arr = NOISE.copy()
        arr[:, : W // 2] = (0, 0, 0)
        return Image.fromarray(arr), (0, 0, 0)
    if mode == "L":
        arr = NOISE[..., 0].copy()
        arr[:, : W // 2] = 7
        return Image.fromarray(arr, "L"), 7
    if mode == "I;16":
        arr = (NOISE[..., 0].astype(np.uint16) * 257) + 1
        arr[:, : W // 2] = 1000
        return Image.fromarray(arr), 1000
    arr = np.ones((H, W), bool)  # mode 1: left half black, the key
    arr[:, : W // 2] = False
    return Image.fromarray(arr), 0


def frames(n: int) -> list[Image.Image]:
    return [Image.fromarray(np.roll(NOISE, 3 * i, axis=1)) for i in range(n)]


@dataclass
class Case:
    name: str
    make: object  # (path) -> None
    out: str = ".png"
    size: tuple[int, int] | None = (2 * W, 2 * H)  # (w, h) of the output; None: an error is expected
    mode: str | None = "RGB"
    alpha: str | None = None  # "left": left half transparent; "corner": the opaque corner, upright
    notice: str | None = None
    error: str | None = None
    code: int = 1


def _save(im_fn, **kw):
    return lambda p: im_fn().save(p, **kw)


def _tiff_multi(p):
    a, b = frames(2)
    a.save(p, save_all=True, append_images=[b.resize((8, 8))])


def _keyed_save(mode):
    def make(p):
        im, key = keyed(mode)
        im.save(p, transparency=key)
    return make


def _palette(transparent: bool):
    def make(p):
        im = Image.fromarray(NOISE).quantize(15)  # index 15 is left for the transparent half
        arr = np.asarray(im).copy()
        arr[:, : W // 2] = 15
        out = Image.fromarray(arr, "P")
        out.putpalette(im.getpalette()[: 15 * 3] + [0, 0, 0])
        out.save(p, transparency=15) if transparent else out.save(p)
    return make


def _corner_alpha(orientation: int):
    """RGBA stored 16 wide x 12 high with its top-left quarter opaque, EXIF orientation `orientation`."""
    def make(p):
        arr = np.zeros((H, W, 4), np.uint8)
        arr[..., :3] = NOISE
        arr[: H // 2, : W // 2, 3] = 255
        ex = Image.Exif()
        ex[0x0112] = orientation
        ex[0x010F] = "camera"
        Image.fromarray(arr, "RGBA").save(p, exif=ex.tobytes())
    return make


def _jpeg_exif(entries):
    return lambda p: Image.fromarray(NOISE).save(p, exif=exif_bytes(entries), quality=90)


SHORT, ASCII, RATIONAL = 3, 2, 5
CASES = [
    Case("raw.tif", _save(lambda: Image.fromarray(NOISE))),
    Case("raw-to-tif.tif", _save(lambda: Image.fromarray(NOISE)), out=".tif"),
    Case("lzw.tif", _save(lambda: Image.fromarray(NOISE), compression="tiff_lzw"), out=".tif"),
    Case("deflate.tif", _save(lambda: Image.fromarray(NOISE), compression="tiff_adobe_deflate"), out=".jpg"),
    Case("jpeg-in.tif", _save(lambda: Image.fromarray(NOISE), compression="jpeg"), out=".webp"),
    Case("pages.tif", _tiff_multi, out=".tif", notice="2 frames"),
    Case("gray16.tif", _save(lambda: Image.fromarray(NOISE[..., 0].astype(np.uint16) * 250)), out=".tif",
         mode="I;16"),
    Case("float.tif", _save(lambda: Image.fromarray(NOISE[..., 0].astype(np.float32) / 255)), mode="I;16"),
    Case("cmyk.jpg", _save(lambda: Image.fromarray(NOISE).convert("CMYK"))),
    Case("cmyk.tif", _save(lambda: Image.fromarray(NOISE).convert("CMYK")), out=".tif"),
    Case("exif-res-ascii.jpg", _jpeg_exif([(282, ASCII, 3, b"72\x00"), (283, ASCII, 3, b"72\x00"),
                                           (296, SHORT, 1, struct.pack("<H", 2))]), out=".jpg"),
    Case("exif-whitepoint-ascii.jpg", _jpeg_exif([(0x013E, ASCII, 4, b"D65\x00"),
                                                  (0x010F, ASCII, 4, b"cam\x00")]), out=".jpg",
         notice="malformed EXIF tag(s) dropped: WhitePoint"),
    Case("exif-no-xres.jpg", _jpeg_exif([(283, RATIONAL, 1, struct.pack("<II", 72, 1)),
                                         (296, SHORT, 1, struct.pack("<H", 2)),
                                         (274, SHORT, 1, struct.pack("<H", 6))]), out=".jpg",
         size=(2 * H, 2 * W)),
    Case("exif-orientation-9.jpg", _jpeg_exif([(274, SHORT, 1, struct.pack("<H", 9))]), notice="not valid"),
    Case("rot6-alpha.png", _corner_alpha(6), size=(2 * H, 2 * W), mode="RGBA", alpha="corner6"),
    Case("rot8-alpha.webp", _corner_alpha(8), size=(2 * H, 2 * W), mode="RGBA", alpha="corner8"),
    Case("one-wide.png", _save(lambda: Image.fromarray(NOISE[:, :1])), size=(2, 2 * H)),
    Case("one-tall.png", _save(lambda: Image.fromarray(NOISE[:1])), size=(2 * W, 2)),
    Case("one-pixel.png", _save(lambda: Image.fromarray(NOISE[:1, :1])), size=(2, 2)),
    Case("trns-rgb.png", _keyed_save("RGB"), mode="RGBA", alpha="left"),
    Case("trns-gray.png", _keyed_save("L"), mode="LA", alpha="left"),
    Case("trns-1bit.png", _keyed_save("1"), mode="LA", alpha="left"),
    # 16-bit grey+alpha (pypng), which Pillow shows as RGBA: check_output reads the PNG's own header
    # (grey+alpha, 16 bits)
    Case("trns-gray16.png", _keyed_save("I;16"), mode="RGBA", alpha="left"),
    Case("trns-palette.png", _palette(True), mode="RGBA", alpha="left"),
    Case("palette.png", _palette(False)),
    Case("la.png", _save(lambda: Image.fromarray(NOISE[..., 0], "L").convert("LA")), mode="L"),  # opaque
    Case("gray16.png", _save(lambda: Image.fromarray(NOISE[..., 0].astype(np.uint16) * 257)), mode="I;16"),
    Case("rgb16.png", lambda p: png_rgb16(p, NOISE.astype(np.uint16) * 257)),  # full depth, written 16-bit
    Case("still.gif", _save(lambda: Image.fromarray(NOISE).quantize(64))),
    Case("anim.gif", lambda p: frames(3)[0].save(p, save_all=True, append_images=frames(3)[1:], duration=50),
         notice="3 frames"),
    Case("anim.webp", lambda p: frames(2)[0].save(p, save_all=True, append_images=frames(2)[1:],
                                                  lossless=True),
         notice="2 frames"),
    Case("anim.png", lambda p: frames(2)[0].save(p, save_all=True, append_images=frames(2)[1:]),
         notice="2 frames"),
    Case("dpi300.png", _save(lambda: Image.fromarray(NOISE), dpi=(300, 300)), out=".tif"),
    Case("truncated.png", lambda p: (Image.fromarray(NOISE).save(p), p.write_bytes(p.read_bytes()[:120])),
         size=None, error="damaged or truncated"),
    Case("truncated.jpg", lambda p: (Image.fromarray(NOISE).save(p), p.write_bytes(p.read_bytes()[:400])),
         size=None, error="damaged or truncated"),
    Case("truncated.tif", _save(lambda: Image.fromarray(np.tile(NOISE, (8, 8, 1)))),  # strips cut short
         size=None, error="damaged or truncated"),
    Case("truncated-lzw.tif", _save(lambda: Image.fromarray(np.tile(NOISE, (8, 8, 1))),
                                    compression="tiff_lzw"),
         size=None, error="damaged or truncated"),  # libtiff: its directory is at the end, cut away
    Case("empty.png", lambda p: p.write_bytes(b""), size=None, error="empty (0 bytes)"),
    Case("notes.jpg", lambda p: p.write_text("shopping list: milk\n"), size=None, error="not an image"),
]


def _truncate_tiff(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:-2000])


def make_files(folder: Path) -> dict[str, Case]:
    folder.mkdir(parents=True, exist_ok=True)
    for c in CASES:
        c.make(folder / c.name)
        if c.name.startswith("truncated") and c.name.endswith(".tif"):
            _truncate_tiff(folder / c.name)
    return {c.name: c for c in CASES}


def check_output(c: Case, out: Path) -> None:
    with Image.open(out) as im:
        assert im.size == c.size, c.name
        assert im.mode == c.mode or (c.mode == "RGB" and out.suffix == ".jpg" and im.mode == "RGB"), \
            (c.name, im.mode)
        arr = np.asarray(im)
        exif = im.getexif()
        dpi = im.info.get("dpi")
    if out.suffix == ".tif":  # its own layout, describing the output, not the input's
        assert (exif[256], exif[257]) == c.size, c.name
    else:
        assert not any(t in exif for t in (256, 257, 258, 259, 273, 279)), f"{c.name}: layout tags carried"
    assert exif.get(0x0112, 1) == 1, c.name
    if c.alpha == "left":
        a = arr[..., -1]
        assert a[:, :6].max() <= 8 and a[:, -12:].min() >= 247, c.name  # edge blur stays near x = 16
    elif c.alpha in ("corner6", "corner8"):
        a = arr[..., -1]  # upright 24 wide x 32 high; the stored top-left quarter is now ...
        top_right, bottom_left = a[2:12, 14:22], a[20:30, 2:10]
        opaque, clear = (top_right, bottom_left) if c.alpha == "corner6" else (bottom_left, top_right)
        assert opaque.min() >= 247 and clear.max() <= 8, c.name  # ... top right (6) or bottom left (8)
    if c.name == "dpi300.png":
        assert dpi is not None and abs(dpi[0] - 600) <= 1 and abs(dpi[1] - 600) <= 1  # same print size
    if c.mode == "I;16":
        assert arr.max() > 255, c.name  # 16-bit values, not 8-bit ones in a 16-bit container
    if c.name == "trns-gray16.png" and out.suffix == ".png":
        assert png_header(out) == (16, GREY_ALPHA), c.name


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("real") / "in"
    return folder, make_files(folder)


@pytest.fixture(scope="module")
def upscaler(tiny_model):
    return Upscaler(tiny_model, options=UpscaleOptions(steps=2))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_upscale_each_file(files, upscaler, tmp_path, case):
    folder, _ = files
    out = tmp_path / (Path(case.name).stem + case.out)
    events = []
    if case.size is None:
        with pytest.raises(InfditError) as e:
            upscaler.upscale_file(folder / case.name, out, scale=2, on_event=events.append)
        assert e.value.exit_code == case.code and case.error in str(e.value) and case.name in str(e.value)
        assert "\n" not in str(e.value)
        assert list(tmp_path.iterdir()) == []  # nothing partial
        return
    upscaler.upscale_file(folder / case.name, out, scale=2, on_event=events.append)
    check_output(case, out)
    notices = [e.text for e in events if isinstance(e, Notice)]
    if case.notice:
        assert any(case.notice in n and case.name in n for n in notices), notices
    else:
        assert notices == [], notices
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def test_one_batch_over_all_files_then_a_rerun(files, tiny_weights, tmp_path):
    folder, cases = files
    out = tmp_path / "out"
    args = ["batch", folder, "-o", out, "--scale", "2", "--steps", "2", "--device", "cpu",
            "--weights", tiny_weights, "--json"]
    res = run_cli(*args)
    assert res.returncode == 1, res.stderr  # some files are bad, every other one is written
    summary = json.loads(res.stdout)
    items = {Path(i["input"]).name: i for i in summary["items"]}
    assert set(items) == set(cases)
    for name, c in cases.items():
        item = items[name]
        if c.size is None:
            assert item["status"] == "failed" and c.error in item["reason"], item
        else:
            assert item["status"] == "done", item
            written = Path(item["output"])
            assert written.suffix == (".png" if Path(name).suffix == ".gif" else Path(name).suffix)
            check_output(Case(name, None, written.suffix, c.size,
                              "RGB" if c.mode == "RGB" or written.suffix == ".jpg" else c.mode, c.alpha),
                         written)
    assert "Traceback" not in res.stderr
    assert {p.name for p in out.iterdir() if p.name.endswith(".part") or p.name.startswith(".")} == set()
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    again = run_cli(*args)
    assert again.returncode == 1
    summary2 = json.loads(again.stdout)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing new written
    failed1 = {(i["input"], i["reason"]) for i in summary["items"] if i["status"] == "failed"}
    failed2 = {(i["input"], i["reason"]) for i in summary2["items"] if i["status"] == "failed"}
    assert failed1 == failed2 and len(failed1) == sum(c.size is None for c in cases.values())
    assert summary2["done"] == 0 and summary2["skipped"] == len(cases) - len(failed1)


# --- files made by other tools: TIFFs compressed by libtiff (tiffcp), grey PNGs with tRNS -------------------

FIXTURES = Path(__file__).parent / "data" / "tiff-tools"  # made by make.sh there; README.md says how


def _source(kind: str) -> np.ndarray:
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiff_tools_source", FIXTURES / "source.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.source(kind)


TIFFS = {  # file: the source pixels it holds (see make.sh for the tool and options of each)
    "rgba16-lzw.tif": "rgba16",  # LZW + predictor, the file: refused with tifffile's words before
    "rgba16-packbits.tif": "rgba16",
    "rgb16-deflate.tif": "rgb16",  # Adobe Deflate (8)
    "rgb16-zlib.tif": "rgb16",  # the old Deflate code (32946)
    "rgb16-planar.tif": "rgb16",  # uncompressed, planes apart: Pillow decodes it wrongly, without a word
    "graya16-lzw.tif": "graya16",  # 16-bit grey+alpha: Pillow cannot open it at all
    "gray16-ljpeg.tif": "gray16",  # JPEG-in-TIFF at 16 bits: lossless JPEG (libjpeg-turbo)
    "rgb8-jpeg.tif": "rgb8",  # JPEG-in-TIFF as libtiff writes it: 8 bits, quality 95
}
FAST = ["--steps", "2", "--device", "cpu"]


def _samples(img) -> np.ndarray:
    """A LoadedImage as (H, W, C) integers at its own depth: grey (one plane) or RGB, then alpha."""
    planes = img.rgb[0, :1] if img.gray else img.rgb[0]
    if img.alpha is not None:
        planes = torch.cat([planes, img.alpha[0]])
    return (planes.permute(1, 2, 0).double().numpy() * (2**img.bits - 1)).round().astype(np.int64)


def _infdit(monkeypatch, capsys, *args) -> tuple[int, str]:
    """`infdit ARGS` through the CLI's own `main`, in this process: (exit code, stderr)."""
    from infdit_cli.cli.app import main

    monkeypatch.setattr(sys, "argv", ["infdit", *map(str, args)])
    monkeypatch.delenv("INFDIT_DEBUG", raising=False)
    with pytest.raises(SystemExit) as e:
        main()
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("name", list(TIFFS))
def test_tiff_from_libtiff_reads_at_full_depth(name):
    from infdit_cli.images.load import load_image

    src = _source(TIFFS[name])
    img = load_image(FIXTURES / name)
    assert img.notices == [] and img.source_format == "TIFF"
    assert img.bits == src.dtype.itemsize * 8 and img.gray == TIFFS[name].startswith("gray")
    got = _samples(img)
    assert got.shape == src.shape
    if name.endswith("jpeg.tif"):  # lossy: within 2 levels of 255 everywhere (a wrong decode is far off)
        assert np.abs(got - src).max() <= 2
    else:
        assert np.array_equal(got, src)  # every sample exact, alpha included
    if img.bits == 16:
        assert len(np.unique(got[0, :, 0])) > 256  # one row holds more levels than 8 bits do


def test_grey_alpha_tiff_keeps_its_metadata():
    """A TIFF only tifffile opens still gives its resolution and text tags, as Pillow would."""
    from infdit_cli.images.load import load_image

    img = load_image(FIXTURES / "graya16-lzw.tif")
    exif = Image.Exif()
    exif.load(img.exif)
    assert img.dpi == (300.0, 300.0) and exif[0x010F] == "ScanCo"


def test_grey_alpha_tiff_oriented(tmp_path):
    """EXIF orientation of a TIFF Pillow cannot open is applied (6: the stored top row becomes the right
    column)."""
    import tifffile

    from infdit_cli.images.load import load_image, probe_size

    src = _source("graya16")
    tifffile.imwrite(tmp_path / "rot.tif", src, photometric="minisblack", extrasamples=("unassalpha",),
                     extratags=[(274, "H", 1, 6, True)], metadata=None)
    img = load_image(tmp_path / "rot.tif")
    assert probe_size(tmp_path / "rot.tif") == img.size == (src.shape[1], src.shape[0])
    assert np.array_equal(_samples(img), np.rot90(src, -1))
    for read in (load_image, probe_size):  # the pixel limit holds here too
        with pytest.raises(InfditError, match="more than 100 pixels"):
            read(tmp_path / "rot.tif", max_pixels=100)


def test_upscale_grey_alpha_lzw_tiff_end_to_end(monkeypatch, capsys, tmp_path, tiny_weights):
    """`infdit upscale` on the TIFF Pillow cannot open: 16-bit grey+alpha out, to TIFF and PNG, and its own
    output reads back as grey+alpha at 16 bits."""
    import tifffile

    from infdit_cli.images.load import load_image

    for out in (tmp_path / "up.tif", tmp_path / "up.png"):
        code, err = _infdit(monkeypatch, capsys, "upscale", FIXTURES / "graya16-lzw.tif", "-o", out,
                            "--scale", "2", *FAST, "--weights", tiny_weights)
        assert code == 0 and "warning" not in err and "error" not in err, err
        back = load_image(out)
        assert back.gray and back.bits == 16 and back.alpha is not None and back.size == (8, 544)
        assert len(np.unique(_samples(back)[..., 0])) > 256
    with tifffile.TiffFile(tmp_path / "up.tif") as t:
        page = t.pages.first
        assert (int(page.photometric), page.samplesperpixel, page.dtype) == (1, 2, np.uint16)
    assert png_header(tmp_path / "up.png") == (16, GREY_ALPHA)


def _tifffile_without_codec(monkeypatch, words: str):
    """tifffile as it is without imagecodecs (or with a codec that fails): every decode raises `words`."""
    import tifffile

    def asarray(self, *a, **k):
        raise ValueError(words)

    monkeypatch.setattr(tifffile.TiffPage, "asarray", asarray)


def test_lzw_tiff_without_imagecodecs_upscales_through_pillow_with_one_warning(monkeypatch, capsys, tmp_path,
                                                                                tiny_weights):
    """Never refused where Pillow reads it: 8 bits, one `warning:` line in our words, not tifffile's."""
    from infdit_cli.images import load as images

    _tifffile_without_codec(monkeypatch, "<COMPRESSION.LZW: 5> requires the 'imagecodecs' package")
    monkeypatch.setattr(images, "_has_imagecodecs", lambda: False)
    img = images.load_image(FIXTURES / "rgba16-lzw.tif")
    assert img.bits == 8 and np.array_equal(_samples(img), _source("rgba16") >> 8)  # Pillow's high bytes
    out = tmp_path / "up.tif"
    code, err = _infdit(monkeypatch, capsys, "upscale", FIXTURES / "rgba16-lzw.tif", "-o", out,
                        "--scale", "2", *FAST, "--weights", tiny_weights)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: ") and "rgba16-lzw.tif" in warnings[0], err
    assert "LZW" in warnings[0] and "imagecodecs package is missing" in warnings[0] and "8-bit" in warnings[0]
    assert "COMPRESSION" not in err and "requires" not in err
    with Image.open(out) as im:
        assert im.mode == "RGBA" and im.size == (544, 8)


@pytest.mark.parametrize("name,missing,expect", [
    ("rgba16-lzw.tif", False, "notice: they did not decode"),  # a codec there but failing: Pillow, a line
    ("rgba16-packbits.tif", True, "notice: they did not decode"),  # tifffile's own PackBits: no codec missing
    ("graya16-lzw.tif", True, "error: this LZW-compressed TIFF needs the imagecodecs package"),  # no Pillow
    ("gray16-ljpeg.tif", True, "error: this JPEG-compressed TIFF needs the imagecodecs package"),
    ("rgb16-planar.tif", False, "error: is damaged or truncated"),  # raw: no codec to miss; Pillow's is wrong
])
def test_tiff_codec_failures_in_our_words(monkeypatch, name, missing, expect):
    from infdit_cli.errors import BadImage
    from infdit_cli.images import load as images

    _tifffile_without_codec(monkeypatch, "TiffFileError: tifffile's own words")
    monkeypatch.setattr(images, "_has_imagecodecs", lambda: not missing)
    kind, text = expect.split(": ", 1)
    if kind == "notice":
        img = images.load_image(FIXTURES / name)
        assert img.bits == 8 and len(img.notices) == 1 and text in img.notices[0]
        assert "tifffile" not in img.notices[0]
        return
    with pytest.raises(BadImage) as e:
        images.load_image(FIXTURES / name)
    assert text in str(e.value) and name in str(e.value) and "tifffile" not in str(e.value)


@pytest.mark.parametrize("depth", [8, 16])
def test_grey_png_with_trns_stays_grey_with_alpha(tmp_path, depth):
    """A grey PNG whose colour key (tRNS) marks the left columns: grey+alpha in, at its depth, and out again
    as grey+alpha (PNG colour type 4, TIFF min-is-black + alpha), read back the same."""
    from infdit_cli.images.load import load_image
    from infdit_cli.images.save import save_image

    top = 2**depth - 1
    x = np.arange(300)
    arr = np.tile(x * (top // 299) + (top - 299 * (top // 299)), (3, 1))  # 300 levels from its top down
    key = 1
    arr[:, :8] = key  # the key appears only here
    src = tmp_path / "keyed.png"
    png_grey(src, arr, depth, key)
    want = np.stack([arr, np.where(arr == key, 0, top)], -1)
    img = load_image(src)
    assert img.gray and img.bits == depth and img.alpha is not None
    assert np.array_equal(_samples(img), want)
    for suffix in (".png", ".tif"):
        out = save_image(tmp_path / f"out{suffix}", img.rgb, alpha=img.alpha, gray=img.gray, bits=img.bits)
        if suffix == ".png":
            assert png_header(out) == (depth, GREY_ALPHA)
        else:
            import tifffile

            with tifffile.TiffFile(out) as t:
                assert (int(t.pages.first.photometric), t.pages.first.samplesperpixel) == (1, 2)
        back = load_image(out)
        assert back.gray and back.bits == depth and np.array_equal(_samples(back), want), suffix


def test_upscale_grey16_png_with_trns_end_to_end(monkeypatch, capsys, tmp_path, tiny_weights):
    src, out = tmp_path / "keyed.png", tmp_path / "up.png"
    arr = np.tile(np.arange(300) * 200 + 5000, (3, 1))
    arr[:, :8] = 1
    png_grey(src, arr, 16, 1)
    code, err = _infdit(monkeypatch, capsys, "upscale", src, "-o", out, "--scale", "2", *FAST,
                        "--weights", tiny_weights)
    assert code == 0 and "warning" not in err, err
    assert png_header(out) == (16, GREY_ALPHA)
    from infdit_cli.images.load import load_image

    back = _samples(load_image(out))
    assert back[:, :12, 1].max() <= 256 and back[:, 24:, 1].min() >= 65535 - 256  # the key's columns clear
