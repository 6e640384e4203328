"""Run configs as Python files (`get_config(variant)`), as train.py's --config takes them."""

from __future__ import annotations

import importlib.util

import ml_collections


def load_config(spec: str) -> ml_collections.ConfigDict:
    """"path/to/config.py[:variant]" -> that file's get_config(variant), as train.py's --config."""
    path, _, variant = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("run_config", path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"config {spec!r}: {path} is not a Python config file "
                         "(e.g. configs/bsmamba2.py or configs/bsroformer.py:tiny)")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variant)
