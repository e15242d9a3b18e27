"""``hyperhuman edit``: a concept applied to a folder of images or to a video file, with frames/s.

Every frame is resized to ``size × size`` (the generator's input: one fixed shape, so every runtime
of :mod:`distill.e2gan.deploy` serves it, an ONNX model or a compiled program included), edited,
and resized back to the frame's own size: a folder's images come out as ``OUTPUT/NAME.png``, a
video as ``OUTPUT/NAME.mp4`` (``.avi`` in, ``.avi`` out: MJPG) at the input's frame rate. The int8
runtimes calibrate on the input's first ``calibration_frames`` frames (the concept's input photos).

Frames/s is reported twice: the model's calls alone, and end to end (decode, resize, model, resize
back, encode). Both **exclude** the setup: loading the generator and the text encoder, the export
and quantization, and the first frame's call, which is where ``torch.compile`` compiles (it runs
as a warm-up before the timed loop). ``OUTPUT/edit_report.json`` holds the numbers; for a runtime
other than ``torch`` also the first frame's agreement with the torch fp32 editor (max |Δ| and PSNR).
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from hyperhuman.config import ConfigError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
VIDEO_CODECS = {".avi": "MJPG", ".mp4": "mp4v"}  # what OpenCV's own writer encodes without extra codecs


def edit_media(
    model: str,
    concept: str,
    source: str,
    output: str,
    runtime: str = "torch",
    size: int = 256,
    adapter: str | None = None,
    calibration_frames: int = 8,
    int8_mode: str = "compiled",
) -> dict:
    """Edit every frame of ``source`` (a folder of images or a video file) with ``concept`` into
    ``output``; returns the report (also ``output/edit_report.json``)."""
    from distill.e2gan.deploy import deploy, load_editor

    started = time.perf_counter()
    frames = FrameSource(source)
    editor, info = load_editor(model, concept, adapter)
    factor = editor.generator.factor
    if isinstance(size, bool) or not isinstance(size, int) or size < factor or size % factor:
        raise ConfigError(f"--size {size!r} must be a positive multiple of {factor} (the generator's 2**(downs + 1))")
    if calibration_frames < 1:
        raise ConfigError(f"--calibration-frames {calibration_frames!r}: at least one frame")
    stream = frames.frames()
    calibration = [to_tensor(frame, size) for _, frame in itertools.islice(stream, calibration_frames)]
    stream.close()  # a video's capture is released now
    if not calibration:
        raise ConfigError(f"--input {source!r} holds no frames (images {IMAGE_SUFFIXES}, or a video OpenCV reads)")
    out = Path(output)
    deployed = deploy(editor, runtime, calibration[0], calibration, out / "deploy", int8_mode)
    first = deployed.run(calibration[0])  # the warm-up: a compiled runtime compiles here
    setup_s = time.perf_counter() - started
    report = {"model": model, **info, "runtime": runtime, "size": size, "input": source, "files": deployed.files}
    if runtime != "torch":
        with torch.no_grad():
            reference = editor(calibration[0])
        difference = first.float() - reference
        mse = difference.square().mean().item()
        psnr_db = 100.0 if mse == 0 else min(100.0, 10 * math.log10(4 / mse))  # images in [-1, 1]: peak-to-peak 2
        report["first_frame_vs_torch"] = {"max_abs": difference.abs().max().item(), "psnr_db": psnr_db}

    model_s, count, loop_started = 0.0, 0, time.perf_counter()
    with frames.writer(out) as write:
        for name, frame in frames.frames():
            image = to_tensor(frame, size)
            call_started = time.perf_counter()
            edited = deployed.run(image)
            model_s += time.perf_counter() - call_started
            write(name, to_frame(edited, frame.shape[:2]))
            count += 1
    loop_s = time.perf_counter() - loop_started
    report.update(frames=count, outputs=frames.outputs, setup_s=round(setup_s, 3), model_s=round(model_s, 4),
                  loop_s=round(loop_s, 4), fps_model=count / model_s, fps_end_to_end=count / loop_s,
                  excluded="loading the generator and text encoder, export/quantization, the first frame's call "
                           "(compilation)")  # fmt: skip
    (out / "edit_report.json").write_text(json.dumps(report, indent=1))
    return report


# --- frames ----------------------------------------------------------------------------------------
def to_tensor(frame: np.ndarray, size: int) -> torch.Tensor:
    """An RGB uint8 frame ``(H, W, 3)`` → ``(1, 3, size, size)`` in [-1, 1] (area-resized)."""
    import cv2

    resized = cv2.resize(frame, (size, size), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(resized).permute(2, 0, 1)[None].float() / 127.5 - 1.0


def to_frame(edited: torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
    """``(1, 3, S, S)`` in [-1, 1] → an RGB uint8 frame of ``shape`` (height, width)."""
    import cv2

    array = ((edited[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return cv2.resize(array, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)


class FrameSource:
    """A folder of images (sorted by name) or a video file, as ``(name, RGB uint8 frame)``; its
    :meth:`writer` writes edited frames the same way (images, or one video at the input's rate)."""

    def __init__(self, source: str):
        import cv2

        self.path = Path(source)
        self.outputs: list[str] = []
        if self.path.is_dir():
            self.images = sorted(p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif self.path.is_file():
            self.images = None
            capture = cv2.VideoCapture(str(self.path))
            opened, self.fps = capture.isOpened(), capture.get(cv2.CAP_PROP_FPS) or 25.0
            capture.release()
            if not opened:
                raise ConfigError(f"--input {source!r}: OpenCV cannot open it as a video")
        else:
            raise ConfigError(f"--input {source!r} is neither a folder of images nor a video file")

    def frames(self) -> Iterator[tuple[str, np.ndarray]]:
        import cv2

        if self.images is not None:
            for path in self.images:
                bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
                if bgr is None:
                    raise ConfigError(f"--input: {path} is not an image OpenCV can read")
                yield path.stem, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            return
        capture = cv2.VideoCapture(str(self.path))
        try:
            index = 0
            while True:
                ok, bgr = capture.read()
                if not ok:
                    return
                yield f"{self.path.stem}-{index:06d}", cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                index += 1
        finally:
            capture.release()

    def writer(self, output: Path):
        output.mkdir(parents=True, exist_ok=True)
        return _ImageWriter(self, output) if self.images is not None else _VideoWriter(self, output)


class _ImageWriter:
    def __init__(self, source: FrameSource, output: Path):
        self.source, self.output = source, output

    def __enter__(self):
        return self.write

    def write(self, name: str, frame: np.ndarray) -> None:
        import cv2

        path = self.output / f"{name}.png"
        cv2.imwrite(str(path), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        self.source.outputs.append(str(path))

    def __exit__(self, *exc) -> None:
        pass


class _VideoWriter:
    def __init__(self, source: FrameSource, output: Path):
        suffix = source.path.suffix.lower() if source.path.suffix.lower() in VIDEO_CODECS else ".mp4"
        self.source, self.path, self.codec = source, output / f"{source.path.stem}{suffix}", VIDEO_CODECS[suffix]
        self.video = None

    def __enter__(self):
        return self.write

    def write(self, name: str, frame: np.ndarray) -> None:
        import cv2

        if self.video is None:  # the first frame gives the size
            height, width = frame.shape[:2]
            fourcc = cv2.VideoWriter_fourcc(*self.codec)
            self.video = cv2.VideoWriter(str(self.path), fourcc, self.source.fps, (width, height))
            if not self.video.isOpened():
                raise RuntimeError(f"OpenCV cannot write {self.path} with codec {self.codec}")
            self.source.outputs.append(str(self.path))
        self.video.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))

    def __exit__(self, *exc) -> None:
        if self.video is not None:
            self.video.release()
