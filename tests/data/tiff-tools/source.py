"""The pixels every fixture here was made from (make.sh), which tests/test_real_files.py checks them against:
smooth ramps with 272 levels per channel (more than 8 bits hold), and a transparent band on the left."""

import numpy as np

H, W = 4, 272


def source(kind: str) -> np.ndarray:
    """(H, W, C) uint16 for "rgba16", "rgb16", "graya16", "gray16"; uint8 (H, W, 3) for "rgb8"."""
    y, x = np.mgrid[0:H, 0:W].astype(np.int64)
    r = x * 240 + y * 7
    g = 65535 - x * 240 - y * 11
    b = (x * 120 + y * 3000) % 65536
    a = np.where(x < 8, 0, 65535 - x * 60)  # 0 (transparent) on the left, then 0.75..1
    planes = {"rgba16": (r, g, b, a), "rgb16": (r, g, b), "graya16": (g, a), "gray16": (r,)}
    if kind == "rgb8":
        return np.stack([x * 255 // (W - 1), (W - 1 - x) * 255 // (W - 1), (y * 40 + x // 4) % 256], -1
                        ).astype(np.uint8)
    return np.stack(planes[kind], -1).astype(np.uint16)
