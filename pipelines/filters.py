"""HumanVerse filters. Each returns None (keep) or the rule name + reason of the rejection,
so the job can count rejections per rule."""

from __future__ import annotations

import numpy as np

from hyperhuman.config import ConfigError

DEFAULT_FILTERS = {
    "min_side": 200,  # shorter image side, pixels
    "max_aspect": 3.0,  # longer side / shorter side
    "min_people": 1,
    "max_people": 3,
    "min_person_area": 0.15,  # fraction of the image covered by the person mask (> 50%)
}
# Rules that are off unless set: left out of the job's settings while off, so an output made
# before a rule existed resumes under the same settings.
OPTIONAL_FILTERS = {
    "min_aesthetic": "aesthetic",  # the LAION aesthetic score (annotators.aesthetic); HumanVerse kept ≥ 4.5
}


def check_filters(options: dict) -> dict:
    known = {*DEFAULT_FILTERS, *OPTIONAL_FILTERS}
    unknown = set(options) - known
    if unknown:
        raise ConfigError(f"unknown filters {sorted(unknown)}; known: {sorted(known)}")
    return {**DEFAULT_FILTERS, **options}


def image_rule(rgb: np.ndarray, options: dict) -> tuple[str, str] | None:
    height, width = rgb.shape[:2]
    if min(width, height) < options["min_side"]:
        return "min_side", f"image is {width}x{height}, shorter side below {options['min_side']} px"
    aspect = max(width, height) / min(width, height)
    if aspect > options["max_aspect"]:
        return "max_aspect", f"aspect ratio {aspect:.2f} above {options['max_aspect']}"
    return None


def aesthetic_rule(score: float, options: dict) -> tuple[str, str] | None:
    """Runs in the annotate actor on the source image's score, before outpainting and the people stages."""
    threshold = options.get("min_aesthetic")
    if threshold is not None and score < threshold:
        return "min_aesthetic", f"aesthetic score {score:.3f} below {threshold}"
    return None


def people_rule(pose: dict, mask: np.ndarray, options: dict) -> tuple[str, str] | None:
    count = len(pose["people"])
    if count < options["min_people"]:
        return "min_people", f"{count} people found, fewer than {options['min_people']}"
    if count > options["max_people"]:
        return "max_people", f"{count} people found, more than {options['max_people']}"
    area = float((np.asarray(mask) > 127).mean())
    if area < options["min_person_area"]:
        return "min_person_area", f"people cover {area:.1%} of the image, less than {options['min_person_area']:.0%}"
    return None
