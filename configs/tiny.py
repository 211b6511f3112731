"""Tiny: seconds per run on 2 CPU cores; used by tests and demos (the built-in default)."""

from jaxckpt.config import Config


def get_config() -> Config:
    return Config()
