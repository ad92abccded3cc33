"""Read Hugging Face safetensors checkpoints into tensors the model already allocated.

``load_checkpoint(model_dir, specs)`` fills each ``TensorSpec.dest`` in place. It reads only the listed
tensors (a pipeline stage lists its own layers; the MTP layer of real checkpoints is simply never
listed), and only the part a rank keeps when a spec is sharded (``safetensors`` slices, so an expert
shard reads 1/C of it). Each file is opened once. fp8 block-quantized weights (a ``.weight`` with a
sibling ``.weight_scale_inv``) are dequantized on the destination device into a model-dtype destination.
A block-fp8 destination (``TensorSpec.scale_dest`` set, the engine's fp8 layers) gets an fp8 checkpoint's
e4m3 values and scales as they are (128x128 blocks), or a bf16 / fp32 checkpoint weight quantized on the
destination device (``kernels.fp8_linear.quantize_weight_fp8``, one fp32 scale per 128x128 block).
"""

from __future__ import annotations

import difflib
import json
import math
import os
from collections import defaultdict
from typing import Iterable

import torch
from safetensors import safe_open

from dsaserve.kernels.block_fp8 import dequantize_block_fp8
from dsaserve.kernels.fp8_linear import BLOCK as FP8_KERNEL_BLOCK
from dsaserve.kernels.fp8_linear import quantize_weight_fp8
from dsaserve.checkpoint.spec import TensorSpec

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SCALE_SUFFIX = "_scale_inv"  # "x.weight" -> "x.weight_scale_inv"

_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read as asked; the message names the tensor and/or file."""


class CheckpointFiles:
    """Where every tensor of a checkpoint folder lives.

    Accepts a single ``model.safetensors``, a sharded checkpoint with ``model.safetensors.index.json``,
    or (no index) any set of ``*.safetensors`` files in the folder. ``weight_map`` maps tensor name ->
    file name (relative to ``model_dir``).
    """

    def __init__(self, model_dir: str):
        self.model_dir = os.fspath(model_dir)
        if not os.path.isdir(self.model_dir):
            raise CheckpointError(f"checkpoint folder {self.model_dir!r} does not exist")
        index_path = os.path.join(self.model_dir, INDEX_FILE)
        self.weight_map: dict[str, str] = {}
        if os.path.isfile(index_path):
            self.source = INDEX_FILE
            self.weight_map = self._read_index(index_path)
            missing = sorted({f for f in self.weight_map.values()
                              if not os.path.isfile(os.path.join(self.model_dir, f))})
            if missing:
                raise CheckpointError(
                    f"{index_path} names shard file(s) that are not in the folder: {', '.join(missing)} "
                    f"(an incomplete download? fetch the missing shard(s) again)")
            return
        if os.path.isfile(os.path.join(self.model_dir, SINGLE_FILE)):
            files = [SINGLE_FILE]
        else:
            files = sorted(f for f in os.listdir(self.model_dir) if f.endswith(".safetensors"))
        if not files:
            raise CheckpointError(
                f"no safetensors weights in {self.model_dir!r}: expected {SINGLE_FILE} or {INDEX_FILE} "
                "with its shards (point --model at a Hugging Face checkpoint folder)")
        self.source = ", ".join(files)
        for fname in files:
            with self.open(fname) as f:
                for name in f.keys():
                    if name in self.weight_map:
                        raise CheckpointError(f"tensor {name!r} is stored twice: in {self.weight_map[name]} "
                                              f"and {fname} (add a {INDEX_FILE} to say which one to use)")
                    self.weight_map[name] = fname

    @staticmethod
    def _read_index(index_path: str) -> dict[str, str]:
        try:
            with open(index_path) as fh:
                index = json.load(fh)
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"cannot read checkpoint index {index_path}: {e}") from e
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"checkpoint index {index_path} has no 'weight_map' object")
        return {str(k): str(v) for k, v in weight_map.items()}

    def path(self, fname: str) -> str:
        return os.path.join(self.model_dir, fname)

    def open(self, fname: str):
        """``safe_open`` one file (a context manager); corrupt or unreadable files raise ``CheckpointError``."""
        path = self.path(fname)
        try:
            return safe_open(path, framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error type for bad headers / truncation
            raise CheckpointError(f"cannot read checkpoint file {path}: {e} (the file is truncated or not a "
                                  "safetensors file; download it again)") from e

    def names(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def file_of(self, name: str) -> str:
        try:
            return self.weight_map[name]
        except KeyError:
            raise CheckpointError(self.missing_message([name])) from None

    def missing_message(self, names: list[str]) -> str:
        shown = ", ".join(repr(n) for n in names[:10]) + (f" (and {len(names) - 10} more)" if len(names) > 10 else "")
        files = sorted(set(self.weight_map.values()))
        msg = (f"tensor(s) {shown} not found in checkpoint {self.model_dir!r}: looked in {self.source} "
               f"({len(self.weight_map)} tensors in {len(files)} file(s))")
        # Suggest near names from the same module (e.g. the same layer): cheap even for 90k-tensor checkpoints.
        prefix = ".".join(names[0].split(".")[:3])
        pool = [n for n in self.weight_map if n.startswith(prefix)] or list(self.weight_map)[:5000]
        close = difflib.get_close_matches(names[0], pool, n=3)
        if close:
            msg += f"; similar names present: {', '.join(close)}"
        return msg

    def scale_name(self, name: str) -> str | None:
        """Name of the fp8 block scale of ``name`` if the checkpoint has one."""
        if not name.endswith(".weight"):
            return None
        scale = name + SCALE_SUFFIX
        return scale if scale in self.weight_map else None


def _fp8_block_size(model_dir: str) -> tuple[int, int]:
    """Block size from config.json's quantization_config (DeepSeek: 128 x 128)."""
    try:
        with open(os.path.join(model_dir, "config.json")) as fh:
            qc = json.load(fh).get("quantization_config") or {}
        block = qc.get("weight_block_size") or (128, 128)
        return int(block[0]), int(block[1])
    except (OSError, ValueError, AttributeError, TypeError, IndexError):
        return 128, 128


def _shard_range(spec: TensorSpec, full_shape: tuple[int, ...], name: str, fname: str) -> list[tuple[int, int]]:
    """Per-dim [start, stop) that this spec keeps of the full checkpoint tensor."""
    ranges = [(0, s) for s in full_shape]
    if spec.shard_dim is not None:
        d = spec.shard_dim if spec.shard_dim >= 0 else spec.shard_dim + len(full_shape)
        if not 0 <= d < len(full_shape):
            raise CheckpointError(f"{name} in {fname}: shard_dim={spec.shard_dim} is out of range for shape "
                                  f"{list(full_shape)}")
        if not 0 <= spec.shard_index < spec.shard_count:
            raise CheckpointError(f"{name}: shard_index={spec.shard_index} is not in [0, {spec.shard_count})")
        ranges[d] = spec.part_range(full_shape[d])
    return ranges


def _read_range(f, name: str, ranges: list[tuple[int, int]], full_shape: tuple[int, ...]) -> torch.Tensor:
    if all(r == (0, s) for r, s in zip(ranges, full_shape)):
        return f.get_tensor(name)
    return f.get_slice(name)[tuple(slice(a, b) for a, b in ranges)]


class _Reader:
    """Open files of one load; a scale that lives in another shard opens that shard too."""

    def __init__(self, files: CheckpointFiles):
        self.files = files
        self.handles: dict[str, object] = {}

    def get(self, fname: str):
        if fname not in self.handles:
            self.handles[fname] = self.files.open(fname)
        return self.handles[fname]

    def close(self, keep: Iterable[str] = ()):
        keep = set(keep)
        for fname in [f for f in self.handles if f not in keep]:
            del self.handles[fname]  # safe_open handles release the mmap when dropped


def _spec_bytes(files: CheckpointFiles, spec: TensorSpec) -> int:
    """Progress units: bytes of the destination (fp8 weights count one byte per value)."""
    return spec.dest.numel() * (1 if files.scale_name(spec.name) else spec.dest.element_size())


def _load_one(reader: _Reader, spec: TensorSpec, block: tuple[int, int]) -> None:
    """Read, check, convert and copy one spec."""
    files = reader.files
    name = spec.name
    fname = files.file_of(name)
    path = files.path(fname)
    f = reader.get(fname)
    try:
        sl = f.get_slice(name)
        full_shape = tuple(sl.get_shape())
    except Exception as e:
        raise CheckpointError(f"cannot read tensor {name!r} from {path}: {e}") from e
    expected = spec.expected_full_shape()
    if full_shape != tuple(expected):
        raise CheckpointError(
            f"tensor {name!r} in {path} has shape {list(full_shape)}, expected {list(expected)}"
            + (f" (destination {list(spec.dest.shape)} is part {spec.shard_index} of {spec.shard_count} along "
               f"dim {spec.shard_dim})" if spec.shard_dim is not None else "")
            + ": the checkpoint does not match config.json")
    if spec.scale_dest is not None:
        _load_block_fp8(reader, spec, full_shape, block, path)
        return
    ranges = _shard_range(spec, full_shape, name, fname)
    dest = spec.dest
    scale_name = files.scale_name(name)
    try:
        if scale_name is not None and dest.dtype not in _FP8_DTYPES and len(full_shape) == 2:
            t = _read_fp8_dequantized(reader, name, scale_name, ranges, full_shape, block, dest.device)
        else:
            t = _read_range(f, name, ranges, full_shape)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"cannot read tensor {name!r} from {path}: {e}") from e
    with torch.no_grad():
        dest.copy_(t.to(device=dest.device, dtype=dest.dtype))


def _load_block_fp8(reader: _Reader, spec: TensorSpec, full_shape: tuple[int, ...], block: tuple[int, int],
                    path: str) -> None:
    """Fill a block-fp8 destination: the checkpoint's own e4m3 + scales, or its float weight quantized."""
    files, name = reader.files, spec.name
    if len(full_shape) != 2 or spec.shard_dim is not None:
        raise CheckpointError(f"{name}: a block-fp8 destination takes a whole 2-D weight, got shape "
                              f"{list(full_shape)}" + (" sliced along a dim" if spec.shard_dim is not None else ""))
    want_scale = tuple(-(-d // FP8_KERNEL_BLOCK) for d in full_shape)
    if tuple(spec.scale_dest.shape) != want_scale:
        raise CheckpointError(f"{name}: scale destination {list(spec.scale_dest.shape)} does not match "
                              f"{list(want_scale)} (128x128 blocks of {list(full_shape)})")
    scale_name = files.scale_name(name)
    f = reader.get(files.file_of(name))
    try:
        w = f.get_tensor(name)
    except Exception as e:
        raise CheckpointError(f"cannot read tensor {name!r} from {path}: {e}") from e
    device = spec.dest.device
    if scale_name is None:                                       # --quantization fp8 of a float checkpoint
        if w.dtype in _FP8_DTYPES:
            raise CheckpointError(f"tensor {name!r} in {path} is {w.dtype} but has no {name + SCALE_SUFFIX!r}")
        q, scale = quantize_weight_fp8(w.to(device=device, dtype=torch.float32))
    else:
        if tuple(block) != (FP8_KERNEL_BLOCK, FP8_KERNEL_BLOCK):
            raise CheckpointError(f"{name}: the checkpoint's fp8 blocks are {block[0]}x{block[1]}; the fp8 kernels "
                                  "take 128x128 (load it with --quantization none to dequantize at load)")
        if w.dtype != torch.float8_e4m3fn:
            raise CheckpointError(f"tensor {name!r} in {path} is {w.dtype}; the fp8 kernels take float8_e4m3fn "
                                  "(load it with --quantization none to dequantize at load)")
        sfile = files.file_of(scale_name)
        try:
            scale = reader.get(sfile).get_tensor(scale_name)
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {scale_name!r} from {files.path(sfile)}: {e}") from e
        if tuple(scale.shape) != want_scale:
            raise CheckpointError(f"fp8 scale {scale_name!r} in {files.path(sfile)} has shape {list(scale.shape)}, "
                                  f"expected {list(want_scale)} for weight {name!r} of shape {list(full_shape)}")
        q = w
    with torch.no_grad():
        spec.dest.copy_(q.to(device))
        spec.scale_dest.copy_(scale.to(device=device, dtype=torch.float32))


def _read_fp8_dequantized(reader: _Reader, name: str, scale_name: str, ranges: list[tuple[int, int]],
                          full_shape: tuple[int, ...], block: tuple[int, int], device: torch.device) -> torch.Tensor:
    """Read the block-aligned window around ``ranges``, dequantize it on ``device``, crop to ``ranges``."""
    files = reader.files
    bo, bi = block
    sfile = files.file_of(scale_name)
    s_sl = reader.get(sfile).get_slice(scale_name)
    s_shape = tuple(s_sl.get_shape())
    want = (math.ceil(full_shape[0] / bo), math.ceil(full_shape[1] / bi))
    if s_shape != want:
        raise CheckpointError(f"fp8 scale {scale_name!r} in {files.path(sfile)} has shape {list(s_shape)}, expected "
                              f"{list(want)} for weight {name!r} of shape {list(full_shape)} in {bo}x{bi} blocks")
    (a0, b0), (a1, b1) = ranges
    # Widen to whole blocks so the scales line up, then crop.
    A0, B0 = a0 // bo * bo, min(math.ceil(b0 / bo) * bo, full_shape[0])
    A1, B1 = a1 // bi * bi, min(math.ceil(b1 / bi) * bi, full_shape[1])
    f = reader.get(files.file_of(name))
    w = _read_range(f, name, [(A0, B0), (A1, B1)], full_shape)  # [B0-A0, B1-A1] fp8
    s = _read_range(reader.get(sfile), scale_name, [(A0 // bo, math.ceil(B0 / bo)), (A1 // bi, math.ceil(B1 / bi))],
                    s_shape)
    if w.dtype not in _FP8_DTYPES:
        raise CheckpointError(f"tensor {name!r} has a scale {scale_name!r} but is stored as {w.dtype}, not fp8")
    deq = dequantize_block_fp8(w.to(device), s.to(device), (bo, bi))  # float32
    return deq[a0 - A0:b0 - A0, a1 - A1:b1 - A1]


def _make_progress(progress, total: int):
    if progress is False:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but a progress bar is never worth a crash
        return None
    # disable=None: shown only when stderr is a terminal (not in logs or CI).
    return tqdm(total=total, unit="B", unit_scale=True, desc="Loading weights",
                disable=None if progress is None else not progress)


def load_checkpoint(model_dir: str, specs: list[TensorSpec], *, progress: bool | None = None) -> None:
    """Fill every ``spec.dest`` from the checkpoint in ``model_dir`` (in place, cast to dest dtype/device).

    ``progress``: None shows a tqdm bar (bytes) only on a terminal, True always, False never.
    Raises ``CheckpointError`` for missing tensors (all of them listed before anything is read), shape
    mismatches, and unreadable files.
    """
    files = CheckpointFiles(model_dir)
    missing = [s.name for s in specs if s.name not in files]
    if missing:
        raise CheckpointError(files.missing_message(missing))
    block = _fp8_block_size(files.model_dir)
    by_file: dict[str, list[TensorSpec]] = defaultdict(list)
    for spec in specs:
        by_file[files.file_of(spec.name)].append(spec)
    total = sum(_spec_bytes(files, s) for s in specs)
    bar = _make_progress(progress, total)
    reader = _Reader(files)
    try:
        for fname in sorted(by_file):
            if bar is not None:
                bar.set_postfix_str(fname, refresh=False)
            for spec in by_file[fname]:
                _load_one(reader, spec, block)
                if bar is not None:
                    bar.update(_spec_bytes(files, spec))
            reader.close()  # each file is opened once; drop it before the next
    finally:
        reader.close()
        if bar is not None:
            bar.close()


def read_tensor(model_dir: str, name: str, *, dequantize: bool = True) -> torch.Tensor:
    """One full tensor from a checkpoint folder (CPU). fp8 weights come back dequantized to float32
    unless ``dequantize=False``. Meant for tests and tools, not for loading a model."""
    files = CheckpointFiles(model_dir)
    fname = files.file_of(name)
    reader = _Reader(files)
    try:
        f = reader.get(fname)
        try:
            full_shape = tuple(f.get_slice(name).get_shape())
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {name!r} from {files.path(fname)}: {e}") from e
        scale_name = files.scale_name(name)
        if dequantize and scale_name is not None and len(full_shape) == 2:
            return _read_fp8_dequantized(reader, name, scale_name, [(0, s) for s in full_shape], full_shape,
                                         _fp8_block_size(files.model_dir), torch.device("cpu"))
        return f.get_tensor(name)
    finally:
        reader.close()
