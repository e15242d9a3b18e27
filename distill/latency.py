"""Per-block latency tables: every block of a denoiser measured at its real input shapes on a
named runtime, cached as JSON, and a whole step predicted from them.

A *block* is one of the modules a step is made of, in execution order (:func:`blocks`): for a
``UNet2DConditionModel`` the time embedding, ``conv_in``, each down block, the mid block, each up
block and the output head; for our ``LatentStructuralUNet`` the same with each branch's own outer
blocks (``branch.<name>.*``) and the shared trunk (``trunk.*``). Each block's *parts* (every
ResNet and attention inside it) are measured too: removing one is what architecture evolving and
pruning weigh against its cost.

Inputs are captured by running the model once with forward hooks, so every block is timed at the
shapes it really sees. A timing is the median of ``repeats`` calls after ``warmup`` calls, under
``torch.inference_mode``. The table file is keyed by machine (CPU, cores, threads, torch), and an
entry by runtime, block signature (its class, structure and parameter shapes) and input shapes:
the same block at the same shapes is measured once per machine and runtime, whatever model it
sits in. Runtimes: ``eager`` (fp32), ``compiled`` (``torch.compile``, inductor, fp32) and ``bf16``
(eager under bf16 autocast).

    table = LatencyTable.load()                      # ~/.cache/hyperhuman/latency/<machine>.json
    predicted = predict(model, example_inputs, "eager", table)   # measures what is missing
    measured = measure_step(model, example_inputs, "eager")
    table.save()
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

RUNTIMES = ("eager", "compiled", "bf16")
RECOMPILE_LIMIT = 256  # compiles of one forward (one per model timed) before dynamo would fall back to eager
TABLE_FORMAT = 1


def cache_dir() -> Path:
    """Where tables live: ``$HYPERHUMAN_CACHE/latency`` (default ``~/.cache/hyperhuman/latency``)."""
    return Path(os.environ.get("HYPERHUMAN_CACHE", Path.home() / ".cache" / "hyperhuman")) / "latency"


# -- which modules are blocks ------------------------------------------------------------------


def blocks(model: nn.Module) -> list[str]:
    """Names of the top-level blocks of a UNet or LSDM, in execution order; together they hold
    every parameter of the model exactly once (checked by the tests)."""
    if hasattr(model, "trunk") and hasattr(model, "branch"):  # LatentStructuralUNet
        trunk, replicated = model.trunk, model.config.replicated_blocks
        names = ["trunk.time_embedding"]
        for branch in model.config.branches:
            names += [f"branch.{branch}.conv_in"]
            names += [f"branch.{branch}.down_blocks.{i}" for i in range(len(model.branch[branch].down_blocks))]
        names += [f"trunk.down_blocks.{i}" for i in range(replicated, len(trunk.down_blocks))]
        names += ["trunk.mid_block"] if trunk.mid_block is not None else []
        names += [f"trunk.up_blocks.{i}" for i in range(len(trunk.up_blocks) - replicated)]
        for branch in model.config.branches:
            names += [f"branch.{branch}.up_blocks.{i}" for i in model.branch[branch].up_blocks]
            names += [f"branch.{branch}.{head}" for head in ("conv_norm_out", "conv_out")]
        return [name for name in names if _has(model, name)]
    names = ["time_embedding", "conv_in"]
    names += [f"down_blocks.{i}" for i in range(len(model.down_blocks))]
    names += ["mid_block"] if model.mid_block is not None else []
    names += [f"up_blocks.{i}" for i in range(len(model.up_blocks))]
    names += ["conv_norm_out", "conv_out"]
    return [name for name in names if _has(model, name)]


def parts(model: nn.Module, block: str) -> list[str]:
    """The ResNets and attentions inside a block (what architecture evolving removes one by one)."""
    module = model.get_submodule(block)
    found = []
    for kind in ("resnets", "attentions"):
        for index in range(len(getattr(module, kind, None) or [])):
            found.append(f"{block}.{kind}.{index}")
    return found


def _has(model: nn.Module, name: str) -> bool:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return False
    return module is not None and not isinstance(module, nn.Identity)


# -- capturing real inputs ---------------------------------------------------------------------


@dataclass
class Call:
    """One module call as it happened in a step: the module and its (detached) inputs."""

    name: str
    module: nn.Module
    args: tuple
    kwargs: dict

    @property
    def shapes(self) -> str:
        return _shapes((self.args, self.kwargs))


def capture(model: nn.Module, inputs: dict, names: list[str]) -> list[Call]:
    """Run ``model(**inputs)`` once and record the first call of every named module."""
    calls: dict[str, Call] = {}
    handles = []
    for name in names:
        module = model.get_submodule(name)

        def hook(module, args, kwargs, name=name):
            if name not in calls:
                calls[name] = Call(name, module, _detach(args), _detach(kwargs))

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.inference_mode():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in names if name not in calls]
    if missing:
        raise RuntimeError(f"modules {missing} were not called by the model's forward; they cannot be timed")
    return [calls[name] for name in names]


def _detach(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple | list):
        return type(value)(_detach(item) for item in value)
    if isinstance(value, dict):
        return {key: _detach(item) for key, item in value.items()}
    return value


def _shapes(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')}{list(value.shape)}"
    if isinstance(value, tuple | list):
        return "(" + ",".join(_shapes(item) for item in value) + ")"
    if isinstance(value, dict):
        return "{" + ",".join(f"{key}:{_shapes(item)}" for key, item in sorted(value.items())) + "}"
    return repr(value) if isinstance(value, int | float | bool | str | type(None)) else type(value).__name__


def signature(module: nn.Module) -> str:
    """What makes two blocks time alike: their class, structure and parameter shapes."""
    text = repr(module) + "|" + ";".join(f"{n}:{list(p.shape)}" for n, p in module.named_parameters())
    return f"{type(module).__name__}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


# -- timing ------------------------------------------------------------------------------------


def runner(module: nn.Module, runtime: str) -> Callable:
    """``module`` as called on ``runtime`` (compiled once per module object)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime {runtime!r} is not one of {RUNTIMES}")
    module = module.eval()
    if runtime == "compiled":
        # Every model timed is another compile of the same forward code (a benchmark times dozens of
        # pruned networks); past dynamo's limit of 8 it silently runs eager, and the timings with it.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        return torch.compile(module)
    if runtime == "bf16":

        def autocast(*args, **kwargs):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return module(*args, **kwargs)

        return autocast
    return module


def time_call(fn: Callable, args: tuple, kwargs: dict, warmup: int = 3, repeats: int = 10) -> float:
    """Median milliseconds of ``fn(*args, **kwargs)`` after ``warmup`` calls."""
    times = []
    with torch.inference_mode():
        for index in range(warmup + repeats):
            started = time.perf_counter()
            fn(*args, **kwargs)
            if index >= warmup:
                times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def alternating_ms(calls: dict[str, Callable], kwargs: dict[str, dict], rounds: int, repeats: int) -> dict[str, float]:
    """Median over ``rounds`` of each callable's :func:`time_call` median (``repeats`` calls, one
    warm-up), the callables timed in turn each round so drift on a shared machine hits all alike;
    ``kwargs[name]``: the keyword inputs ``calls[name]`` takes."""
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            times[name].append(time_call(call, (), kwargs[name], warmup=1, repeats=repeats))
    return {name: statistics.median(values) for name, values in times.items()}


def measure_step(model: nn.Module, inputs: dict, runtime: str, warmup: int = 3, repeats: int = 10) -> float:
    """Median milliseconds of one whole ``model(**inputs)`` on ``runtime``."""
    return time_call(runner(model, runtime), (), inputs, warmup, repeats)


# -- the table ---------------------------------------------------------------------------------


def machine() -> dict:
    """What a timing depends on besides the block: CPU, cores, threads, torch."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__}


def machine_id(info: dict | None = None) -> str:
    return hashlib.sha256(json.dumps(info or machine(), sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class LatencyTable:
    """Timings (ms) by ``runtime|signature|shapes`` for one machine; JSON on disk."""

    machine: dict = field(default_factory=machine)
    entries: dict[str, float] = field(default_factory=dict)
    path: Path | None = None
    measured: int = 0  # entries this process measured (the rest came from the cache)

    @classmethod
    def load(cls, path: str | Path | None = None) -> LatencyTable:
        info = machine()
        path = Path(path) if path else cache_dir() / f"{machine_id(info)}.json"
        if path.is_file():
            data = json.loads(path.read_text())
            if data.get("format") == TABLE_FORMAT and data.get("machine") == info:
                return cls(info, dict(data["entries"]), path)
        return cls(info, {}, path)

    def save(self, path: str | Path | None = None) -> Path:
        path = Path(path or self.path or cache_dir() / f"{machine_id(self.machine)}.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"format": TABLE_FORMAT, "machine": self.machine, "entries": self.entries},
                                  indent=1, sort_keys=True))  # fmt: skip
        os.replace(tmp, path)
        self.path = path
        return path

    def lookup(self, call: Call, runtime: str, warmup: int = 3, repeats: int = 10) -> float:
        """The call's timing on ``runtime``, measured now if the table lacks it."""
        key = f"{runtime}|{signature(call.module)}|{call.shapes}"
        if key not in self.entries:
            self.entries[key] = time_call(runner(call.module, runtime), call.args, call.kwargs, warmup, repeats)
            self.measured += 1
        return self.entries[key]

    def lookup_rest(self, model: nn.Module, inputs: dict, names: list[str], runtime: str, warmup=3, repeats=10):
        """The timing of what a step runs outside its blocks (see :func:`rest_of_step`)."""
        key = f"{runtime}|rest-{signature(model)}|{_shapes(inputs)}"
        if key not in self.entries:
            self.entries[key] = rest_of_step(model, inputs, names, runtime, warmup, repeats)
            self.measured += 1
        return self.entries[key]


def rest_of_step(
    model: nn.Module, inputs: dict, names: list[str], runtime: str, warmup: int = 3, repeats: int = 10
) -> float:
    """Milliseconds of a step with every named block replaced by a replay of its recorded output:
    the time step projection, concatenations, the branch merge, activations between blocks. Small
    (about 1% of a step here), but it does not shrink with the blocks a student removes. For eager
    and bf16; a compiled step fuses it into its neighbours."""
    outputs, handles = {}, []
    for name in names:
        hook = lambda module, args, output, name=name: outputs.setdefault(name, output)  # noqa: E731
        handles.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        with torch.inference_mode():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    modules = {name: model.get_submodule(name) for name in names}
    own = {name: vars(module).get("forward") for name, module in modules.items()}  # e.g. accelerate's hooks
    for name, module in modules.items():
        module.forward = lambda *args, output=outputs[name], **kwargs: output
    try:
        return time_call(runner(model, runtime), (), inputs, warmup, repeats)
    finally:
        for name, module in modules.items():
            if own[name] is None:
                del module.forward  # back to the class's forward
            else:
                module.forward = own[name]


@dataclass
class Prediction:
    runtime: str
    total_ms: float
    blocks: dict[str, float]  # block name → ms
    parts: dict[str, float] = field(default_factory=dict)  # part name → ms (with ``with_parts``)
    rest_ms: float = 0.0  # everything between the blocks, included in total_ms


def predict(
    model: nn.Module,
    inputs: dict,
    runtime: str,
    table: LatencyTable,
    *,
    with_parts: bool = False,
    warmup: int = 3,
    repeats: int = 10,
) -> Prediction:
    """One step's latency on ``runtime``: the sum of its blocks' timings from ``table`` (measuring
    those it lacks) and the rest of the step (:func:`rest_of_step`, eager: a compiled step fuses
    it into its neighbours); ``with_parts`` also times every ResNet and attention."""
    names = blocks(model)
    timings = {call.name: table.lookup(call, runtime, warmup, repeats) for call in capture(model, inputs, names)}
    part_timings = {}
    if with_parts:
        inner = [part for name in names for part in parts(model, name)]
        for call in capture(model, inputs, inner):
            part_timings[call.name] = table.lookup(call, runtime, warmup, repeats)
    rest = 0.0 if runtime == "compiled" else table.lookup_rest(model, inputs, names, runtime, warmup, repeats)
    return Prediction(runtime, sum(timings.values()) + rest, timings, part_timings, rest)
