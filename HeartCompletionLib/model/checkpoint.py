"""The inference checkpoint: ONE ``.safetensors`` file with the weights and everything needed to use them.

The safetensors header carries, under the key ``"heartcompletion"``, a JSON document::

    {"format": "heartcompletion-checkpoint", "format_version": 1,
     "model_config": {...ModelConfig...}, "structure_table": {...StructureTable.to_dict()...},
     "normalization": {"scale_mm": 100.0, "centre_rule": "input_surface_centroid"},
     "encoder_input": {"num_input_points": 2048, "min_per_structure": 32},
     "phase": 2, "data_summary": {...}, "created": "2026-...Z", "torch_version": "2.x",
     "num_parameters": 6433578, "extra": {...}}

Loading never executes pickled code: the file is parsed by safetensors (tensors + a JSON header)
and a ``torch.save`` pickle (or anything else) is refused with a :class:`CheckpointError` that
names the file. The resumable training state (optimiser, step, RNG) is a separate file owned by
the trainer.

>>> import tempfile, torch
>>> from HeartCompletionLib.model.vecset import HeartVecSet
>>> from HeartCompletionLib.model.configs import get_config
>>> from HeartCompletionLib.geometry.normalization import Normalization
>>> from HeartCompletionLib.structures.table import StructureTable
>>> table = StructureTable.default()
>>> model = HeartVecSet(get_config("tiny", len(table)))
>>> tmp = tempfile.TemporaryDirectory()
>>> path = Path(tmp.name) / "tiny.safetensors"
>>> _ = save_inference_checkpoint(path, model, table, Normalization(), phase=1, data_summary={"cases": 0})
>>> read_checkpoint_metadata(path)["model_config"]["width"]
64
>>> load_inference_checkpoint(path, expected_table=table).table.names[:3]
['Myocardium', 'LA', 'LV']
>>> tmp.cleanup()
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from HeartCompletionLib.atomic_io import atomic_write_bytes
from HeartCompletionLib.errors import HeartCompletionError
from HeartCompletionLib.geometry.normalization import Normalization
from HeartCompletionLib.structures.table import StructureTable

from .configs import ModelConfig, count_parameters

FORMAT_NAME = "heartcompletion-checkpoint"
FORMAT_VERSION = 1
METADATA_KEY = "heartcompletion"
SUFFIX = ".safetensors"
DEFAULT_NUM_INPUT_POINTS = 2048
DEFAULT_MIN_PER_STRUCTURE = 32

# A safetensors header is JSON; anything this large is not a checkpoint of ours.
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_REQUIRED_KEYS = ("model_config", "structure_table", "normalization", "encoder_input")


class CheckpointError(HeartCompletionError, ValueError):
    """A checkpoint that cannot be used; the message starts with the file path."""


@dataclass
class InferenceCheckpoint:
    """A loaded checkpoint: the model (eval mode, on ``device``) and what it was trained with."""

    model: object  #: HeartVecSet
    config: ModelConfig
    table: StructureTable
    normalization: Normalization
    metadata: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def num_input_points(self) -> int:
        """Encoder points per sample used in training (use the same count at inference)."""
        return int(self.metadata["encoder_input"]["num_input_points"])

    @property
    def min_per_structure(self) -> int:
        return int(self.metadata["encoder_input"]["min_per_structure"])


# --- saving --------------------------------------------------------------------------------
def _unwrap(model):
    """The bare model under DistributedDataParallel / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and not hasattr(model, "config"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _json_default(value):
    """JSON for numpy scalars/arrays and paths in data summaries."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def save_inference_checkpoint(
    path,
    model,
    table: StructureTable,
    normalization: Normalization,
    phase,
    data_summary: dict,
    extra: dict | None = None,
    num_input_points: int = DEFAULT_NUM_INPUT_POINTS,
    min_per_structure: int = DEFAULT_MIN_PER_STRUCTURE,
) -> Path:
    """Write ``model`` (a HeartVecSet, possibly DDP/compile-wrapped) and its metadata to ``path``.

    Weights are stored as float32 on CPU. ``phase`` is the training phase (1..4 or a name),
    ``data_summary`` a JSON-able dict (cases, datasets, ...); ``extra`` anything else JSON-able.
    The file is written to a temporary file in the same folder and moved into place, so a
    crash never leaves a half-written checkpoint. Returns the path.
    """
    import torch
    from safetensors.torch import save

    path = Path(path)
    model = _unwrap(model)
    config = getattr(model, "config", None)
    if not isinstance(config, ModelConfig):
        raise CheckpointError(f"{path}: the model has no ModelConfig (.config); is it a HeartVecSet?")
    if config.num_classes != len(table):
        raise CheckpointError(
            f"{path}: the model predicts {config.num_classes} structures but the table has {len(table)}: {table.names}"
        )
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model_config": config.to_dict(),
        "structure_table": table.to_dict(),
        "normalization": normalization.to_dict(),
        "encoder_input": {"num_input_points": int(num_input_points), "min_per_structure": int(min_per_structure)},
        "phase": phase,
        "data_summary": data_summary or {},
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "torch_version": torch.__version__,
        "num_parameters": count_parameters(model),
        "extra": extra or {},
    }
    try:
        header = json.dumps(metadata, default=_json_default, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: metadata is not JSON serialisable: {exc}") from exc
    # contiguous float32 CPU copies: independent of device, dtype and DDP of the run
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}

    # serialise in memory and write through atomic_io: the file gets the user's umask
    # (safetensors' own writer makes it 0600) and is on disk before it replaces the old one
    return atomic_write_bytes(path, save(tensors, metadata={METADATA_KEY: header}))


# --- reading -------------------------------------------------------------------------------
def _read_header(path: Path) -> dict:
    """The safetensors JSON header of ``path`` after checking the file is one and is complete."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        raw = f.read(n) if 0 < n <= _MAX_HEADER_BYTES and 8 + n <= size else b""
    if not raw.startswith(b"{"):
        if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
            raise CheckpointError(
                f"{path}: this is a PyTorch pickle (torch.save) file, not a HeartCompletion inference checkpoint; "
                "it is refused because loading it could execute code. Export it with save_inference_checkpoint "
                f"(a {SUFFIX} file)."
            )
        raise CheckpointError(
            f"{path}: not a safetensors checkpoint, or truncated (header of {n} bytes in a {size}-byte file)"
        )
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a safetensors checkpoint (unreadable header: {exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors checkpoint (header is not a JSON object)")
    # tensors lie back to back after the header; the last one must end exactly at the file end
    ends = []
    for key, entry in header.items():
        if key == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise CheckpointError(f"{path}: malformed safetensors header (__metadata__ must map names to strings)")
            continue
        problem = _tensor_entry_problem(entry)
        if problem:
            raise CheckpointError(f"{path}: malformed safetensors header (tensor {key[:80]!r}: {problem})")
        ends.append(entry["data_offsets"][1])
    expected = 8 + n + max(ends, default=0)
    if expected != size:
        raise CheckpointError(
            f"{path}: truncated or damaged checkpoint ({size} bytes, the header describes {expected})"
        )
    return header


#: bytes per element of the safetensors dtypes
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


def _tensor_entry_problem(entry) -> str | None:
    """Why one tensor entry of a safetensors header is malformed (None: it is fine)."""
    if not isinstance(entry, dict):
        return f"a {type(entry).__name__}, not an object"
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _DTYPE_BYTES:
        return f"unknown dtype {str(dtype)[:20]!r}"
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        return f"shape {str(shape)[:40]} is not a list of sizes"
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
        return f"data_offsets {str(offsets)[:40]} are not [begin, end]"
    size = _DTYPE_BYTES[dtype]
    for d in shape:
        size *= d
    if size != offsets[1] - offsets[0]:
        return f"shape {shape} of {dtype} needs {size} bytes but data_offsets span {offsets[1] - offsets[0]}"
    return None


def read_checkpoint_metadata(path) -> dict:
    """The checkpoint's metadata dict (see module docstring) from the header only; no weights read.

    Raises :class:`CheckpointError` for a file that is not a readable checkpoint of this format
    version (the message names the file).
    """
    path = Path(path)
    header = _read_header(path)
    text = (header.get("__metadata__") or {}).get(METADATA_KEY)
    if text is None:
        raise CheckpointError(
            f"{path}: a safetensors file without HeartCompletion metadata (no {METADATA_KEY!r} key); "
            "it was not written by save_inference_checkpoint"
        )
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: garbled HeartCompletion metadata: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{path}: metadata format is {found!r}, expected {FORMAT_NAME!r}")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version!r}; this HeartCompletion reads version {FORMAT_VERSION} "
            "(update HeartCompletion or re-export the checkpoint)"
        )
    missing = [k for k in _REQUIRED_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: garbled HeartCompletion metadata: missing {missing}")
    try:  # names end up in segment names, file headers and CSV cells: validated before anyone shows them
        StructureTable.from_dict(meta["structure_table"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{path}: garbled HeartCompletion metadata: structure table: {exc}") from exc
    return meta


def _resolve_device(device):
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available (torch {torch.__version__})")
    return device


def check_expected_table(path, table: StructureTable, expected_table: StructureTable | None) -> None:
    """Refuse (:class:`CheckpointError` naming ``path``, both lists in the message) a checkpoint
    whose structure ``table`` is not ``expected_table``; nothing to check when that is None."""
    if expected_table is not None and not table.is_compatible(expected_table):
        raise CheckpointError(
            f"{path}: trained on other structures than expected.\n  checkpoint: {table.names}\n"
            f"  expected:   {expected_table.names}"
        )


def load_inference_checkpoint(path, expected_table: StructureTable | None = None, device="cpu") -> InferenceCheckpoint:
    """Load a checkpoint written by :func:`save_inference_checkpoint` without unpickling anything.

    ``expected_table``: refuse a checkpoint trained on other structures (the message lists both).
    ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"auto"`` or a ``torch.device``.
    The model comes back in eval mode. Raises :class:`CheckpointError` naming the file.
    """
    import safetensors
    from safetensors.torch import load_file

    from .vecset import HeartVecSet

    path = Path(path)
    meta = read_checkpoint_metadata(path)
    try:
        config = ModelConfig.from_dict(meta["model_config"])
        table = StructureTable.from_dict(meta["structure_table"])
        normalization = Normalization.from_dict(meta["normalization"])
        int(meta["encoder_input"]["num_input_points"]), int(meta["encoder_input"]["min_per_structure"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: garbled HeartCompletion metadata: {exc}") from exc
    check_expected_table(path, table, expected_table)
    if config.num_classes != len(table):
        raise CheckpointError(
            f"{path}: model config predicts {config.num_classes} structures but the table has {len(table)}"
        )
    target = _resolve_device(device)
    # The header's config is compared with the stored tensor shapes on the "meta" device (shapes
    # only, no memory) BEFORE the model is built: a crafted config (width 32768, depth 48) would
    # otherwise allocate tens of GB; the stored tensors are bounded by the file's size.
    import torch

    stored = {k: tuple(v["shape"]) for k, v in _read_header(path).items() if k != "__metadata__"}
    # every size of the config is bounded by what the file stores (depth by the tensor count, the
    # others by the element count): even the meta-device model stays as small as the file
    elements = sum(math.prod(shape) for shape in stored.values())
    for name, value in config.to_dict().items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            limit = len(stored) if name == "depth" else elements
            if not (math.isfinite(value) and 0 <= value <= limit):
                raise CheckpointError(f"{path}: weights do not match the model config: {name}={value!r} is "
                                      f"impossible for {len(stored)} stored tensors of {elements} values")
    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in HeartVecSet(config).state_dict().items()}
    except (TypeError, ValueError, RuntimeError, AssertionError, OverflowError, ZeroDivisionError) as exc:
        raise CheckpointError(f"{path}: garbled HeartCompletion metadata: model config {meta['model_config']}: {exc}") from exc
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    wrong = [f"{k} {stored[k]} != {v}" for k, v in expected.items() if k in stored and stored[k] != v]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{path}: weights do not match the model config: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shape {wrong[:5]}"
        )
    try:
        tensors = load_file(str(path), device="cpu")
    except (getattr(safetensors, "SafetensorError", RuntimeError), OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: cannot read the weights: {exc}") from exc
    model = HeartVecSet(config)
    model.load_state_dict(tensors, strict=True)
    model.to(target).eval()
    return InferenceCheckpoint(model, config, table, normalization, meta, path)


def describe_checkpoint(meta: dict) -> str:
    """One human-readable line for a metadata dict (the Slicer panel and ``--help`` output)."""
    cfg = meta.get("model_config", {})
    names = [s.get("name", "?") for s in meta.get("structure_table", {}).get("structures", [])]
    summary = meta.get("data_summary") or {}
    cases = summary.get("num_cases", summary.get("cases"))
    parts = [
        f"phase {meta.get('phase')}",
        f"{len(names)} structures",
        f"{meta.get('num_parameters', 0) / 1e6:.1f}M params (M={cfg.get('num_latents')}, width={cfg.get('width')}, depth={cfg.get('depth')})",
        f"S={meta.get('normalization', {}).get('scale_mm')} mm",
    ]
    if cases is not None:
        parts.append(f"{cases} training cases")
    parts.append(f"created {meta.get('created')} with torch {meta.get('torch_version')}")
    return ", ".join(parts)
