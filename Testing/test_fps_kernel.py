"""The CUDA farthest-point kernel (HeartCompletionLib.model.fps_kernel) and when it is used.

CI has no GPU, so the kernel runs through Triton's interpreter on the CPU (``TRITON_INTERPRET=1``,
read when the kernel is defined, hence a fresh process): the same program, with numpy doing the
arithmetic. It must give the eager loop's indices, ties included. On the GPU,
``benchmarks/fps_speed.py`` checks the compiled kernel the same way (``gpu_check.sh`` part ``fps``).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from HeartCompletionLib.model import vecset

_CHECK = textwrap.dedent("""
    import torch
    from HeartCompletionLib.model.vecset import _farthest_point_indices_eager, _farthest_point_indices_kernel

    g = torch.Generator().manual_seed(3)
    grid = torch.stack(torch.meshgrid(*[torch.arange(5.0)] * 3, indexing="ij"), -1).reshape(1, -1, 3)
    cases = {
        "random, N not a power of two": (torch.rand(3, 300, 3, generator=g), 40),
        "every point (m = N)": (torch.rand(2, 37, 3, generator=g), 37),
        "a grid: exact ties everywhere": (torch.cat([grid, grid[:, torch.randperm(125, generator=g)]]), 60),
        "float64, non-contiguous input": (torch.rand(2, 3, 200, generator=g, dtype=torch.float64).transpose(1, 2), 25),
    }
    for name, (points, m) in cases.items():
        got = _farthest_point_indices_kernel(points, m)  # what the CUDA dispatch calls
        want = _farthest_point_indices_eager(points, m)
        assert got.dtype == torch.long and got.shape == want.shape, name
        assert torch.equal(got, want), (name, got, want)
        print("same:", name)
""")


@pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.machine() == "x86_64"),
                    reason="Triton is installed with the tests on Linux x86-64 only")
def test_kernel_gives_the_eager_indices_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", _CHECK], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("same:") == 4


def test_kernel_is_chosen_by_size_switch_installation_and_gpu(monkeypatch):
    found = []
    monkeypatch.setattr(vecset.importlib.util, "find_spec", lambda name: found.append(name) or object())
    monkeypatch.setattr(vecset.torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.delenv(vecset.FPS_TRITON_ENV, raising=False)
    assert vecset.fps_triton_usable(2048)
    assert vecset.fps_triton_usable(vecset.FPS_KERNEL_MAX_POINTS)
    assert not vecset.fps_triton_usable(vecset.FPS_KERNEL_MAX_POINTS + 1)  # the CUDA graph takes those
    for off in ("0", "false", "OFF", " no "):
        monkeypatch.setenv(vecset.FPS_TRITON_ENV, off)
        assert not vecset.fps_triton_usable(2048)
    monkeypatch.setenv(vecset.FPS_TRITON_ENV, "1")
    monkeypatch.setattr(vecset.torch.cuda, "get_device_capability", lambda device=None: (6, 1))  # a Pascal card
    assert not vecset.fps_triton_usable(2048)
    monkeypatch.setattr(vecset.importlib.util, "find_spec", lambda name: None)  # Triton not installed
    assert not vecset.fps_triton_usable(2048)
    assert found == ["triton", "triton", "triton"]


def test_the_model_asks_for_the_kernel_in_training_only(monkeypatch):
    """A completion samples once or twice per process: Triton's import and the kernel's compile would
    cost it more than the kernel saves, so an eval-mode encode keeps the CUDA graph."""
    import torch

    from HeartCompletionLib.model.configs import get_config

    asked = []
    real = vecset._farthest_point_indices

    def spy(points, m, kernel=True):
        asked.append(kernel)
        return real(points, m, kernel)

    monkeypatch.setattr(vecset, "_farthest_point_indices", spy)
    model = vecset.HeartVecSet(get_config("tiny", 10))
    points, onehot = torch.rand(2, 64, 3), torch.eye(10)[torch.randint(0, 10, (2, 64))]
    model.train().encode(points, onehot)
    model.eval().encode(points, onehot)
    assert asked == [True, False]


def test_cpu_sampling_never_imports_triton():
    code = ("import sys, torch; from HeartCompletionLib.model.vecset import farthest_point_indices; "
            "farthest_point_indices(torch.rand(2, 100, 3), 10); print('triton' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "False"
