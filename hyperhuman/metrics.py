"""The HyperHuman paper's metrics: FID, KID×1000, FID_CLIP, CLIP score, pose AP/AR and "clean" AP/AR.

Image quality (feature statistics, float64, no model inside):

- **FID** (:func:`fid_from_features`, :func:`frechet_distance`): the Fréchet distance between
  Gaussians fitted to the features of real and generated images,
  ``||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1 S2)^½)``, covariances with ``N - 1``. ``Tr (S1 S2)^½`` is
  the sum of the square roots of the eigenvalues of the symmetric PSD matrix ``S1^½ S2 S1^½``
  (same spectrum as ``S1 S2``), so no complex numbers appear; eigenvalues that rounding makes
  slightly negative count as 0 — what pytorch-fid's "drop the tiny imaginary part" and
  torchmetrics' ``eigvals(S1 S2).sqrt().real`` do.
- **KID** (:func:`kid_from_features`): the unbiased MMD² with the polynomial kernel
  ``(x·y / D + 1)³``, averaged over random subsets (mean, population std), exactly as
  torchmetrics' ``KernelInceptionDistance``; the paper reports it ×1000. Subsets are drawn with
  ``torch.randperm`` from a generator seeded with ``seed`` in torchmetrics' order, so the same
  seed gives the same subsets as torchmetrics after ``torch.manual_seed(seed)``.
- Features come from any :class:`FeatureExtractor` (a module mapping uint8 ``(N, 3, H, W)`` images
  to ``(N, D)``): :class:`InceptionFeatures` (standard FID/KID), :class:`ClipFeatures`
  (FID_CLIP), or your own.
- **FID_CLIP** (:func:`fid_clip`): FID on CLIP image embeddings (the projected, unnormalised
  ``get_image_features`` output, as clean-fid's ``clip_vit_b_32`` mode) of real vs generated.
- **CLIP score** (:func:`clip_score`): ``100 · max(cos(image, prompt), 0)`` per pair, averaged
  (Hessel et al. 2021, w = 100). torchmetrics' ``CLIPScore`` clamps the *mean* instead of each
  pair; the two agree whenever no pair has a negative cosine (always the case with real CLIP
  weights in practice). Captions longer than the text model's context are truncated keeping the
  end-of-text token (as OpenAI's ``clip.tokenize(truncate=True)``).

Weights (never downloaded here; a missing path is a ``ValueError`` naming it and what to get):

- Inception: the FID Inception-v3 of TF "2015-12-05" converted to PyTorch,
  ``weights-inception-2015-12-05-6726825d.pth`` from the torch-fidelity release (:data:`INCEPTION_URL`;
  pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` has the same hash prefix and fits too: the
  module has exactly the state-dict keys and shapes of torchvision's ``Inception3(num_classes=1008,
  aux_logits=False)``, which pytorch-fid loads that file into), run through
  torchmetrics' ``NoTrainInceptionV3`` (needs ``torch-fidelity``): 2048-d pool features, images
  resized to 299 with antialiased bilinear by default = torchmetrics' ``FrechetInceptionDistance``
  default (``antialias=False`` gives torch-fidelity's / TF1's resize, the original FID protocol).
- CLIP: a transformers ``CLIPModel`` folder with its processor (e.g. ``openai/clip-vit-large-patch14``
  fetched with ``huggingface-cli download ... --local-dir PATH`` elsewhere), loaded with
  ``local_files_only=True``.

Pose accuracy (COCO keypoint evaluation re-implemented in numpy, no pycocotools needed at run time):

- :func:`pose_ap_ar`: OKS with the COCO-17 sigmas, greedy matching by detection score, AP as the
  mean of 101-point interpolated precision over OKS thresholds .50:.05:.95, AP50, AP75, AR
  (maxDets 20), and the medium/large variants — COCOeval's ``iouType="keypoints"`` semantics,
  tie-breaking included: a GT person with no labelled keypoint is ignored (detections matched to
  it count neither way), a detection's area is the extent of its keypoints, images with no GT
  still contribute false positives, an undefined value is ``-1`` as in COCO.
- :func:`clean_pose_ap_ar`: HyperHuman's "clean" AP/AR — the same evaluation with only the 3 most
  salient GT people of each image kept, salience = largest area (ties: first listed); the other
  GT people are removed (so detections of them count as false positives), detections unchanged.
- :func:`coco_people` turns our shard pose dicts (``KEY.pose.json``: per person ``bbox``
  ``[x0, y0, x1, y1]``, ``score``, COCO-17 ``keypoints`` ``[x, y, score]``, score 0 = not
  labelled) into those inputs. Our poses carry no person mask, so a person's area is its bbox
  area unless the person dict has an ``area``; COCO uses the segmentation area (roughly half to
  two thirds of the box), so our OKS is somewhat more lenient than COCO's on the same keypoints.
  :func:`pose_metrics` and :func:`pose_sample_score` are the entry points ``hyperhuman eval`` uses
  (ground truth = the conditioning pose, detections = the pose annotator on the generated image).

How it was checked (``tests/hyperhuman/test_metrics.py``; numbers measured with torchmetrics 1.9.0,
pycocotools 2.0.11, transformers 5.24): FID against torchmetrics' ``FrechetInceptionDistance`` fed
the same features through a fixed random feature module (relative difference 3e-10 to 4e-9 for
N = 8-200, D = 12-64) and against closed forms for Gaussians; KID against
``KernelInceptionDistance`` with the same subsets (mean identical, std within 2e-16); ``InceptionFeatures``
against torchmetrics' own Inception on a randomly initialised copy of the real architecture;
``clip_similarities`` against torchmetrics' CLIP-score code on a toy random ``CLIPModel`` saved to
disk (max difference 3.5e-6 on a 0-100 scale; torchmetrics 1.9 needs a shim there, as transformers
5 returns ModelOutputs from ``get_*_features``); FID_CLIP against torchmetrics' FID on our CLIP
module (2e-8); pose AP/AR — all ten COCO numbers, plain and clean — against pycocotools'
``COCOeval`` on synthetic people with jitter, misses, duplicates, false positives, tied scores,
>20 detections and unlabelled keypoints: bit-identical on 60 random sets of 12 images.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch

INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_FEATURES = 2048

# COCO-17 per-keypoint OKS constants (pycocotools' Params.kpt_oks_sigmas).
COCO17_SIGMAS = (
    np.array([0.26, 0.25, 0.25, 0.35, 0.35, 0.79, 0.79, 0.72, 0.72, 0.62, 0.62, 1.07, 1.07, 0.87, 0.87, 0.89, 0.89])
    / 10.0
)
OKS_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
AREA_RANGES = {"all": (0.0, 1e10), "medium": (32.0**2, 96.0**2), "large": (96.0**2, 1e10)}
MAX_DETECTIONS = 20
SALIENT_PEOPLE = 3


# --------------------------------------------------------------------------------------------- features


@runtime_checkable
class FeatureExtractor(Protocol):
    """Anything (typically a ``torch.nn.Module``) mapping uint8 images ``(N, 3, H, W)`` to features ``(N, D)``."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


def as_image_batch(images, name: str = "images") -> torch.Tensor:
    """uint8 ``(N, 3, H, W)`` tensor from a tensor or numpy array of that layout; a ValueError otherwise."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{name} must be a uint8 tensor (N, 3, H, W), got {type(images).__name__}")
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"{name} must be uint8 (N, 3, H, W) with values 0-255, got {images.dtype} {tuple(images.shape)}; "
            "convert with (x.clamp(0, 1) * 255).round().byte() and permute channels first"
        )
    return images


@torch.no_grad()
def image_features(extractor: FeatureExtractor, images, batch_size: int = 64) -> torch.Tensor:
    """``extractor`` over ``images`` in batches: a float64 CPU tensor ``(N, D)``."""
    images = as_image_batch(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    chunks = [extractor(images[start : start + batch_size]) for start in range(0, len(images), batch_size)]
    features = torch.cat([torch.as_tensor(chunk).detach().reshape(len(chunk), -1) for chunk in chunks])
    return features.to("cpu", torch.float64)


def _features(features, name: str) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().to("cpu", torch.float64).numpy()
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"{name} features must be 2-D (N, D), got shape {features.shape}")
    if len(features) < 2:
        raise ValueError(
            f"{name} features: need at least 2 samples for a covariance, got {len(features)}; evaluate more images"
        )
    if not np.isfinite(features).all():
        raise ValueError(f"{name} features contain NaN or inf; check the images and the feature extractor")
    return features


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and covariance ``(D, D)`` (``N - 1`` normalisation), float64."""
    features = _features(features, "the")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)`` (float64).

    ``Tr (sigma1 sigma2)^½`` comes from the eigenvalues of ``sigma1^½ sigma2 sigma1^½`` (symmetric,
    PSD): negative rounding noise is clipped to 0, the counterpart of discarding the tiny
    imaginary parts a general ``sqrtm(sigma1 @ sigma2)`` produces.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    dim = mu1.shape[0]
    if mu1.shape != (dim,) or mu2.shape != (dim,) or sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(
            f"shapes do not match: mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 {mu2.shape}, sigma2 {sigma2.shape}; "
            "expected (D,), (D, D), (D,), (D, D)"
        )
    for name, value in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(value).all():
            raise ValueError(f"{name} contains NaN or inf")
    root1 = _psd_sqrt(sigma1)
    product = root1 @ sigma2 @ root1
    eigenvalues = np.linalg.eigvalsh((product + product.T) / 2)
    trace_covmean = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_covmean)


def fid_from_features(real, fake) -> float:
    """FID between two feature sets ``(N, D)`` (each N >= 2; tensors or arrays)."""
    real, fake = _features(real, "real"), _features(fake, "generated")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real features have {real.shape[1]} dims, generated {fake.shape[1]}; use one extractor")
    return frechet_distance(real.mean(0), np.cov(real, rowvar=False), fake.mean(0), np.cov(fake, rowvar=False))


def _poly_mmd(f_real: torch.Tensor, f_fake: torch.Tensor, degree: int, gamma: float, coef: float) -> torch.Tensor:
    k_xx = (f_real @ f_real.T * gamma + coef) ** degree
    k_yy = (f_fake @ f_fake.T * gamma + coef) ** degree
    k_xy = (f_real @ f_fake.T * gamma + coef) ** degree
    m = k_xx.shape[0]
    xx = k_xx.sum() - torch.diagonal(k_xx).sum()
    yy = k_yy.sum() - torch.diagonal(k_yy).sum()
    return (xx + yy) / (m * (m - 1)) - 2 * k_xy.sum() / m**2


def kid_from_features(
    real,
    fake,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef: float = 1.0,
    seed: int = 0,
) -> tuple[float, float]:
    """KID (mean, std over ``subsets``) between two feature sets; multiply by 1000 for the paper's KID×1000.

    Unbiased MMD² with the kernel ``(x·y * gamma + coef) ** degree`` (``gamma`` = 1 / D by default)
    on random subsets of ``subset_size`` samples drawn without replacement from each set;
    ``subset_size`` is clipped to the smaller set's size (with all samples every subset is the
    whole set and the std is 0). Deterministic for a given ``seed``: the subsets are
    ``torch.randperm`` draws (real, then generated, per subset) from a generator seeded with it —
    the draws torchmetrics makes after ``torch.manual_seed(seed)``. std is the population std.
    """
    real = torch.from_numpy(_features(real, "real"))
    fake = torch.from_numpy(_features(fake, "generated"))
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real features have {real.shape[1]} dims, generated {fake.shape[1]}; use one extractor")
    for name, value in (("subsets", subsets), ("subset_size", subset_size), ("degree", degree)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if gamma is not None and not gamma > 0:
        raise ValueError(f"gamma must be None (1 / D) or > 0, got {gamma!r}")
    if not coef > 0:
        raise ValueError(f"coef must be > 0, got {coef!r}")
    size = min(subset_size, len(real), len(fake))
    gamma = 1.0 / real.shape[1] if gamma is None else float(gamma)
    generator = torch.Generator().manual_seed(seed)
    scores = []
    for _ in range(subsets):
        f_real = real[torch.randperm(len(real), generator=generator)[:size]]
        f_fake = fake[torch.randperm(len(fake), generator=generator)[:size]]
        scores.append(_poly_mmd(f_real, f_fake, degree, gamma, coef))
    scores = torch.stack(scores)
    return float(scores.mean()), float(scores.std(unbiased=False))


def fid(extractor: FeatureExtractor, real_images, generated_images, batch_size: int = 64) -> float:
    """FID of two uint8 image sets ``(N, 3, H, W)`` through any feature extractor."""
    return fid_from_features(
        image_features(extractor, real_images, batch_size), image_features(extractor, generated_images, batch_size)
    )


def kid(extractor: FeatureExtractor, real_images, generated_images, batch_size: int = 64, **options):
    """KID (mean, std) of two uint8 image sets through any feature extractor; ``options``: see
    :func:`kid_from_features`."""
    return kid_from_features(
        image_features(extractor, real_images, batch_size),
        image_features(extractor, generated_images, batch_size),
        **options,
    )


def _default_device(device) -> torch.device:
    return torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))


class InceptionFeatures(torch.nn.Module):
    """The standard FID/KID Inception-v3 (2048-d pool features) from a local weights file.

    ``path`` is ``weights-inception-2015-12-05-6726825d.pth`` (:data:`INCEPTION_URL`; fetch it
    yourself, nothing is downloaded). Runs torchmetrics' ``NoTrainInceptionV3`` (torch-fidelity's
    port of the TF graph); ``antialias=True`` is torchmetrics' default resize to 299,
    ``antialias=False`` torch-fidelity's TF1-compatible one. Call it on uint8 ``(N, 3, H, W)``:
    returns float32 ``(N, 2048)`` on the CPU, computed in batches of ``batch_size``.
    """

    def __init__(self, path: str | os.PathLike, antialias: bool = True, batch_size: int = 32, device=None):
        super().__init__()
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ValueError(
                f"Inception weights {path!r} not found. Download {INCEPTION_URL} (the FID Inception-v3; "
                "pytorch-fid's pt_inception-2015-12-05-6726825d.pth fits too) on a machine with network and "
                "give its local path"
            )
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ModuleNotFoundError(f"InceptionFeatures needs torchmetrics and torch-fidelity: {exc}") from exc
        try:
            # refuse pickled code before torch-fidelity unpickles the file without weights_only
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"{path!r} is not a plain PyTorch state dict ({exc}); expected {INCEPTION_URL}") from exc
        try:
            self.model = NoTrainInceptionV3(
                name="inception-v3-compat",
                features_list=[str(INCEPTION_FEATURES)],
                feature_extractor_weights_path=path,
                antialias=antialias,
            )
        except RuntimeError as exc:
            message = f"{path!r} does not hold the FID Inception weights ({exc}); expected {INCEPTION_URL}"
            raise ValueError(message) from exc
        self.num_features = INCEPTION_FEATURES
        self.batch_size = batch_size
        self.device = _default_device(device)
        self.model.to(self.device)

    @torch.no_grad()
    def forward(self, images) -> torch.Tensor:
        images = as_image_batch(images)
        out = [
            self.model(images[start : start + self.batch_size].to(self.device)).float().cpu()
            for start in range(0, len(images), self.batch_size)
        ]
        return torch.cat(out) if out else torch.zeros(0, INCEPTION_FEATURES)


class ClipFeatures(torch.nn.Module):
    """A transformers CLIP model and its processor from a local folder (``local_files_only``).

    ``image_embeddings`` / ``text_embeddings`` are the projected, unnormalised embeddings
    (``get_image_features`` / ``get_text_features``), float32 ``(N, D)`` on the CPU. Calling the
    module gives the image embeddings, so it is also a :class:`FeatureExtractor` (FID_CLIP).
    """

    def __init__(self, path: str | os.PathLike, batch_size: int = 32, device=None):
        super().__init__()
        path = os.fspath(path)
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(
                f"no CLIP model at {path!r} (no config.json there). Fetch a CLIPModel folder with its processor "
                "(e.g. `huggingface-cli download openai/clip-vit-large-patch14 --local-dir PATH` on a machine with "
                "network) and give its local path"
            )
        from transformers import CLIPModel, CLIPProcessor

        try:
            self.model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
            self.processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot load a CLIPModel and CLIPProcessor from {path!r}: {exc}") from exc
        self.batch_size = batch_size
        self.device = _default_device(device)
        self.model.to(self.device)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)

    @staticmethod
    def _tensor(output) -> torch.Tensor:
        # transformers 5 returns a ModelOutput whose pooler_output is the projected embedding
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    @torch.no_grad()
    def image_embeddings(self, images) -> torch.Tensor:
        images = as_image_batch(images)
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = list(images[start : start + self.batch_size])
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device)
            out.append(self._tensor(self.model.get_image_features(pixel_values=pixels)).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(prompt, str) for prompt in prompts):
            raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
        out = []
        for start in range(0, len(prompts), self.batch_size):
            tokens = self.processor(
                text=prompts[start : start + self.batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
            )
            features = self.model.get_text_features(
                input_ids=tokens["input_ids"].to(self.device), attention_mask=tokens["attention_mask"].to(self.device)
            )
            out.append(self._tensor(features).float().cpu())
        return torch.cat(out)

    def forward(self, images) -> torch.Tensor:
        return self.image_embeddings(images)


def clip_similarities(clip, images, prompts: Sequence[str]) -> np.ndarray:
    """``100 · cos(image, prompt)`` per pair (float64, unclamped); ``clip`` as :class:`ClipFeatures`."""
    images = as_image_batch(images)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts; give one prompt per image")
    image = clip.image_embeddings(images).double()
    text = clip.text_embeddings(prompts).double()
    image = image / image.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    return (100 * (image * text).sum(-1)).numpy()


def clip_score(clip, images, prompts: Sequence[str]) -> float:
    """CLIP score: mean over pairs of ``100 · max(cos(image, prompt), 0)`` (see the module notes)."""
    return float(np.maximum(clip_similarities(clip, images, prompts), 0).mean())


def fid_clip(clip, real_images, generated_images) -> float:
    """FID on CLIP image embeddings (FID_CLIP) of real vs generated uint8 images."""
    return fid_from_features(clip.image_embeddings(real_images), clip.image_embeddings(generated_images))


# --------------------------------------------------------------------------------------------- pose


def coco_people(pose: dict) -> list[dict]:
    """Our pose dict (``KEY.pose.json`` layout, see ``shards.codecs.normalize_pose``) → people for
    :func:`pose_ap_ar`, for ground truth and detections alike.

    Per person: ``keypoints`` ``(17, 3)`` ``[x, y, v]`` with ``v = 2`` where the keypoint score is
    > 0 (labelled) and 0 otherwise; ``bbox`` COCO ``[x, y, w, h]`` from our ``[x0, y0, x1, y1]``;
    ``area`` = the person's ``area`` if given, else the bbox area (COCO uses the segmentation area,
    which our poses lack: bbox area is larger, so OKS is more lenient); ``score`` = person score
    (1.0 if absent). Coordinates of score-0 keypoints are kept: COCO ignores them in ground truth,
    and in a detection they are a (likely wrong) guess, as in any COCO result file. NaN/inf values
    become 0 (unlabelled, at the origin); a person without ``bbox`` gets the extent of its labelled
    keypoints.
    """
    if not isinstance(pose, dict) or "people" not in pose:
        raise ValueError(f"a pose must be a dict with 'people' (shards.codecs layout), got {type(pose).__name__}")
    people = []
    for index, person in enumerate(pose["people"]):
        keypoints = np.asarray(person["keypoints"], dtype=np.float64)
        if keypoints.shape != (len(COCO17_SIGMAS), 3):
            raise ValueError(f"people[{index}].keypoints must be COCO-17 (17, 3) [x, y, score], got {keypoints.shape}")
        keypoints = np.nan_to_num(keypoints, nan=0.0, posinf=0.0, neginf=0.0)
        labelled = keypoints[:, 2] > 0
        if person.get("bbox") is not None:
            x0, y0, x1, y1 = (float(value) for value in person["bbox"])
        elif labelled.any():
            (x0, y0), (x1, y1) = keypoints[labelled, :2].min(axis=0), keypoints[labelled, :2].max(axis=0)
        else:
            x0 = y0 = x1 = y1 = 0.0
        width, height = max(x1 - x0, 0.0), max(y1 - y0, 0.0)
        visibility = np.where(labelled, 2.0, 0.0)
        people.append(
            {
                "keypoints": np.column_stack([keypoints[:, :2], visibility]),
                "bbox": [float(x0), float(y0), float(width), float(height)],
                "area": float(person.get("area", float(width * height))),
                "score": float(person.get("score", 1.0)),
            }
        )
    return people


def _keypoints(person: dict, index: str, sigmas: np.ndarray) -> np.ndarray:
    keypoints = np.asarray(person["keypoints"], dtype=np.float64)
    if keypoints.ndim == 1 and keypoints.size == 3 * len(sigmas):
        keypoints = keypoints.reshape(-1, 3)  # COCO's flat [x1, y1, v1, x2, ...]
    if keypoints.shape != (len(sigmas), 3):
        raise ValueError(f"{index}.keypoints must be ({len(sigmas)}, 3) [x, y, v], got {keypoints.shape}")
    return keypoints


def oks_matrix(ground_truth: Sequence[dict], detections: Sequence[dict], sigmas=COCO17_SIGMAS) -> np.ndarray:
    """COCO object keypoint similarity ``(len(detections), len(ground_truth))``, in the given orders.

    As COCOeval's ``computeOks``: over the labelled GT keypoints,
    ``mean exp(-d² / (2 · area · (2σ)²))``; for a GT with no labelled keypoint, the distance of each
    detected keypoint outside the GT box enlarged to 3× its size (COCO's ignore region).
    """
    sigmas = np.asarray(sigmas, dtype=np.float64)
    variances = (sigmas * 2) ** 2
    ious = np.zeros((len(detections), len(ground_truth)))
    if not len(detections) or not len(ground_truth):
        return ious
    found = np.stack([_keypoints(d, f"detections[{i}]", sigmas) for i, d in enumerate(detections)])
    xd, yd = found[:, :, 0], found[:, :, 1]
    for j, truth in enumerate(ground_truth):
        keypoints = _keypoints(truth, f"ground_truth[{j}]", sigmas)
        xg, yg, vg = keypoints.T
        labelled = vg > 0
        if labelled.any():
            dx, dy = xd - xg, yd - yg
        else:
            bx, by, bw, bh = (float(value) for value in truth["bbox"])
            x0, x1, y0, y1 = bx - bw, bx + bw * 2, by - bh, by + bh * 2
            dx = np.maximum(0, x0 - xd) + np.maximum(0, xd - x1)
            dy = np.maximum(0, y0 - yd) + np.maximum(0, yd - y1)
        e = (dx**2 + dy**2) / variances / (float(truth["area"]) + np.spacing(1)) / 2
        if labelled.any():
            e = e[:, labelled]
        ious[:, j] = np.exp(-e).sum(axis=1) / e.shape[1]
    return ious


def most_salient_people(people: Sequence[dict], keep: int = SALIENT_PEOPLE) -> list[dict]:
    """The ``keep`` people with the largest ``area`` (ties: first listed), in their original order."""
    order = np.argsort([-float(person["area"]) for person in people], kind="mergesort")[:keep]
    return [people[index] for index in sorted(order)]


def _evaluate_image(oks, gt_ignore, gt_area, dt_area, area_range):
    """COCOeval.evaluateImg for one image and area range: matches per threshold (dts already sorted)."""
    low, high = area_range
    ignore = gt_ignore | (gt_area < low) | (gt_area > high)
    gt_order = np.argsort(ignore, kind="mergesort")
    ignore = ignore[gt_order]
    oks = oks[:, gt_order] if oks.size else oks
    thresholds, num_dt, num_gt = len(OKS_THRESHOLDS), len(dt_area), len(gt_order)
    gt_matched = np.zeros((thresholds, num_gt), dtype=bool)
    dt_matched = np.zeros((thresholds, num_dt), dtype=bool)
    dt_ignore = np.zeros((thresholds, num_dt), dtype=bool)
    if oks.size:
        for t, threshold in enumerate(OKS_THRESHOLDS):
            for d in range(num_dt):
                best, match = min(threshold, 1 - 1e-10), -1
                for g in range(num_gt):
                    if gt_matched[t, g]:  # no crowd people: a matched GT is taken
                        continue
                    if match > -1 and not ignore[match] and ignore[g]:
                        break
                    if oks[d, g] < best:
                        continue
                    best, match = oks[d, g], g
                if match == -1:
                    continue
                dt_ignore[t, d] = ignore[match]
                dt_matched[t, d] = True
                gt_matched[t, match] = True
    outside = (dt_area < low) | (dt_area > high)
    dt_ignore |= ~dt_matched & outside[None, :]
    return dt_matched, dt_ignore, ignore


def _accumulate(results, scores):
    """COCOeval.accumulate for one area range: precision ``(T, R)`` and recall ``(T,)``, -1 if undefined."""
    precision = -np.ones((len(OKS_THRESHOLDS), len(RECALL_THRESHOLDS)))
    recall = -np.ones(len(OKS_THRESHOLDS))
    if not results:
        return precision, recall
    dt_scores = np.concatenate(scores)
    order = np.argsort(-dt_scores, kind="mergesort")
    dt_matched = np.concatenate([r[0] for r in results], axis=1)[:, order]
    dt_ignore = np.concatenate([r[1] for r in results], axis=1)[:, order]
    gt_ignore = np.concatenate([r[2] for r in results])
    positives = np.count_nonzero(~gt_ignore)
    if positives == 0:
        return precision, recall
    tp_sum = np.cumsum(dt_matched & ~dt_ignore, axis=1).astype(float)
    fp_sum = np.cumsum(~dt_matched & ~dt_ignore, axis=1).astype(float)
    for t, (tp, fp) in enumerate(zip(tp_sum, fp_sum, strict=True)):
        num = len(tp)
        rc = tp / positives
        pr = (tp / (fp + tp + np.spacing(1))).tolist()
        recall[t] = rc[-1] if num else 0
        for i in range(num - 1, 0, -1):
            if pr[i] > pr[i - 1]:
                pr[i - 1] = pr[i]
        q = np.zeros(len(RECALL_THRESHOLDS))
        for r, index in enumerate(np.searchsorted(rc, RECALL_THRESHOLDS, side="left")):
            if index >= num:
                break
            q[r] = pr[index]
        precision[t] = q
    return precision, recall


def _mean_defined(values: np.ndarray) -> float:
    defined = values[values > -1]
    return float(defined.mean()) if defined.size else -1.0


def pose_ap_ar(
    ground_truth: Sequence[Sequence[dict]],
    detections: Sequence[Sequence[dict]],
    sigmas=COCO17_SIGMAS,
    max_detections: int = MAX_DETECTIONS,
    keep_largest: int | None = None,
) -> dict[str, float]:
    """COCO keypoint AP/AR of detections against ground truth, one list of people per image.

    Ground-truth person: ``keypoints`` ``(17, 3)`` (or COCO's flat 51) ``[x, y, v]`` in pixels,
    ``v > 0`` = labelled; ``area`` (the OKS scale and the area-range filter); ``bbox`` COCO
    ``[x, y, w, h]`` (only used for a person with no labelled keypoint, who is ignored).
    Detection: ``keypoints`` ``[x, y, any]`` and ``score``; its area is the extent of its keypoints
    (as ``COCO.loadRes``). Only the ``max_detections`` best-scored detections of an image count.

    Returns COCOeval's ten keypoint numbers in [0, 1] (``-1`` where undefined, e.g. no labelled
    ground truth): ``AP`` (OKS .50:.05:.95, 101-point interpolated precision), ``AP50``, ``AP75``,
    ``APm``, ``APl``, ``AR``, ``AR50``, ``AR75``, ``ARm``, ``ARl``. ``keep_largest=k`` first keeps
    only the k largest-area GT people of each image (see :func:`clean_pose_ap_ar`).
    """
    if len(ground_truth) != len(detections):
        raise ValueError(
            f"{len(ground_truth)} images of ground truth but {len(detections)} of detections; give one list per image"
        )
    sigmas = np.asarray(sigmas, dtype=np.float64)
    per_area = {name: ([], []) for name in AREA_RANGES}
    for image, (truth, found) in enumerate(zip(ground_truth, detections, strict=True)):
        truth = list(truth)
        if keep_largest is not None:
            truth = most_salient_people(truth, keep_largest)
        if not truth and not found:
            continue
        order = np.argsort([-float(d["score"]) for d in found], kind="mergesort")[:max_detections]
        found = [found[i] for i in order]
        gt_ignore = np.zeros(len(truth), dtype=bool)
        for j, person in enumerate(truth):
            gt_ignore[j] = not (_keypoints(person, f"ground_truth[{image}][{j}]", sigmas)[:, 2] > 0).any()
            if "area" not in person or (gt_ignore[j] and "bbox" not in person):
                raise ValueError(
                    f"ground_truth[{image}][{j}] needs 'area' (and 'bbox' when no keypoint is labelled); "
                    "build people from our poses with coco_people"
                )
        gt_area = np.array([float(p["area"]) for p in truth])
        dt_area = np.zeros(len(found))
        for i, person in enumerate(found):
            keypoints = _keypoints(person, f"detections[{image}][{i}]", sigmas)
            dt_area[i] = np.ptp(keypoints[:, 0]) * np.ptp(keypoints[:, 1])
        oks = oks_matrix(truth, found, sigmas) if truth and found else np.zeros((0, 0))
        scores = np.array([float(d["score"]) for d in found])
        for name, area_range in AREA_RANGES.items():
            results, score_lists = per_area[name]
            results.append(_evaluate_image(oks, gt_ignore, gt_area, dt_area, area_range))
            score_lists.append(scores)
    stats = {}
    for name, suffix in (("all", ""), ("medium", "m"), ("large", "l")):
        precision, recall = _accumulate(*per_area[name])
        stats[f"AP{suffix}"] = _mean_defined(precision)
        if name == "all":
            stats["AP50"], stats["AP75"] = _mean_defined(precision[0]), _mean_defined(precision[5])
            stats["AR50"], stats["AR75"] = _mean_defined(recall[:1]), _mean_defined(recall[5:6])
        stats[f"AR{suffix}"] = _mean_defined(recall)
    return {key: stats[key] for key in ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")}


def clean_pose_ap_ar(
    ground_truth: Sequence[Sequence[dict]], detections: Sequence[Sequence[dict]], keep: int = SALIENT_PEOPLE, **options
) -> dict[str, float]:
    """HyperHuman's "clean" pose AP/AR: :func:`pose_ap_ar` with only the ``keep`` (3) most salient
    ground-truth people of each image — the largest by area, ties to the first listed — kept.
    The other GT people are dropped before matching (a detection of one counts as a false
    positive); detections are not filtered."""
    return pose_ap_ar(ground_truth, detections, keep_largest=keep, **options)


def _or_none(value: float) -> float | None:
    return None if value < 0 else value


def pose_metrics(ground_truth: Sequence[dict], detections: Sequence[dict]) -> dict[str, float | None]:
    """Pose accuracy of generated images: our pose dicts (the conditioning poses, and the pose
    annotator's output on the generations, one per image) → ``pose_ap``, ``pose_ap50``,
    ``pose_ap75``, ``pose_ar``, ``pose_ap_clean``, ``pose_ar_clean`` (``None`` where COCO's value
    is undefined, i.e. no labelled conditioning person at all)."""
    truth = [coco_people(pose) for pose in ground_truth]
    found = [coco_people(pose) for pose in detections]
    full, clean = pose_ap_ar(truth, found), clean_pose_ap_ar(truth, found)
    return {
        "pose_ap": _or_none(full["AP"]),
        "pose_ap50": _or_none(full["AP50"]),
        "pose_ap75": _or_none(full["AP75"]),
        "pose_ar": _or_none(full["AR"]),
        "pose_ap_clean": _or_none(clean["AP"]),
        "pose_ar_clean": _or_none(clean["AR"]),
    }


def pose_sample_score(truth: dict, found: dict) -> dict | None:
    """Per image: for each conditioning person, the OKS of the best-matching detected person
    (0 if none; ``None`` for a person with no labelled keypoint) and their mean; ``None`` when the
    image has no labelled conditioning person. OKS as :func:`oks_matrix` (bbox area as scale)."""
    truth_people, found_people = coco_people(truth), coco_people(found)
    labelled = [(person["keypoints"][:, 2] > 0).any() for person in truth_people]
    if not any(labelled):
        return None
    oks = oks_matrix(truth_people, found_people)
    best = oks.max(axis=0) if len(found_people) else np.zeros(len(truth_people))
    per_person = [float(value) if ok else None for value, ok in zip(best, labelled, strict=True)]
    values = [value for value in per_person if value is not None]
    return {"oks": per_person, "mean_oks": float(np.mean(values)), "detected": len(found_people)}
