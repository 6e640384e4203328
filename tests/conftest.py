"""Shared fixtures: a small synthetic MUSDB18-HQ-shaped dataset; a headless browser.

`synthetic_root` has the sizes of the `tiny` data config (configs/bsmamba2.py): ROOT/train holds
3 training tracks and 1 validation track, ROOT/test 2 tracks, 6 s each, seed 0, float32 wavs.
"""

from __future__ import annotations

import os

import pytest
from absl import flags

# Grain's multiprocessing (mp_prefetch) reads absl flags; pytest never parses them.
flags.FLAGS.mark_as_parsed()

SYNTHETIC_SIZES = {"tracks": 4, "valid_tracks": 1, "test_tracks": 2, "seconds": 6.0, "seed": 0}


@pytest.fixture(scope="session", autouse=True)
def _activity_cache_dir(tmp_path_factory):
    """Keeps the data pipeline's default activity cache inside the test session's tmp dir."""
    from bsmamba2_jax.data import activity

    old = os.environ.get(activity.CACHE_ENV)
    os.environ[activity.CACHE_ENV] = str(tmp_path_factory.mktemp("activity_cache"))
    yield
    if old is None:
        os.environ.pop(activity.CACHE_ENV, None)
    else:
        os.environ[activity.CACHE_ENV] = old


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """pathlib.Path of a synthetic MUSDB18-HQ-shaped root (read-only by convention: copy it
    before modifying)."""
    from bsmamba2_jax.data import synthetic

    return synthetic.generate_dataset(tmp_path_factory.mktemp("synthetic") / "root",
                                      **SYNTHETIC_SIZES)


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium (a Selenium WebDriver, tests/browser.py) with a fresh profile; its
    downloads land in tmp_path / "downloads". Skips, saying why, where there is none."""
    from tests import browser as chromium

    reason = chromium.skip_reason()
    if reason is not None:
        pytest.skip(reason)
    with chromium.chromium(tmp_path / "profile", tmp_path / "downloads") as driver:
        yield driver
