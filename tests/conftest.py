"""Shared fixtures: one tiny model and small data sets, built once per test session."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Path of a tiny random Qwen3-VL folder (model, tokenizer, processor), built offline."""
    from mgsd import tiny

    return str(tiny.build_model(tmp_path_factory.mktemp("tiny") / "model", size="tiny", seed=0))


@pytest.fixture(scope="session")
def make_data(tmp_path_factory):
    """make_data(split, per_level, tasks=None, levels=None, kinds=(...), image_size=128) -> data dir.

    Cached per argument set, so tests that ask for the same split share one directory."""
    from mgsd import splits

    cache = {}

    def make(split, per_level, tasks=None, levels=None, kinds=("planning", "perception"), image_size=128):
        key = (split, per_level, tuple(tasks or ()), tuple(levels or ()), tuple(kinds), image_size)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"data-{split}")
            cache[key] = str(splits.make_split(out, split, per_level, tasks=tasks, levels=levels, kinds=kinds,
                                             image_size=image_size))
        return cache[key]

    return make
