"""Metadata carried deliberately from one image file to another: EXIF rebuilt tag by tag, and resolution.

Never one format's tags handed to another: a TIFF's layout tags (strips, compression, bits per sample)
describe that file's storage, and passed back as EXIF they break a TIFF output and mislead any other.
Each tag is checked by writing it alone, so a wrong-typed one (a camera's ASCII XResolution) is dropped
with a notice instead of failing the save.
"""

from __future__ import annotations

import math
import warnings

__all__ = ["read_exif", "read_dpi", "ORIENTATION"]

# Tags that describe how the *source file* stores its pixels (TIFF layout, resolution, which we write
# through the output format's own field), or that a converter must not copy: they are never carried.
_LAYOUT_TAGS = {
    0x00FE, 0x00FF, 0x0100, 0x0101, 0x0102, 0x0103, 0x0106, 0x0107, 0x0108, 0x0109, 0x010A, 0x0111, 0x0115,
    0x0116, 0x0117, 0x0118, 0x0119, 0x011A, 0x011B, 0x011C, 0x011D, 0x011E, 0x011F, 0x0120, 0x0121, 0x0122,
    0x0123, 0x0124, 0x0125, 0x0128, 0x012D, 0x013D, 0x0140, 0x0142, 0x0143, 0x0144, 0x0145, 0x014A, 0x014C,
    0x0152, 0x0153, 0x0154, 0x0155, 0x0156, 0x015B, 0x0200, 0x0201, 0x0202, 0x0211, 0x0212, 0x0213, 0x0214,
    0x83BB, 0x8649, 0x8773, 0x935C, 0xC612,  # IPTC, Photoshop, ICC (carried on its own), ...
}
_SIZE_TAGS = {0xA002, 0xA003, 0xA005}  # PixelXDimension, PixelYDimension, the Interop IFD pointer
_EXIF_IFD, _GPS_IFD = 0x8769, 0x8825
ORIENTATION = 0x0112
_JPEG_EXIF_LIMIT = 65533  # one APP1 segment



def _serializes(tag: int, value, ifd: int | None = None) -> bool:
    from PIL import Image

    e = Image.Exif()
    if ifd is None:
        e[tag] = value
    else:
        e[ifd] = {tag: value}
    try:
        e.tobytes()
        return True
    except Exception:  # noqa: BLE001 - wrong-typed values fail in many ways inside Pillow
        return False


def _tag_name(tag: int) -> str:
    from PIL import ExifTags

    return ExifTags.TAGS.get(tag, f"0x{tag:04X}")


def read_exif(im, name: str, notices: list[str]) -> tuple[int, bytes | None]:
    """(orientation, rebuilt EXIF bytes or None). Malformed tags are dropped with a notice."""
    from PIL import Image

    try:
        with warnings.catch_warnings():  # Pillow warns about the corrupt EXIF it reads
            warnings.simplefilter("ignore")
            src = im.getexif()
            base = dict(src.items())
            subs = {}
            for ifd in (_EXIF_IFD, _GPS_IFD):
                if ifd in base:
                    subs[ifd] = dict(src.get_ifd(ifd))
    except Exception:  # noqa: BLE001
        notices.append(f"{name}: its EXIF cannot be read; dropped")
        return 1, None
    orientation = base.get(ORIENTATION, 1)
    if orientation not in range(1, 9):
        if ORIENTATION in base:
            notices.append(f"{name}: EXIF orientation {orientation!r} is not valid; ignored")
        orientation = 1
    if not base:
        return orientation, None
    out, dropped = Image.Exif(), []
    for tag, value in base.items():
        if tag in _LAYOUT_TAGS or tag in (_EXIF_IFD, _GPS_IFD, ORIENTATION):
            continue
        if _serializes(tag, value):
            out[tag] = value
        else:
            dropped.append(_tag_name(tag))
    for ifd, tags in subs.items():
        kept = {}
        for tag, value in tags.items():
            if tag in _SIZE_TAGS:
                continue
            if _serializes(tag, value, ifd):
                kept[tag] = value
            else:
                dropped.append(_tag_name(tag))
        if kept:
            out[ifd] = kept
    out[ORIENTATION] = 1  # the pixels are upright now
    if dropped:
        notices.append(f"{name}: malformed EXIF tag(s) dropped: {', '.join(dropped)}")
    try:
        data = out.tobytes()
        if len(data) > _JPEG_EXIF_LIMIT and _EXIF_IFD in out:
            out[_EXIF_IFD] = {t: v for t, v in out[_EXIF_IFD].items() if t != 0x927C}  # MakerNote
            data = out.tobytes()
            notices.append(f"{name}: EXIF maker note dropped (too large to carry)")
        if len(data) > _JPEG_EXIF_LIMIT:
            notices.append(f"{name}: EXIF too large to carry; dropped")
            return orientation, None
    except Exception:  # noqa: BLE001
        notices.append(f"{name}: its EXIF cannot be rewritten; dropped")
        return orientation, None
    return orientation, data


def read_dpi(info: dict, name: str, notices: list[str]) -> tuple[float, float] | None:
    dpi = info.get("dpi")
    if dpi is None:
        return None
    try:
        if (isinstance(dpi, (tuple, list)) and len(dpi) == 2
                and not any(isinstance(v, (str, bytes)) for v in dpi)):
            x, y = (float(v) for v in dpi)
            if all(math.isfinite(v) and v > 0 for v in (x, y)):
                return x, y
    except (TypeError, ValueError, ZeroDivisionError):
        pass
    notices.append(f"{name}: resolution {dpi!r} is not valid; dropped")
    return None
