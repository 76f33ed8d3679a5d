"""Inference checkpoint: one safetensors file, round trip, and every refusal names the file."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from HeartCompletionLib.geometry.normalization import Normalization
from HeartCompletionLib.model.checkpoint import (
    FORMAT_VERSION,
    METADATA_KEY,
    CheckpointError,
    describe_checkpoint,
    load_inference_checkpoint,
    read_checkpoint_metadata,
    save_inference_checkpoint,
)
from HeartCompletionLib.model.checkpoint_cli import main as checkpoint_main
from HeartCompletionLib.model.configs import get_config
from HeartCompletionLib.model.vecset import HeartVecSet
from HeartCompletionLib.structures.table import StructureTable


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine OpenMP threads thrash."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def table():
    return StructureTable.default()


def trained_looking_model(table, **overrides):
    """A tiny model whose output layer is not zero, so a lost weight would change outputs."""
    torch.manual_seed(0)
    model = HeartVecSet(get_config("tiny", len(table), **overrides))
    with torch.no_grad():
        model.to_sdf.weight.normal_(0, 0.1)
        model.to_sdf.bias.normal_(0, 0.1)
    return model.eval()


def sample_inputs(k, n=96, q=40):
    g = torch.Generator().manual_seed(5)
    points = torch.rand(2, n, 3, generator=g) - 0.5
    onehot = torch.nn.functional.one_hot(torch.randint(0, k, (2, n), generator=g), k).float()
    return points, onehot, torch.rand(2, q, 3, generator=g) - 0.5


def rewrite_metadata(src, dst, edit):
    """Copy a checkpoint with its metadata JSON changed by ``edit(meta) -> meta`` (a real safetensors file)."""
    from safetensors.torch import load_file

    meta = read_checkpoint_metadata(src)
    save_file(load_file(str(src)), str(dst), metadata={METADATA_KEY: json.dumps(edit(meta))})
    return dst


@pytest.fixture()
def saved(tmp_path, table):
    model = trained_looking_model(table)
    path = save_inference_checkpoint(
        tmp_path / "run" / "phase2.safetensors",
        model,
        table,
        Normalization(scale_mm=120.0),
        phase=2,
        data_summary={"num_cases": 7, "datasets": ["imagecas"]},
        extra={"val_dice": 0.5},
        num_input_points=1024,
    )
    return path, model


# --- round trip -----------------------------------------------------------------------------------
def test_round_trip_gives_identical_outputs_and_metadata(saved, table):
    path, model = saved
    assert path.is_file() and path.suffix == ".safetensors"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left over
    ck = load_inference_checkpoint(path, expected_table=table)
    assert not ck.model.training
    assert ck.config == model.config and ck.table.is_compatible(table)
    assert ck.normalization == Normalization(scale_mm=120.0)
    assert ck.num_input_points == 1024 and ck.min_per_structure == 32
    points, onehot, queries = sample_inputs(len(table))
    with torch.no_grad():
        expected, got = model(points, onehot, queries)["sdf"], ck.model(points, onehot, queries)["sdf"]
    assert expected.abs().max() > 1e-3
    assert torch.equal(expected, got)

    meta = read_checkpoint_metadata(path)
    assert meta["format"] == "heartcompletion-checkpoint" and meta["format_version"] == FORMAT_VERSION
    assert meta["phase"] == 2 and meta["data_summary"]["num_cases"] == 7 and meta["extra"] == {"val_dice": 0.5}
    assert meta["torch_version"] == torch.__version__ and meta["created"].endswith("Z")
    assert meta["structure_table"] == table.to_dict()
    assert meta["normalization"] == {"scale_mm": 120.0, "centre_rule": "input_surface_centroid"}
    line = describe_checkpoint(meta)
    assert "phase 2" in line and "10 structures" in line and "7 training cases" in line


def test_config_variants_survive_the_round_trip(tmp_path, table):
    model = trained_looking_model(table, bottleneck="kl", latent_queries="fps", use_normals=True)
    path = save_inference_checkpoint(tmp_path / "kl.safetensors", model, table, Normalization(), 3, {})
    ck = load_inference_checkpoint(path, device="auto")
    assert ck.config == model.config
    points, onehot, queries = sample_inputs(len(table))
    normals = torch.nn.functional.normalize(points, dim=-1)
    with torch.no_grad():
        assert torch.equal(
            model(points, onehot, queries, normals)["sdf"], ck.model(points, onehot, queries, normals)["sdf"]
        )


def test_ddp_wrapped_model_is_saved_unwrapped(tmp_path, table):
    import torch.distributed as dist

    model = trained_looking_model(table)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        path = save_inference_checkpoint(tmp_path / "ddp.safetensors", ddp, table, Normalization(), 1, {})
    finally:
        dist.destroy_process_group()
    ck = load_inference_checkpoint(path)
    assert all(not k.startswith("module.") for k in ck.model.state_dict())
    assert torch.equal(ck.model.to_sdf.weight, model.to_sdf.weight)


def test_cli_shows_the_checkpoint(saved, capsys):
    path, _ = saved
    assert checkpoint_main([str(path), "--load"]) == 0
    assert "phase 2" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        checkpoint_main([str(path.with_name("absent.safetensors"))])
    assert exc.value.code == 2 and "absent.safetensors" in capsys.readouterr().err


# --- refusals -------------------------------------------------------------------------------------
def test_pickled_torch_file_is_refused(tmp_path, table):
    model = trained_looking_model(table)
    for name, obj in (("model.pt", model.state_dict()), ("disguised.safetensors", {"model": model.state_dict()})):
        path = tmp_path / name
        torch.save(obj, path)
        with pytest.raises(CheckpointError, match="pickle") as exc:
            load_inference_checkpoint(path)
        assert str(path) in str(exc.value)
    legacy = tmp_path / "legacy.pt"
    torch.save(model.state_dict(), legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="pickle"):
        read_checkpoint_metadata(legacy)


def test_other_format_version_is_refused(saved, tmp_path):
    path, _ = saved
    future = rewrite_metadata(path, tmp_path / "v2.safetensors", lambda m: {**m, "format_version": 2})
    with pytest.raises(CheckpointError, match="version 2") as exc:
        load_inference_checkpoint(future)
    assert str(future) in str(exc.value)


def test_other_class_table_is_refused_listing_both(saved, table):
    path, _ = saved
    entries = table.to_dict()["structures"]
    swapped = [dict(e) for e in entries]  # LA and RA trade places: same K, other outputs
    swapped[1], swapped[3] = {**entries[3], "label": 2}, {**entries[1], "label": 4}
    for other in (
        StructureTable.from_dict({"name": "swapped", "structures": swapped}),
        StructureTable.from_dict({"name": "ext", "structures": entries + [{"label": 11, "name": "SVC"}]}),
    ):
        with pytest.raises(CheckpointError) as exc:
            load_inference_checkpoint(path, expected_table=other)
        message = str(exc.value)
        assert str(path) in message and str(table.names) in message and str(other.names) in message


def test_truncated_file_is_refused(saved, tmp_path):
    path, _ = saved
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    for cut in (len(data) - 100, 8 + header_len // 2, 5):
        short = tmp_path / f"cut{cut}.safetensors"
        short.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated|not a safetensors") as exc:
            load_inference_checkpoint(short)
        assert str(short) in str(exc.value)


def test_garbled_or_foreign_files_are_refused(saved, tmp_path):
    path, _ = saved
    tensors = {"w": torch.zeros(3)}
    cases = {
        "foreign.safetensors": None,  # a safetensors file of someone else's model
        "garbled.safetensors": {METADATA_KEY: "{not json"},
        "missing.safetensors": {
            METADATA_KEY: json.dumps({"format": "heartcompletion-checkpoint", "format_version": 1})
        },
    }
    for name, metadata in cases.items():
        save_file(tensors, str(tmp_path / name), metadata=metadata)
        with pytest.raises(CheckpointError) as exc:
            load_inference_checkpoint(tmp_path / name)
        assert str(tmp_path / name) in str(exc.value)
    noise = tmp_path / "noise.safetensors"
    noise.write_bytes(bytes(range(256)) * 10)
    with pytest.raises(CheckpointError, match="not a safetensors"):
        read_checkpoint_metadata(noise)
    with pytest.raises(CheckpointError, match="no such"):
        read_checkpoint_metadata(tmp_path / "absent.safetensors")
    bad_table = rewrite_metadata(path, tmp_path / "badtable.safetensors", lambda m: {**m, "structure_table": {"x": 1}})
    with pytest.raises(CheckpointError, match="garbled"):
        load_inference_checkpoint(bad_table)


def test_weights_that_do_not_match_the_config_are_refused(saved, tmp_path):
    path, _ = saved

    def wider(meta):
        meta["model_config"]["width"] = 128
        return meta

    wrong = rewrite_metadata(path, tmp_path / "wider.safetensors", wider)
    with pytest.raises(CheckpointError, match="weights do not match") as exc:
        load_inference_checkpoint(wrong)
    assert str(wrong) in str(exc.value)


def test_failed_save_leaves_the_old_file_intact(saved, table):
    path, model = saved
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match="JSON"):
        save_inference_checkpoint(path, model, table, Normalization(), 2, {"bad": object()})
    with pytest.raises(CheckpointError, match="structures"):
        save_inference_checkpoint(path, HeartVecSet(get_config("tiny", 9)), table, Normalization(), 2, {})
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_reading_metadata_does_not_import_torch(saved):
    """The Slicer panel shows checkpoint details before PyTorch is installed."""
    import subprocess
    import sys

    path, _ = saved
    code = (
        "import sys; from HeartCompletionLib.model.checkpoint import read_checkpoint_metadata, describe_checkpoint; "
        f"print(describe_checkpoint(read_checkpoint_metadata({str(path)!r}))); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "phase 2" in out and out.strip().endswith("False")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when CUDA is absent")
def test_cuda_without_cuda_is_a_clear_error(saved):
    path, _ = saved
    with pytest.raises(ValueError, match="CUDA is not available"):
        load_inference_checkpoint(path, device="cuda")


def test_saved_file_follows_the_umask(saved):
    """Readable by the team like any file the user writes (a temp-file helper must not make it 0600)."""
    import os

    path, _ = saved
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
