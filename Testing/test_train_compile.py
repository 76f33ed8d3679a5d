"""``run.compile=true``: the trainer compiles the model's attention blocks, or with
``run.compile_scope=model`` the whole model, in place (:func:`heart_training.train.engine.compile_model`)
and the compiled model gives the eager outputs; the options are checked; AdamW's fused kernel is
asked for on CUDA only.

torch.compile (inductor, C++ on CPU) takes minutes on a shared CPU even for the tiny model: one
forward of a one-block tiny model here; two to three training steps with the option on were
checked by hand (docs/training.md, "Throughput options").
"""

from __future__ import annotations

import copy

import pytest
import torch
from fixtures_training import write_analytic_case, write_case_lists
from heart_training.config import ConfigError, load_config
from heart_training.data.dataset import collate
from heart_training.train.distributed import init_distributed
from heart_training.train.engine import Trainer, _to, compile_model


def _tiny_trainer(tmp_path, *overrides) -> Trainer:
    """A one-block ``tiny`` trainer on one analytic heart, batch 1, one thread."""
    data = tmp_path / "data"
    data.mkdir()
    write_analytic_case(data / "h0.npz", seed=0, num_surface=6000, num_volume=3000, num_near=4000)
    write_case_lists(data, ["h0"], [])
    cfg = load_config("tiny_test", [f"data.datasets.0.data_dir={data}", f"run.output_dir={tmp_path / 'run'}",
                                    "model.overrides.depth=0", "optim.batch_size=1", *overrides])
    torch.set_num_threads(1)
    return Trainer(cfg, init_distributed("cpu"))


def _assert_same_outputs(trainer, compiled, eager) -> None:
    """Given a non-zero output layer, the compiled model's distances are the eager copy's."""
    torch.nn.init.normal_(compiled.to_sdf.weight, std=0.1)  # a non-zero output layer: compare real values
    eager.load_state_dict(compiled.state_dict())
    batch = _to(collate([trainer.train_ds[k] for k in trainer.sampler.plan(0)[:1]]), trainer.ctx.device)
    with torch.no_grad():
        want = eager(batch["enc_points"], batch["enc_onehot"], batch["queries"])["sdf"]
        got = compiled(batch["enc_points"], batch["enc_onehot"], batch["queries"])["sdf"]
    assert want.abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_compiled_model_matches_eager_and_keeps_its_state_dict(tmp_path):
    trainer = _tiny_trainer(tmp_path, "run.compile=true")
    model = trainer.model
    eager = copy.deepcopy(model)
    eager._compiled_call_impl = None  # Module.compile() is an attribute of the module; the copy runs eager
    eager.encoder._compiled_call_impl = eager.decoder._compiled_call_impl = None
    assert model.encoder._compiled_call_impl is not None and model.decoder._compiled_call_impl is not None
    assert list(model.state_dict()) == list(eager.state_dict())  # checkpoints keep their keys
    _assert_same_outputs(trainer, model, eager)
    trainer.log.close()


@pytest.mark.slow
def test_the_whole_model_compiled_matches_eager(tmp_path):
    """``run.compile_scope=model``: one module compiled; the farthest-point sampling between the
    encoder's graphs runs eagerly (it is never traced), and the outputs are the eager ones."""
    trainer = _tiny_trainer(tmp_path, "run.compile=true", "run.compile_scope=model")
    model = trainer.model
    assert model._compiled_call_impl is not None and model.encoder._compiled_call_impl is None
    eager = copy.deepcopy(model)
    eager._compiled_call_impl = None
    _assert_same_outputs(trainer, model, eager)
    trainer.log.close()


def test_compile_options_are_checked_and_adamw_is_fused_on_cuda_only(tmp_path):
    base = [f"data.datasets.0.data_dir={tmp_path}", f"run.output_dir={tmp_path / 'run'}"]
    with pytest.raises(ConfigError, match="run.compile_scope 'trunk' is not one of"):
        load_config("tiny_test", [*base, "run.compile_scope=trunk"]).validate()
    with pytest.raises(ConfigError, match="run.compile_mode 'fast' is not one of"):
        load_config("tiny_test", [*base, "run.compile_mode=fast"]).validate()
    assert load_config("tiny_test", [*base, "run.compile_mode=reduce-overhead"]).validate().run.compile_mode == \
        "reduce-overhead"
    with pytest.raises(ValueError, match="compile scope 'trunk'"):
        compile_model(torch.nn.Linear(2, 2), "trunk")
    trainer = _tiny_trainer(tmp_path)
    assert trainer.cfg.optim.fused  # the default: fused where there is a device kernel for it ...
    assert not trainer.optimizer.defaults.get("fused")  # ... i.e. not on the CPU
    trainer.log.close()
