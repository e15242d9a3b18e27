"""int8 post-training quantization of a denoiser on the x86 runtime: torchao's PT2E flow.

    torch.export (batch dimension dynamic)
      → prepare_pt2e(X86InductorQuantizer: u8 activations per tensor, s8 weights per channel)
      → calibrate on the denoiser's own trajectory inputs (:mod:`distill.quant.calibration`)
      → convert_pt2e (quantize / dequantize pairs around every int8 op)
      → torch.compile with inductor freezing, which fuses each pair and its op into one oneDNN
        int8 kernel (AMX / VNNI on this CPU).

Convolutions and linears run int8; attention's softmax, GroupNorm and the elementwise work stay
fp32 (the quantizer leaves them alone, as Q-Diffusion keeps softmax at higher precision), which is
why attention-heavy models gain less. ``torch.ao.quantization`` is deprecated and never imported.

The converted model is saved as an exported program (``torch.export.save``), with its dynamic
batch: :func:`load_program` gives it back, :class:`QuantizedDenoiser` puts it in a pipeline's
``unet`` slot (the float model stays beside it for the pipeline's config and latent normalisation,
never for the denoising itself).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

RUNTIMES = ("compiled", "eager")  # eager: the converted graph as is (quantize/dequantize in fp32), for tests


def _quantizer():
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    return X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())


def canonical_call(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    """A denoiser call as the keyword arguments an exported program takes: every argument by name,
    ``None``s and ``return_dict`` dropped, a scalar timestep expanded to one per sample (sampling
    passes one, training-style measures one per sample: one program serves both)."""
    import inspect

    bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    call = {name: value for name, value in bound.items() if value is not None and name != "return_dict"}
    sample, timestep = call.get("sample"), call.get("timestep")
    if sample is not None and timestep is not None:
        timestep = torch.as_tensor(timestep, device=sample.device)
        call["timestep"] = timestep.reshape(-1).expand(sample.shape[0]) if timestep.numel() == 1 else timestep
    return call


def export_denoiser(model: nn.Module, call: dict) -> torch.export.ExportedProgram:
    """``model`` exported at a :func:`canonical_call`'s inputs, every input's first (batch)
    dimension dynamic: guided and unguided sampling, any number of prompts, run the same program."""
    return torch.export.export(model.eval(), (), dict(call), dynamic_shapes=_dynamic_batch(call))


def _dynamic_batch(call: dict) -> dict:
    """``dynamic_shapes`` for ``torch.export``: the first dimension of every input tensor left to
    the exporter (``Dim.AUTO``: it finds the range the model allows)."""
    return {
        name: {0: torch.export.Dim.AUTO} if isinstance(value, torch.Tensor) and value.ndim else None
        for name, value in call.items()
    }


@torch.no_grad()
def quantize_int8(model: nn.Module, calibration, split_skip: bool = False) -> torch.fx.GraphModule:
    """The PT2E-converted int8 model of ``model`` (float, eval), calibrated on every call of
    ``calibration`` (a :class:`distill.quant.calibration.Calibration`). ``split_skip``: the up
    path's skip concatenations get a scale per half (:mod:`distill.quant.split_skip`, on a copy)."""
    if not len(calibration):
        raise ValueError("the calibration holds no denoiser calls: sample at least one trajectory")
    calls = [canonical_call(model, args, kwargs) for args, kwargs in calibration.calls]
    if split_skip:
        from distill.quant.split_skip import with_split_skip

        model = with_split_skip(model, calls[0])
    return quantize_exported(export_denoiser(model, calls[0]), calls)


@torch.no_grad()
def quantize_exported(exported: torch.export.ExportedProgram, calls: list[dict]) -> torch.fx.GraphModule:
    """PT2E int8 of any exported float model (X86 inductor quantizer), calibrated on ``calls``
    (keyword inputs): what :func:`quantize_int8` does for a denoiser, for other networks (SR)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    prepared = prepare_pt2e(exported.module(), _quantizer())
    for call in calls:
        prepared(**call)
    return convert_pt2e(prepared)


def save_program(module: torch.fx.GraphModule, call: dict, path: str | Path) -> Path:
    """The converted model as an exported program (``.pt2``), exported again at ``call`` (a
    :func:`canonical_call`) with its batch dimension dynamic."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(torch.export.export(module, (), dict(call), dynamic_shapes=_dynamic_batch(call)), path)
    return path


def load_program(path: str | Path) -> torch.fx.GraphModule:
    import torchao  # noqa: F401  (registers the quantize / dequantize ops the program calls)

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no quantized program at {path}: run `hyperhuman quantize ptq` first")
    return torch.export.load(path).module()


def compiled(module: nn.Module, runtime: str = "compiled"):
    """The int8 program as it runs: compiled by inductor with freezing (the int8 kernels), or
    ``eager`` (quantize / dequantize simulated in fp32)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"int8 runtime={runtime!r}; choose one of {RUNTIMES}")
    if runtime == "eager":
        return module
    return Frozen(module)


class Frozen:
    """``torch.compile`` of ``module`` with inductor freezing (weights folded as constants: int8
    weights prepacked for oneDNN, fp32 convolutions' weights too) and the C++ wrapper (the
    compiled graph's kernel calls made from C++, not Python: a PT2E program is many small
    kernels, and on the mobile student's small step the Python wrapper took half the int8
    step's time). Both are switched on while each call runs, when dynamo compiles: freezing given as
    ``torch.compile(options={"freezing": True})`` instead, inductor meets the prepack ops of a
    PT2E program before folding them and fails (``UnsupportedOperatorException:
    onednn.qconv_prepack``, torch 2.14 / torchao 0.18)."""

    def __init__(self, module: nn.Module):
        import torch._inductor.config as inductor_config

        self.module = module
        self.compiled = torch.compile(module)
        # one patch object, entered on every call: building it per call cost 28 µs, reusing it 6
        self.settings = inductor_config.patch(freezing=True, cpp_wrapper=True)

    def __call__(self, *args, **kwargs):
        with self.settings, torch.no_grad():
            return self.compiled(*args, **kwargs)


class QuantizedDenoiser(nn.Module):
    """What a pipeline's ``unet`` slot holds to denoise with an int8 program: calls, in whatever
    form the pipeline makes them, go to ``program`` as a :func:`canonical_call`; ``config``,
    ``dtype``, ``device`` and the rest of the model's interface (latent normalisation, branch
    names) come from the float model it was quantized from."""

    def __init__(self, program, float_model: nn.Module):
        super().__init__()
        self.program = program
        self.float_model = float_model.eval().requires_grad_(False)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("float_model"), name)

    @property
    def config(self):
        return self.float_model.config

    @property
    def dtype(self) -> torch.dtype:
        return self.float_model.dtype

    @property
    def device(self) -> torch.device:
        return self.float_model.device

    @torch.no_grad()
    def forward(self, *args, return_dict: bool = True, **kwargs):
        output = self.program(**canonical_call(self.float_model, args, kwargs))
        return output if return_dict else (output.sample,)


def with_denoiser(pipeline, denoiser: nn.Module):
    """A shallow copy of ``pipeline`` whose ``unet`` is ``denoiser`` (the original keeps its own)."""
    import copy

    pipeline = copy.copy(pipeline)
    object.__setattr__(pipeline, "unet", denoiser)  # not registered: this pipeline runs, it is not saved
    return pipeline
