"""Deterministic visualisations of depth and normal maps for previews and galleries.

The skeleton renderer, which makes the models' pose condition, lives in :mod:`hyperhuman.skeleton`.
"""

from __future__ import annotations

import numpy as np


def render_depth(depth: np.ndarray, kind: str = "metric") -> np.ndarray:
    """Depth → RGB uint8 with the inferno colour map, near = bright (inverse kinds: large = near)."""
    import matplotlib

    depth = np.asarray(depth, dtype=np.float64)
    nearness = depth if ("inverse" in kind or "disparity" in kind) else -depth
    low, high = np.percentile(nearness, 1), np.percentile(nearness, 99)
    scaled = np.clip((nearness - low) / max(high - low, 1e-12), 0, 1)
    return (matplotlib.colormaps["inferno"](scaled)[..., :3] * 255).round().astype(np.uint8)


def render_normal(normal: np.ndarray) -> np.ndarray:
    """Unit normals → RGB uint8, the same colours as the stored ``.normal.png``."""
    return np.clip(np.round((np.asarray(normal) + 1.0) * 127.5), 0, 255).astype(np.uint8)
