"""Data sieving (SpFDE, Yuan et al. 2022): train on a part of the data, swapping the easiest samples of
that part for held-back ones every so often.

:class:`Sieve` wraps a recipe's batch stream (anything with ``__next__`` and a JSON-able ``state()``,
e.g. ``hyperhuman.lsdm.data.Batches``) and yields batches of the same size drawn only from the samples
*in use*: the stream's batches are split into samples, those held back are passed over, and the kept
ones are regrouped. Samples are told apart by ``batch[id_key]`` (the shards' ``key``).

- In use or held back: a sample first seen joins the pool when ``sha256(seed:id)`` falls below
  ``fraction`` (so the pool is the same whatever order the stream has, and needs no listing of the
  data up front); every other one waits in the held-back queue, in the order it was first seen.
- Scores: the recipe reports each trained sample's loss (:meth:`Sieve.record`); a sample's score is
  the exponential average ``decay · old + (1 − decay) · loss`` of its recent losses.
- Swaps, every ``swap_every`` optimizer steps: the ``swap_fraction`` of the pool with the lowest
  scores (the easy ones: learnt already) leaves for the back of the queue, as many from its front
  (held back the longest) come in, unscored, so they cannot leave before they are trained on.

Exact resume: :meth:`state` holds the pool, the queue, the scores and where the samples waiting to be
batched came from (the inner stream's position before the first of their batches, how many batches
follow and which samples of them wait): a resumed sieve re-reads those batches from the inner stream
and continues with exactly the batches the uninterrupted run trained on. In a multi-process run each
process sieves its own part of the data (its shards) and keeps its own state.
"""

from __future__ import annotations

import hashlib

import torch

from hyperhuman.config import ConfigError

DEFAULTS = {"fraction": 0.7, "swap_every": 100, "swap_fraction": 0.2, "score_decay": 0.5, "id_key": "key"}
MAX_BATCHES_WITHOUT_A_SAMPLE = 10_000


def check_sieving(settings: dict, where: str = "train.efficiency.sieving") -> dict:
    merged = {**DEFAULTS, **{k: v for k, v in settings.items() if v is not None and k != "use"}}
    if not isinstance(merged["fraction"], int | float) or not 0 < merged["fraction"] < 1:
        raise ConfigError(f"{where}.fraction={merged['fraction']!r}: the share of the data in use, in (0, 1)")
    if not isinstance(merged["swap_every"], int) or merged["swap_every"] < 1:
        raise ConfigError(f"{where}.swap_every={merged['swap_every']!r}: optimizer steps between swaps, ≥ 1")
    if not isinstance(merged["swap_fraction"], int | float) or not 0 <= merged["swap_fraction"] <= 1:
        raise ConfigError(
            f"{where}.swap_fraction={merged['swap_fraction']!r}: the share of the pool swapped, in [0, 1]"
        )
    if not isinstance(merged["score_decay"], int | float) or not 0 <= merged["score_decay"] < 1:
        raise ConfigError(f"{where}.score_decay={merged['score_decay']!r}: the weight of the old score, in [0, 1)")
    if not isinstance(merged["id_key"], str):
        raise ConfigError(f"{where}.id_key={merged['id_key']!r}: the batch field naming each sample, e.g. key")
    return merged


def in_use_at_start(seed: int, sample_id: str, fraction: float) -> bool:
    digest = hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_batch(batch: dict, size: int) -> list[dict]:
    """A collated batch back into its samples (tensors by row, lists by item, nested dicts alike)."""

    def item(value, index):
        if isinstance(value, dict):
            return {key: item(v, index) for key, v in value.items()}
        if isinstance(value, torch.Tensor | list | tuple) and len(value) == size:
            return value[index]
        raise ValueError(f"sieving cannot split a batch value of type {type(value).__name__} into {size} samples")

    return [{key: item(value, index) for key, value in batch.items()} for index in range(size)]


def collate(samples: list[dict]) -> dict:
    """Samples split by :func:`split_batch` back into a batch (what ``default_collate`` made)."""
    first = samples[0]
    batch = {}
    for key, value in first.items():
        values = [sample[key] for sample in samples]
        if isinstance(value, dict):
            batch[key] = collate(values)
        elif isinstance(value, torch.Tensor):
            batch[key] = torch.stack(values)
        else:
            batch[key] = list(values)
    return batch


class Sieve:
    """A batch stream over the samples in use; see the module docstring.

    ``make_stream(position)`` builds the recipe's stream at an inner position (``{}``-like state of
    a fresh stream included); ``position`` is where this run starts; ``saved`` the sieve's own state
    from a checkpoint (``None``: a fresh sieve)."""

    def __init__(self, make_stream, position: dict, batch_size: int, settings: dict, seed: int, saved=None):
        self.settings, self.batch_size, self.seed = check_sieving(settings), batch_size, seed
        self.make_stream = make_stream
        self.in_use: set[str] = set()
        self.held_back: list[str] = []
        self._held: set[str] = set()  # the queue's members, for lookups
        self.scores: dict[str, float] = {}
        self.counts = {"samples_trained": 0, "samples_not_seen": 0, "swaps": 0, "swapped": 0}
        self._serial = 0  # raw batches read so far (of this sieve object)
        self._window: dict[int, tuple[dict, list[dict]]] = {}  # serial → (position before, samples)
        self._waiting: list[tuple[int, int]] = []  # (serial, index) of kept samples not yet batched
        if saved is None:
            self.stream = make_stream(position)
        else:
            self._restore(saved)

    # --- the stream ----------------------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self) -> dict:
        without = 0
        while len(self._waiting) < self.batch_size:
            if self._read_batch():
                without = 0
            elif (without := without + 1) > MAX_BATCHES_WITHOUT_A_SAMPLE:
                raise ConfigError(
                    f"sieving passed over {without} batches without a sample in use; raise "
                    f"train.efficiency.sieving.fraction={self.settings['fraction']} or add data"
                )
        taken, self._waiting = self._waiting[: self.batch_size], self._waiting[self.batch_size :]
        batch = collate([self._window[serial][1][index] for serial, index in taken])
        still_needed = {serial for serial, _ in self._waiting}
        self._window = {s: entry for s, entry in self._window.items() if s in still_needed}
        self.counts["samples_trained"] += len(taken)
        return batch

    def _read_batch(self) -> bool:
        """Read one batch of the inner stream; keep its samples in use. True if any was kept."""
        before = self.stream.state()
        batch = next(self.stream)
        ids = batch.get(self.settings["id_key"])
        if ids is None:
            raise ConfigError(
                f"sieving needs each sample's id in batch[{self.settings['id_key']!r}]; this stream's batches "
                f"hold {sorted(batch)}: set train.efficiency.sieving.id_key"
            )
        samples = split_batch(batch, len(ids))
        kept = [index for index, sample_id in enumerate(ids) if self._in_use(str(sample_id))]
        self.counts["samples_not_seen"] += len(ids) - len(kept)
        self._window[self._serial] = (before, samples)
        self._waiting += [(self._serial, index) for index in kept]
        self._serial += 1
        return bool(kept)

    def _in_use(self, sample_id: str) -> bool:
        if sample_id in self.in_use:
            return True
        if sample_id in self._held:
            return False
        if in_use_at_start(self.seed, sample_id, self.settings["fraction"]):
            self.in_use.add(sample_id)
            return True
        self.held_back.append(sample_id)
        self._held.add(sample_id)
        return False

    # --- scores and swaps ----------------------------------------------------------------------------
    def record(self, ids, losses) -> None:
        """Each trained sample's loss (a tensor or list, one per id) into its score."""
        decay = self.settings["score_decay"]
        values = losses.detach().float().cpu().tolist() if isinstance(losses, torch.Tensor) else list(losses)
        for sample_id, loss in zip(ids, values, strict=True):
            old = self.scores.get(str(sample_id))
            self.scores[str(sample_id)] = loss if old is None else decay * old + (1 - decay) * loss

    def swap_due(self, step: int) -> bool:
        return step % self.settings["swap_every"] == 0

    def swap(self) -> list[str]:
        """The easiest scored samples in use out, the longest held back in; returns those swapped out."""
        scored = sorted((self.scores[i], i) for i in self.in_use if i in self.scores)  # easiest first
        count = min(round(self.settings["swap_fraction"] * len(self.in_use)), len(scored), len(self.held_back))
        leaving = [sample_id for _, sample_id in scored[:count]]
        coming, self.held_back = self.held_back[:count], self.held_back[count:] + leaving
        self.in_use.difference_update(leaving)
        self.in_use.update(coming)
        self._held.difference_update(coming)
        self._held.update(leaving)
        for sample_id in coming:  # unscored: kept until trained on
            self.scores.pop(sample_id, None)
        self.counts["swaps"] += 1
        self.counts["swapped"] += count
        return leaving

    # --- state ---------------------------------------------------------------------------------------
    def state(self) -> dict:
        """The inner stream's current position (so a run without sieving can resume from it) plus the
        sieve's own state under ``sieve``."""
        first = min(self._window, default=self._serial)
        replay_from = self._window[first][0] if self._window else self.stream.state()
        return {
            **self.stream.state(),
            "sieve": {
                "replay_from": replay_from,
                "replay_batches": self._serial - first,
                "waiting": [[serial - first, index] for serial, index in self._waiting],
                "in_use": sorted(self.in_use),
                "held_back": list(self.held_back),
                "scores": dict(self.scores),
                "counts": dict(self.counts),
            },
        }

    def _restore(self, saved: dict) -> None:
        self.in_use, self.held_back = set(saved["in_use"]), list(saved["held_back"])
        self._held = set(self.held_back)
        self.scores, self.counts = dict(saved["scores"]), dict(saved["counts"])
        self.stream = self.make_stream(saved["replay_from"])
        for _ in range(saved["replay_batches"]):  # the batches the waiting samples came from
            before = self.stream.state()
            batch = next(self.stream)
            size = len(batch[self.settings["id_key"]])
            self._window[self._serial] = (before, split_batch(batch, size))
            self._serial += 1
        self._waiting = [(serial, index) for serial, index in saved["waiting"]]
        needed = {serial for serial, _ in self._waiting}
        self._window = {s: entry for s, entry in self._window.items() if s in needed}

    def report(self) -> dict:
        return {
            **self.counts,
            "in_use": len(self.in_use),
            "held_back": len(self.held_back),
            "fraction": self.settings["fraction"],
        }
