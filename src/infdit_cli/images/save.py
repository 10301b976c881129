"""Image files out: the format's limits, never replacing what the user has, atomic writes, 8- and 16-bit
PNG/TIFF/JPEG/WebP with ICC, EXIF (orientation 1, provenance) and resolution carried over from the input.

Nothing is printed: Pillow's and libtiff's own messages are silenced, as on the way in (`load`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import (
    BadRequest,
    DiskFull,
    OutputError,
    OutputExists,
    no_space,
)
from ..files import atomic_write
from ..units import row_chunks
from .load import DPI_FORMATS, MAX_SIDE, SUFFIXES, quiet

__all__ = ["PROVENANCE", "check_format_size", "check_output", "is_infdit_output", "save_image"]

PROVENANCE = "infdit"  # the EXIF/TIFF Software tag of every file infdit writes
_SOFTWARE = 0x0131


def _with_provenance(exif: bytes | None) -> bytes:
    from PIL import Image

    out = Image.Exif()
    if exif:
        out.load(exif)
    out[_SOFTWARE] = PROVENANCE
    return out.tobytes()


def is_infdit_output(path: str | Path) -> bool:
    """Whether the file at `path` says it was written by infdit (its Software tag); False for anything that
    cannot be read."""
    from PIL import Image

    try:
        with quiet(), Image.open(path) as im:
            software = im.getexif().get(_SOFTWARE) or im.info.get("Software")
    except Exception:  # noqa: BLE001 - unreadable: the real run reports it
        return False
    return isinstance(software, str) and software.strip("\x00 ") == PROVENANCE


def check_format_size(fmt: str, size: tuple[int, int]) -> None:
    """An output of `size` (H, W) fits the format `fmt` (WebP: 16383 px per side, JPEG: 65535).

    Raises:
        BadRequest: it does not (exit 2).
    """
    if max(size) > MAX_SIDE[fmt]:
        raise BadRequest(f"{fmt} cannot hold {size[1]}x{size[0]} (at most {MAX_SIDE[fmt]} px per side); "
                         "choose .png or .tif")


def check_output(path: Path, overwrite: bool) -> str:
    """The Pillow format for `path`, after checking it can be written: a known suffix, an existing and
    writable folder, and no file in the way unless `overwrite`. Callers check before computing,
    `save_image` again after.

    Raises:
        BadRequest: the suffix is not one infdit writes (exit 2).
        OutputExists: the file exists and `overwrite` is False.
        OutputError: the folder is missing or not writable, or the path is a folder.
    """
    path = Path(path)
    fmt = SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise BadRequest(f"unsupported output type {path.suffix!r} for {path}; use one of "
                         f"{', '.join(sorted(SUFFIXES))}")
    if path.is_dir():
        raise OutputError(f"{path} is a directory")
    # lexists: a dangling link is there too (the user's link: with --overwrite replaced, never its target)
    if os.path.lexists(path) and not overwrite:
        raise OutputExists(f"{path} exists; pass --overwrite to replace it")
    parent = path.parent
    if not parent.is_dir():
        raise OutputError(f"output directory does not exist: {parent}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to {parent}: permission denied")
    return fmt


def save_image(path: str | Path, rgb: torch.Tensor, *, alpha: torch.Tensor | None = None, gray: bool = False,
               bits: int = 8, icc: bytes | None = None, exif: bytes | None = None,
               dpi: tuple[float, float] | None = None, quality: int = 95, overwrite: bool = False) -> Path:
    """Write (1, 3, H, W) in [0, 1] to `path`, format from the suffix, atomically.

    The file appears complete or not at all: it is written to a temporary file in the same directory,
    given the mode the umask allows (as any tool's output), and renamed. An existing file is only replaced
    with `overwrite`. `bits=16` writes PNG and TIFF at 16 bits (grey with Pillow; colour and grey+alpha
    with pypng / tifffile, `_save16`); JPEG and WebP are 8-bit. `dpi` goes to PNG, JPEG and TIFF.

    Raises:
        BadRequest, OutputExists, OutputError: see `check_output`.
    """
    import numpy as np
    from PIL import Image

    path = Path(path)
    fmt = check_output(path, overwrite)
    sixteen = bits == 16 and gray and alpha is None and fmt in ("PNG", "TIFF")
    if bits == 16 and fmt in ("PNG", "TIFF") and not sixteen:  # colour or with alpha: pypng / tifffile
        return _atomic(path, fmt, overwrite, lambda tmp: _save16(tmp, fmt, rgb, alpha, gray, icc, exif, dpi))
    if gray:
        rgb = rgb.clamp(0, 1)
        lum = rgb[0, 0] * 0.299 + rgb[0, 1] * 0.587 + rgb[0, 2] * 0.114  # ITU-R 601, Pillow's L
        if sixteen:
            im = Image.fromarray((lum * 65535).round().numpy().astype(np.uint16))
        else:
            im = Image.fromarray((lum * 255).round().numpy().astype(np.uint8), "L")
    else:
        im = Image.fromarray(_to_uint8(rgb).numpy(), "RGB")
    if alpha is not None and fmt != "JPEG":
        a = Image.fromarray((alpha[0, 0].clamp(0, 1) * 255).round().numpy().astype(np.uint8), "L")
        im = im.convert("LA" if gray else "RGBA")
        im.putalpha(a)
    kw: dict = {}
    if icc:
        kw["icc_profile"] = icc
    kw["exif"] = _with_provenance(exif)  # `batch` knows its own outputs by it (never upscales them again)
    if fmt == "TIFF":
        kw["software"] = PROVENANCE
    if dpi is not None and fmt in DPI_FORMATS:
        kw["dpi"] = (round(dpi[0], 3), round(dpi[1], 3))
    if fmt in ("JPEG", "WEBP"):
        kw["quality"] = quality
    def write(tmp: str) -> None:
        with quiet(c_stderr=fmt == "TIFF"):
            im.save(tmp, format=fmt, **kw)

    return _atomic(path, fmt, overwrite, write)


def _atomic(path: Path, fmt: str, overwrite: bool, write) -> Path:
    """`write(tmp)` into a temporary file beside `path`, then rename it into place (`files.atomic_write`)."""
    def checked(tmp: str) -> None:
        write(tmp)
        if os.path.lexists(path) and not overwrite:  # appeared while we computed (a dangling link too)
            raise OutputExists(f"{path} exists; pass --overwrite to replace it")

    try:
        atomic_write(path, checked)  # the umask's permissions: outputs are shared like any tool's
    except BaseException as e:
        if no_space(e):  # the folder, not the temporary name
            raise DiskFull(f"no space left in {path.parent} for {path.name}") from None
        raise
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I",
                                                                    zlib.crc32(kind + data) & 0xFFFFFFFF)


def _save16(tmp: str, fmt: str, rgb, alpha, gray: bool, icc, exif, dpi) -> None:
    """16-bit colour (or grey+alpha) to PNG with pypng, to TIFF with tifffile; ICC, EXIF (PNG: eXIf; TIFF:
    the main IFD's text tags and Software, not the Exif sub-IFD) and DPI carried."""
    import io
    import zlib

    import numpy as np

    h, w = rgb.shape[-2:]
    c = (1 if gray else 3) + (alpha is not None)
    arr = np.empty((h, w, c), np.uint16)
    for r in row_chunks(h, c * w, 2**22):  # a few rows at a time: no float copy of the whole image
        part = rgb[0, :, r].clamp(0, 1)
        planes = [part[0] * 0.299 + part[1] * 0.587 + part[2] * 0.114] if gray else list(part)
        if alpha is not None:
            planes.append(alpha[0, 0, r].clamp(0, 1))
        arr[r] = (torch.stack(planes, -1) * 65535).round().numpy().astype(np.uint16)
    if fmt == "PNG":
        import png

        buf = io.BytesIO()
        png.Writer(w, h, greyscale=c in (1, 2), alpha=c in (2, 4), bitdepth=16).write_array(buf,
                                                                                            arr.reshape(-1))
        data = buf.getvalue()
        extra = b""
        if icc:
            extra += _png_chunk(b"iCCP", b"ICC Profile\0\0" + zlib.compress(icc))
        if dpi is not None:
            import struct

            extra += _png_chunk(b"pHYs",
                                struct.pack(">IIB", round(dpi[0] / 0.0254), round(dpi[1] / 0.0254), 1))
        extra += _png_chunk(b"eXIf", _with_provenance(exif))
        at = 8 + 25  # after the signature and IHDR (13 bytes of data + 12)
        with open(tmp, "wb") as f:
            f.write(data[:at] + extra + data[at:])
        return
    import tifffile

    kw: dict = {"photometric": "minisblack" if c in (1, 2) else "rgb", "software": PROVENANCE}
    if c in (2, 4):
        kw["extrasamples"] = ("unassalpha",)
    if icc:
        kw["iccprofile"] = icc
    if dpi is not None:
        kw["resolution"] = (float(dpi[0]), float(dpi[1]))
        kw["resolutionunit"] = "INCH"
    if exif:  # the main IFD's text tags (description, make, model, date, artist, copyright)
        from PIL import Image

        tags = Image.Exif()
        tags.load(exif)
        kw["extratags"] = [(t, "s", 0, tags[t], True) for t in _TIFF_TEXT_TAGS
                           if isinstance(tags.get(t), str) and tags[t].isascii()]
    tifffile.imwrite(tmp, arr if c > 1 else arr[..., 0], metadata=None, **kw)


_TIFF_TEXT_TAGS = (270, 271, 272, 306, 315, 33432)


def _to_uint8(rgb: torch.Tensor, chunk: int = 2**22) -> torch.Tensor:
    """(1, 3, H, W) in [0, 1] -> (H, W, 3) uint8, a few rows at a time: no float copy of the whole image
    (at 16384^2 each would be 3 GiB)."""
    h, w = rgb.shape[-2:]
    out = torch.empty(h, w, 3, dtype=torch.uint8)
    for r in row_chunks(h, 3 * w, chunk):
        out[r] = (rgb[0, :, r].permute(1, 2, 0).clamp(0, 1) * 255).round()
    return out
