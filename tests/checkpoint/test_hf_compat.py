"""transformers 5.24 as the oracle: it reads our tiny checkpoints, and we read its save_pretrained folders."""

import pytest
import torch

from dsaserve.checkpoint.loader import CheckpointFiles, load_checkpoint, read_tensor
from dsaserve.checkpoint.spec import TensorSpec
from dsaserve.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
transformers.utils.logging.set_verbosity_error()

PACKED = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")  # transformers' in-memory expert layout


def _hf_value(sd, name, moe_intermediate):
    """Value of checkpoint tensor ``name`` in a transformers state dict (experts are packed there)."""
    if ".mlp.experts." in name:
        layer, e, proj = name.split(".mlp.experts.")[0], int(name.split(".")[5]), name.split(".")[6]
        if proj == "down_proj":
            return sd[f"{layer}.mlp.experts.down_proj"][e]
        gu = sd[f"{layer}.mlp.experts.gate_up_proj"][e]  # [2 * moe_intermediate, hidden]: gate rows, then up
        return gu[:moe_intermediate] if proj == "gate_proj" else gu[moe_intermediate:]
    return sd[name]


@pytest.mark.parametrize("fixture", ["tiny_ds", "tiny_glm"])
def test_transformers_loads_our_tiny_checkpoint(fixture, request):
    d = request.getfixturevalue(fixture)
    cfg = transformers.AutoConfig.from_pretrained(d)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    sd = model.state_dict()
    names = [n for n in CheckpointFiles(d).names() if not n.startswith(f"model.layers.{cfg.num_hidden_layers}.")]
    covered = set()
    for name in names:
        assert torch.equal(_hf_value(sd, name, cfg.moe_intermediate_size), read_tensor(d, name).float()), name
        covered.add(name if ".mlp.experts." not in name else name.split(".experts.")[0] + ".experts")
    assert {k if not k.endswith(PACKED) else k.rsplit(".", 1)[0] for k in sd} <= covered
    # The random model is not degenerate: greedy tokens vary and are never eos right away.
    tok = Tokenizer.from_dir(d)
    ids = torch.tensor([tok.encode("The capital of France is")])
    out = model.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:].tolist()
    assert len(set(out)) >= 5 and out[0] not in tok.eos_token_ids, out
    with torch.no_grad():
        logits = model(ids).logits[0]  # [tokens, vocab]
    assert logits[-1].std() > 0.2 and not torch.allclose(logits[-1], logits[-2])


def test_our_loader_reads_a_save_pretrained_folder(tiny_ds, tmp_path):
    cfg = transformers.AutoConfig.from_pretrained(tiny_ds)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # HF inits biases/norms to constants; make every tensor distinct
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(tmp_path)
    assert Tokenizer.from_dir(str(tmp_path)) is None
    files = CheckpointFiles(str(tmp_path))
    sd = model.state_dict()
    specs = []
    for name in files.names():
        shape = read_tensor(str(tmp_path), name).shape
        specs.append(TensorSpec(name, torch.empty(shape)))
    load_checkpoint(str(tmp_path), specs, progress=False)
    for s in specs:
        assert torch.equal(s.dest, _hf_value(sd, s.name, cfg.moe_intermediate_size)), s.name
    # every HF parameter came from somewhere
    loaded = {s.name.split(".experts.")[0] + ".experts" if ".mlp.experts." in s.name else s.name for s in specs}
    assert {k.rsplit(".", 1)[0] if k.endswith(PACKED) else k for k in sd} <= loaded
    # an expert shard read from the HF folder
    name = "model.layers.1.mlp.experts.6.down_proj.weight"
    part = TensorSpec(name, torch.empty(cfg.hidden_size, cfg.moe_intermediate_size // 2), 1, 1, 2)
    load_checkpoint(str(tmp_path), [part], progress=False)
    assert torch.equal(part.dest, sd["model.layers.1.mlp.experts.down_proj"][6][:, cfg.moe_intermediate_size // 2:])
