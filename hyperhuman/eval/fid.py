"""FID and KID×1000: statistics of image features, float64, with no model inside; and the
standard FID Inception-v3 as a feature extractor from a local weights file.

- **FID** (:func:`fid_from_features`, :func:`fid_from_statistics`, :func:`frechet_distance`): the
  Fréchet distance between Gaussians fitted to the features of real and generated images,
  ``||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1 S2)^½)``, covariances with ``N - 1``. ``Tr (S1 S2)^½`` is
  the sum of the square roots of the eigenvalues of the symmetric PSD matrix ``S1^½ S2 S1^½``
  (same spectrum as ``S1 S2``), so no complex numbers appear; eigenvalues that rounding makes
  slightly negative count as 0 — what pytorch-fid's "drop the tiny imaginary part" and
  torchmetrics' ``eigvals(S1 S2).sqrt().real`` do.
- **Batch by batch**: :class:`FeatureStatistics` keeps a running mean and scatter matrix
  (Chan et al.'s pairwise update, float64), so FID over any number of images needs O(D²) memory,
  not the N × D features. With fewer samples than feature dimensions the covariance is singular
  and FID is biased upward and depends on N: :func:`sample_size_warning` says so.
- **KID** (:func:`kid_from_features`): the unbiased MMD² with the polynomial kernel
  ``(x·y / D + 1)³``, averaged over random subsets (mean, population std), exactly as
  torchmetrics' ``KernelInceptionDistance``; the paper reports it ×1000. Subsets are drawn with
  ``torch.randperm`` from a generator seeded with ``seed`` in torchmetrics' order, so the same
  seed gives the same subsets as torchmetrics after ``torch.manual_seed(seed)``. Its subsets are
  drawn from the whole set, so KID needs every feature (N × D; float32 is what the extractors
  return: 8 kB per image at 2048-d), never the images.
- Features come from any :class:`FeatureExtractor` (a module mapping uint8 ``(N, 3, H, W)`` images
  to ``(N, D)``): :class:`InceptionFeatures` (standard FID/KID),
  :class:`hyperhuman.eval.clip.ClipFeatures` (FID_CLIP), or your own.

Inception weights (never downloaded here; a missing path is a ``ValueError`` naming it and what to
get): the FID Inception-v3 of TF "2015-12-05" converted to PyTorch,
``weights-inception-2015-12-05-6726825d.pth`` from the torch-fidelity release (:data:`INCEPTION_URL`;
pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` has the same hash prefix and fits too: the
module has exactly the state-dict keys and shapes of torchvision's ``Inception3(num_classes=1008,
aux_logits=False)``, which pytorch-fid loads that file into), run through torchmetrics'
``NoTrainInceptionV3`` (needs ``torch-fidelity``): 2048-d pool features, images resized to 299 with
antialiased bilinear by default = torchmetrics' ``FrechetInceptionDistance`` default
(``antialias=False`` gives torch-fidelity's / TF1's resize, the original FID protocol).

How it was checked (``tests/hyperhuman/test_metrics.py``; torchmetrics 1.9.0): FID against
torchmetrics' ``FrechetInceptionDistance`` fed the same features through a fixed random feature
module (relative difference 3e-10 to 4e-9 for N = 8-200, D = 12-64), the batch-by-batch statistics
against the all-at-once ones, and against closed forms for Gaussians; KID against
``KernelInceptionDistance`` with the same subsets (mean identical, std within 2e-16);
``InceptionFeatures`` against torchmetrics' own Inception on a randomly initialised copy of the
real architecture.
"""

from __future__ import annotations

import os
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from hyperhuman.config import ConfigError

INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_FEATURES = 2048


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


def _finite_2d(features, name: str) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().to("cpu", torch.float64).numpy()
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"{name} features must be 2-D (N, D), got shape {features.shape}")
    if not np.isfinite(features).all():
        raise ValueError(f"{name} features contain NaN or inf; check the images and the feature extractor")
    return features


def _features(features, name: str) -> np.ndarray:
    features = _finite_2d(features, name)
    if len(features) < 2:
        raise ValueError(
            f"{name} features: need at least 2 samples for a covariance, got {len(features)}; evaluate more images"
        )
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


class FeatureStatistics:
    """Mean and covariance of features added batch by batch: float64, O(D²) memory whatever N.

    Each batch's mean and scatter matrix ``Σ (x - mean)(x - mean)ᵀ`` are merged into the running
    ones with Chan et al.'s pairwise update, which stays accurate where the one-pass
    ``Σ x xᵀ - N mean meanᵀ`` loses digits to cancellation. ``covariance`` uses ``N - 1``, as
    :func:`feature_statistics`.
    """

    def __init__(self):
        self.count = 0
        self.mean: np.ndarray | None = None
        self._scatter: np.ndarray | None = None

    def update(self, features) -> None:
        batch = _finite_2d(features, "batch")
        if not len(batch):
            return
        if self.mean is not None and batch.shape[1] != self.mean.shape[0]:
            raise ValueError(
                f"a batch of {batch.shape[1]}-d features after {self.mean.shape[0]}-d ones; use one extractor"
            )
        batch_mean = batch.mean(axis=0)
        centred = batch - batch_mean
        batch_scatter = centred.T @ centred
        if self.mean is None:
            self.count, self.mean, self._scatter = len(batch), batch_mean, batch_scatter
            return
        total = self.count + len(batch)
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * (len(batch) / total)
        self._scatter = self._scatter + batch_scatter + np.outer(delta, delta) * (self.count * len(batch) / total)
        self.count = total

    @property
    def dim(self) -> int | None:
        return None if self.mean is None else int(self.mean.shape[0])

    def covariance(self, name: str = "the") -> np.ndarray:
        if self.count < 2:
            raise ValueError(
                f"{name} features: need at least 2 samples for a covariance, got {self.count}; evaluate more images"
            )
        return self._scatter / (self.count - 1)


def fid_from_statistics(real: FeatureStatistics, fake: FeatureStatistics) -> float:
    """FID between two sets of accumulated :class:`FeatureStatistics` (each N >= 2)."""
    real_cov, fake_cov = real.covariance("real"), fake.covariance("generated")
    if real.dim != fake.dim:
        raise ValueError(f"real features have {real.dim} dims, generated {fake.dim}; use one extractor")
    return frechet_distance(real.mean, real_cov, fake.mean, fake_cov)


def sample_size_warning(metric: str, samples: int, dim: int) -> str | None:
    """Why a Fréchet distance from ``samples`` features of ``dim`` dimensions is unreliable, or None.

    With N ≤ D the covariance of N samples has rank at most N - 1 < D: FID is then dominated by
    its bias, larger than on more samples of the same images, and comparable only at equal N."""
    if samples > dim:
        return None
    return (
        f"{metric} from {samples} samples of {dim}-d features: their covariance has rank at most "
        f"{max(samples - 1, 0)} of {dim}, so {metric} is strongly biased upward and comparable only between runs "
        f"of the same size; use more samples than feature dimensions (--num > {dim}; thousands for published numbers)"
    )


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


def default_device(device) -> torch.device:
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
            raise ConfigError(
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
            raise ConfigError(f"{path!r} is not a plain PyTorch state dict ({exc}); expected {INCEPTION_URL}") from exc
        try:
            self.model = NoTrainInceptionV3(
                name="inception-v3-compat",
                features_list=[str(INCEPTION_FEATURES)],
                feature_extractor_weights_path=path,
                antialias=antialias,
            )
        except RuntimeError as exc:
            message = f"{path!r} does not hold the FID Inception weights ({exc}); expected {INCEPTION_URL}"
            raise ConfigError(message) from exc
        self.num_features = INCEPTION_FEATURES
        self.batch_size = batch_size
        self.device = default_device(device)
        self.model.to(self.device)

    @torch.no_grad()
    def forward(self, images) -> torch.Tensor:
        images = as_image_batch(images)
        out = [
            self.model(images[start : start + self.batch_size].to(self.device)).float().cpu()
            for start in range(0, len(images), self.batch_size)
        ]
        return torch.cat(out) if out else torch.zeros(0, INCEPTION_FEATURES)
