"""Deploying an E2GAN editor: one concept baked in, run fp32 or int8, in torch or ONNX Runtime.

A deployed editor takes only the image. :class:`ConceptEditor` holds a generator (any: the base
model, a searched one, or one with a LoRA concept merged in, :func:`distill.e2gan.lora.merge_concept`)
and the concept prompt's text states as buffers, so an export bakes them in as constants (ONNX
initializers): the text encoder never ships. :func:`load_editor` builds it from a run folder and a
concept name (the prompt from the run's ``concepts.json``).

Runtimes (:data:`RUNTIMES`), each through the quantization stage's own path (:mod:`distill.quant`):

- ``torch``: eager fp32; ``compiled``: ``torch.compile`` with inductor freezing
  (:func:`distill.quant.ptq.compiled`), the baseline int8 is compared against;
- ``int8``: PT2E int8 (``X86InductorQuantizer``: u8 activations per tensor, s8 weights per channel;
  :func:`distill.quant.ptq.quantize_exported`) calibrated on the concept's input photos, compiled
  with freezing (``int8_mode="eager"``: the converted graph as is, quantize / dequantize simulated in
  fp32; for tests, no compile);
- ``onnx`` / ``onnx-int8``: :func:`distill.quant.onnx_runtime.export_onnx` (fp32, the dynamo
  exporter) and its static QDQ int8 (:func:`distill.quant.onnx_runtime.quantize_qdq`, the weighted
  ops only, calibrated on the same photos), run by ONNX Runtime at the exported batch of one frame.

Every runtime is built at one frame size (``1 × 3 × S × S``): a deployed editor runs a stream of
frames of one size.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from hyperhuman.config import ConfigError

RUNTIMES = ("torch", "compiled", "int8", "onnx", "onnx-int8")
ONNX_FILES = {"onnx": "editor.onnx", "onnx-int8": "editor_int8.onnx"}


class ConceptEditor(nn.Module):
    """``generator`` with one concept's text states (``(1, L, D)``) and mask (``(1, L)``) as
    buffers: ``forward(image)`` → the edited image, both ``(B, 3, H, W)`` in [-1, 1]."""

    def __init__(self, generator: nn.Module, states: torch.Tensor, mask: torch.Tensor):
        super().__init__()
        self.generator = generator.eval()
        self.register_buffer("encoder_hidden_states", states.detach().clone())
        self.register_buffer("encoder_attention_mask", mask.detach().clone())

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        batch = image.shape[0]
        states = self.encoder_hidden_states.expand(batch, -1, -1)
        return self.generator(image, states, self.encoder_attention_mask.expand(batch, -1))


def concept_prompts(folder: Path) -> dict[str, str]:
    path = folder / "concepts.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def load_editor(model: str, concept: str, adapter: str | None = None) -> tuple[ConceptEditor, dict]:
    """The editor of ``concept`` from ``model`` (a ``distill gan`` / ``distill gan-search`` run or a
    generator folder), and what it is made of (``{concept, prompt, generator, adapter}``).

    ``adapter`` (**the LoRA stage's concepts**): a folder holding a generator with the concept merged
    in (``merge_concept(...).save_pretrained(folder)``, its ``concepts.json`` or the base's naming the
    prompt), or a concept adapter file (``CONCEPT.safetensors`` of :mod:`distill.e2gan.lora`), merged
    into ``model``'s base generator here. Without it, the concept is one the base model was trained on."""
    from distill.e2gan.generator import load_generator
    from distill.e2gan.train import PromptStates
    from hyperhuman.text import load_text_encoder

    base = _generator_folder(model, "--model")
    prompts = concept_prompts(base)
    if adapter is None:
        generator = load_generator(str(base))
    elif Path(adapter).is_file():  # a LoRA adapter file: merged into the base here
        from distill.e2gan.lora import load_concept, merge_concept, read_adapter

        description = read_adapter(adapter)[1]
        if description["concept"] != concept:
            raise ConfigError(
                f"--adapter {adapter!r} holds concept {description['concept']!r}, not --concept {concept!r}"
            )
        prompts[concept] = description.get("prompt", prompts.get(concept, ""))
        generator = merge_concept(load_concept(str(base), adapter), concept)
    else:
        folder = _generator_folder(adapter, "--adapter")
        prompts.update(concept_prompts(folder))
        generator = load_generator(str(folder))
    if concept not in prompts:
        raise ConfigError(f"--concept {concept!r}: {base} knows the concepts {sorted(prompts)}; train another with the "
                          "LoRA stage and pass its adapter with --adapter")  # fmt: skip
    tokenizer, encoder = load_text_encoder(generator.config.text_encoder)
    states, mask = PromptStates(tokenizer, encoder, "cpu")([prompts[concept]])
    editor = ConceptEditor(generator, states, mask).eval()
    return editor, {"concept": concept, "prompt": prompts[concept], "generator": str(base), "adapter": adapter}


def _generator_folder(path: str, option: str) -> Path:
    folder = Path(path)
    for candidate in (folder, folder / "generator"):
        if (candidate / "config.json").is_file():
            return candidate
    raise ConfigError(f"{option} {path!r} holds no E2GAN generator (no config.json, nor generator/config.json); "
                      "train one with `hyperhuman distill gan`")  # fmt: skip


# --- runtimes --------------------------------------------------------------------------------------
@dataclass
class Deployed:
    """An editor on a runtime: ``run(image)`` → edited, for ``(1, 3, S, S)`` frames; ``files`` it wrote,
    ``setup_s`` what building it took (export, quantization; a compile happens at the first call)."""

    runtime: str
    run: object
    files: dict[str, str] = field(default_factory=dict)
    setup_s: float = 0.0


@torch.no_grad()
def deploy(editor: ConceptEditor, runtime: str, example: torch.Tensor, calibration: list[torch.Tensor],
           folder: str | Path | None = None, int8_mode: str = "compiled") -> Deployed:  # fmt: skip
    """``editor`` on ``runtime`` for frames shaped as ``example``; the int8 runtimes are calibrated
    on ``calibration`` (frames of the concept's input photos); ONNX files go to ``folder``."""
    from distill.quant.ptq import compiled

    if runtime not in RUNTIMES:
        raise ConfigError(f"--runtime {runtime!r}: one of {RUNTIMES}")
    if runtime.endswith("int8") and not calibration:
        raise ConfigError(f"--runtime {runtime} calibrates on the input's frames: give at least one")
    started = time.perf_counter()
    editor = editor.eval()
    files = {}
    if runtime == "torch":
        run = editor
    elif runtime == "compiled":
        run = compiled(editor)
    elif runtime == "int8":
        run = compiled(quantize_pt2e(editor, example, calibration), int8_mode)
    else:
        if folder is None:
            raise ValueError(f"runtime {runtime!r} writes ONNX files: give a folder")
        paths = export_onnx_editor(editor, example, Path(folder), calibration if runtime == "onnx-int8" else None)
        files = {name: str(path) for name, path in paths.items()}
        run = _OnnxEditor(paths[runtime])
    if not runtime.startswith("onnx"):
        run = _ImageOnly(run)
    return Deployed(runtime, run, files, round(time.perf_counter() - started, 3))


def quantize_pt2e(editor: ConceptEditor, example: torch.Tensor, calibration: list[torch.Tensor]):
    """The editor's PT2E int8 program (X86 inductor quantizer) calibrated on ``calibration`` frames."""
    from distill.quant.ptq import quantize_exported

    exported = torch.export.export(editor.eval(), (), {"image": example})
    return quantize_exported(exported, [{"image": frame} for frame in calibration])


def export_onnx_editor(editor: ConceptEditor, example: torch.Tensor, folder: Path,
                       calibration: list[torch.Tensor] | None = None) -> dict[str, Path]:  # fmt: skip
    """``folder/editor.onnx`` (input ``image``, output ``prediction``; the text states are
    initializers) and, given calibration frames, its static QDQ int8 ``folder/editor_int8.onnx``."""
    from distill.quant.onnx_runtime import export_onnx, quantize_qdq

    folder.mkdir(parents=True, exist_ok=True)
    paths = {"onnx": export_onnx(editor, {"image": example}, folder / ONNX_FILES["onnx"])}
    if calibration:
        calls = [{"image": frame} for frame in calibration]
        paths["onnx-int8"] = quantize_qdq(paths["onnx"], calls, folder / ONNX_FILES["onnx-int8"])
    return paths


class _ImageOnly:
    """A module or program called with the image by keyword (as an exported program takes it)."""

    def __init__(self, module):
        self.module = module

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.module(image=image)


class _OnnxEditor:
    def __init__(self, path: Path):
        from distill.quant.onnx_runtime import OnnxDenoiser

        self.session = OnnxDenoiser(path)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.session(image=image).sample
