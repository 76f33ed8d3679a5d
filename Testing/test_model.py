"""HeartVecSet and its named configs: shapes, zero init, invariances, real optimiser steps."""

from __future__ import annotations

import math

import pytest
import torch

from HeartCompletionLib.model.configs import CONFIG_NAMES, ModelConfig, count_parameters, get_config
from HeartCompletionLib.model.configs_cli import main as configs_main
from HeartCompletionLib.model.vecset import (
    FPS_CUDA_GRAPH_ENV,
    FPS_TRITON_ENV,
    HeartVecSet,
    _farthest_point_indices_eager,
    farthest_point_indices,
    fps_cuda_graph_enabled,
)

K = 10


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine OpenMP threads thrash."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def sphere_sample(batch: int = 1, n: int = 256, q: int = 384, k: int = K, seed: int = 0):
    """K spheres (one per structure) in network units: encoder points on their surfaces with
    outward normals and one-hot, random queries with the exact signed distance to every sphere
    (negative inside)."""
    g = torch.Generator().manual_seed(seed)
    centres = (torch.rand(batch, k, 3, generator=g) - 0.5) * 0.8
    radii = 0.1 + 0.15 * torch.rand(batch, k, generator=g)
    labels = torch.randint(0, k, (batch, n), generator=g)
    normals = torch.nn.functional.normalize(torch.randn(batch, n, 3, generator=g), dim=-1)
    c = torch.gather(centres, 1, labels[..., None].expand(-1, -1, 3))
    r = torch.gather(radii, 1, labels)[..., None]
    points = c + r * normals
    onehot = torch.nn.functional.one_hot(labels, k).float()
    queries = (torch.rand(batch, q, 3, generator=g) - 0.5) * 1.2
    sdf = (queries[:, :, None, :] - centres[:, None]).norm(dim=-1) - radii[:, None]
    return points, onehot, normals, queries, sdf


@pytest.fixture(scope="module")
def tiny_eval():
    torch.manual_seed(0)
    model = HeartVecSet(get_config("tiny", K))
    # zero-init output would make every invariance test trivially pass: perturb it
    with torch.no_grad():
        model.to_sdf.weight.normal_(0, 0.1)
        model.to_sdf.bias.normal_(0, 0.1)
    return model.eval()


# --- configs --------------------------------------------------------------------------------
def test_qk_norm_normalises_each_heads_queries_and_keys_and_old_configs_load_without_it():
    cfg = get_config("tiny", K, qk_norm=True)
    model = HeartVecSet(cfg)
    head_dim = cfg.width // cfg.heads
    norms = [m for name, m in model.named_modules() if name.endswith(("q_norm", "k_norm"))]
    assert len(norms) == 2 * (cfg.depth + 2) and all(n.normalized_shape == (head_dim,) for n in norms)
    plain = HeartVecSet(get_config("tiny", K))
    assert not any(name.endswith(("q_norm.weight", "k_norm.weight")) for name, _ in plain.named_parameters())
    # a checkpoint written before the field existed has no "qk_norm": it rebuilds the plain model
    legacy = {key: value for key, value in get_config("tiny", K).to_dict().items() if key != "qk_norm"}
    assert ModelConfig.from_dict(legacy).qk_norm is False


def test_config_round_trip_and_validation():
    cfg = get_config("small", 16, bottleneck="kl", latent_queries="fps")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.num_classes == 16 and cfg.bottleneck == "kl"
    with pytest.raises(ValueError, match="unknown field"):
        ModelConfig.from_dict({**cfg.to_dict(), "widht": 3})
    with pytest.raises(ValueError, match="divisible"):
        get_config("tiny", K, width=66)
    with pytest.raises(ValueError, match="bottleneck"):
        get_config("tiny", K, bottleneck="vq")
    with pytest.raises(ValueError, match="unknown model config"):
        get_config("huge", K)


def test_parameter_counts_in_stated_ranges(capsys):
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        counts = {name: count_parameters(HeartVecSet(get_config(name, K))) for name in CONFIG_NAMES}
    assert counts["tiny"] < 1_000_000
    assert 1_000_000 <= counts["compact"] <= 2_000_000
    assert 1_000_000 <= counts["small"] <= 30_000_000
    assert 20_000_000 <= counts["base"] <= 100_000_000
    assert counts["tiny"] < counts["compact"] < counts["small"] < counts["base"]
    assert configs_main(["--names", "tiny"]) == 0
    assert f"{counts['tiny']:,d}" in capsys.readouterr().out


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_shapes_and_zero_init_for_each_config(name):
    torch.manual_seed(0)
    model = HeartVecSet(get_config(name, K))
    batch = 1 if name == "base" else 2  # base's trunk alone is ~20 GFLOP per sample
    # fps latent queries (the named configs' default) need at least num_latents input points
    points, onehot, _, queries, sdf = sphere_sample(batch=batch, n=max(32, model.config.num_latents), q=17)
    with torch.no_grad():
        latents, kl = model.encode(points, onehot)
        out = model(points, onehot, queries)
    cfg = model.config
    assert latents.shape == (batch, cfg.num_latents, cfg.width)
    assert out["sdf"].shape == (batch, 17, K) and out["sdf"].dtype == torch.float32
    assert kl.shape == () and float(kl) == 0.0
    # zero-initialised output layer: exactly 0, so the first L1 loss is the mean |target|
    assert torch.count_nonzero(out["sdf"]) == 0
    assert torch.equal((out["sdf"] - sdf).abs().mean(), sdf.abs().mean())


# --- invariances ------------------------------------------------------------------------------
@pytest.mark.parametrize("queries_kind", ["learned", "fps", "learned+qk_norm"])
def test_permutation_invariant_to_input_point_order(tiny_eval, queries_kind):
    model = tiny_eval
    if queries_kind != "fps":  # tiny_eval: the named tiny config, fps latent queries
        torch.manual_seed(1)
        overrides = {"latent_queries": "learned", "qk_norm": queries_kind.endswith("qk_norm")}
        model = HeartVecSet(get_config("tiny", K, **overrides)).eval()
        with torch.no_grad():
            model.to_sdf.weight.normal_(0, 0.1)
    points, onehot, _, queries, _ = sphere_sample(batch=2, n=200)
    perm = torch.randperm(points.shape[1], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = model(points, onehot, queries)["sdf"]
        b = model(points[:, perm], onehot[:, perm], queries)["sdf"]
    assert a.abs().max() > 1e-3  # not trivially zero
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_eval_deterministic_and_batch_independent(tiny_eval):
    points, onehot, _, queries, _ = sphere_sample(batch=3, n=128, q=50)
    with torch.no_grad():
        batched = tiny_eval(points, onehot, queries)["sdf"]
        again = tiny_eval(points, onehot, queries)["sdf"]
        alone = torch.cat(
            [tiny_eval(points[i : i + 1], onehot[i : i + 1], queries[i : i + 1])["sdf"] for i in range(3)]
        )
    assert torch.equal(batched, again)
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    # the samples differ, so a batch mix-up would show
    assert (batched[0] - batched[1]).abs().max() > 1e-3


def test_chunked_decode_equals_unchunked(tiny_eval):
    points, onehot, _, queries, _ = sphere_sample(batch=2, n=128, q=1000)
    with torch.no_grad():
        latents, _ = tiny_eval.encode(points, onehot)
        whole = tiny_eval.decode(latents, queries, chunk_size=None)
        chunked = tiny_eval.decode(latents, queries, chunk_size=97)
    assert chunked.shape == (2, 1000, K)
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="chunk_size"):
        tiny_eval.decode(latents, queries, chunk_size=0)


# --- bottlenecks and inputs ---------------------------------------------------------------
def test_kl_bottleneck_positive_in_training_and_mean_at_eval():
    torch.manual_seed(0)
    model = HeartVecSet(get_config("tiny", K, bottleneck="kl"))
    with torch.no_grad():
        model.to_sdf.weight.normal_(0, 0.1)
    points, onehot, _, queries, _ = sphere_sample(batch=2, n=128, q=20)
    model.train()
    with torch.no_grad():
        out1, out2 = model(points, onehot, queries), model(points, onehot, queries)
    assert float(out1["kl"]) > 0 and math.isfinite(float(out1["kl"]))
    assert not torch.equal(out1["sdf"], out2["sdf"])  # sampled in training
    model.eval()
    with torch.no_grad():
        e1, e2 = model(points, onehot, queries), model(points, onehot, queries)
        # at eval the bottleneck passes the mean: identical to up(mean) by hand
        pre = torch.randn(2, 5, model.config.width)
        mean = model.bottleneck.down(pre).chunk(2, dim=-1)[0]
        by_hand = model.bottleneck.up(mean)
        via_module, kl = model.bottleneck(pre)
    assert torch.equal(e1["sdf"], e2["sdf"])
    assert float(e1["kl"]) > 0
    torch.testing.assert_close(via_module, by_hand)


def test_normals_are_used_when_configured():
    torch.manual_seed(0)
    model = HeartVecSet(get_config("tiny", K, use_normals=True)).eval()
    with torch.no_grad():
        model.to_sdf.weight.normal_(0, 0.1)
    points, onehot, normals, queries, _ = sphere_sample(n=64, q=10)
    with torch.no_grad():
        a = model(points, onehot, queries, normals=normals)["sdf"]
        b = model(points, onehot, queries, normals=-normals)["sdf"]
    assert (a - b).abs().max() > 1e-4
    with pytest.raises(ValueError, match="use_normals"):
        model(points, onehot, queries)


def test_bad_input_shapes_are_refused(tiny_eval):
    points, onehot, _, queries, _ = sphere_sample(n=32, q=4)
    with pytest.raises(ValueError, match="onehot"):
        tiny_eval(points, onehot[..., :9], queries)
    with pytest.raises(ValueError, match="points_n"):
        tiny_eval(points[0], onehot, queries)
    with pytest.raises(ValueError, match="queries_n"):
        tiny_eval(points, onehot, queries[..., :2])


def test_farthest_point_sampling_is_deterministic_and_spread():
    g = torch.Generator().manual_seed(0)
    points = torch.rand(2, 300, 3, generator=g)
    idx = farthest_point_indices(points, 16)
    assert idx.shape == (2, 16)
    assert all(len(set(row.tolist())) == 16 for row in idx)
    assert torch.equal(idx, farthest_point_indices(points, 16))
    first = (points - points.mean(1, keepdim=True)).norm(dim=-1).argmax(1)
    assert torch.equal(idx[:, 0], first)
    with pytest.raises(ValueError, match="at least 16"):
        farthest_point_indices(points[:, :10], 16)


def test_fps_cuda_graph_switch(monkeypatch):
    monkeypatch.delenv(FPS_CUDA_GRAPH_ENV, raising=False)
    assert fps_cuda_graph_enabled()
    for off in ("0", "false", "OFF", " no "):
        monkeypatch.setenv(FPS_CUDA_GRAPH_ENV, off)
        assert not fps_cuda_graph_enabled()
    monkeypatch.setenv(FPS_CUDA_GRAPH_ENV, "1")
    assert fps_cuda_graph_enabled()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA graph path needs a CUDA device")
@pytest.mark.parametrize("triton_kernel", ["0", "1"])  # the CUDA graph, then the Triton kernel where installed
def test_fps_cuda_graph_gives_the_eager_indices(monkeypatch, triton_kernel):
    monkeypatch.setenv(FPS_CUDA_GRAPH_ENV, "1")
    monkeypatch.setenv(FPS_TRITON_ENV, triton_kernel)
    g = torch.Generator().manual_seed(1)
    for b, n in ((4, 500), (2, 700), (4, 500)):  # a second shape, then the first graph again
        points = torch.rand(b, n, 3, generator=g).cuda()
        assert torch.equal(farthest_point_indices(points, 32), _farthest_point_indices_eager(points, 32))


def test_bf16_autocast_runs_and_stays_close_to_fp32(tiny_eval):
    points, onehot, _, queries, _ = sphere_sample(n=64, q=32)
    with torch.no_grad():
        ref = tiny_eval(points, onehot, queries)["sdf"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = tiny_eval(points, onehot, queries)["sdf"]
    assert low.dtype == torch.float32
    assert (low - ref).abs().max() < 0.05 * ref.abs().max() + 1e-3


# --- real training steps --------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [{}, {"bottleneck": "kl"}, {"qk_norm": True, "latent_queries": "learned"}])
def test_optimiser_steps_reduce_the_loss(overrides):
    torch.manual_seed(0)
    model = HeartVecSet(get_config("tiny", K, **overrides)).train()
    points, onehot, _, queries, sdf = sphere_sample(n=128, q=256)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(20):
        out = model(points, onehot, queries)
        loss = (out["sdf"] - sdf).abs().mean() + 1e-4 * out["kl"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(float(sdf.abs().mean()), rel=1e-3)
    assert losses[-1] < 0.6 * losses[0]
    # every parameter takes part (after step 1 the zero output layer lets gradients through)
    silent = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert silent == []
