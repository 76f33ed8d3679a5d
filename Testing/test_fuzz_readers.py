"""Fuzz the readers (issue 14): a seeded loop of header and byte mutations of NIfTI, NRRD,
.seg.nrrd, .npz and .safetensors files (``benchmarks/fuzz_readers.py``, which runs the long
version with ``--count``). Every result is a correct load or the project's own error naming the
file; numpy never allocates more than the file could justify (``tracemalloc``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _fuzz_module():
    spec = importlib.util.spec_from_file_location("fuzz_readers", ROOT / "benchmarks" / "fuzz_readers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("seed", [7])
@pytest.mark.slow
def test_mutated_files_load_correctly_or_are_refused_naming_the_file(tmp_path, seed):
    fuzz = _fuzz_module()
    result = fuzz.fuzz(480, seed=seed, folder=tmp_path, progress=False)
    failures = "\n".join(f"#{f['index']} {f['kind']} ({f['mutation']}): {f['outcome']}: {f['problem']}"
                         for f in result["failures"])
    assert not result["failures"], f"fuzz seed {seed}:\n{failures}"
    # the mutations reach both outcomes for every kind (a fuzzer that never breaks a file tests nothing)
    for kind, counter in result["by_kind"].items():
        assert counter["refused"] >= 10 and counter["loaded"] >= 1, (kind, dict(counter))
    assert sum(result["outcomes"].values()) == 480


def test_a_header_promising_gigabytes_costs_no_memory(tmp_path):
    """The memory rule itself: a 1 KB .npz member header claiming 10^12 values is refused cheaply."""
    import tracemalloc

    import numpy as np
    from heart_training.data.case_format import CaseFormatError, load_case

    fuzz = _fuzz_module()
    seeds = fuzz.make_seeds(tmp_path / "seeds")
    raw = seeds[".npz"]
    i = raw.index(b"'shape': (") + len(b"'shape': (")
    end = raw.index(b")", i)
    claim = b"1000000000000, 3"[: end - i].ljust(end - i)
    path = tmp_path / "claims.npz"
    path.write_bytes(raw[:i] + claim + raw[end:])
    tracemalloc.start()
    with pytest.raises(CaseFormatError, match="claims.npz"):
        load_case(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 32e6 and np.isfinite(peak)
