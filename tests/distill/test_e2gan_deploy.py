"""Deploying an E2GAN editor at toy size: the concept's text baked into the model, the ONNX export
against torch, int8 (PT2E simulated, ONNX Runtime QDQ) close to fp32, and `hyperhuman edit` on a
folder of images and on tiny video files, with its frames/s. No torch.compile here (slow to
compile on two cores; bench/ times the compiled runtimes)."""

import json
import math

import numpy as np
import pytest
import torch

from distill.e2gan.deploy import ConceptEditor, deploy, export_onnx_editor, load_editor
from distill.e2gan.edit import edit_media
from distill.e2gan.generator import E2GANGenerator
from distill.quant.onnx_runtime import OnnxDenoiser
from hyperhuman.config import ConfigError

from .test_e2gan import text_encoder_path  # noqa: F401 (fixture: the toy text encoder folder)

TINY = {"base_channels": 8, "num_downsamples": 2, "attention_heads": 2, "mlp_ratio": 2}
CONCEPTS = {"sketch": "turn the photo into a pencil sketch", "cartoon": "turn the person into a cartoon"}
ONNX_ATOL = 1e-4  # fp32 ONNX Runtime vs torch eager: the same math, other kernels
INT8_MIN_PSNR_DB = 30.0  # int8 (u8 activations per tensor, s8 weights per channel) vs fp32, images in [-1, 1]


def tiny_generator(seed=0, text_encoder="test"):
    torch.manual_seed(seed)
    return E2GANGenerator(**TINY, text_dim=32, text_encoder=text_encoder).eval()


def frames(count=4, size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(1, 3, size, size, generator=generator) * 2 - 1 for _ in range(count)]


def psnr(ours, reference):
    mse = torch.mean((ours.float() - reference) ** 2).item()
    return 100.0 if mse == 0 else 10 * math.log10(4 / mse)


@pytest.fixture(scope="module")
def editor():
    states = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1, 1, 1, 1, 0]])  # a padded token: baked in too
    return ConceptEditor(tiny_generator(), states, mask)


@pytest.fixture(scope="module")
def onnx_files(editor, tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    return export_onnx_editor(editor, frames(1)[0], folder, calibration=frames(4, seed=1))


def test_the_editor_is_the_generator_with_the_concepts_states_baked_in(editor):
    image = torch.cat(frames(2))
    with torch.no_grad():
        expected = editor.generator(image, editor.encoder_hidden_states.expand(2, -1, -1),
                                    editor.encoder_attention_mask.expand(2, -1))  # fmt: skip
        assert torch.equal(editor(image), expected)


def test_the_onnx_export_takes_only_the_image_and_matches_torch(editor, onnx_files):
    import onnx

    graph = onnx.load(str(onnx_files["onnx"])).graph
    assert [i.name for i in graph.input] == ["image"]  # the text states are initializers, not inputs
    session = OnnxDenoiser(onnx_files["onnx"])
    for image in frames(4, seed=2):
        with torch.no_grad():
            torch.testing.assert_close(session(image=image).sample, editor(image), rtol=0, atol=ONNX_ATOL)


def test_int8_through_the_quantization_stages_paths_stays_close_to_fp32(editor, onnx_files):
    import onnx

    ops = {node.op_type for node in onnx.load(str(onnx_files["onnx-int8"])).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    pt2e = deploy(editor, "int8", frames(1)[0], frames(4, seed=1), int8_mode="eager")  # simulated: no compile
    qdq = OnnxDenoiser(onnx_files["onnx-int8"])
    for image in frames(3, seed=2):  # photos other than the calibration's
        with torch.no_grad():
            reference = editor(image)
        assert psnr(pt2e.run(image), reference) > INT8_MIN_PSNR_DB
        assert psnr(qdq(image=image).sample, reference) > INT8_MIN_PSNR_DB
    with pytest.raises(ConfigError, match="calibrates on the input's frames"):
        deploy(editor, "int8", frames(1)[0], [])
    with pytest.raises(ConfigError, match="--runtime 'tensorrt'"):
        deploy(editor, "tensorrt", frames(1)[0], [])


# --- from a run folder, and the command ------------------------------------------------------------
@pytest.fixture(scope="module")
def run_folder(text_encoder_path, tmp_path_factory):  # noqa: F811
    folder = tmp_path_factory.mktemp("gan-run")
    tiny_generator(text_encoder=text_encoder_path).save_pretrained(folder / "generator", safe_serialization=True)
    (folder / "generator" / "concepts.json").write_text(json.dumps(CONCEPTS))
    return folder


def test_a_concept_of_the_base_model_or_a_merged_adapter_folder(run_folder, text_encoder_path, tmp_path):  # noqa: F811
    from distill.e2gan.train import PromptStates
    from hyperhuman.text import load_text_encoder

    editor, info = load_editor(str(run_folder), "sketch")
    assert info["prompt"] == CONCEPTS["sketch"] and info["adapter"] is None
    states, mask = PromptStates(*load_text_encoder(text_encoder_path), "cpu")([CONCEPTS["sketch"]])
    assert torch.equal(editor.encoder_hidden_states, states) and torch.equal(editor.encoder_attention_mask, mask)
    with pytest.raises(ConfigError, match=r"--concept 'anime'.*\['cartoon', 'sketch'\].*--adapter"):
        load_editor(str(run_folder), "anime")

    merged = tmp_path / "anime"  # a generator with a new concept merged in, saved as the LoRA stage would
    tiny_generator(seed=3, text_encoder=text_encoder_path).save_pretrained(merged)
    (merged / "concepts.json").write_text(json.dumps({"anime": "make it an anime drawing"}))
    adapted, info = load_editor(str(run_folder), "anime", adapter=str(merged))
    assert info["prompt"] == "make it an anime drawing"
    assert torch.equal(adapted.generator.conv_in.weight, tiny_generator(seed=3).conv_in.weight)


def test_a_lora_adapter_file_is_merged_into_the_base(run_folder, tmp_path):
    from distill.e2gan.generator import load_generator
    from distill.e2gan.lora import add_adapter, base_digest, merge_concept, save_adapter

    base, targets = load_generator(str(run_folder)), ["res_blocks.1.conv1", "transformer.attn2.to_k"]
    torch.manual_seed(0)
    add_adapter(base, "anime", targets, rank=2, alpha=2.0)
    with torch.no_grad():  # peft starts lora_B at zero: a trained adapter changes the edit
        for name, parameter in base.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.1)
    description = {"prompt": "make it an anime drawing", "target_modules": targets, "rank": 2, "alpha": 2.0,
                   "base": {"run": str(run_folder), "generator_sha256": base_digest(base)}}  # fmt: skip
    path = save_adapter(base, "anime", tmp_path / "anime.safetensors", description)
    editor, info = load_editor(str(run_folder), "anime", adapter=str(path))
    assert info["prompt"] == "make it an anime drawing" and info["adapter"] == str(path)
    merged = merge_concept(base, "anime").state_dict()
    assert all(torch.equal(value, merged[name]) for name, value in editor.generator.state_dict().items())
    with pytest.raises(ConfigError, match="holds concept 'anime', not --concept 'sketch'"):
        load_editor(str(run_folder), "sketch", adapter=str(path))


def write_photos(folder, count=3):
    import cv2

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    shapes = [(40, 56), (32, 32), (48, 36)][:count]  # images of other sizes: each comes back at its own
    for index, (height, width) in enumerate(shapes):
        cv2.imwrite(str(folder / f"photo{index}.png"), rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    return shapes


def write_video(path, count=5, size=(24, 40)):
    import cv2

    codec = {".avi": "MJPG", ".mp4": "mp4v"}[path.suffix]
    video = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), 12.0, (size[1], size[0]))
    for index in range(count):
        video.write(np.full((*size, 3), 30 * index, dtype=np.uint8))
    video.release()


def read_video(path):
    import cv2

    capture = cv2.VideoCapture(str(path))
    shapes = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        shapes.append(frame.shape)
    fps = capture.get(cv2.CAP_PROP_FPS)
    capture.release()
    return shapes, fps


def test_edit_a_folder_of_images_on_the_command_line(run_folder, tmp_path, capsys):
    import cv2

    from hyperhuman.cli import main

    shapes = write_photos(tmp_path / "photos")
    code = main(["edit", "--model", str(run_folder), "--concept", "cartoon", "--input", str(tmp_path / "photos"),
                 "--output", str(tmp_path / "out"), "--size", "16"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "3 frames" in printed and "frames/s" in printed and "excluding" in printed
    for index, (height, width) in enumerate(shapes):
        assert cv2.imread(str(tmp_path / "out" / f"photo{index}.png")).shape == (height, width, 3)
    report = json.loads((tmp_path / "out" / "edit_report.json").read_text())
    assert report["frames"] == 3 and report["fps_model"] > 0 and report["fps_end_to_end"] > 0
    assert report["runtime"] == "torch" and report["prompt"] == CONCEPTS["cartoon"]


@pytest.mark.parametrize(("suffix", "runtime"), [(".avi", "onnx-int8"), (".mp4", "torch")])
def test_edit_a_video_file(run_folder, tmp_path, suffix, runtime):
    write_video(tmp_path / f"clip{suffix}")
    report = edit_media(str(run_folder), "sketch", str(tmp_path / f"clip{suffix}"), str(tmp_path / "out"),
                        runtime=runtime, size=16, calibration_frames=3)  # fmt: skip
    assert report["frames"] == 5 and report["outputs"] == [str(tmp_path / "out" / f"clip{suffix}")]
    shapes, fps = read_video(tmp_path / "out" / f"clip{suffix}")
    assert shapes == [(24, 40, 3)] * 5 and fps == pytest.approx(12.0)
    if runtime == "onnx-int8":  # exported and quantized on the video's first frames, checked against torch fp32
        assert report["first_frame_vs_torch"]["psnr_db"] > INT8_MIN_PSNR_DB
        assert set(report["files"]) == {"onnx", "onnx-int8"}


def test_edit_refuses_what_it_cannot_do_naming_the_option(run_folder, tmp_path):
    write_photos(tmp_path / "photos", count=1)
    with pytest.raises(ConfigError, match="--size 12 must be a positive multiple of 8"):
        edit_media(str(run_folder), "sketch", str(tmp_path / "photos"), str(tmp_path / "out"), size=12)
    with pytest.raises(ConfigError, match="neither a folder of images nor a video file"):
        edit_media(str(run_folder), "sketch", str(tmp_path / "nothing"), str(tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no frames"):
        edit_media(str(run_folder), "sketch", str(tmp_path / "empty"), str(tmp_path / "out"), size=16)
    with pytest.raises(ConfigError, match="--model .* holds no E2GAN generator"):
        edit_media(str(tmp_path), "sketch", str(tmp_path / "photos"), str(tmp_path / "out"))
