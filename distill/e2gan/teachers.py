"""Teacher editors: what turns a photo into its edited version for one concept.

Two kinds, one interface (``edit(images, prompt, seeds) -> images``, uint8 RGB ``(H, W, 3)`` in and
out, and ``record()``, the provenance every pair shard sample stores):

- ``instruct-pix2pix`` / ``img2img``: a real diffusers editor loaded from a local folder or a cached
  hub id (``StableDiffusionInstructPix2PixPipeline``, ``StableDiffusionImg2ImgPipeline``), the prompt
  per concept, one seeded generator per image so a rerun draws the same noise;
- ``stand-in``: no diffusion editor exists offline, so deterministic classical OpenCV edits play the
  teacher. They are not what E2GAN distils, and every record says so (``"stand_in": true`` and a
  name ending in ``(offline stand-in)``): stylization, pencil sketch, detail enhancement, a fixed
  colour grade and a cartoon (bilateral filtering + adaptive-threshold edges).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hyperhuman.config import ConfigError

STAND_IN_VERSION = "1"  # bump when an edit below changes: pair shards record it
REFERENCE_SIDE = 512  # the stand-ins' spatial parameters are set for this image side, scaled to others
DIFFUSION_KINDS = ("instruct-pix2pix", "img2img")
TEACHER_KINDS = ("stand-in", *DIFFUSION_KINDS)
DTYPES = ("float32", "float16", "bfloat16")


# --- offline stand-ins -----------------------------------------------------------------------------
def _bgr(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image[..., ::-1])


def _rgb(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image[..., ::-1])


def _spatial(image: np.ndarray, sigma_at_512: float) -> float:
    """A spatial filter size set for a 512-pixel image, scaled to this one's shorter side, so an edit
    looks alike at every resolution (OpenCV's defaults smear a 64-pixel image into blobs)."""
    return float(max(1.0, sigma_at_512 * min(image.shape[:2]) / REFERENCE_SIDE))


def stylization(image: np.ndarray) -> np.ndarray:
    """OpenCV's edge-preserving stylization (Gastal & Oliveira's domain transform): a painted look."""
    import cv2

    return _rgb(cv2.stylization(_bgr(image), sigma_s=_spatial(image, 60), sigma_r=0.45))


def pencil_sketch(image: np.ndarray) -> np.ndarray:
    """OpenCV's pencil sketch, the grey drawing replicated to RGB."""
    import cv2

    gray, _ = cv2.pencilSketch(_bgr(image), sigma_s=_spatial(image, 60), sigma_r=0.07, shade_factor=0.05)
    return np.repeat(gray[..., None], 3, axis=2)


def detail_enhance(image: np.ndarray) -> np.ndarray:
    """OpenCV's detail enhancement: local contrast boosted by the domain-transform filter."""
    import cv2

    return _rgb(cv2.detailEnhance(_bgr(image), sigma_s=_spatial(image, 10), sigma_r=0.15))


def _grade_luts() -> np.ndarray:
    """A fixed "teal and orange" grade as a 256-entry LUT per channel (R, G, B): an S-curve for
    contrast, warm highlights (red lifted, blue lowered at the top), cool shadows (blue lifted)."""
    x = np.linspace(0.0, 1.0, 256)
    s_curve = 0.5 - 0.5 * np.cos(np.pi * x)  # smooth contrast curve through (0, 0), (0.5, 0.5), (1, 1)
    base = 0.6 * s_curve + 0.4 * x
    red = base + 0.08 * x**2
    green = base + 0.02 * np.sin(np.pi * x)
    blue = base + 0.10 * (1 - x) ** 2 - 0.08 * x**2
    return np.stack([np.clip(np.round(c * 255), 0, 255).astype(np.uint8) for c in (red, green, blue)])


def colour_grade(image: np.ndarray) -> np.ndarray:
    luts = _grade_luts()
    return np.stack([luts[c][image[..., c]] for c in range(3)], axis=2)


def cartoon(image: np.ndarray) -> np.ndarray:
    """Cartoonisation: colours flattened by repeated bilateral filtering, dark edges from an adaptive
    threshold of the median-blurred grey image (the classic recipe)."""
    import cv2

    colour, space = _bgr(image), _spatial(image, 7)
    for _ in range(3):
        colour = cv2.bilateralFilter(colour, d=-1, sigmaColor=60, sigmaSpace=space)  # d=-1: from sigmaSpace
    gray = cv2.medianBlur(cv2.cvtColor(_bgr(image), cv2.COLOR_BGR2GRAY), 5)
    block = min(15, max(3, (min(image.shape[:2]) // 16) | 1))  # odd, about a 16th of the image
    # C=6: only pixels clearly darker than their neighbourhood become ink (2 inks every flat patch's noise)
    edges = cv2.adaptiveThreshold(gray, 255, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY, block, 6)
    return _rgb(cv2.bitwise_and(colour, colour, mask=edges))


STAND_INS = {
    "stylization": stylization,
    "pencil-sketch": pencil_sketch,
    "detail-enhance": detail_enhance,
    "colour-grade": colour_grade,
    "cartoon": cartoon,
}


class StandInTeacher:
    """A classical edit named as what it is: an offline stand-in for a diffusion editor. The prompt
    and seeds are ignored (the edit is fixed and deterministic: same pixels in, same bytes out)."""

    kind = "stand-in"

    def __init__(self, edit: str):
        if edit not in STAND_INS:
            raise ConfigError(f"stand_in={edit!r}: one of {sorted(STAND_INS)}")
        self.edit_name = edit
        self.function = STAND_INS[edit]

    def edit(self, images: list[np.ndarray], prompt: str, seeds: list[int]) -> list[np.ndarray]:
        return [self.function(np.ascontiguousarray(image, dtype=np.uint8)) for image in images]

    def record(self) -> dict:
        import cv2

        return {
            "name": f"opencv-{self.edit_name} (offline stand-in)",
            "kind": self.kind,
            "stand_in": True,
            "version": f"{STAND_IN_VERSION}/opencv-{cv2.__version__}",
            "settings": {"edit": self.edit_name, "spatial_parameters_for_side": REFERENCE_SIDE},
            "note": "a deterministic classical edit, not a diffusion editor: no diffusion weights exist offline",
        }


# --- real diffusion editors ------------------------------------------------------------------------
def _pipeline_class(kind: str):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInstructPix2PixPipeline

    return {"instruct-pix2pix": StableDiffusionInstructPix2PixPipeline, "img2img": StableDiffusionImg2ImgPipeline}[kind]


class DiffusionTeacher:
    """A diffusers editor from ``path`` (a local pipeline folder or a cached hub id), loaded once and
    shared by every concept; one ``torch.Generator`` per image, seeded from the sample, so a rerun
    edits identically. ``settings``: ``num_inference_steps``, ``guidance_scale`` and, for
    instruct-pix2pix, ``image_guidance_scale``; for img2img, ``strength``."""

    def __init__(self, kind: str, path: str | None, settings: dict, device: str | None = None, dtype="float32"):
        if kind not in DIFFUSION_KINDS:
            raise ConfigError(f"teacher.kind={kind!r}: one of {TEACHER_KINDS}")
        if not path:
            raise ConfigError(
                f"teacher.kind={kind} needs teacher.path: a diffusers pipeline folder (e.g. timbrooks/instruct-pix2pix "
                "saved locally); offline, use teacher.kind=stand-in"
            )
        self.kind, self.path = kind, str(path)
        self.settings = {key: settings[key] for key in self.setting_names() if key in settings}
        import torch

        if dtype not in DTYPES:
            raise ConfigError(f"teacher.dtype={dtype!r}: one of {DTYPES}")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = dtype
        try:
            self.pipeline = _pipeline_class(kind).from_pretrained(
                self.path, safety_checker=None, requires_safety_checker=False, dtype=getattr(torch, dtype)
            )
        except (OSError, ValueError) as exc:  # diffusers: OSError when not cached, ValueError for no such path
            raise ConfigError(
                f"cannot load the {kind} editor teacher.path={self.path!r}: {exc}. Point it at a local pipeline folder "
                "(with HF_HUB_OFFLINE=1 a hub id must be in the cache), or use teacher.kind=stand-in"
            ) from exc
        self.pipeline.to(self.device)
        self.pipeline.set_progress_bar_config(disable=True)

    def setting_names(self) -> tuple[str, ...]:
        extra = ("image_guidance_scale",) if self.kind == "instruct-pix2pix" else ("strength",)
        return ("num_inference_steps", "guidance_scale", *extra)

    def edit(self, images: list[np.ndarray], prompt: str, seeds: list[int]) -> list[np.ndarray]:
        import PIL.Image
        import torch

        generators = [torch.Generator().manual_seed(seed) for seed in seeds]  # CPU draws: alike on any device
        result = self.pipeline(
            [prompt] * len(images),
            image=[PIL.Image.fromarray(image) for image in images],
            generator=generators,
            output_type="np",
            **self.settings,
        ).images
        edited = [np.clip(np.round(image * 255), 0, 255).astype(np.uint8) for image in result]
        # a VAE may return another size (a side not a multiple of its factor): back to the input's
        return [_resized(out, image.shape[:2]) for out, image in zip(edited, images, strict=True)]

    def record(self) -> dict:
        import diffusers

        name_or_path = self.pipeline.config.get("_name_or_path") or self.path
        return {
            "name": f"diffusers-{self.kind}",
            "kind": self.kind,
            "stand_in": False,
            "version": f"diffusers-{diffusers.__version__}",
            "weights": str(name_or_path),
            "pipeline": type(self.pipeline).__name__,
            "settings": {**self.settings, "dtype": self.dtype},
        }


def _resized(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if image.shape[:2] == tuple(shape):
        return image
    import PIL.Image

    return np.asarray(PIL.Image.fromarray(image).resize((shape[1], shape[0]), PIL.Image.BICUBIC))


def make_teachers(teacher: dict, concepts: dict) -> dict:
    """``{concept: teacher}``: one stand-in per concept (its ``stand_in`` edit), or one diffusion
    editor shared by all concepts (loaded once)."""
    kind = teacher.get("kind", "stand-in")
    if kind == "stand-in":
        return {name: StandInTeacher(concept.get("stand_in")) for name, concept in concepts.items()}
    if kind not in DIFFUSION_KINDS:
        raise ConfigError(f"teacher.kind={kind!r}: one of {TEACHER_KINDS}")
    shared = DiffusionTeacher(
        kind, teacher.get("path"), teacher, teacher.get("device"), teacher.get("dtype", "float32")
    )
    return dict.fromkeys(concepts, shared)


def check_teacher_path(teacher: dict) -> None:
    """A diffusion teacher's ``path`` exists as a folder with ``model_index.json`` (or is a hub id:
    left to ``from_pretrained``, which names the cache flag when it is not there)."""
    path = teacher.get("path")
    if teacher.get("kind", "stand-in") in DIFFUSION_KINDS and path and Path(path).exists():
        if not (Path(path) / "model_index.json").is_file():
            raise ConfigError(f"teacher.path={path!r} is not a diffusers pipeline folder (no model_index.json)")
