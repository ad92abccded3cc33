"""Engine options: one dataclass, used by ``LLM(...)``, ``LLMEngine(...)`` and every CLI subcommand.

CLI flags are generated from the fields (``--pp-size``, ``--cp-size``, ``--chunked-prefill-size`` ...) so
the same name means the same thing everywhere.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, fields

import torch

from dsaserve.config import ConfigError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EngineArgs:
    """Everything that configures an engine besides the model folder."""

    pp_size: int = 1                      # pipeline stages
    cp_size: int = 1                      # context-parallel ranks per stage
    device: str = "cpu"                   # "cpu" or "cuda"
    dtype: str = "float32"                # "float32" | "bfloat16" | "float16" | "auto" (config's torch_dtype)
    pp_layer_partition: str | None = None  # e.g. "30,31": layers per stage
    cp_split: str = "round-robin"         # "round-robin" | "zigzag"
    chunked_prefill_size: int = 8192      # max prompt tokens per prefill step
    max_num_seqs: int = 64                # max requests per step
    max_model_len: int | None = None      # context limit; default: the model's max_position_embeddings
    kv_cache_tokens: int | None = None    # KV cache capacity in tokens; default: fits max_num_seqs contexts (CPU) / 90% of free memory (CUDA)
    page_size: int = 64
    indexer_mode: str = "auto"            # "exact" | "fp8" | "auto" (fp8 on CUDA, exact on CPU)
    pp_comm_ctas: int = 1                 # CTAs the NCCL PP communicator may use (the SM reservation follows)
    indexer_num_sms: str = "auto"         # "auto" (reserve the PP comm's CTAs while a recv is pending), "off", or N
    pp_transfer: str = "scattered"        # "scattered": each rank sends its own shard; "gathered": benchmark-only ablation
    load_format: str = "auto"             # "auto": safetensors; "random": seeded random weights (benchmarks)
    weights_seed: int = 0                 # seed of load_format="random"
    comm_timeout_s: float = 120.0         # every collective / wait gives up after this long
    master_port: int | None = None        # local spawn rendezvous port (default: a free port)

    def validate(self) -> None:
        # pp_size / cp_size are validated with the model by parallel.layout.Layout.build
        for name in ("chunked_prefill_size", "max_num_seqs", "page_size", "pp_comm_ctas"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
        if self.device not in ("cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ConfigError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.dtype not in (*_DTYPES, "auto"):
            raise ConfigError(f"dtype must be one of {', '.join((*_DTYPES, 'auto'))}, got {self.dtype!r}")
        if self.cp_split not in ("round-robin", "zigzag"):
            raise ConfigError(f"cp_split must be 'round-robin' or 'zigzag', got {self.cp_split!r}")
        if self.indexer_mode not in ("exact", "fp8", "auto"):
            raise ConfigError(f"indexer_mode must be 'exact', 'fp8' or 'auto', got {self.indexer_mode!r}")
        if self.indexer_num_sms not in ("auto", "off"):
            try:
                if int(self.indexer_num_sms) < 1:
                    raise ValueError
            except ValueError:
                raise ConfigError(f"indexer_num_sms must be 'auto', 'off' or a positive integer, got {self.indexer_num_sms!r}")
        if self.pp_transfer not in ("scattered", "gathered"):
            raise ConfigError(f"pp_transfer must be 'scattered' or 'gathered', got {self.pp_transfer!r}")
        if self.load_format not in ("auto", "random"):
            raise ConfigError(f"load_format must be 'auto' or 'random', got {self.load_format!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.comm_timeout_s <= 0:
            raise ConfigError(f"comm_timeout_s must be > 0, got {self.comm_timeout_s}")

    def torch_dtype(self, config_dtype: str) -> torch.dtype:
        name = config_dtype if self.dtype == "auto" else self.dtype
        if name not in _DTYPES:
            raise ConfigError(f"dtype {name!r} (from the checkpoint's torch_dtype) is not supported; pass dtype=...")
        return _DTYPES[name]

    def indexer_fp8(self) -> bool:
        if self.indexer_mode == "auto":
            return str(self.device).startswith("cuda")
        return self.indexer_mode == "fp8"

    # ---- CLI ---------------------------------------------------------------------------------------
    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("engine")
        for f in fields(cls):
            flag = "--" + f.name.replace("_", "-")
            default = f.default
            kind = {"int": int, "float": float, "str": str, "int | None": int, "str | None": str}.get(str(f.type), str)
            group.add_argument(flag, dest=f.name, type=kind, default=default, help=f"(default: {default})")

    @classmethod
    def from_cli(cls, args: argparse.Namespace) -> "EngineArgs":
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})

    def replace(self, **changes) -> "EngineArgs":
        return dataclasses.replace(self, **changes)
