"""Shared pytest configuration. Area-specific fixtures live in ``Testing/fixtures_*.py`` and are
re-exported here so every test file sees them."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

# Keep the 2-core CI machine responsive and results reproducible.
os.environ.setdefault("OMP_NUM_THREADS", "2")
# The data gate caches verdicts by file hash; tests keep that cache out of the user's home.
os.environ.setdefault("HEARTCOMPLETION_CACHE_DIR", tempfile.mkdtemp(prefix="hc-test-cache-"))

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
# The Slicer module's own package (HeartCompletion/HeartCompletionModule) imports as in Slicer,
# which puts the module's folder on sys.path.
sys.path.append(str(REPO_ROOT / "HeartCompletion"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_real_cases() -> list[Path]:
    """Real label maps under ``../shared/data/real/``; skips when there are none."""
    real = SHARED_DATA_DIR / "real"
    if not real.is_dir():
        pytest.skip(f"no real label maps: {real} is absent (see ../shared/data/README.md)")
    suffixes = (".nii", ".nii.gz", ".nrrd")
    cases = sorted(p for p in real.rglob("*") if p.is_file() and p.name.lower().endswith(suffixes))
    if not cases:
        pytest.skip(f"no real label maps found under {real}")
    return cases


#: Fixtures that make every test using them slow: the session's tiny model is trained for about two
#: minutes of one CPU core before its first user runs. Such tests are marked ``slow`` here, in one
#: place, so the fast tier (``bash scripts/test.sh --fast`` = ``-m "not slow"``) never trains it.
SLOW_FIXTURES = frozenset({"tiny_training_run", "tiny_checkpoint"})


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


# Area fixtures (one file per area, owned by that area's tests).
from fixtures_data import *  # noqa: E402,F401,F403
from fixtures_training import *  # noqa: E402,F401,F403
