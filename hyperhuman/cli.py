"""The ``hyperhuman`` console script: one subcommand per pipeline stage.

Each subcommand reads a YAML config from ``configs/`` (``--config`` picks another file) and
takes ``--set key=value`` overrides. Heavy imports happen inside the commands so that
``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from hyperhuman.cli_distill import add_commands as add_distill_commands
from hyperhuman.cli_options import add_config_options, add_resume_option
from hyperhuman.config import ConfigError, check_known_keys, load_config

SHARDS_KEYS = {
    "writer": dict.fromkeys(["max_samples", "max_bytes", "jpeg_quality"]),
    "pack": dict.fromkeys(["extensions", "partition"]),
    "validate": {"decode": None},
    "inspect": {"max_keys": None},
}


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
    add_config_options(pack, "shards")
    pack.set_defaults(func=_shards_pack)

    validate = shard_commands.add_parser("validate", help="check every shard; exit 1 on any problem")
    validate.add_argument("path", help="dataset root")
    add_config_options(validate, "shards")
    validate.set_defaults(func=_shards_validate)

    inspect = shard_commands.add_parser("inspect", help="counts, sizes, annotator versions, example keys")
    inspect.add_argument("path", help="dataset root")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    add_config_options(inspect, "shards")
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
    add_config_options(annotate, "annotate/offline")
    annotate.set_defaults(func=_annotate)

    train_vae = commands.add_parser("train-vae", help="train the small offline VAE on shards (all modalities)")
    add_config_options(train_vae, "vae/tiny")
    train_vae.set_defaults(func=_train_vae)

    lsdm_stats = commands.add_parser(
        "lsdm-stats", help="per-modality latent shift/scale for the LSDM, computed from shards through the VAE"
    )
    lsdm_stats.add_argument("--output", default=None, help="JSON file to write (default: OUTPUT/latent_stats.json)")
    add_config_options(lsdm_stats, "lsdm/tiny")
    lsdm_stats.set_defaults(func=_lsdm_stats)

    train_lsdm = commands.add_parser("train-lsdm", help="train the Latent Structural Diffusion Model on shards")
    add_resume_option(train_lsdm)
    add_config_options(train_lsdm, "lsdm/tiny")
    train_lsdm.set_defaults(func=_train_lsdm)

    train_sgr = commands.add_parser("train-sgr", help="train the Structure-Guided Refiner on shards (base UNet frozen)")
    add_resume_option(train_sgr)
    add_config_options(train_sgr, "sgr/tiny")
    train_sgr.set_defaults(func=_train_sgr)

    train_sr = commands.add_parser("train-sr", help="train the WDSR-style ×2 super-resolution network on shard RGB")
    add_resume_option(train_sr)
    add_config_options(train_sr, "sr/tiny")
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
    add_config_options(evaluate, "eval/default")
    evaluate.set_defaults(func=_eval)

    add_distill_commands(commands)  # distill, prune, quantize, edit

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

    demo = commands.add_parser("demo", help="run the pipeline end to end on offline defaults (make demo)")
    demo.add_argument("--output", default="demo_output", help="where the demo writes (default: demo_output)")
    demo.add_argument("--data", default=None, help="your own folder of images (+ NAME.txt captions) instead")
    add_config_options(demo, "demo")
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
