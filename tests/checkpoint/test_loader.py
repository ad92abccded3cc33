"""load_checkpoint / CheckpointFiles / read_tensor on tiny and hand-made checkpoints."""

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsaserve.kernels.block_fp8 import dequantize_block_fp8, quantize_block_fp8
from dsaserve.checkpoint.loader import CheckpointError, CheckpointFiles, load_checkpoint, read_tensor
from dsaserve.checkpoint.spec import TensorSpec

EXPERT = "model.layers.1.mlp.experts.3."


def _all_raw(model_dir):
    """Every tensor of a checkpoint read straight through safetensors: {name: tensor}."""
    out = {}
    for f in sorted(os.listdir(model_dir)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(model_dir, f), framework="pt") as h:
                out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def _specs_like(raw, names, dtype=torch.float32):
    return [TensorSpec(n, torch.full(raw[n].shape, float("nan"), dtype=dtype)) for n in names]


def _write(model_dir, shards: dict[str, dict[str, torch.Tensor]], index=True):
    os.makedirs(model_dir, exist_ok=True)
    wm = {}
    for fname, tensors in shards.items():
        save_file(tensors, os.path.join(model_dir, fname), metadata={"format": "pt"})
        wm.update({k: fname for k in tensors})
    if index:
        with open(os.path.join(model_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": wm}, f)
    return str(model_dir)


def test_loads_every_tensor_exactly(tiny_ds):
    raw = _all_raw(tiny_ds)
    names = [n for n in raw if not n.startswith("model.layers.4.")]  # skip the MTP layer like a model does
    specs = _specs_like(raw, names)
    load_checkpoint(tiny_ds, specs, progress=False)
    for s in specs:
        assert torch.equal(s.dest, raw[s.name].float()), s.name
        assert torch.equal(read_tensor(tiny_ds, s.name), raw[s.name])


def test_casts_to_dest_dtype(tiny_ds):
    raw = _all_raw(tiny_ds)
    name = "model.layers.2.mlp.gate.e_score_correction_bias"  # stored fp32
    specs = _specs_like(raw, [name, "model.norm.weight"], dtype=torch.bfloat16)
    load_checkpoint(tiny_ds, specs, progress=True)  # the bar (to stderr) must not break anything
    assert specs[0].dest.dtype == torch.bfloat16
    assert torch.equal(specs[0].dest, raw[name].to(torch.bfloat16))
    assert torch.equal(specs[1].dest, raw["model.norm.weight"])


def test_sharded_equals_single_file(tiny_ds, tmp_path):
    raw = _all_raw(tiny_ds)
    single = tmp_path / "single"
    _write(single, {"model.safetensors": raw}, index=False)
    assert CheckpointFiles(str(single)).source == "model.safetensors"
    files = CheckpointFiles(tiny_ds)
    assert len(set(files.weight_map.values())) >= 2 and files.source == "model.safetensors.index.json"
    names = sorted(raw)
    a, b = _specs_like(raw, names), _specs_like(raw, names)
    load_checkpoint(tiny_ds, a, progress=False)
    load_checkpoint(str(single), b, progress=False)
    for x, y in zip(a, b):
        assert torch.equal(x.dest, y.dest), x.name


@pytest.mark.parametrize("parts", [1, 2, 4])
def test_expert_shard_slicing(tiny_ds, parts):
    """gate/up split by rows, down by columns; the parts concatenate back to the full tensor."""
    raw = _all_raw(tiny_ds)
    for proj, dim in [("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)]:
        name = EXPERT + proj + ".weight"
        full = raw[name]
        shape = list(full.shape)
        shape[dim] //= parts
        specs = [TensorSpec(name, torch.empty(shape, dtype=torch.bfloat16), shard_dim=dim, shard_index=i,
                            shard_count=parts) for i in range(parts)]
        load_checkpoint(tiny_ds, specs, progress=False)
        assert torch.equal(torch.cat([s.dest for s in specs], dim=dim), full)
        if parts > 1:
            assert not torch.equal(specs[0].dest, specs[1].dest)


def test_fp8_dequantize_and_slice_across_blocks(tmp_path):
    """A 300x200 fp8 weight (blocks end at 128, 256) sliced into parts that straddle block edges."""
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(0))
    q, s = quantize_block_fp8(w, ue8m0=True)
    ref = dequantize_block_fp8(q, s)
    d = _write(tmp_path / "ck", {"a.safetensors": {"x.weight": q}, "b.safetensors": {"x.weight_scale_inv": s}})
    assert torch.equal(read_tensor(d, "x.weight"), ref)  # scale in another shard than its weight
    assert read_tensor(d, "x.weight", dequantize=False).dtype == torch.float8_e4m3fn
    for dim, parts in [(0, 3), (1, 4), (1, 5), (0, 1)]:
        shape = list(w.shape)
        shape[dim] //= parts
        specs = [TensorSpec("x.weight", torch.empty(shape), dim if parts > 1 else None, i, parts)
                 for i in range(parts)]
        load_checkpoint(d, specs, progress=False)
        assert torch.equal(torch.cat([sp.dest for sp in specs], dim=dim), ref)


def test_fp8_raw_copy_when_dest_is_fp8(tiny_ds_fp8):
    name = "model.layers.0.self_attn.q_b_proj.weight"
    raw = _all_raw(tiny_ds_fp8)
    wq = TensorSpec(name, torch.empty(raw[name].shape, dtype=torch.float8_e4m3fn))
    sc = TensorSpec(name + "_scale_inv", torch.empty(raw[name + "_scale_inv"].shape))
    load_checkpoint(tiny_ds_fp8, [wq, sc], progress=False)
    assert torch.equal(wq.dest.view(torch.uint8), raw[name].view(torch.uint8))
    assert torch.equal(sc.dest, raw[name + "_scale_inv"])


def test_reads_only_listed_files(tiny_ds, tmp_path):
    """A stage loading layer 0 never opens the shard holding the head (here: made corrupt)."""
    d = tmp_path / "ck"
    shutil.copytree(tiny_ds, d)
    files = CheckpointFiles(str(d))
    head_file = files.file_of("lm_head.weight")
    layer0 = [n for n in files.names() if n.startswith("model.layers.0.")]
    assert {files.file_of(n) for n in layer0} == {files.file_of("model.embed_tokens.weight")} != {head_file}
    (d / head_file).write_bytes(b"\x00" * 100)
    raw = _all_raw(tiny_ds)
    load_checkpoint(str(d), _specs_like(raw, layer0), progress=False)
    with pytest.raises(CheckpointError, match=head_file):
        load_checkpoint(str(d), _specs_like(raw, ["lm_head.weight"]), progress=False)


# ---- errors ------------------------------------------------------------------------------------------
def test_missing_tensor_names_it_and_where_it_looked(tiny_ds):
    name = "model.layers.1.mlp.experts.3.gate_proj.weigth"  # typo
    specs = [TensorSpec(name, torch.empty(32, 128)), TensorSpec("model.layers.9.x.weight", torch.empty(1))]
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tiny_ds, specs, progress=False)
    msg = str(e.value)
    assert name in msg and "model.layers.9.x.weight" in msg
    assert "model.safetensors.index.json" in msg and tiny_ds in msg
    assert "model.layers.1.mlp.experts.3.gate_proj.weight" in msg  # the suggestion
    with pytest.raises(CheckpointError, match="not found"):
        read_tensor(tiny_ds, "nope.weight")


def test_wrong_shape_names_tensor_file_and_shapes(tiny_ds):
    name = "model.layers.0.self_attn.q_b_proj.weight"
    fname = CheckpointFiles(tiny_ds).file_of(name)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tiny_ds, [TensorSpec(name, torch.empty(192, 65))], progress=False)
    msg = str(e.value)
    assert name in msg and fname in msg and "[192, 64]" in msg and "[192, 65]" in msg
    # sharded: expected full shape is dest * shard_count
    with pytest.raises(CheckpointError, match=r"expected \[64, 128\].*part 0 of 2 along dim 0"):
        load_checkpoint(tiny_ds, [TensorSpec(EXPERT + "gate_proj.weight", torch.empty(32, 128), 0, 0, 2)],
                        progress=False)


def test_uneven_shard_is_an_error(tmp_path):
    d = _write(tmp_path / "ck", {"model.safetensors": {"w.weight": torch.zeros(10, 4)}}, index=False)
    # 10 rows do not split in 3 parts: no dest shape can match, so it surfaces as a shape error.
    with pytest.raises(CheckpointError, match=r"w\.weight"):
        load_checkpoint(d, [TensorSpec("w.weight", torch.empty(3, 4), 0, 0, 3)], progress=False)
    with pytest.raises(CheckpointError, match=r"shard_index=3 is not in \[0, 2\)"):
        load_checkpoint(d, [TensorSpec("w.weight", torch.empty(5, 4), 0, 3, 2)], progress=False)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_file_names_the_file(tiny_ds, tmp_path, damage):
    d = tmp_path / "ck"
    shutil.copytree(tiny_ds, d)
    fname = CheckpointFiles(str(d)).file_of("model.norm.weight")
    path = d / fname
    data = path.read_bytes()
    path.write_bytes(b"this is not a safetensors file" * 10 if damage == "garbage" else data[: len(data) // 2])
    raw = _all_raw(tiny_ds)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(d), _specs_like(raw, ["model.norm.weight"]), progress=False)
    assert fname in str(e.value) and "cannot read" in str(e.value)


def test_corrupt_single_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        CheckpointFiles(str(tmp_path))


def test_index_names_missing_shard(tiny_ds, tmp_path):
    d = tmp_path / "ck"
    shutil.copytree(tiny_ds, d)
    gone = "model-00002-of-00003.safetensors"
    os.remove(d / gone)
    with pytest.raises(CheckpointError, match=f"names shard file.*{gone}") as e:
        load_checkpoint(str(d), [], progress=False)
    assert "model.safetensors.index.json" in str(e.value)


def test_bad_index_json(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="model.safetensors.index.json"):
        CheckpointFiles(str(tmp_path))
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match="no 'weight_map'"):
        CheckpointFiles(str(tmp_path))


def test_no_safetensors(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no safetensors weights in"):
        CheckpointFiles(str(tmp_path))
    with pytest.raises(CheckpointError, match="does not exist"):
        CheckpointFiles(str(tmp_path / "nope"))


def test_unindexed_multi_file_folder(tmp_path):
    d = _write(tmp_path / "ck", {"a.safetensors": {"x": torch.ones(2)}, "b.safetensors": {"y": torch.zeros(3)}},
               index=False)
    assert CheckpointFiles(d).weight_map == {"x": "a.safetensors", "y": "b.safetensors"}
    _write(tmp_path / "ck", {"c.safetensors": {"x": torch.ones(2)}}, index=False)
    with pytest.raises(CheckpointError, match="'x' is stored twice"):
        CheckpointFiles(d)
