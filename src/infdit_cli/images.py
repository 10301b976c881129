"""Image files in and out with Pillow: orientation, alpha, grayscale, 16-bit, ICC/EXIF, atomic saving.

The model sees RGB in [-1, 1]. Everything else about a file (alpha, grayscale, bit depth, colour profile,
EXIF) is taken apart on the way in and put back on the way out.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import BadImage, BadRequest, OutputExists

__all__ = ["LoadedImage", "load_image", "save_image", "check_output", "fill_transparent", "resize", "SUFFIXES", "MAX_SIDE"]

SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF"}
MAX_SIDE = {"PNG": 2**31 - 1, "JPEG": 65535, "WEBP": 16383, "TIFF": 2**31 - 1}
DEFAULT_MAX_PIXELS = 64 * 2**20  # inputs; above this an image is refused unless --max-pixels says otherwise


@dataclass
class LoadedImage:
    rgb: torch.Tensor  # (1, 3, h, w) float32 in [0, 1], orientation applied
    alpha: torch.Tensor | None  # (1, 1, h, w) in [0, 1]
    gray: bool  # the file was grayscale: write grayscale back
    bits: int  # 8 or 16
    icc: bytes | None
    exif: bytes | None  # with orientation reset to 1
    source_format: str | None

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)."""
        return self.rgb.shape[-2], self.rgb.shape[-1]


def _to_tensor(im) -> torch.Tensor:
    """A Pillow image in L/RGB/I;16-like modes -> (1, C, h, w) float32 in [0, 1]."""
    import numpy as np

    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float32) / 65535.0
    else:
        arr = np.asarray(im, dtype=np.float32) / 255.0
    t = torch.from_numpy(np.ascontiguousarray(arr))
    t = t[None, None] if t.ndim == 2 else t.permute(2, 0, 1)[None]
    return t.clamp(0, 1)


def load_image(path: str | Path, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Read an image file for upscaling.

    Raises:
        BadImage: missing, unreadable, truncated, not an image, or larger than `max_pixels`.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise BadImage(f"no such file: {path}")
    if path.is_dir():
        raise BadImage(f"{path} is a directory")
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
            im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage(f"{path} has more than {max_pixels} pixels; raise --max-pixels if it is trusted") from None
    except UnidentifiedImageError:
        raise BadImage(f"{path} is not an image Pillow can read") from None
    except PermissionError:
        raise BadImage(f"{path}: permission denied") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"{path} is damaged or truncated: {e}") from None
    fmt = im.format
    icc = im.info.get("icc_profile")
    exif_obj = im.getexif()
    im = ImageOps.exif_transpose(im)  # orientation applied to the pixels
    exif = None
    if exif_obj:
        exif_obj[0x0112] = 1  # Orientation: the pixels are upright now
        exif = exif_obj.tobytes()

    gray, bits, alpha = False, 8, None
    mode = im.mode
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode == "PA":
        im = im.convert("RGBA")
    elif mode in ("1", "L", "LA", "I;16", "I;16B", "I;16L", "I", "F"):
        gray = True
    elif mode == "CMYK":
        im = im.convert("RGB")
        icc = None  # the profile described CMYK
    elif mode not in ("RGB", "RGBA"):
        im = im.convert("RGBA" if "A" in mode else "RGB")

    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L"):
        bits, rgb = 16, _to_tensor(im)
    elif mode in ("I", "F"):
        import numpy as np

        arr = np.asarray(im, dtype=np.float64)
        bits = 16 if arr.max(initial=0) > 255 else 8
        rgb = torch.from_numpy(arr / (65535.0 if bits == 16 else 255.0)).float()[None, None].clamp(0, 1)
    elif mode == "1":
        rgb = _to_tensor(im.convert("L"))
    elif mode == "LA":
        rgb, alpha = _to_tensor(im.getchannel("L")), _to_tensor(im.getchannel("A"))
    elif mode == "RGBA":
        t = _to_tensor(im)
        rgb, alpha = t[:, :3], t[:, 3:]
        if bool((alpha >= 1).all()):
            alpha = None  # fully opaque: no alpha to carry
    else:
        rgb = _to_tensor(im)
    if rgb.shape[1] == 1:
        rgb = rgb.expand(-1, 3, -1, -1).contiguous()
    return LoadedImage(rgb=rgb, alpha=alpha, gray=gray, bits=bits, icc=icc, exif=exif, source_format=fmt)


def resize(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """High-quality resample of (B, C, h, w) to (H, W): antialiased bicubic, as the official resizes."""
    if tuple(t.shape[-2:]) == tuple(size):
        return t
    return F.interpolate(t, size=size, mode="bicubic", align_corners=False, antialias=True)


def fill_transparent(rgb: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Replace the colour under fully transparent pixels by the colour of the nearest visible ones
    (pull-push over an alpha-weighted pyramid), so resampling never pulls dark fringes into edges."""
    known = (alpha > 0).float()
    if bool(known.all()) or not bool(known.any()):
        return rgb
    levels = [(rgb * known, known)]
    while min(levels[-1][1].shape[-2:]) > 1:
        c, w = levels[-1]
        levels.append((F.avg_pool2d(c, 2, ceil_mode=True), F.avg_pool2d(w, 2, ceil_mode=True)))
    c, w = levels[-1]
    filled = c / w.clamp_min(1e-8)
    for c, w in reversed(levels[:-1]):
        up = F.interpolate(filled, size=c.shape[-2:], mode="nearest")
        filled = torch.where(w > 0, c / w.clamp_min(1e-8), up)
    return torch.where(known > 0, rgb, filled)


def check_output(path: Path, overwrite: bool) -> str:
    """The Pillow format for `path`, after checking it can be written: a known suffix, an existing folder,
    and no file in the way unless `overwrite`. Callers check before computing, `save_image` again after."""
    fmt = SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise BadRequest(f"unsupported output type {path.suffix!r}; use one of {', '.join(sorted(SUFFIXES))}")
    if path.exists() and not overwrite:
        raise OutputExists(f"{path} exists; pass --overwrite to replace it")
    if not path.parent.is_dir():
        raise BadImage(f"output directory does not exist: {path.parent}")
    return fmt


def save_image(path: str | Path, rgb: torch.Tensor, *, alpha: torch.Tensor | None = None, gray: bool = False,
               bits: int = 8, icc: bytes | None = None, exif: bytes | None = None, quality: int = 95,
               overwrite: bool = False) -> Path:
    """Write (1, 3, H, W) in [0, 1] to `path`, format from the suffix, atomically.

    The file appears complete or not at all: it is written to a temporary file in the same directory and
    renamed. An existing file is only replaced with `overwrite`.
    """
    import numpy as np
    from PIL import Image

    path = Path(path)
    fmt = check_output(path, overwrite)
    rgb = rgb.clamp(0, 1)
    sixteen = bits == 16 and gray and alpha is None and fmt in ("PNG", "TIFF")
    if gray:
        lum = rgb[0, 0] * 0.299 + rgb[0, 1] * 0.587 + rgb[0, 2] * 0.114  # ITU-R 601, Pillow's L
        if sixteen:
            im = Image.fromarray((lum * 65535).round().numpy().astype(np.uint16))
        else:
            im = Image.fromarray((lum * 255).round().numpy().astype(np.uint8), "L")
    else:
        im = Image.fromarray((rgb[0].permute(1, 2, 0) * 255).round().numpy().astype(np.uint8), "RGB")
    if alpha is not None and fmt != "JPEG":
        a = Image.fromarray((alpha[0, 0].clamp(0, 1) * 255).round().numpy().astype(np.uint8), "L")
        im = im.convert("LA" if gray else "RGBA")
        im.putalpha(a)
    kw: dict = {}
    if icc:
        kw["icc_profile"] = icc
    if exif and fmt in ("JPEG", "PNG", "WEBP", "TIFF"):
        kw["exif"] = exif
    if fmt in ("JPEG", "WEBP"):
        kw["quality"] = quality
    if fmt == "JPEG" and im.mode in ("LA", "RGBA"):
        im = im.convert("L" if gray else "RGB")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix + ".part", dir=path.parent)
    os.close(fd)
    try:
        im.save(tmp, format=fmt, **kw)
        if path.exists() and not overwrite:  # appeared while we computed
            raise OutputExists(f"{path} exists; pass --overwrite to replace it")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
