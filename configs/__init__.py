"""The YAML configs, installed as package data of ``hyperhuman.configs`` (see ``setup.py``);
``hyperhuman.config.load_config`` reads them through ``importlib.resources``."""
