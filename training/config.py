"""Training configuration: one YAML file per phase, plus ``key=value`` overrides.

A config is a tree of small dataclasses (:class:`TrainConfig`). ``heart-train --config NAME``
accepts a path to a YAML file or the name of a bundled config in ``training/configs/``
(``phase1`` .. ``phase4``, ``smoke``, ``tiny_test``). Overrides use dotted keys and YAML values::

    heart-train --config phase2 optim.lr=1e-4 data.datasets.0.data_dir=/scratch/imagecas

Unknown keys are errors that name the file and the key (a typo must not silently train with the
default). Units: every ``*_mm`` field is millimetres in RAS; ``augment.rotation_deg`` degrees.

>>> cfg = load_config("tiny_test", overrides=["optim.lr=0.01", "phase=2"])
>>> cfg.optim.lr, cfg.phase, cfg.mask.kind
(0.01, 2, 'all')
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from HeartCompletionLib.errors import HeartCompletionError

CONFIG_DIR = Path(__file__).with_name("configs")

MASK_KINDS = ("all", "drop_random", "subsets", "annotated")
TRUNCATION_MODES = ("near_cut", "structure", "ignore")
#: ``run.compile_scope``: the attention blocks (encoder, trunk, decoder) or the whole model
COMPILE_SCOPES = ("blocks", "model")
#: ``run.compile_mode``: torch.compile's modes (reduce-overhead replays CUDA graphs)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
QUERY_BALANCES = ("area", "structure")
DEVICE_CACHE_MEMORY = ("device", "pinned")


class ConfigError(HeartCompletionError, ValueError):
    """A config that cannot be used (message names the file and the key)."""


@dataclass
class DatasetSpec:
    """One dataset: a folder of ``.npz`` cases (``heart-prepare`` output) with its split lists.

    ``train_list``/``val_list`` are CSV files (relative to ``data_dir``) written by
    ``heart-split``; when ``train_list`` is absent every ``*.npz`` in ``data_dir`` is used for
    training. ``weight`` is this dataset's share of the training samples when several are mixed.
    """

    data_dir: str = ""
    name: str = ""
    train_list: str = "train.csv"
    val_list: str = "val.csv"
    weight: float = 1.0


@dataclass
class DataConfig:
    datasets: list = field(default_factory=list)  #: list of DatasetSpec
    num_input_points: int = 2048  #: encoder points per sample, drawn from the input structures only
    min_points_per_structure: int = 32  #: floor per input structure (small structures must not vanish)
    num_volume_queries: int = 1024  #: uniform-in-box queries per sample
    num_near_queries: int = 1024  #: near-surface queries per sample
    num_surface_queries: int = 512  #: surface samples (target sdf = 0 for their own structure)
    #: how near-surface and surface queries are shared among structures: "structure" (equal
    #: numbers per annotated structure, so the coronaries and PV get as many as the myocardium)
    #: or "area" (as stored, proportional to surface area). Measured with
    #: benchmarks/overfit_iou.py (two hearts, tiny model, H200): after 2,500 / 4,000 steps the
    #: coronary near-surface IoU is 0.44 / 0.46 with "structure" against 0.22 / 0.38 with "area",
    #: the mean 0.73 / 0.76 against 0.71 / 0.75.
    query_balance: str = "structure"
    samples_per_epoch: int = 0  #: 0: max(number of training cases, 500 global batches)
    num_workers: int = 2  #: DataLoader workers per process
    cache_cases: int = 0  #: cases kept in memory per worker (0: reload the .npz each time)
    max_val_cases: int = 0  #: 0: all validation cases
    #: keep every training case in memory and draw the samples there with torch ops (no loader
    #: workers in the hot loop; heart_training.data.device_data). Validation still uses the loader.
    device_cache: bool = False
    device_cache_memory: str = "device"  #: device_cache: "device" (the training device) or "pinned" host memory


@dataclass
class AugmentConfig:
    """Anatomy-preserving augmentation: never flips or axis permutations (they swap left/right)."""

    rotation_deg: float = 10.0  #: max rotation angle about a random axis through the centre
    translation_mm: float = 5.0  #: max shift of the heart relative to the encoder centre, per axis
    scale: float = 0.05  #: scale factor in [1/(1+scale), 1+scale]; distances scale with it


@dataclass
class MaskConfig:
    """Which structures the encoder sees (DESIGN.md, "The four training phases")."""

    kind: str = "all"  #: all | drop_random | subsets | annotated
    drop_min: int = 2  #: drop_random: fewest structures dropped
    drop_max: int = 5  #: drop_random: most structures dropped
    min_keep: int = 1  #: never drop below this many input structures
    subsets: dict = field(
        default_factory=lambda: {
            "A": ["Myocardium", "LA", "LV", "RA", "RV"],
            "B": ["Aorta", "PA", "LAA", "Coronary", "PV"],
        }
    )
    subset_choices: list = field(default_factory=lambda: ["A", "B", "A+B"])  #: names or unions "A+B"
    subset_weights: list = field(default_factory=list)  #: optional weights of subset_choices
    random_drop_prob: float = 0.0  #: subsets: share of samples masked as drop_random (drop_min..drop_max) instead
    extra_drop_prob: float = 0.0  #: annotated: probability of dropping further structures
    extra_drop_max: int = 2  #: annotated: most further structures dropped
    truncated: str = "near_cut"  #: near_cut | structure | ignore (targets of structures cut by the image border)
    truncation_margin_mm: float = 3.0  #: near_cut: keep a target only this far beyond |sdf| from the border


@dataclass
class ModelSection:
    config: str = "small"  #: named model config (HeartCompletionLib.model.configs), or from_init: model.init_from's
    overrides: dict = field(default_factory=dict)  #: single ModelConfig fields, e.g. {bottleneck: kl}
    init_from: str = ""  #: inference checkpoint (.safetensors) or training state (.pt) to start from


@dataclass
class LossConfig:
    """Loss weights; every distance is in network units (mm / S)."""

    volume: float = 1.0  #: L1 on sdf at uniform volume queries
    near: float = 1.0  #: L1 on sdf at near-surface queries
    surface: float = 1.0  #: |sdf| of the own structure at surface samples
    clamp_mm: float = 0.0  #: >0: L1 on clamp(sdf, -c, c) (DeepSDF): capacity goes to the surfaces, not the far field
    eikonal: float = 0.0  #: (|grad sdf| - 1)^2 by central finite differences
    eikonal_queries: int = 128  #: near queries per sample used for the eikonal term (6 extra decodes each)
    eikonal_step_mm: float = 1.0  #: finite-difference step
    kl: float = 1e-4  #: weight of the model's KL term (0 when its bottleneck has none)
    exclusion: float = 0.0  #: hinge: inside one structure -> outside every other by at least that depth
    teacher: float = 0.0  #: L1 to the frozen init_from model for structures a sample does not annotate (phase 4)


@dataclass
class OptimConfig:
    batch_size: int = 8  #: samples per process per micro-batch
    grad_accum: int = 1  #: micro-batches per optimizer step
    lr: float = 2e-4
    weight_decay: float = 0.01
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 500
    max_steps: int = 100_000
    min_lr_ratio: float = 0.05  #: cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0  #: 0 disables clipping
    fused: bool = True  #: AdamW's fused kernel (one launch for every parameter) on CUDA; the CPU keeps foreach


@dataclass
class RunConfig:
    output_dir: str = "runs/heart"
    device: str = "auto"  #: auto | cpu | cuda
    amp: str = "auto"  #: auto (bf16 on CUDA) | bf16 | off
    log_every: int = 20
    val_every: int = 1000
    checkpoint_every: int = 1000
    keep_best: bool = True  #: export model_best.safetensors when the validation IoU improves
    data_gate: bool = True  #: refuse to train on data that fails the checks (data_gate.py)
    gate_cases: int = 8  #: kept for old configs; the data gate now checks every case (verdicts cached by file hash)
    gate_workers: int = 0  #: threads of the data gate (0: one per core, up to 8)
    gate_cache_dir: str = ""  #: data-gate verdicts by file hash ("": $HEARTCOMPLETION_CACHE_DIR or ~/.cache/heartcompletion)
    tensorboard: bool = True
    progress: bool = True  #: tqdm bar on rank 0
    threads: int = 0  #: torch CPU threads per process (0: leave torch's default)
    stop_after: int = 0  #: stop (state saved, resumable) after this many steps of this invocation; 0: off
    compile: bool = False  #: torch.compile the model (what: compile_scope; how: compile_mode)
    compile_scope: str = "blocks"  #: blocks: the attention blocks | model: the whole model in one go
    compile_mode: str = "default"  #: torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune ...


@dataclass
class TrainConfig:
    phase: int = 1
    name: str = "heart"
    seed: int = 0
    structures: str = "default"  #: structure table: "default" or a JSON path (relative to the config)
    scale_mm: float = 100.0  #: S of the normalisation rule
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    model: ModelSection = field(default_factory=ModelSection)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    source: str = "<memory>"  #: where the config came from (for messages)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> TrainConfig:
        where = self.source
        if self.phase not in (1, 2, 3, 4):
            raise ConfigError(f"{where}: phase must be 1..4, got {self.phase}")
        if self.mask.kind not in MASK_KINDS:
            raise ConfigError(f"{where}: mask.kind {self.mask.kind!r} is not one of {MASK_KINDS}")
        if self.data.query_balance not in QUERY_BALANCES:
            raise ConfigError(f"{where}: data.query_balance {self.data.query_balance!r} is not one of {QUERY_BALANCES}")
        if self.data.device_cache_memory not in DEVICE_CACHE_MEMORY:
            raise ConfigError(f"{where}: data.device_cache_memory {self.data.device_cache_memory!r} is not one of "
                              f"{DEVICE_CACHE_MEMORY}")
        if self.mask.truncated not in TRUNCATION_MODES:
            raise ConfigError(f"{where}: mask.truncated {self.mask.truncated!r} is not one of {TRUNCATION_MODES}")
        if not 0 <= self.mask.drop_min <= self.mask.drop_max:
            raise ConfigError(f"{where}: need 0 <= mask.drop_min <= mask.drop_max")
        if self.scale_mm <= 0:
            raise ConfigError(f"{where}: scale_mm must be positive (mm per network unit)")
        for name in ("batch_size", "grad_accum", "max_steps"):
            if getattr(self.optim, name) < 1:
                raise ConfigError(f"{where}: optim.{name} must be >= 1")
        if self.data.num_input_points < 1 or self.data.num_volume_queries + self.data.num_near_queries < 1:
            raise ConfigError(f"{where}: need input points and volume or near queries")
        if self.loss.teacher < 0:
            raise ConfigError(f"{where}: loss.teacher must be >= 0")
        if self.loss.teacher > 0 and not self.model.init_from:
            raise ConfigError(f"{where}: loss.teacher > 0 needs model.init_from (the teacher is the model it starts from)")
        if self.run.compile_scope not in COMPILE_SCOPES:
            raise ConfigError(f"{where}: run.compile_scope {self.run.compile_scope!r} is not one of {COMPILE_SCOPES}")
        if self.run.compile_mode not in COMPILE_MODES:
            raise ConfigError(f"{where}: run.compile_mode {self.run.compile_mode!r} is not one of {COMPILE_MODES}")
        if self.loss.eikonal > 0 and self.loss.eikonal_queries > self.data.num_near_queries:
            raise ConfigError(f"{where}: loss.eikonal_queries must not exceed data.num_near_queries")
        if not self.data.datasets:
            raise ConfigError(f"{where}: data.datasets is empty; set data.datasets.0.data_dir=DIR")
        for i, spec in enumerate(self.data.datasets):
            if not spec.data_dir:
                raise ConfigError(f"{where}: data.datasets.{i}.data_dir is not set")
            if spec.weight <= 0:
                raise ConfigError(f"{where}: data.datasets.{i}.weight must be positive")
        return self


# --- building dataclasses from dicts --------------------------------------------------------
_NESTED = {
    "data": DataConfig,
    "augment": AugmentConfig,
    "mask": MaskConfig,
    "model": ModelSection,
    "loss": LossConfig,
    "optim": OptimConfig,
    "run": RunConfig,
}


def _build(cls, values: dict, where: str, prefix: str = ""):
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: {prefix or 'config'} must be a mapping, got {type(values).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {[prefix + k for k in unknown]}; known: {sorted(known)}")
    kwargs = {}
    for key, value in values.items():
        if cls is TrainConfig and key in _NESTED:
            kwargs[key] = _build(_NESTED[key], value or {}, where, f"{key}.")
        elif cls is DataConfig and key == "datasets":
            if not isinstance(value, list):
                raise ConfigError(f"{where}: data.datasets must be a list")
            kwargs[key] = [_build(DatasetSpec, v, where, f"data.datasets.{i}.") for i, v in enumerate(value)]
        else:
            kwargs[key] = _coerce(known[key], value, where, prefix + key)
    return cls(**kwargs)


def _coerce(f: dataclasses.Field, value: Any, where: str, key: str):
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be true/false, got {value!r}")
        return value
    if isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, str):
            try:
                value = float(value)  # YAML reads "1e-4" as a string
            except ValueError:
                pass
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
        return float(value)
    if isinstance(default, str):
        return "" if value is None else str(value)
    if isinstance(default, (list, dict)) and value is not None and not isinstance(value, type(default)):
        raise ConfigError(f"{where}: {key} must be a {type(default).__name__}, got {value!r}")
    return value


# --- loading ---------------------------------------------------------------------------------
def resolve_config_path(spec: str | Path) -> Path:
    """A YAML path, or the name of a bundled config (``phase1``, ``smoke``, ...)."""
    path = Path(spec)
    if path.is_file():
        return path
    bundled = CONFIG_DIR / f"{spec}.yaml"
    if bundled.is_file():
        return bundled
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"{spec}: no such config file and no bundled config of that name; bundled: {names}")


def apply_override(tree: dict, assignment: str, where: str = "command line") -> None:
    """Apply one ``dotted.key=value`` (value parsed as YAML) to a nested dict/list tree in place."""
    if "=" not in assignment:
        raise ConfigError(f"{where}: override {assignment!r} is not of the form key=value")
    key, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        problem = str(exc).replace("\n", " ")
        raise ConfigError(f"{where}: override {assignment!r}: the value is not valid YAML ({problem})") from exc
    parts = key.strip().split(".")
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        nxt_is_index = parts[i + 1].isdigit()
        if isinstance(node, list):
            idx = int(part)
            while len(node) <= idx:
                node.append({})
            node = node[idx]
        else:
            if part not in node or node[part] is None:
                node[part] = [] if nxt_is_index else {}
            node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        idx = int(last)
        while len(node) <= idx:
            node.append({})
        node[idx] = value
    else:
        node[last] = value


def load_config(spec: str | Path | dict, overrides: list | None = None) -> TrainConfig:
    """Read a config (path, bundled name, or a dict), apply overrides, validate.

    Relative ``data_dir``/``structures``/``init_from`` paths are resolved against the config
    file's folder for user files, and against the working directory for bundled configs.
    """
    if isinstance(spec, dict):
        tree, where, base = dict(spec), "<dict>", Path.cwd()
    else:
        path = resolve_config_path(spec)
        where = str(path)
        try:
            tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read config: {exc}") from exc
        base = Path.cwd() if path.parent.resolve() == CONFIG_DIR.resolve() else path.parent
    for assignment in overrides or []:
        apply_override(tree, assignment)
    cfg = _build(TrainConfig, tree, where)
    cfg.source = where
    for spec_ in cfg.data.datasets:
        if spec_.data_dir:
            spec_.data_dir = str((base / Path(spec_.data_dir).expanduser()).resolve())
        if not spec_.name:
            spec_.name = Path(spec_.data_dir).name or "dataset"
    if cfg.structures not in ("", "default"):
        cfg.structures = str((base / cfg.structures).resolve())
    if cfg.model.init_from:
        cfg.model.init_from = str((base / Path(cfg.model.init_from).expanduser()).resolve())
    return cfg


def config_to_yaml(cfg: TrainConfig) -> str:
    """The full resolved config as YAML (written next to every run's checkpoints)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
