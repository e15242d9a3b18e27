"""The portable runtime: a denoiser (and a VAE decoder) exported to ONNX, fp32 or int8 QDQ, run by
ONNX Runtime.

- :func:`export_onnx`: ``torch.onnx.export(..., dynamo=True)`` (the path that exports SDPA) at a
  :func:`distill.quant.ptq.canonical_call`'s inputs, inputs named by argument.
  Models over 2 GB go to external data (ONNX's protobuf limit).
- :func:`quantize_qdq`: ONNX Runtime static quantization in QDQ form (``QuantizeLinear`` /
  ``DequantizeLinear`` around each op; ORT's CPU kernels fuse them into int8 ones): u8 activations,
  s8 weights per channel (7-bit, ``reduce_range``, on a CPU without VNNI: :func:`has_vnni`),
  calibrated on the same trajectory inputs as the PT2E path. Only the weighted ops (Conv, Gemm, MatMul by a weight) are
  quantized: attention's activation × activation products and its softmax stay fp32 (Q-Diffusion),
  and ORT cannot yet share a quantization parameter into a weight (its error on our graphs when
  every op type is quantized). Dynamic quantization is not offered: it turns convolutions
  into ``ConvInteger`` (u8 × u8 only) and runs slower than fp32.
- :func:`export_vae_decoder`: the VAE's decoder the same way; its calibration data are the final
  latents of the same trajectories (``Calibration.decoder_inputs``).
- :class:`OnnxDenoiser`: an ORT session called like the denoiser, for
  :class:`distill.quant.ptq.QuantizedDenoiser` (so ``HyperHumanPipeline`` samples with it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

EXTERNAL_DATA_BYTES = 2 * 1024**3  # protobuf's limit on one ONNX file
OUTPUT_NAME = "prediction"  # not "sample": that is an input's name


@dataclass
class DenoiserOutput:
    sample: torch.Tensor


class _SampleOnly(nn.Module):
    """The model returning its prediction tensor (ONNX outputs are tensors, not dataclasses): a
    denoiser's or decoder's ``.sample``, or the tensor a plain network (SR) returns."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, **inputs):
        output = self.model(**inputs)
        return output if isinstance(output, torch.Tensor) else output.sample


def export_onnx(model: nn.Module, call: dict, path: str | Path) -> Path:
    """``model`` (a denoiser, or any network returning ``.sample`` or a tensor) exported to ``path``
    at ``call``'s inputs; its parameters as external data beside it when they pass 2 GB. The batch
    is the call's: with a dynamic batch, torch 2.14's ONNX decompositions fail on our UNets (a
    NameError inside ``run_decompositions``), so :class:`OnnxDenoiser` runs other batch sizes in
    chunks of this one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    torch.onnx.export(
        _SampleOnly(model).eval(), (), str(path), kwargs=dict(call), input_names=list(call),
        output_names=[OUTPUT_NAME], dynamo=True, external_data=size > EXTERNAL_DATA_BYTES,
    )  # fmt: skip
    return path


class VaeDecoder(nn.Module):
    """A VAE's decoder as a model of one input: latents as ``vae.decode`` takes them → the image."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor):
        return self.vae.decode(latents)  # DecoderOutput: .sample, as the export takes it


def export_vae_decoder(vae: nn.Module, latents: torch.Tensor, path: str | Path) -> Path:
    """The decoder of ``vae`` exported at the batch and size of ``latents`` (input ``latents``);
    :class:`OnnxDenoiser` runs it too (``OnnxDenoiser(path)(latents=z).sample``)."""
    return export_onnx(VaeDecoder(vae), {"latents": latents}, path)


def rebatched(calls: list[dict], rows: int) -> list[dict]:
    """``calls`` cut into calls of ``rows`` rows each: calibration data for a model exported at a
    smaller batch than the calibration's (each call's batch must be a multiple of ``rows``)."""
    pieces = []
    for call in calls:
        size = int(next(iter(call.values())).shape[0])
        if size % rows:
            raise ValueError(f"a calibration call of {size} rows does not cut into calls of {rows}")
        for start in range(0, size, rows):
            pieces.append({name: value[start : start + rows] for name, value in call.items()})
    return pieces


class _Reader:
    """ONNX Runtime's calibration data reader over recorded denoiser calls."""

    def __init__(self, calls: list[dict], names: list[str]):
        self.feeds = iter([_feed(call, names) for call in calls])

    def get_next(self):
        return next(self.feeds, None)

    def rewind(self):  # pragma: no cover - ORT calls it for some calibrators
        pass


def quantize_qdq(fp32_path: str | Path, calls: list[dict], path: str | Path, per_channel: bool = True) -> Path:
    """Static int8 QDQ quantization of the ONNX model at ``fp32_path``, calibrated on ``calls``
    (:func:`distill.quant.ptq.canonical_call`\\ s of the calibration), written to ``path``."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not calls:
        raise ValueError("QDQ quantization needs calibration calls: sample at least one trajectory")
    names = [i.name for i in ort.InferenceSession(str(fp32_path), providers=["CPUExecutionProvider"]).get_inputs()]
    path = Path(path)
    quantize_static(
        str(fp32_path), str(path), _Reader(calls, names), quant_format=QuantFormat.QDQ, per_channel=per_channel,
        reduce_range=not has_vnni(), activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax, nodes_to_quantize=weighted_nodes(fp32_path),
    )  # fmt: skip
    return path


def has_vnni() -> bool:
    """Whether this x86 CPU multiplies u8 by s8 in 32-bit sums (VNNI or AMX). Without it ORT's AVX2
    kernels add pairs of products in 16 bits, which saturate at full 8-bit range: there the weights
    are quantized to 7 bits (``reduce_range``), as ORT advises for non-VNNI machines."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")


def weighted_nodes(path: str | Path) -> list[str]:
    """The names of the ONNX model's Conv / Gemm / MatMul nodes whose second input is a weight."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {initializer.name for initializer in graph.initializer}
    return [node.name for node in graph.node if node.op_type in WEIGHTED_OPS and node.input[1] in weights]


class OnnxDenoiser:
    """An ONNX Runtime session of an exported denoiser, called with a canonical call's keyword
    arguments; returns ``.sample`` as a torch tensor. Batches other than the exported one run in
    chunks of it (the last one padded by repeating its final row, the padding dropped)."""

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        inputs = self.session.get_inputs()
        self.names = [i.name for i in inputs]
        self.batch = int(inputs[0].shape[0])

    def __call__(self, **call) -> DenoiserOutput:
        size = int(next(iter(call.values())).shape[0])
        outputs = []
        for start in range(0, size, self.batch):
            rows = torch.arange(start, start + self.batch).clamp(max=size - 1)
            chunk = {name: value[rows] for name, value in call.items()}
            (prediction,) = self.session.run([OUTPUT_NAME], _feed(chunk, self.names))
            outputs.append(torch.from_numpy(prediction)[: min(self.batch, size - start)])
        return DenoiserOutput(torch.cat(outputs))


def _feed(call: dict, names: list[str]) -> dict[str, np.ndarray]:
    missing = [name for name in names if name not in call]
    if missing:
        raise ValueError(f"the ONNX model takes inputs {names}; this call lacks {missing}")
    return {name: call[name].detach().cpu().numpy() for name in names}
