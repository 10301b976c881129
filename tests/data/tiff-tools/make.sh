#!/usr/bin/env bash
# Regenerates the TIFF fixtures in this folder (see README.md). Needs tiffcp (Debian: libtiff-tools) and
# Python with numpy, tifffile and imagecodecs. Source pixels: source.py, written uncompressed by tifffile; the
# compression is libtiff's (tiffcp), the library most scanners and editors write TIFF with.
set -euo pipefail
cd "$(dirname "$0")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 - "$tmp" <<'PY'
import sys

import tifffile

from source import source

d = sys.argv[1]
kw = {"metadata": None, "software": False}
tifffile.imwrite(f"{d}/rgba16.tif", source("rgba16"), photometric="rgb", extrasamples=("unassalpha",), **kw)
tifffile.imwrite(f"{d}/rgb16.tif", source("rgb16"), photometric="rgb", **kw)
tifffile.imwrite(f"{d}/rgb16-planar.tif", source("rgb16").transpose(2, 0, 1), photometric="rgb",
                 planarconfig="separate", **kw)
tifffile.imwrite(f"{d}/graya16.tif", source("graya16"), photometric="minisblack",
                 extrasamples=("unassalpha",), resolution=(300.0, 300.0), resolutionunit="INCH",
                 extratags=[(271, "s", 0, "ScanCo", True)], **kw)
tifffile.imwrite(f"{d}/rgb8.tif", source("rgb8"), photometric="rgb", **kw)
# libtiff writes JPEG at 8 bits only: the 16-bit one is lossless JPEG (libjpeg-turbo, through imagecodecs)
tifffile.imwrite("gray16-ljpeg.tif", source("gray16")[..., 0], photometric="minisblack", compression="jpeg",
                 compressionargs={"lossless": True}, bitspersample=16, **kw)
PY
tiffcp -c lzw:2 "$tmp/rgba16.tif" rgba16-lzw.tif          # LZW + horizontal predictor: scanners, Photoshop
tiffcp -c packbits "$tmp/rgba16.tif" rgba16-packbits.tif
tiffcp -c zip:2 "$tmp/rgb16.tif" rgb16-deflate.tif         # Adobe Deflate (8)
tiffcp -c none "$tmp/rgb16-planar.tif" rgb16-planar.tif  # one plane after another, uncompressed (tiffcp
# cannot change the planar layout at 16 bits: tifffile wrote it, libtiff rewrote it)
tiffcp -c lzw "$tmp/graya16.tif" graya16-lzw.tif            # grey + alpha: Pillow has no mode for it
tiffcp -c jpeg:r:95 "$tmp/rgb8.tif" rgb8-jpeg.tif           # JPEG-in-TIFF, RGB (not YCbCr), quality 95
# The old Deflate code (32946) some writers still use: the same zlib stream, only the tag differs
python3 - <<'PY'
import tifffile

with tifffile.TiffFile("rgb16-deflate.tif") as t:
    at = t.pages.first.tags[259].offset + 8  # the entry's value field (classic TIFF)
data = bytearray(open("rgb16-deflate.tif", "rb").read())
order = "little" if data[:2] == b"II" else "big"
assert int.from_bytes(data[at:at + 2], order) == 8
data[at:at + 2] = (32946).to_bytes(2, order)
open("rgb16-zlib.tif", "wb").write(bytes(data))
PY
ls -l ./*.tif
