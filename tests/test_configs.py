"""Every shipped config is loaded and checked by its own recipe's checks; the recipes share one
vocabulary; every key a recipe reads is documented in its config, so `--set` can set it."""

import pytest

from hyperhuman.config import ConfigError, available_configs, documented_keys, load_config


def check_lsdm(config):
    from hyperhuman.lsdm.train import check_config

    check_config(config, check_paths=False)


def check_sgr(config):
    from hyperhuman.sgr.train import check_config

    check_config(config, check_paths=False)


def check_sr(config):
    from hyperhuman.sr.train import check_config

    check_config(config, check_paths=False)


def check_vae(config):
    from hyperhuman.vae import check_vae_config

    check_vae_config(config, check_paths=False)


def check_eval(config):
    from hyperhuman.eval.evaluate import check_eval_config

    check_eval_config(config)


def check_annotate(config):
    from pipelines.job import check_job_config

    check_job_config(config)


def check_shards(config):
    from hyperhuman.cli import SHARDS_KEYS
    from hyperhuman.config import check_known_keys

    check_known_keys(config, SHARDS_KEYS, "configs/shards.yaml")
    assert set(config) == set(SHARDS_KEYS)


def check_distill_unet(config):
    from distill.kd import check_config

    check_config(config, check_paths=False)


def check_distill_steps(config):
    from distill.steps import check_config

    check_config(config, check_paths=False)


def check_distill_vae_decoder(config):
    from distill.vae_decoder import check_config

    check_config(config, check_paths=False)


def check_distill_edit_pairs(config):
    from distill.e2gan.pairs import check_config

    check_config(config, check_paths=False)


def check_distill_gan(config):
    from distill.e2gan.train import check_config

    check_config(config, check_paths=False)


def check_distill_gan_concept(config):
    from distill.e2gan.concept import check_config

    check_config(config, check_paths=False)


def check_distill_gan_search(config):
    from distill.e2gan.search_train import check_config

    check_config(config, check_paths=False)


def check_distill_annotator(config):
    from distill.annotator_student.train import check_config

    check_config(config, check_paths=False)


def check_prune(config):
    from distill.prune import check_config

    check_config(config, check_paths=False)


def check_quantize_ptq(config):
    from distill.quantize import check_ptq_config

    check_ptq_config(config, check_paths=False)


def check_quantize_qat(config):
    from distill.quant.qat import check_config

    check_config(config, check_paths=False)


def check_demo(config):
    """Each stage's config with the demo's overrides passes that stage's own checks."""
    from hyperhuman.config import apply_overrides

    for stage, check in (("job", check_annotate), ("vae", check_vae), ("lsdm", check_lsdm), ("eval", check_eval)):
        check(load_config(config[f"{stage}_config"], config.get(f"{stage}_overrides", [])))
    assert apply_overrides(config, [])  # the demo's own keys parse


CHECKS = {
    "lsdm/": check_lsdm,
    "sgr/": check_sgr,
    "sr/": check_sr,
    "vae/": check_vae,
    "eval/": check_eval,
    "annotate/": check_annotate,
    "distill/unet": check_distill_unet,
    "distill/steps": check_distill_steps,
    "distill/vae-decoder": check_distill_vae_decoder,
    "distill/edit-pairs": check_distill_edit_pairs,
    "distill/gan-concept": check_distill_gan_concept,  # before "distill/gan", which it starts with
    "distill/gan-search": check_distill_gan_search,  # the same
    "distill/gan": check_distill_gan,
    "distill/pose-student": check_distill_annotator,
    "prune/": check_prune,
    "quantize/ptq": check_quantize_ptq,
    "quantize/qat": check_quantize_qat,
    "shards": check_shards,
    "demo": check_demo,
}


def checker_for(name: str):
    found = [check for prefix, check in CHECKS.items() if name == prefix or name.startswith(prefix)]
    assert found, f"configs/{name}.yaml has no recipe check in tests/test_configs.py: add one"
    return found[0]


def test_configs_are_found():
    names = available_configs()
    assert {"lsdm/tiny", "lsdm/sd2-base-512", "sgr/tiny", "vae/tiny", "annotate/offline", "demo"} <= set(names)


@pytest.mark.parametrize("name", available_configs())
def test_every_config_passes_its_recipes_own_checks(name):
    config = load_config(name)
    checker_for(name)(config)


def recipe_schemas():
    from distill.annotator_student.train import KNOWN_KEYS as DISTILL_ANNOTATOR
    from distill.e2gan.concept import KNOWN_KEYS as DISTILL_GAN_CONCEPT
    from distill.e2gan.pairs import KNOWN_KEYS as DISTILL_EDIT_PAIRS
    from distill.e2gan.search_train import KNOWN_KEYS as DISTILL_GAN_SEARCH
    from distill.e2gan.train import KNOWN_KEYS as DISTILL_GAN
    from distill.kd import KNOWN_KEYS as DISTILL_UNET
    from distill.quant.qat import KNOWN_KEYS as QUANTIZE_QAT
    from distill.quantize import KNOWN_KEYS as QUANTIZE_PTQ
    from distill.steps import KNOWN_KEYS as DISTILL_STEPS
    from distill.vae_decoder import KNOWN_KEYS as DISTILL_VAE_DECODER
    from hyperhuman.lsdm.train import KNOWN_KEYS as LSDM
    from hyperhuman.sgr.train import KNOWN_KEYS as SGR
    from hyperhuman.sr.train import KNOWN_KEYS as SR
    from hyperhuman.vae import KNOWN_KEYS as VAE

    return {
        "lsdm/tiny": LSDM,
        "sgr/tiny": SGR,
        "sr/tiny": SR,
        "vae/tiny": VAE,
        "distill/unet-tiny": DISTILL_UNET,
        "distill/steps-tiny": DISTILL_STEPS,
        "distill/vae-decoder-tiny": DISTILL_VAE_DECODER,
        "distill/edit-pairs-tiny": DISTILL_EDIT_PAIRS,
        "distill/gan-tiny": DISTILL_GAN,
        "distill/gan-concept-tiny": DISTILL_GAN_CONCEPT,
        "distill/gan-search-tiny": DISTILL_GAN_SEARCH,
        "distill/pose-student": DISTILL_ANNOTATOR,
        "quantize/ptq-tiny": QUANTIZE_PTQ,
        "quantize/qat-tiny": QUANTIZE_QAT,
    }


RECIPE_CONFIGS = ["lsdm/tiny", "sgr/tiny", "sr/tiny", "vae/tiny", "distill/unet-tiny", "distill/steps-tiny",
                  "distill/vae-decoder-tiny", "quantize/ptq-tiny", "quantize/qat-tiny", "distill/edit-pairs-tiny",
                  "distill/gan-tiny", "distill/gan-concept-tiny", "distill/gan-search-tiny",
                  "distill/pose-student"]  # fmt: skip


@pytest.mark.parametrize("name", RECIPE_CONFIGS)
def test_the_recipes_config_documents_every_key_the_recipe_reads(name):
    config = load_config(name)
    undocumented = []
    for dotted in documented_keys(recipe_schemas()[name]):
        node = config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                undocumented.append(dotted)
                break
            node = node[part]
    assert not undocumented, f"configs/{name}.yaml lacks {undocumented}: `--set` cannot reach them"


def test_one_vocabulary_across_the_training_recipes():
    distill = ("distill/unet-tiny", "distill/steps-tiny", "distill/vae-decoder-tiny")
    for name in ("lsdm/tiny", "sgr/tiny", "sr/tiny", "vae/tiny", *distill):
        config = load_config(name)
        assert isinstance(config["seed"], int), name
        for key in ("batch_size", "max_train_steps", "learning_rate"):
            assert key in config["train"], (name, key)


def test_set_reaches_optional_keys_and_unknown_keys_fail_at_start():
    from hyperhuman.lsdm.train import check_config

    config = load_config("lsdm/tiny", ["train.adam_beta2=0.99", "scheduler.beta_end=0.02"])
    assert config["train"]["adam_beta2"] == 0.99 and config["scheduler"]["beta_end"] == 0.02
    config["train"]["learning_rat"] = 1e-4  # a typo in a hand-written config
    with pytest.raises(ConfigError, match=r"unknown config key 'train.learning_rat'.*'learning_rate'"):
        check_config(config, check_paths=False)
