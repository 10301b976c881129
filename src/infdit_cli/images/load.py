"""Image files in and out: orientation, alpha, grayscale, 16-bit, ICC/EXIF/DPI, atomic saving (Pillow;
16-bit colour PNG and TIFF: pypng and tifffile).

The model sees RGB in [-1, 1]. Everything else about a file (alpha, grayscale, bit depth, colour profile,
EXIF, resolution) is taken apart on the way in and put back on the way out, deliberately (`metadata.py`
rebuilds EXIF tag by tag). Nothing is printed: what was dropped or changed is returned as notices, and
Pillow's and libtiff's own messages are silenced.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import (
    BadImage,
    InfditError,
    TooManyPixels,
)
from .metadata import ORIENTATION, read_dpi, read_exif

__all__ = ["LoadedImage", "load_image", "probe_size", "fill_transparent", "resize", "SUFFIXES", "MAX_SIDE",
           "DEFAULT_MAX_PIXELS"]

SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF"}
MAX_SIDE = {"PNG": 2**31 - 1, "JPEG": 65535, "WEBP": 16383, "TIFF": 2**31 - 1}
DEFAULT_MAX_PIXELS = 64 * 2**20  # inputs; above this an image is refused unless --max-pixels says otherwise
DPI_FORMATS = ("PNG", "JPEG", "TIFF")  # WebP has no resolution field

@dataclass
class LoadedImage:
    rgb: torch.Tensor  # (1, 3, h, w) float32 in [0, 1], orientation applied
    alpha: torch.Tensor | None  # (1, 1, h, w) in [0, 1]
    gray: bool  # the file was grayscale: write grayscale back
    bits: int  # 8 or 16
    icc: bytes | None
    exif: bytes | None  # rebuilt: orientation 1, no layout/thumbnail/size tags
    source_format: str | None
    dpi: tuple[float, float] | None = None  # (x, y) of the upright image, as the file said
    notices: list[str] = field(default_factory=list)  # what was dropped or changed, for the user

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)."""
        return self.rgb.shape[-2], self.rgb.shape[-1]


@contextlib.contextmanager
def quiet(c_stderr: bool = False):
    """Silence Pillow for one decode/encode: its warnings, its logger, and (`c_stderr`, for libtiff, which
    prints to the C library's stderr) file descriptor 2, restored afterwards. Decompression-bomb warnings
    are raised, not silenced."""
    from PIL import Image

    log = logging.getLogger("PIL")
    level = log.level
    saved = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        log.setLevel(logging.CRITICAL + 1)
        if c_stderr:
            try:
                sys.stderr.flush()
                saved = os.dup(2)
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, 2)
                os.close(null)
            except OSError:
                saved = None
        try:
            yield
        finally:
            if saved is not None:
                os.dup2(saved, 2)
                os.close(saved)
            log.setLevel(level)


_MAGIC = {b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"II+\x00": "TIFF", b"MM\x00+": "TIFF",
          b"\x89PNG": "PNG", b"GIF8": "GIF", b"RIFF": "WebP", b"\xff\xd8\xff": "JPEG"}


def _sniff(path: Path) -> str | None:
    """The format a file's first bytes announce, whatever its name says."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return None
    return next((kind for magic, kind in _MAGIC.items() if head.startswith(magic)), None)


def _is_tiff(path: Path) -> bool:
    return _sniff(path) == "TIFF"


class _Undecodable(BadImage):
    """Pillow opened the file's bytes but could not decode them (not: missing, empty, too large, forbidden).
    A TIFF then goes to tifffile, which reads layouts Pillow has no mode for (16-bit grey+alpha, 16-bit
    lossless JPEG); the line stands if tifffile cannot read it either. `opened`: Pillow read the header and
    failed on the data."""

    def __init__(self, message: str, *, opened: bool = False):
        super().__init__(message)
        self.opened = opened


def _open(path: Path, max_pixels: int | None, *, load: bool):
    """Image.open (and load) with every failure turned into one BadImage line naming `path`."""
    from PIL import Image, UnidentifiedImageError

    if not path.exists():
        raise BadImage(f"no such file: {path}")
    if path.is_dir():
        raise BadImage(f"{path} is a directory")
    try:
        if path.stat().st_size == 0:
            raise BadImage(f"{path} is empty (0 bytes)")
    except OSError as e:
        raise BadImage(f"{path}: {e.strerror or e}") from None
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    im = None
    try:
        with quiet(c_stderr=_is_tiff(path)):
            im = Image.open(path)
            if load:
                im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise TooManyPixels(f"{path} has more than {max_pixels} pixels; "
                            f"raise --max-pixels if it is trusted") from None
    except UnidentifiedImageError:
        kind = _sniff(path)
        if kind is not None:  # the start of a known format: a damaged file, not a foreign one
            raise _Undecodable(f"{path} is damaged or truncated: it starts like a {kind} but cannot be read"
                               ) from None
        raise BadImage(f"{path} is not an image Pillow can read") from None
    except PermissionError:
        raise BadImage(f"{path}: permission denied") from None
    except MemoryError:
        raise BadImage(f"{path}: not enough memory to decode it") from None
    except Exception as e:  # noqa: BLE001 - decoders raise OSError, SyntaxError, ValueError, struct.error...
        raise _Undecodable(f"{path} is damaged or truncated: {_one_line(e)}", opened=im is not None
                           ) from None
    finally:
        Image.MAX_IMAGE_PIXELS = old
    return im


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


def probe_size(path: str | Path, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(height, width) as displayed (EXIF orientation applied), from the header alone.

    Raises:
        BadImage: as `load_image` would for a missing, unreadable or oversized file.
    """
    path = Path(path)
    with _decoding(path):
        try:
            im = _open(path, max_pixels, load=False)
        except _Undecodable as e:
            if not _is_tiff(path):
                raise
            t = _tiff_read(path, max_pixels, e, pixels=False)  # a layout only tifffile reads
            return (t.w, t.h) if t.orientation in (5, 6, 7, 8) else (t.h, t.w)
    with _decoding(path), im:
        h, w = im.height, im.width
        try:
            with quiet():
                if im.getexif().get(ORIENTATION, 1) in (5, 6, 7, 8):
                    h, w = w, h
        except Exception:  # noqa: BLE001 - unreadable EXIF: load_image drops it with a notice
            pass
    return h, w


def _to_tensor(arr) -> torch.Tensor:
    """(h, w) or (h, w, C) array in [0, 1] -> (1, C, h, w) float32."""
    import numpy as np

    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    t = t[None, None] if t.ndim == 2 else t.permute(2, 0, 1)[None]
    return t.clamp(0, 1)


_TRANSPOSE = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE", 6: "ROTATE_270",
              7: "TRANSVERSE", 8: "ROTATE_90"}
_GRAY16 = ("I;16", "I;16B", "I;16L", "I;16N")


def load_image(path: str | Path, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Read an image file for upscaling: the first frame, upright, with its metadata taken apart.

    Anything dropped or changed on the way (malformed EXIF, extra frames, 16-bit colour outside PNG/TIFF
    read as 8-bit) is
    listed in `notices`; nothing is printed.

    Raises:
        BadImage: missing, unreadable, truncated, not an image, larger than `max_pixels`, or anything a
            decoder raises on the way (a fuzzed file that opens but cannot be decoded).
    """
    with _decoding(path):
        return _load_image(path, max_pixels)


@contextlib.contextmanager
def _decoding(path: str | Path):
    """Whatever a decoder raises while a file is read is that file's fault: one BadImage line."""
    try:
        yield
    except InfditError:
        raise
    except MemoryError:
        raise BadImage(f"{path}: not enough memory to decode it") from None
    except Exception as e:  # noqa: BLE001 - plugins raise ValueError, struct.error, IndexError, SyntaxError...
        raise BadImage(f"{path} is damaged or unsupported: {_one_line(e)}") from None


def _load_image(path: str | Path, max_pixels: int | None) -> LoadedImage:
    import numpy as np
    from PIL import Image

    path = Path(path)
    name = str(path)
    notices: list[str] = []
    try:
        im = _open(path, max_pixels, load=False)
        deep_tiff = im.format == "TIFF" and _tiff_is_deep(im)
        frames = getattr(im, "n_frames", 1)
        args = im.tile[0][3] if im.tile else ""
        args = args[0] if isinstance(args, tuple) and args else args  # TIFF: (rawmode, ...)
        rawmode = args if isinstance(args, str) else ""
        im = _open(path, max_pixels, load=True)  # fresh: n_frames may have moved the frame pointer
    except _Undecodable as e:
        if not _is_tiff(path):
            raise
        return _load_tiff_direct(path, max_pixels, e)  # a layout Pillow has no mode for
    if frames > 1:
        notices.append(f"{name} has {frames} frames; only the first is upscaled")
    fmt = im.format
    icc = im.info.get("icc_profile") or None
    with quiet():  # Pillow warns while it re-encodes odd tags
        orientation, exif = read_exif(im, name, notices)
    dpi = read_dpi(im.info, name, notices)
    trns = im.info.get("transparency")
    mode = im.mode
    deep = (mode in ("RGB", "RGBA", "LA") and ";16" in rawmode and fmt == "PNG") or deep_tiff
    if mode in ("RGB", "RGBA") and ";16" in rawmode and not deep:
        notices.append(f"{name}: 16-bit RGB is read as 8-bit (Pillow holds no 16-bit RGB); "
                       f"the output is 8-bit")

    gray, bits, alpha = False, 8, None
    try:
        with quiet():
            if mode in ("P", "PA"):
                im = im.convert("RGBA" if trns is not None or mode == "PA" else "RGB")
            elif mode == "CMYK":
                im, icc = _cmyk_to_rgb(im, icc), None  # the profile described CMYK; the result is sRGB
            elif mode in ("La", "RGBa"):
                im = im.convert(mode.upper())
            elif mode not in ("1", "L", "LA", "RGB", "RGBA", "I", "F") + _GRAY16:
                im = im.convert("RGBA" if "A" in mode else "RGB")
    except (ValueError, OSError) as e:
        raise BadImage(f"{path}: colour mode {mode} cannot be converted to RGB: {_one_line(e)}") from None
    if orientation in _TRANSPOSE:
        im = im.transpose(getattr(Image.Transpose, _TRANSPOSE[orientation]))
        if dpi is not None and orientation >= 5:
            dpi = (dpi[1], dpi[0])
    mode = im.mode

    arr = np.asarray(im)
    if mode in ("1", "L", "I", "F") + _GRAY16:
        gray = True
        if mode == "1":
            value = arr.astype(np.float32)
        elif mode == "L":
            value = arr / 255.0
        elif mode in _GRAY16:
            bits, value = 16, arr / 65535.0
        else:  # I or F: 32-bit; guess the range from the values
            a = arr.astype(np.float64)
            top = float(a.max(initial=0))
            bits = 8 if top <= 255 and mode == "I" and ";16" not in rawmode else 16  # older Pillow: I;16 as I
            value = a if mode == "F" and top <= 1.0 else a / (255.0 if bits == 8 else 65535.0)
        rgb = _to_tensor(value)
        if trns is not None and isinstance(trns, (int, float)):  # tRNS colour key: one grey value
            key = bool(trns) if mode == "1" else trns
            alpha = _to_tensor((arr != key).astype(np.float32))
    elif mode == "LA":
        gray = True
        rgb, alpha = _to_tensor(arr[..., 0] / 255.0), _to_tensor(arr[..., 1] / 255.0)
    elif mode == "RGBA":
        t = _to_tensor(arr / 255.0)
        rgb, alpha = t[:, :3], t[:, 3:]
    else:  # RGB
        rgb = _to_tensor(arr / 255.0)
        if isinstance(trns, tuple) and len(trns) == 3:  # tRNS colour key: one RGB triple
            key = tuple(v >> 8 if max(trns) > 255 else v for v in trns)  # 16-bit key on 8-bit samples
            alpha = _to_tensor((arr != np.array(key, dtype=arr.dtype)).any(-1).astype(np.float32))
    if deep and fmt == "PNG":  # 16-bit colour or grey+alpha: the samples at full depth (pypng), oriented
        arr16 = _orient(_read16(path, fmt), orientation)
        value = arr16.astype(np.float32) / 65535.0
        colour = 1 if value.shape[-1] in (1, 2) else 3
        gray = colour == 1  # Pillow shows 16-bit grey+alpha as RGBA
        rgb = _to_tensor(value[..., :colour] if colour == 3 else value[..., 0])
        if value.shape[-1] in (2, 4):
            alpha = _to_tensor(value[..., colour])
        bits = 16
    elif deep:  # a 16-bit TIFF: tifffile (Pillow holds colour at 8 bits, and misreads some layouts)
        try:
            t = _tiff_read(path, max_pixels, None, pixels=True)
        except _NoFullDepth as e:  # a codec missing or failing: Pillow's decode (full depth for grey)
            if not gray:
                notices.append(f"{name}: {e}; read as 8-bit, the output is 8-bit")
        else:
            gray, bits = t.colour.shape[-1] == 1, t.bits
            rgb = _to_tensor(_orient(t.colour, orientation))
            alpha = _to_tensor(_orient(t.alpha, orientation)) if t.alpha is not None else None
    if alpha is not None and bool((alpha >= 1).all()):
        alpha = None  # fully opaque: no alpha to carry
    if rgb.shape[1] == 1:
        rgb = rgb.expand(-1, 3, -1, -1).contiguous()
    return LoadedImage(rgb=rgb, alpha=alpha, gray=gray, bits=bits, icc=icc, exif=exif, source_format=fmt,
                       dpi=dpi, notices=notices)


def _read16(path: Path, fmt: str):
    """(H, W, C) uint16 samples of a 16-bit PNG (pypng), as stored (not oriented). Pillow reads these as
    8-bit; pypng keeps every level. (TIFF: `_tiff_read`.)"""
    import numpy as np
    import png

    w, h, rows, info = png.Reader(filename=str(path)).asDirect()  # tRNS becomes an alpha plane
    arr = np.vstack([np.asarray(r, dtype=np.uint16) for r in rows]).reshape(h, w, info["planes"])
    if info["bitdepth"] != 16:
        raise BadImage(f"{path}: expected 16-bit samples, found {info['bitdepth']}-bit")
    return arr


_COMPRESSION = {5: "LZW", 7: "JPEG", 8: "Deflate", 32946: "Deflate", 32773: "PackBits", 34925: "LZMA",
                50000: "Zstd", 50001: "WebP", 50002: "JPEG XL", 34887: "LERC"}
_TIFFFILE_OWN = (1, 8, 32946, 32773)  # decoded by tifffile itself (zlib, its PackBits); others: imagecodecs
_LIBTIFF_HAS = (5, 8, 32946, 32773)  # LZW, Deflate, PackBits: in every libtiff
_PILLOW_DECODES_16 = (*_LIBTIFF_HAS, 34925, 50000)  # and LZMA, Zstd: Pillow's 16-bit samples right, at 8 bits
_TIFF_TEXT = (270, 271, 272, 305, 306, 315, 33432)  # description, make, model, software, date, artist, (c)


class _NoFullDepth(Exception):
    """tifffile cannot decode a compressed TIFF Pillow reads at 8 bits: why, in our words."""


@dataclass
class _Tiff:
    h: int
    w: int
    orientation: int
    bits: int
    frames: int
    tags: dict  # code -> value, the first page's
    colour: object = None  # (H, W, 1 or 3) float32 in [0, 1], as stored (not oriented)
    alpha: object = None  # (H, W) float32 in [0, 1] (unassociated), or None


@contextlib.contextmanager
def _tifffile_quiet():
    """tifffile logs what it finds odd: its words never reach the user."""
    log = logging.getLogger("tifffile")
    level = log.level
    log.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def _tiff_is_deep(im) -> bool:
    """A TIFF Pillow opened whose samples are 16-bit grey or RGB (with or without alpha). tifffile reads
    these: Pillow holds colour at 8 bits, and decodes uncompressed planar colour and lossless 16-bit JPEG
    wrongly, without a word."""
    try:
        bits = im.tag_v2.get(258, (1,))
        bits = bits if isinstance(bits, tuple) else (bits,)
        photometric = int(im.tag_v2.get(262, -1))
    except (TypeError, ValueError, AttributeError):
        return False
    return 16 in bits and photometric in (0, 1, 2)


def _has_imagecodecs() -> bool:
    import importlib.util

    return importlib.util.find_spec("imagecodecs") is not None


def _tiff_read(path: Path, max_pixels: int | None, failure: BadImage | None, *, pixels: bool) -> _Tiff:
    """The first page of a TIFF through tifffile: its size, orientation and (`pixels`) samples, as floats.

    `failure` is Pillow's line for a file Pillow could not open: raised if tifffile cannot read it either
    (or the line that the imagecodecs package is needed, where that is why). `failure` None (Pillow read the
    file at 8 bits): a compressed file tifffile cannot decode raises `_NoFullDepth`, an uncompressed one
    BadImage (damaged: tifffile needs no codec for it).
    """
    import numpy as np
    import tifffile

    def cannot(compression: int | None) -> BaseException:
        known = _COMPRESSION.get(compression)
        kind, tail = (f"{known}-compressed ", "") if known else ("", f" (compression {compression})")
        missing = compression not in (None, *_TIFFFILE_OWN) and not _has_imagecodecs()
        # Pillow read the header but libtiff failed on data in a compression it has: damaged, codec or not
        damaged = getattr(failure, "opened", False) and compression in _LIBTIFF_HAS
        if missing and not damaged and (failure is not None or compression not in _PILLOW_DECODES_16):
            return BadImage(f"{path}: this {kind}TIFF{tail} needs the imagecodecs package to be read "
                            "(pip install imagecodecs)")
        if failure is not None:
            return failure
        if compression not in _PILLOW_DECODES_16:  # raw: nothing to miss; JPEG: Pillow's decode is wrong
            return BadImage(f"{path} is damaged or truncated: its 16-bit samples cannot be decoded")
        why = "the imagecodecs package is missing" if missing else "they did not decode"
        return _NoFullDepth(f"its {kind}16-bit samples{tail} cannot be read at full depth ({why})")

    compression = None
    try:
        with _tifffile_quiet(), tifffile.TiffFile(str(path)) as tif:
            page = tif.pages.first
            compression = int(page.compression)
            tags = {t.code: t.value for t in page.tags.values()}
            h, w = int(page.imagelength), int(page.imagewidth)
            spp, photometric = int(page.samplesperpixel), int(page.photometric)
            extra = tuple(int(e) for e in page.extrasamples)
            bits = int(page.bitspersample)
            frames = len(tif.pages)
            if max_pixels is not None and h * w > max_pixels:
                raise TooManyPixels(f"{path} has more than {max_pixels} pixels; raise --max-pixels if it is "
                               "trusted")
            arr = page.asarray() if pixels else None
    except BadImage:
        raise
    except MemoryError:
        raise BadImage(f"{path}: not enough memory to decode it") from None
    except Exception:  # noqa: BLE001 - tifffile and its codecs raise many kinds; their words are not shown
        raise cannot(compression) from None
    try:
        orientation = int(tags.get(ORIENTATION, 1))
    except (TypeError, ValueError):
        orientation = 1
    t = _Tiff(h=h, w=w, orientation=orientation if orientation in range(1, 9) else 1, bits=bits,
              frames=frames, tags=tags)
    colours = {0: 1, 1: 1, 2: 3}.get(photometric)
    if colours is None and photometric == 6 and compression == 7:  # YCbCr JPEG: tifffile gives RGB
        colours = 3
    if colours is None or bits not in (8, 16) or spp < colours:
        raise failure if failure is not None else BadImage(f"{path}: unsupported TIFF layout ({bits}-bit, "
                                                           f"{spp} samples, photometric {photometric})")
    if not pixels:
        return t
    if arr.ndim == 3 and arr.shape[-1] != spp and arr.shape[0] == spp:
        arr = np.moveaxis(arr, 0, -1)  # planar
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.dtype not in (np.uint8, np.uint16) or arr.shape[:2] != (h, w):
        raise failure if failure is not None else BadImage(f"{path}: unsupported TIFF layout {arr.dtype} "
                                                           f"{arr.shape}")
    top = float(np.iinfo(arr.dtype).max)
    colour = arr[..., :colours].astype(np.float32) / top
    if photometric == 0:  # min-is-white
        colour = 1 - colour
    kind = extra[0] if spp > colours and extra else 0  # 1 associated (premultiplied), 2 unassociated alpha
    if kind in (1, 2):
        alpha = arr[..., colours].astype(np.float32) / top
        if kind == 1:
            colour = np.where(alpha[..., None] > 0, colour / np.maximum(alpha[..., None], 1e-12), 0)
        t.alpha = alpha
    t.colour = np.clip(colour, 0, 1).astype(np.float32, copy=False)
    return t


def _load_tiff_direct(path: Path, max_pixels: int | None, failure: BadImage) -> LoadedImage:
    """A TIFF Pillow cannot open (16-bit grey+alpha, lossless 16-bit JPEG...), through tifffile: samples at
    their depth, orientation, ICC, resolution and the main IFD's text tags as EXIF; or `failure`."""
    from PIL import Image

    name = str(path)
    notices: list[str] = []
    t = _tiff_read(path, max_pixels, failure, pixels=True)
    if t.frames > 1:
        notices.append(f"{name} has {t.frames} frames; only the first is upscaled")
    tags = Image.Exif()
    for code in _TIFF_TEXT:
        if isinstance(t.tags.get(code), str):
            tags[code] = t.tags[code]
    if ORIENTATION in t.tags:
        tags[ORIENTATION] = t.tags[ORIENTATION]
    with quiet():
        _, exif = read_exif(_ExifOnly(tags), name, notices)
    dpi = read_dpi({"dpi": _tiff_dpi(t.tags)} if 282 in t.tags and 283 in t.tags else {}, name, notices)
    if dpi is not None and t.orientation >= 5:
        dpi = (dpi[1], dpi[0])
    icc = t.tags.get(34675)
    gray = t.colour.shape[-1] == 1
    rgb = _to_tensor(_orient(t.colour, t.orientation))
    alpha = _to_tensor(_orient(t.alpha, t.orientation)) if t.alpha is not None else None
    if alpha is not None and bool((alpha >= 1).all()):
        alpha = None
    if gray:
        rgb = rgb.expand(-1, 3, -1, -1).contiguous()
    return LoadedImage(rgb=rgb, alpha=alpha, gray=gray, bits=t.bits, icc=icc if isinstance(icc, bytes) and icc
                       else None, exif=exif, source_format="TIFF", dpi=dpi, notices=notices)


class _ExifOnly:
    """What `read_exif` asks of a Pillow image, for tags read by tifffile."""

    def __init__(self, exif):
        self._exif = exif

    def getexif(self):
        return self._exif


def _tiff_dpi(tags: dict):
    """Pillow's `dpi` for a TIFF's resolution tags: per inch, per centimetre x 2.54; None without a unit."""
    unit = tags.get(296, 2)
    try:
        x, y = (v[0] / v[1] if isinstance(v, tuple) else float(v) for v in (tags[282], tags[283]))
        factor = {2: 1.0, 3: 2.54}.get(int(unit))
    except (TypeError, ValueError, ZeroDivisionError, IndexError):
        return (tags.get(282), tags.get(283))  # read_dpi drops it with a notice
    return None if factor is None else (x * factor, y * factor)


def _orient(a, orientation: int):
    """numpy's version of the EXIF orientation transposes `_TRANSPOSE` names (Pillow's, on an (H, W, C))."""
    import numpy as np

    op = _TRANSPOSE.get(orientation)
    if op == "FLIP_LEFT_RIGHT":
        a = a[:, ::-1]
    elif op == "FLIP_TOP_BOTTOM":
        a = a[::-1]
    elif op == "ROTATE_180":
        a = a[::-1, ::-1]
    elif op == "ROTATE_90":  # counter-clockwise
        a = np.rot90(a, 1)
    elif op == "ROTATE_270":
        a = np.rot90(a, -1)
    elif op == "TRANSPOSE":
        a = a.swapaxes(0, 1)
    elif op == "TRANSVERSE":
        a = a[::-1, ::-1].swapaxes(0, 1)
    return np.ascontiguousarray(a)


def _cmyk_to_rgb(im, icc: bytes | None):
    """Through the file's ICC profile to sRGB where there is one (what a viewer shows), else Pillow's
    formula."""
    if icc:
        try:
            import io

            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except Exception:  # noqa: BLE001 - a broken profile: fall back to the plain conversion
            pass
    return im.convert("RGB")


def resize(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """High-quality resample of (B, C, h, w) to (H, W): antialiased bicubic, as the official resizes.

    A side that would round to 0 (a 1-pixel-wide input halved) is kept at 1.
    """
    size = (max(1, int(size[0])), max(1, int(size[1])))
    if tuple(t.shape[-2:]) == size:
        return t
    return F.interpolate(t, size=size, mode="bicubic", align_corners=False, antialias=True)


def fill_transparent(rgb: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Replace the colour under fully transparent pixels by the colour of the nearest visible ones
    (pull-push over an alpha-weighted pyramid), so resampling never pulls dark fringes into edges."""
    known = (alpha > 0).float()
    if bool(known.all()) or not bool(known.any()):
        return rgb
    levels = [(rgb * known, known)]
    while max(levels[-1][1].shape[-2:]) > 1:
        c, w = levels[-1]
        levels.append((F.avg_pool2d(c, 2, ceil_mode=True), F.avg_pool2d(w, 2, ceil_mode=True)))
    c, w = levels[-1]
    filled = c / w.clamp_min(1e-8)
    for c, w in reversed(levels[:-1]):
        up = F.interpolate(filled, size=c.shape[-2:], mode="nearest")
        filled = torch.where(w > 0, c / w.clamp_min(1e-8), up)
    return torch.where(known > 0, rgb, filled)
