"""Known inputs for testing where annotators map model outputs back to the image.

With random weights a model's output says nothing about where things are, so the tests paint
coloured rectangles in the image and replace the model's raw output with boxes planted on
those rectangles *as they appear in the model's input* (after the resize/pad the annotator
and its library apply). The annotator must then return the rectangles where they were painted.
"""

from __future__ import annotations

import numpy as np

MAGENTA = (255, 0, 255)  # red and blue: channels 0 and 2 in RGB and in BGR inputs
GREEN = (0, 255, 0)
# (high, low) channel pairs that tell each colour apart in RGB or BGR, normalised or not
CHANNELS = {MAGENTA: (0, 1), GREEN: (1, 0)}


def paint(image: np.ndarray, box, colour) -> np.ndarray:
    """Fill ``box`` (x0, y0, x1, y1 integer pixels, x1/y1 exclusive) with ``colour``, in place."""
    x0, y0, x1, y1 = box
    image[y0:y1, x0:x1] = colour
    return image


def painted_people(height: int, width: int, magenta, green) -> np.ndarray:
    """A black image with a magenta and a green rectangle (the "people") at the boxes given."""
    return paint(paint(np.zeros((height, width, 3), np.uint8), magenta, MAGENTA), green, GREEN)


def painted_box(pixels, colour) -> tuple[float, float, float, float]:
    """The box (x0, y0, x1, y1 in pixels of ``pixels``, a ``(3, H, W)`` model input) of the
    rectangle painted in ``colour``, found from the channel difference that only that colour
    has; the background and any grey padding have the median difference."""
    high, low = CHANNELS[colour]
    pixels = np.asarray(pixels, dtype=np.float32)
    difference = pixels[high] - pixels[low]
    inside = difference > (difference.max() + np.median(difference)) / 2
    rows, cols = np.flatnonzero(inside.any(1)), np.flatnonzero(inside.any(0))
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)


def offline_pose_annotator() -> str:
    """The provenance name of the offline config's pose annotator on this machine: MoveNet's when
    its models are installed (make setup), else its mediapipe fallback's."""
    from annotators.registry import annotator_class, resolve
    from hyperhuman.config import load_config

    return annotator_class(resolve(load_config("annotate/offline")["annotators"]["pose"]).name).name
