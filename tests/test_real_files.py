"""The kinds of files cameras, scanners and editors write, generated here with Pillow (and one PNG by hand),
each through `upscale` (the library, in-process) and all of them through one `batch` (the CLI): each gives
a correct image (size, mode, alpha, orientation) or one line with the right exit code."""

import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from infdit_cli.errors import InfditError
from infdit_cli.events import Notice
from infdit_cli.pipeline import UpscaleOptions
from infdit_cli.upscaler import Upscaler

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


def png_rgb16(path: Path, arr: np.ndarray) -> None:
    """A 16-bit RGB PNG written by hand (Pillow cannot write one), as scanners and raw converters do."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


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
    Case("trns-gray16.png", _keyed_save("I;16"), mode="RGBA", alpha="left"),  # 16-bit grey+alpha (pypng), which
    # Pillow shows as RGBA
    Case("trns-palette.png", _palette(True), mode="RGBA", alpha="left"),
    Case("palette.png", _palette(False)),
    Case("la.png", _save(lambda: Image.fromarray(NOISE[..., 0], "L").convert("LA")), mode="L"),  # opaque
    Case("gray16.png", _save(lambda: Image.fromarray(NOISE[..., 0].astype(np.uint16) * 257)), mode="I;16"),
    Case("rgb16.png", lambda p: png_rgb16(p, NOISE.astype(np.uint16) * 257)),  # full depth, written 16-bit
    Case("still.gif", _save(lambda: Image.fromarray(NOISE).quantize(64))),
    Case("anim.gif", lambda p: frames(3)[0].save(p, save_all=True, append_images=frames(3)[1:], duration=50),
         notice="3 frames"),
    Case("anim.webp", lambda p: frames(2)[0].save(p, save_all=True, append_images=frames(2)[1:], lossless=True),
         notice="2 frames"),
    Case("anim.png", lambda p: frames(2)[0].save(p, save_all=True, append_images=frames(2)[1:]), notice="2 frames"),
    Case("dpi300.png", _save(lambda: Image.fromarray(NOISE), dpi=(300, 300)), out=".tif"),
    Case("truncated.png", lambda p: (Image.fromarray(NOISE).save(p), p.write_bytes(p.read_bytes()[:120])),
         size=None, error="damaged or truncated"),
    Case("truncated.jpg", lambda p: (Image.fromarray(NOISE).save(p), p.write_bytes(p.read_bytes()[:400])),
         size=None, error="damaged or truncated"),
    Case("truncated.tif", _save(lambda: Image.fromarray(np.tile(NOISE, (8, 8, 1)))),  # strips cut short
         size=None, error="damaged or truncated"),
    Case("truncated-lzw.tif", _save(lambda: Image.fromarray(np.tile(NOISE, (8, 8, 1))), compression="tiff_lzw"),
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
                              "RGB" if c.mode == "RGB" or written.suffix == ".jpg" else c.mode, c.alpha), written)
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
