"""The ``hyperhuman`` console script: one subcommand per pipeline stage.

Each subcommand reads a YAML config from ``configs/`` (``--config`` picks another file) and
takes ``--set key=value`` overrides. Heavy imports happen inside the commands so that
``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import sys

from hyperhuman.config import ConfigError, check_known_keys, load_config


def _add_config_options(parser: argparse.ArgumentParser, default_config: str) -> None:
    parser.add_argument(
        "--config",
        default=default_config,
        help=f"YAML config: a name in configs/ or a path (default: {default_config})",
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set writer.max_samples=500 (repeatable)",
    )  # fmt: skip


SHARDS_KEYS = {
    "writer": dict.fromkeys(["max_samples", "max_bytes", "jpeg_quality"]),
    "pack": dict.fromkeys(["extensions", "partition"]),
    "validate": {"decode": None},
    "inspect": {"max_keys": None},
}


def _add_resume_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--resume", default=None, metavar="latest|PATH", help="continue from the latest checkpoint or a given one"
    )


def _add_heldout_options(parser: argparse.ArgumentParser, model_help: str, runtime_help: str) -> None:
    """The options of the stages that read a model run and a held-out set (measure, evolve)."""
    parser.add_argument("--model", required=True, help=model_help)
    parser.add_argument("--shards", required=True, help="HumanVerse shards: the held-out samples (first --num)")
    parser.add_argument("--num", type=int, default=16, help="held-out samples (default: 16)")
    parser.add_argument("--runtime", default="eager", choices=["eager", "compiled", "bf16"], help=runtime_help)


def load_shards_config(args: argparse.Namespace) -> dict:
    config = load_config(args.config, args.overrides)
    check_known_keys(config, SHARDS_KEYS, "configs/shards.yaml")
    if missing := [section for section in SHARDS_KEYS if section not in config]:
        raise ConfigError(f"shards config lacks {missing}; see configs/shards.yaml")
    return config


def _shards_pack(args: argparse.Namespace) -> int:
    from shards.pack import pack_folder

    config = load_shards_config(args)
    manifest = pack_folder(
        args.source,
        args.output,
        extensions=config["pack"]["extensions"],
        partition=config["pack"]["partition"],
        **config["writer"],
    )
    shard_count, rows = manifest["num_shards"], manifest["counts"]
    print(f"wrote {shard_count} shard(s), {manifest['samples']} samples, rows {rows} to {args.output}")
    return 0


def _shards_validate(args: argparse.Namespace) -> int:
    from shards.validate import validate

    config = load_shards_config(args)
    problems = validate(args.path, decode=config["validate"]["decode"])
    for problem in problems:
        print(problem)
    if problems:
        print(f"INVALID: {len(problems)} problem(s) in {args.path}", file=sys.stderr)
        return 1
    print(f"OK: {args.path} is a valid HumanVerse dataset")
    return 0


def _shards_inspect(args: argparse.Namespace) -> int:
    from shards.validate import inspect

    config = load_shards_config(args)
    report = inspect(args.path, max_keys=config["inspect"]["max_keys"])
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    width = max(len(name) for name in report)
    for name, value in report.items():
        if isinstance(value, dict):
            print(f"{name:<{width}}")
            for sub, count in value.items():
                print(f"  {sub}: {count}")
        else:
            print(f"{name:<{width}}  {value}")
    return 0


def _annotate(args: argparse.Namespace) -> int:
    from pipelines.job import run_job

    config = load_config(args.config, args.overrides)
    report = run_job(
        args.source,
        args.output,
        config,
        address=args.address,
        overwrite=args.overwrite,
        retry_failed=args.retry_failed,
        plan_only=args.plan_only,
        show_progress=True,
    )
    if args.plan_only:
        return 0
    counts = report["counts"]
    print(f"[annotate] {args.output}: {report['samples']} samples in {report['shards']} shard(s); rows {counts}")
    for rule, count in sorted(report["rejections_per_rule_this_run"].items()):
        print(f"[annotate]   {rule}: {count}")
    print(f"[annotate] times (s): {report['time_s']}; report in {args.output}/report.json")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from hyperhuman.demo import run_demo

    return run_demo(load_config(args.config, args.overrides), args.output, data=args.data)


def _train_vae(args: argparse.Namespace) -> int:
    from hyperhuman.vae import train_vae

    report = train_vae(load_config(args.config, args.overrides))
    print(f"[train-vae] {json.dumps({k: v for k, v in report.items() if not isinstance(v, list)})}")
    return 0


def _lsdm_stats(args: argparse.Namespace) -> int:
    from hyperhuman.lsdm.train import latent_stats

    config = load_config(args.config, args.overrides)
    norm, path = latent_stats(config, args.output)
    for name, (shift, scale) in norm.items():
        print(f"[lsdm-stats] {name:<7} shift {shift:+.4f}  scale {scale:.4f}")
    print(f"[lsdm-stats] wrote {path}; use it with --set model.latent_norm={path}")
    return 0


def _train_lsdm(args: argparse.Namespace) -> int:
    from hyperhuman.lsdm.train import train_lsdm

    config = load_config(args.config, args.overrides)
    report = train_lsdm(config, resume=args.resume)
    if "last_loss" in report:
        print(f"[train-lsdm] {report['steps']} steps in {report['wall_s']} s; loss {report['first_loss']:.4f} → "
              f"{report['last_loss']:.4f}; pipeline in {config['output']}/pipeline")  # fmt: skip
    return 0


def _train_sgr(args: argparse.Namespace) -> int:
    from hyperhuman.sgr.train import train_sgr

    config = load_config(args.config, args.overrides)
    report = train_sgr(config, resume=args.resume)
    if "last_loss" in report:
        print(f"[train-sgr] {report['steps']} steps in {report['wall_s']} s; loss {report['first_loss']:.4f} → "
              f"{report['last_loss']:.4f}; refiner in {config['output']}/refiner")  # fmt: skip
    return 0


def _train_sr(args: argparse.Namespace) -> int:
    from hyperhuman.sr.train import train_sr

    config = load_config(args.config, args.overrides)
    report = train_sr(config, resume=args.resume)
    if "last_loss" in report:
        heldout = report.get("heldout") or {}
        scores = (f"; held-out PSNR {heldout['psnr']:.2f} dB (bicubic {heldout['bicubic_psnr']:.2f})"
                  if heldout else "")  # fmt: skip
        print(f"[train-sr] {report['steps']} steps in {report['wall_s']} s; L1 {report['first_loss']:.4f} → "
              f"{report['last_loss']:.4f}{scores}; network in {config['output']}/sr")  # fmt: skip
    return 0


def _eval(args: argparse.Namespace) -> int:
    from hyperhuman.eval.evaluate import run_eval

    config = load_config(args.config, args.overrides)
    if args.num is not None:
        config["num"] = args.num
    if args.refiner is not None:
        config["refiner"] = args.refiner
    report = run_eval(args.model, args.shards, args.output, config, overwrite=args.overwrite)
    for name, value in report["metrics"].items():
        shown = "skipped: " + report["skipped"][name] if value is None else f"{value:.4f}"
        print(f"[eval] {name:<16} {shown}")
    for name, message in report.get("warnings", {}).items():
        print(f"[eval] warning ({name}): {message}")
    print(f"[eval] {report['info']['samples']} samples; gallery: {report['gallery']}")
    return 0


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


def _gallery_shards(args: argparse.Namespace) -> int:
    from hyperhuman.eval.gallery import shard_gallery

    index = shard_gallery(args.shards, args.output, page_size=args.page_size)
    print(f"[gallery] open {index}")
    return 0


def _gallery_run(args: argparse.Namespace) -> int:
    from hyperhuman.eval.gallery import generation_gallery

    index = generation_gallery(args.run, args.output, page_size=args.page_size)
    print(f"[gallery] open {index}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hyperhuman", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    shards_parser = commands.add_parser("shards", help="write, validate and inspect HumanVerse shards")
    shard_commands = shards_parser.add_subparsers(dest="shards_command", required=True, metavar="ACTION")

    pack = shard_commands.add_parser("pack", help="pack a folder of images (+ NAME.txt captions) into shards")
    pack.add_argument("source", help="folder of images (any fsspec URL)")
    pack.add_argument("output", help="output dataset root (any fsspec URL)")
    _add_config_options(pack, "shards")
    pack.set_defaults(func=_shards_pack)

    validate = shard_commands.add_parser("validate", help="check every shard; exit 1 on any problem")
    validate.add_argument("path", help="dataset root")
    _add_config_options(validate, "shards")
    validate.set_defaults(func=_shards_validate)

    inspect = shard_commands.add_parser("inspect", help="counts, sizes, annotator versions, example keys")
    inspect.add_argument("path", help="dataset root")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_config_options(inspect, "shards")
    inspect.set_defaults(func=_shards_inspect)

    annotate = commands.add_parser("annotate", help="the Ray Data annotation job: images in, HumanVerse shards out")
    annotate.add_argument(
        "source", help="a folder of images, a URL list (parquet/csv/tsv/jsonl[.gz]) or webdataset tars"
    )
    annotate.add_argument("output", help="output dataset root (any fsspec URL)")
    annotate.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else local)")
    annotate.add_argument(
        "--overwrite", action="store_true",
        help="rewrite every partition, even with changed settings or a changed source listing",
    )  # fmt: skip
    annotate.add_argument("--retry-failed", action="store_true", help="redo partitions with transient failures")
    annotate.add_argument(
        "--plan-only", action="store_true",
        help="plan the partitions from the source's metadata, write OUTPUT/plan.json and stop (fetches nothing)",
    )  # fmt: skip
    _add_config_options(annotate, "annotate/offline")
    annotate.set_defaults(func=_annotate)

    train_vae = commands.add_parser("train-vae", help="train the small offline VAE on shards (all modalities)")
    _add_config_options(train_vae, "vae/tiny")
    train_vae.set_defaults(func=_train_vae)

    lsdm_stats = commands.add_parser(
        "lsdm-stats", help="per-modality latent shift/scale for the LSDM, computed from shards through the VAE"
    )
    lsdm_stats.add_argument("--output", default=None, help="JSON file to write (default: OUTPUT/latent_stats.json)")
    _add_config_options(lsdm_stats, "lsdm/tiny")
    lsdm_stats.set_defaults(func=_lsdm_stats)

    train_lsdm = commands.add_parser("train-lsdm", help="train the Latent Structural Diffusion Model on shards")
    _add_resume_option(train_lsdm)
    _add_config_options(train_lsdm, "lsdm/tiny")
    train_lsdm.set_defaults(func=_train_lsdm)

    train_sgr = commands.add_parser("train-sgr", help="train the Structure-Guided Refiner on shards (base UNet frozen)")
    _add_resume_option(train_sgr)
    _add_config_options(train_sgr, "sgr/tiny")
    train_sgr.set_defaults(func=_train_sgr)

    train_sr = commands.add_parser("train-sr", help="train the WDSR-style ×2 super-resolution network on shard RGB")
    _add_resume_option(train_sr)
    _add_config_options(train_sr, "sr/tiny")
    train_sr.set_defaults(func=_train_sr)

    evaluate = commands.add_parser(
        "eval", help="generate from shards' poses and captions; FID, KID, CLIP and pose metrics; a gallery"
    )
    evaluate.add_argument("--model", required=True, help="a train-lsdm output folder or a saved pipeline folder")
    evaluate.add_argument("--shards", required=True, help="HumanVerse shards: conditions and reference images")
    evaluate.add_argument("--num", type=int, default=None, help="eval samples (default: the config's num)")
    evaluate.add_argument("--output", default=None, help="where to write (default: MODEL/eval)")
    evaluate.add_argument("--refiner", default=None, help="a train-sgr output: refine stage 1 and score the result")
    evaluate.add_argument(
        "--overwrite", action="store_true",
        help="regenerate every sample, even when --output holds generations made with other settings",
    )  # fmt: skip
    _add_config_options(evaluate, "eval/default")
    evaluate.set_defaults(func=_eval)

    distill_parser = commands.add_parser("distill", help="make the models mobile-sized (students, KD, quality measure)")
    stages = distill_parser.add_subparsers(dest="distill_command", required=True, metavar="STAGE")
    unet = stages.add_parser(
        "unet", help="train a student LSDM (BK-SDM block removal or evolved) by KD from a teacher run folder"
    )
    _add_resume_option(unet)
    _add_config_options(unet, "distill/unet-tiny")
    unet.set_defaults(func=_distill_unet)
    steps = stages.add_parser(
        "steps", help="step distillation (progressive or direct), with classifier-free guidance folded in"
    )
    _add_resume_option(steps)
    _add_config_options(steps, "distill/steps-tiny")
    steps.set_defaults(func=_distill_steps)
    vae_decoder = stages.add_parser(
        "vae-decoder", help="SnapFusion's efficient VAE decoder: a channel-reduced decoder by data distillation"
    )
    _add_resume_option(vae_decoder)
    _add_config_options(vae_decoder, "distill/vae-decoder-tiny")
    vae_decoder.set_defaults(func=_distill_vae_decoder)
    pairs = stages.add_parser(
        "edit-pairs", help="E2GAN data: shard photos edited per concept by a teacher editor, as pair shards"
    )
    _add_config_options(pairs, "distill/edit-pairs-tiny")
    pairs.set_defaults(func=_distill_edit_pairs)
    gan = stages.add_parser("gan", help="train the E2GAN base model (text-conditioned generator) on edit pairs")
    _add_resume_option(gan)
    _add_config_options(gan, "distill/gan-tiny")
    gan.set_defaults(func=_distill_gan)
    concept = stages.add_parser(
        "gan-concept", help="a new concept on the E2GAN base: LoRA on searched crucial layers and rank, minimal data"
    )
    _add_resume_option(concept)
    _add_config_options(concept, "distill/gan-concept-tiny")
    concept.set_defaults(func=_distill_gan_concept)
    gan_search = stages.add_parser(
        "gan-search", help="the E2GAN generator's widths searched to a latency target, removed, fine-tuned by KD"
    )
    _add_resume_option(gan_search)
    _add_config_options(gan_search, "distill/gan-search-tiny")
    gan_search.set_defaults(func=_distill_gan_search)
    student = stages.add_parser(
        "annotator", help="an EfficientFormerV2 pose student trained on the shards' pseudo-labels, exported to ONNX"
    )
    _add_resume_option(student)
    _add_config_options(student, "distill/pose-student")
    student.set_defaults(func=_distill_annotator)
    quality = stages.add_parser(
        "measure", help="held-out v-loss, sample PSNR against a reference and step latency, as JSON"
    )
    _add_heldout_options(
        quality, "a run folder with pipeline/, or a pipeline folder", "runtime of step_ms (default: eager)"
    )
    quality.add_argument("--reference", default=None, help="a run or pipeline folder to compare samples with")
    quality.add_argument("--steps", type=int, default=8, help="sampling steps of the PSNR comparison (default: 8)")
    quality.set_defaults(func=_distill_measure)
    search = stages.add_parser(
        "evolve", help="SnapFusion architecture evolving: which parts of a robust-trained LSDM to remove for a budget"
    )
    _add_heldout_options(
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
    _add_resume_option(prune_parser)
    _add_config_options(prune_parser, "prune/tiny")
    prune_parser.set_defaults(func=_prune)

    quantize_parser = commands.add_parser("quantize", help="quantize a denoiser: int8 PTQ, QAT schemes, PIM-QAT")
    schemes = quantize_parser.add_subparsers(dest="scheme", required=True, metavar="SCHEME")
    ptq = schemes.add_parser(
        "ptq", help="int8 PT2E post-training quantization, calibrated on the model's own sampling trajectories"
    )
    _add_config_options(ptq, "quantize/ptq-tiny")
    ptq.set_defaults(func=_quantize_ptq)
    qat = schemes.add_parser(
        "qat", help="quantization-aware KD fine-tuning: fixed-point, power-of-two or mixed schemes, PIM-QAT"
    )
    _add_resume_option(qat)
    _add_config_options(qat, "quantize/qat-tiny")
    qat.set_defaults(func=_quantize_qat)

    gallery_parser = commands.add_parser("gallery", help="static HTML galleries of shards or of an eval run")
    gallery_commands = gallery_parser.add_subparsers(dest="gallery_command", required=True, metavar="KIND")
    shards_gallery = gallery_commands.add_parser("shards", help="kept samples with every modality, and rejected rows")
    shards_gallery.add_argument("shards", help="dataset root")
    shards_gallery.add_argument("output", help="folder for index.html, pages and thumbnails")
    shards_gallery.add_argument("--page-size", type=int, default=100, help="samples per page (default: 100)")
    shards_gallery.set_defaults(func=_gallery_shards)
    run_gallery = gallery_commands.add_parser("run", help="the generations of `hyperhuman eval` with their scores")
    run_gallery.add_argument("run", help="an eval output folder (metrics.json + samples.jsonl)")
    run_gallery.add_argument("output", nargs="?", default=None, help="default: RUN/gallery")
    run_gallery.add_argument("--page-size", type=int, default=100, help="samples per page (default: 100)")
    run_gallery.set_defaults(func=_gallery_run)

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

    demo = commands.add_parser("demo", help="run the pipeline end to end on offline defaults (make demo)")
    demo.add_argument("--output", default="demo_output", help="where the demo writes (default: demo_output)")
    demo.add_argument("--data", default=None, help="your own folder of images (+ NAME.txt captions) instead")
    _add_config_options(demo, "demo")
    demo.set_defaults(func=_demo)
    return parser


# Exit status: 0 done; 1 a configuration or run-time problem the message explains (a bad key or
# value, malformed YAML, missing data, weights or files, a path that is a file where a folder is
# needed or the other way round, no permission); 2 a usage error (argparse's own); 130 interrupted
# by Ctrl-C (128 + SIGINT, as a shell reports it); 141 stdout closed before we finished writing
# (`hyperhuman shards inspect --json DATA | head`: 128 + SIGPIPE, what coreutils report). Anything
# else is a bug and keeps its traceback.
EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 1, 2, 130, 141
EXPLAINED_ERRORS = (
    ConfigError,
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    FileExistsError,
)

# What a rerun after Ctrl-C does, for the commands that keep their completed work.
RESUME_HINTS = {
    "annotate": "rerun the same command to resume (completed work is kept)",
    "eval": "rerun the same command to resume (completed work is kept)",
    "demo": "rerun the same command to resume (completed work is kept)",
    "train-lsdm": "rerun it with --resume latest to continue from the last checkpoint",
    "train-sgr": "rerun it with --resume latest to continue from the last checkpoint",
    "train-sr": "rerun it with --resume latest to continue from the last checkpoint",
    "distill": "for `distill unet`, `distill steps`, `distill vae-decoder` or `distill gan`, rerun it with --resume "
    "latest to continue from the last checkpoint (`distill edit-pairs`: rerun it; finished concepts are kept)",
    "prune": "rerun it with --resume latest to continue from the last checkpoint",
    "quantize": "for `quantize qat`, rerun it with --resume latest to continue from the last checkpoint",
}


def _describe(error: Exception) -> str:
    """One line: an OS error as "Permission denied: PATH", ours as its message."""
    if isinstance(error, OSError) and error.strerror and error.filename is not None:
        paths = error.filename if error.filename2 is None else f"{error.filename} -> {error.filename2}"
        return f"{error.strerror}: {paths}"
    return " ".join(str(error).splitlines())


def _silence_stdout() -> None:
    """After the reader of our stdout went away (``| head``): point stdout at /dev/null, so the
    interpreter's final flush of what is still buffered does not fail again and print "Exception
    ignored" (the recipe of the Python docs, "Note on SIGPIPE" in the signal module)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # usage errors exit with 2 here
    try:
        status = args.func(args)
        sys.stdout.flush()  # a closed pipe shows up here, not in the interpreter's flush at exit
        return status
    except EXPLAINED_ERRORS as error:
        print(f"hyperhuman {args.command}: error: {_describe(error)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        hint = RESUME_HINTS.get(args.command)
        print(f"hyperhuman {args.command}: interrupted" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
