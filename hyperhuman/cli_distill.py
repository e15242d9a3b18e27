"""The ``hyperhuman`` subcommands of the compression stages (``distill/``): ``distill …``, ``prune``,
``quantize …`` and ``edit``; :func:`add_commands` registers them on the main parser
(:mod:`hyperhuman.cli`). Heavy imports happen inside the commands so that ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os

from hyperhuman.cli_options import add_config_options, add_heldout_options, add_resume_option
from hyperhuman.config import ConfigError, load_config


def _distill_unet(args: argparse.Namespace) -> int:
    from distill.kd import distill_unet

    config = load_config(args.config, args.overrides)
    report = distill_unet(config, resume=args.resume)
    if "last_loss" in report:
        params = report["params"]
        print(f"[distill unet] {report['steps']} steps in {report['wall_s']} s; loss {report['first_loss']:.4f} → "
              f"{report['last_loss']:.4f}; student {params['student']:,} parameters (teacher {params['teacher']:,}); "
              f"pipeline in {config['output']}/pipeline")  # fmt: skip
    return 0


def _prune(args: argparse.Namespace) -> int:
    from distill.prune import prune

    config = load_config(args.config, args.overrides)
    report = prune(config, resume=args.resume)
    if config.get("network") == "sr":
        if "measured_ms" in report:  # the main process
            print(f"[prune] SR network {report['measured_ms']['pruned']:.2f} ms vs the teacher's "
                  f"{report['measured_ms']['teacher']:.2f} ms ({report['runtime']}; {report['speedup']:.2f}x, target "
                  f"{report['target_ms']:.2f} ms); blocks {report['architecture']['pruned']}; "
                  f"network in {config['output']}/sr")  # fmt: skip
        return 0
    unit = report["cost_unit"]
    reached = report["predicted_cost"] / report["teacher_cost"]
    measured = f", measured {report['measured_cost']:.2f} ms" if "measured_cost" in report else ""
    print(f"[prune] {unit} {reached:.1%} of the teacher's (target {report['target'] / report['teacher_cost']:.1%}"
          f"{measured}); {report['params']:,} parameters; pipeline in {config['output']}/pipeline")  # fmt: skip
    return 0


def _quantize_ptq(args: argparse.Namespace) -> int:
    from distill.quantize import quantize_ptq

    config = load_config(args.config, args.overrides)
    report = quantize_ptq(config)
    calibration = report["calibration"]
    print(f"[quantize ptq] {calibration['calls']} calls ({calibration['mode']}) calibrated; int8 vs fp32 relative "
          f"error {calibration['relative_error']:.3f}; program in {report['program']}")  # fmt: skip
    if "evaluation" in report:
        evaluation = report["evaluation"]
        psnr = ", ".join(f"{name} {value:.1f} dB" for name, value in evaluation["psnr_vs_fp32"].items())
        print(f"[quantize ptq] held-out v-loss fp32 {evaluation['fp32_v_loss']:.4f}, "
              f"int8 {evaluation['int8_v_loss']:.4f}; samples vs fp32: {psnr}")  # fmt: skip
        if "step_ms" in evaluation:
            print("[quantize ptq] step ms: " + ", ".join(f"{k} {v:.2f}" for k, v in evaluation["step_ms"].items()))
    return 0


def _quantize_qat(args: argparse.Namespace) -> int:
    from distill.quant.qat import quantize_qat

    config = load_config(args.config, args.overrides)
    report = quantize_qat(config, resume=args.resume)
    if "last_loss" in report:
        heldout = report["heldout"]
        losses = ", ".join(f"{name} {value:.4f}" for name, value in heldout.items())
        print(f"[quantize qat] {report['steps']} steps, loss {report['first_loss']:.4f} → {report['last_loss']:.4f}; "
              f"held-out v-loss {losses or '(no validation.heldout)'}; int8-representable: "
              f"{report['int8_representable']}; pipeline in {config['output']}/pipeline")  # fmt: skip
    return 0


def _distill_steps(args: argparse.Namespace) -> int:
    from distill.steps import distill_steps

    config = load_config(args.config, args.overrides)
    report = distill_steps(config, resume=args.resume)
    rounds = ", ".join(f"{r['teacher_steps']} → {r['student_steps']} ({r['steps']} steps)" for r in report["rounds"])
    folded = "guidance folded in" if report["guidance_folded"] else "guided at sampling"
    print(f"[distill steps] {report['mode']}: {rounds} in {report['wall_s']} s; a {report['student_steps']}-step "
          f"student, {folded}: {config['output']}/pipeline")  # fmt: skip
    return 0


def _distill_vae_decoder(args: argparse.Namespace) -> int:
    from distill.vae_decoder import distill_vae_decoder

    config = load_config(args.config, args.overrides)
    report = distill_vae_decoder(config, resume=args.resume)
    if "psnr_db" in report:
        psnr = ", ".join(f"{name} {value:.1f}" for name, value in report["psnr_db"].items())
        speedup = report["decode_ms"]["speedup"]
        print(f"[distill vae-decoder] {report['steps']} steps in {report['train_s']} s; held-out PSNR vs the teacher "
              f"decoder {psnr} dB; decodes {speedup:.2f}x faster; vae in {config['output']}/vae")  # fmt: skip
    return 0


def _distill_edit_pairs(args: argparse.Namespace) -> int:
    from distill.e2gan.pairs import edit_pairs

    config = load_config(args.config, args.overrides)
    report = edit_pairs(config)
    concepts = ", ".join(f"{name} ({entry['teacher']['name']})" for name, entry in report["concepts"].items())
    print(f"[distill edit-pairs] {report['train_photos']} training + {report['heldout_photos']} held-out photos × "
          f"{len(report['concepts'])} concepts: {concepts}; in {report['wall_s']} s; pairs in "
          f"{config['output']}/train and /heldout")  # fmt: skip
    return 0


def _distill_gan(args: argparse.Namespace) -> int:
    from distill.e2gan.train import train_gan

    config = load_config(args.config, args.overrides)
    report = train_gan(config, resume=args.resume)
    if "psnr_db" in report:
        psnr = ", ".join(f"{name} {value:.2f}" for name, value in report["psnr_db"].items())
        identity = report["identity_psnr_db"]["all"]
        print(f"[distill gan] {report['steps']} steps in {report['wall_s']} s; held-out PSNR vs the teacher's edits "
              f"{psnr} dB (the input itself: {identity:.2f} dB); {report['params']['generator']:,} generator "
              f"parameters; generator in {config['output']}/generator")  # fmt: skip
    return 0


def _distill_gan_concept(args: argparse.Namespace) -> int:
    from distill.e2gan.concept import train_concept

    config = load_config(args.config, args.overrides)
    report = train_concept(config, resume=args.resume)
    if "psnr_db" in report:
        concept, params = report["concept"], report["params"]
        print(f"[distill gan-concept] {report['steps']} steps in {report['wall_s']} s (searches "
              f"{report['search_s']} s); LoRA rank {report['rank']} on {', '.join(report['crucial'])}: "
              f"{params['adapter']:,} parameters ({params['fraction']:.2%} of the base), "
              f"{report['output']['bytes']:,} bytes; held-out PSNR "
              f"{report['psnr_db'][concept]:.2f} dB (base {report['base_psnr_db']:.2f}); "
              f"adapter {report['output']['adapter']}")  # fmt: skip
    return 0


def _distill_gan_search(args: argparse.Namespace) -> int:
    from distill.e2gan.search_train import search_gan

    config = load_config(args.config, args.overrides)
    report = search_gan(config, resume=args.resume)
    if "macs" in report:  # absent on every process but the main one
        ms = report["measured_ms"]
        print(f"[distill gan-search] {report['macs_ratio']:.2f}x fewer MACs, {report['speedup']:.2f}x faster on "
              f"{report['runtime']} ({ms['searched']:.2f} vs {ms['full']:.2f} ms a {report['resolution']}² frame); "
              f"target met: {report['search']['target_met']}; generator in {config['output']}/generator")  # fmt: skip
    return 0


def _edit(args: argparse.Namespace) -> int:
    from distill.e2gan.edit import edit_media

    report = edit_media(args.model, args.concept, args.input, args.output, runtime=args.runtime, size=args.size,
                        adapter=args.adapter, calibration_frames=args.calibration_frames)  # fmt: skip
    print(f"[edit] {report['frames']} frames of {report['concept']!r} at {report['size']}x{report['size']} on "
          f"{report['runtime']}: {report['fps_model']:.1f} frames/s (model), {report['fps_end_to_end']:.1f} frames/s "
          f"(end to end), excluding {report['setup_s']:.1f} s of setup (load, export, compile, first frame); "
          f"in {args.output}")  # fmt: skip
    return 0


def _distill_annotator(args: argparse.Namespace) -> int:
    from distill.annotator_student.train import train_pose_student

    config = load_config(args.config, args.overrides)
    report = train_pose_student(config, resume=args.resume)
    if report.get("oks_vs_teacher") is not None:  # absent on every process but the main one
        onnx = report["output"].get("onnx", "not exported (export.onnx: false)")
        print(f"[distill annotator] {report['steps']} steps in {report['wall_s']} s; held-out OKS vs the teacher "
              f"({report['teacher'].get('annotator', '?')}) {report['oks_vs_teacher']:.3f} on {report['people']} "
              f"people; {report['params']:,} parameters; ONNX {onnx}")  # fmt: skip
    return 0


def _distill_measure(args: argparse.Namespace) -> int:
    from distill.measure import measure

    result = measure(
        args.model, args.shards, reference=args.reference, num=args.num, steps=args.steps, runtime=args.runtime
    )
    print(json.dumps(result, indent=1))
    return 0


def _distill_evolve(args: argparse.Namespace) -> int:
    from distill.evolve import evolve, write
    from distill.latency import LatencyTable
    from distill.measure import HeldOut, load_pipeline
    from hyperhuman.unet_parts import removable_parts

    pipeline = load_pipeline(args.model)
    heldout = HeldOut.from_shards(args.shards, pipeline, num=args.num)
    removable = removable_parts(pipeline.unet)
    candidates = [part for part in removable if fnmatch.fnmatchcase(part, args.parts)]
    if not candidates:
        raise ConfigError(f"--parts {args.parts!r} matches no removable part; they are named like {removable[:3]}")
    evolution = evolve(pipeline, heldout, LatencyTable.load(), runtime=args.runtime, budget=args.budget,
                       candidates=candidates, repeats=args.repeats)  # fmt: skip
    path = write(evolution, args.output or os.path.join(args.model, "evolve"))
    met = "met" if evolution.budget_met else "NOT met (every removable part is out)"
    print(f"[distill evolve] {len(evolution.removed)} parts out: {evolution.full_ms:.1f} → "
          f"{evolution.latency_ms:.1f} ms predicted on {args.runtime} (budget {evolution.budget_ms:.1f} ms, {met}); "
          f"held-out v-loss {evolution.base_loss:.4f} → {evolution.loss:.4f}; {path}")  # fmt: skip
    print(f"[distill evolve] next: hyperhuman distill unet --set student={path} --set teacher=...")
    return 0


def add_commands(commands) -> None:
    """``distill``, ``prune``, ``quantize`` and ``edit`` on the main parser's subcommands."""
    distill_parser = commands.add_parser("distill", help="make the models mobile-sized (students, KD, quality measure)")
    stages = distill_parser.add_subparsers(dest="distill_command", required=True, metavar="STAGE")
    unet = stages.add_parser(
        "unet", help="train a student LSDM (BK-SDM block removal or evolved) by KD from a teacher run folder"
    )
    add_resume_option(unet)
    add_config_options(unet, "distill/unet-tiny")
    unet.set_defaults(func=_distill_unet)
    steps = stages.add_parser(
        "steps", help="step distillation (progressive or direct), with classifier-free guidance folded in"
    )
    add_resume_option(steps)
    add_config_options(steps, "distill/steps-tiny")
    steps.set_defaults(func=_distill_steps)
    vae_decoder = stages.add_parser(
        "vae-decoder", help="SnapFusion's efficient VAE decoder: a channel-reduced decoder by data distillation"
    )
    add_resume_option(vae_decoder)
    add_config_options(vae_decoder, "distill/vae-decoder-tiny")
    vae_decoder.set_defaults(func=_distill_vae_decoder)
    pairs = stages.add_parser(
        "edit-pairs", help="E2GAN data: shard photos edited per concept by a teacher editor, as pair shards"
    )
    add_config_options(pairs, "distill/edit-pairs-tiny")
    pairs.set_defaults(func=_distill_edit_pairs)
    gan = stages.add_parser("gan", help="train the E2GAN base model (text-conditioned generator) on edit pairs")
    add_resume_option(gan)
    add_config_options(gan, "distill/gan-tiny")
    gan.set_defaults(func=_distill_gan)
    concept = stages.add_parser(
        "gan-concept", help="a new concept on the E2GAN base: LoRA on searched crucial layers and rank, minimal data"
    )
    add_resume_option(concept)
    add_config_options(concept, "distill/gan-concept-tiny")
    concept.set_defaults(func=_distill_gan_concept)
    gan_search = stages.add_parser(
        "gan-search", help="the E2GAN generator's widths searched to a latency target, removed, fine-tuned by KD"
    )
    add_resume_option(gan_search)
    add_config_options(gan_search, "distill/gan-search-tiny")
    gan_search.set_defaults(func=_distill_gan_search)
    student = stages.add_parser(
        "annotator", help="an EfficientFormerV2 pose student trained on the shards' pseudo-labels, exported to ONNX"
    )
    add_resume_option(student)
    add_config_options(student, "distill/pose-student")
    student.set_defaults(func=_distill_annotator)
    quality = stages.add_parser(
        "measure", help="held-out v-loss, sample PSNR against a reference and step latency, as JSON"
    )
    add_heldout_options(
        quality, "a run folder with pipeline/, or a pipeline folder", "runtime of step_ms (default: eager)"
    )
    quality.add_argument("--reference", default=None, help="a run or pipeline folder to compare samples with")
    quality.add_argument("--steps", type=int, default=8, help="sampling steps of the PSNR comparison (default: 8)")
    quality.set_defaults(func=_distill_measure)
    search = stages.add_parser(
        "evolve", help="SnapFusion architecture evolving: which parts of a robust-trained LSDM to remove for a budget"
    )
    add_heldout_options(
        search, "the robust-trained run (distill unet with kd.skip_prob > 0)", "the latency table's runtime"
    )
    search.add_argument("--budget", type=float, default=0.4, help="latency budget: a fraction of the step (0.4)")
    search.add_argument(
        "--parts", default="*", help="only parts whose names match this glob, e.g. '*attentions*' (default: all)"
    )
    search.add_argument("--repeats", type=int, default=10, help="timed calls per block and part (default: 10)")
    search.add_argument("--output", default=None, help="folder for evolve.json (default: MODEL/evolve)")
    search.set_defaults(func=_distill_evolve)

    prune_parser = commands.add_parser(
        "prune", help="Pruning-as-Search to a MACs or latency target, then a KD fine-tune of the smaller model"
    )
    add_resume_option(prune_parser)
    add_config_options(prune_parser, "prune/tiny")
    prune_parser.set_defaults(func=_prune)

    quantize_parser = commands.add_parser("quantize", help="quantize a denoiser: int8 PTQ, QAT schemes, PIM-QAT")
    schemes = quantize_parser.add_subparsers(dest="scheme", required=True, metavar="SCHEME")
    ptq = schemes.add_parser(
        "ptq", help="int8 PT2E post-training quantization, calibrated on the model's own sampling trajectories"
    )
    add_config_options(ptq, "quantize/ptq-tiny")
    ptq.set_defaults(func=_quantize_ptq)
    qat = schemes.add_parser(
        "qat", help="quantization-aware KD fine-tuning: fixed-point, power-of-two or mixed schemes, PIM-QAT"
    )
    add_resume_option(qat)
    add_config_options(qat, "quantize/qat-tiny")
    qat.set_defaults(func=_quantize_qat)

    edit = commands.add_parser("edit", help="apply an E2GAN concept to a folder of images or a video file (frames/s)")
    edit.add_argument("--model", required=True, help="a `distill gan` / `distill gan-search` run or a generator folder")
    edit.add_argument("--concept", required=True, help="a concept of the model's concepts.json (or of --adapter)")
    edit.add_argument("--input", required=True, help="a folder of images or a video file")
    edit.add_argument("--output", required=True, help="folder for the edited images or video and edit_report.json")
    edit.add_argument(
        "--runtime", default="torch", choices=["torch", "compiled", "int8", "onnx", "onnx-int8"],
        help="eager fp32, torch.compile, PT2E int8 (compiled), ONNX Runtime fp32 or QDQ int8 (default: torch)",
    )  # fmt: skip
    edit.add_argument("--size", type=int, default=256, help="the square side frames are edited at (default: 256)")
    edit.add_argument("--calibration-frames", type=int, default=8, help="input frames int8 calibrates on (default: 8)")
    edit.add_argument(
        "--adapter", default=None,
        help="a LoRA concept: a folder holding a generator with it merged in, or its adapter file (merged here)",
    )  # fmt: skip
    edit.set_defaults(func=_edit)
