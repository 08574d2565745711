"""Saved MoE models are Hugging Face models (issue 19 part 1, moe/hf_native.py):
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` gives the same MoE as
spectra's own model (bit-equal logits on CPU, the same greedy generation with the KV cache), for
upcycled and router-replaced models and every router, without spectra installed; without
trust_remote_code it raises instead of building a dense model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_causal_lm
from spectra.config import load_config, validate
from spectra.moe import load_moe_model, save_moe_model, upcycle
from spectra.moe.hf_native import MODEL_TYPE, HFNativeError, bundle_sources, slice_module
from spectra.routers_catalog import NO_ROUTER, ROUTER_NAMES
from test_router_replacement import tiny_moe
from test_upcycle_models import one_thread  # noqa: F401 (fixture)

# Every router of the catalog (conf/router/<name>.yaml, k = moe.top_k = 2 unless it fixes its own).
ROUTERS = [name for name in ROUTER_NAMES if name != NO_ROUTER]


def _cfg(router: str, *overrides):
    return validate(load_config([f"router={router}", "moe.num_experts=4", *overrides]))


def _perturb(model, seed: int = 0):
    """Move every saved tensor (weights, SPECTRA's running buffers) away from any fresh build, so
    that one the loader does not restore shows in the logits."""
    gen = torch.Generator().manual_seed(seed + 100)
    saved = {id(t): t for t in model.state_dict(keep_vars=True).values() if t.is_floating_point()}
    with torch.no_grad():
        for t in saved.values():
            t.add_(0.3 * (t.std() if t.numel() > 1 else 1.0) * torch.randn(t.shape, generator=gen))
    return model.eval()


def upcycled(model_type: str, router: str, seed: int = 0):
    model = tiny_causal_lm(model_type, seed=seed)
    upcycle(model, _cfg(router, "moe.num_shared_experts=1"), seed=seed)
    return _perturb(model, seed)


def replaced(model_type: str, router: str, seed: int = 0):
    model = tiny_moe(model_type, seed=seed)
    upcycle(model, _cfg(router), seed=seed)  # an MoE model: upcycle hands it to replace_routers
    return _perturb(model, seed)


PROMPT = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(1))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(PROMPT).logits


def _generate(model) -> torch.Tensor:
    """Greedy decoding with the KV cache: the recurrent routing state is carried between calls."""
    return model.generate(PROMPT[:1], max_new_tokens=6, do_sample=False, pad_token_id=0)


def _hf_load(path):
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)


@pytest.mark.parametrize("router", ROUTERS)
def test_upcycled_llama_loads_through_transformers_as_the_same_moe(tmp_path, router):
    model = upcycled("llama", router)
    save_moe_model(model, tmp_path)
    ours, hf = load_moe_model(tmp_path), _hf_load(tmp_path)
    assert type(hf).__name__ == "SpectraMoEForCausalLM"
    want = _logits(model)
    assert torch.equal(_logits(ours), want)
    assert torch.equal(_logits(hf), want)
    assert torch.equal(_generate(hf), _generate(ours))
    assert hf.state_dict().keys() == model.state_dict().keys()


def _shift_tensor_data(path, offset: int = 56) -> None:
    """Rewrite the saved safetensors with header padding so that its tensor data starts `offset`
    bytes past a 64-byte boundary (as the demo run's file does), whatever the header's length."""
    import struct

    from safetensors.torch import load_file, save_file

    f = str(path / "model.safetensors")
    state = load_file(f)
    for n in range(64):
        save_file(state, f, metadata={"format": "pt", "pad": "x" * n})
        with open(f, "rb") as fh:
            (header,) = struct.unpack("<Q", fh.read(8))
        if (8 + header) % 64 == offset:
            return
    raise AssertionError("no padding gives that offset")


def test_a_demo_sized_spectra_model_is_bit_equal_on_unaligned_file_data(tmp_path):
    """conf/model/tiny.yaml's size (H=128, 4 layers, E=8). transformers' loader leaves CPU tensors
    as views into the memory-mapped file; where the data is not 64-byte aligned the CPU kernels
    round differently (here ~2e-7 on the logits without the fix); the loaded model gets aligned copies."""
    model = tiny_causal_lm("llama", hidden_size=128, intermediate_size=256, num_hidden_layers=4, tie_word_embeddings=True)
    upcycle(model, validate(load_config(["router=spectra", "moe.num_experts=8", "router.top_k=2"])))
    _perturb(model)
    save_moe_model(model, tmp_path)
    _shift_tensor_data(tmp_path)
    hf = _hf_load(tmp_path)
    assert all(t.data_ptr() % 64 == 0 for t in [*hf.parameters(), *hf.buffers()])
    assert torch.equal(_logits(hf), _logits(model))
    assert torch.equal(_generate(hf), _generate(load_moe_model(tmp_path)))


@pytest.mark.parametrize("model_type", ["gpt2", "gpt_neox", "qwen2"])
def test_upcycled_other_families_load_through_transformers(tmp_path, model_type):
    model = upcycled(model_type, "spectra")
    save_moe_model(model, tmp_path)
    hf = _hf_load(tmp_path)
    assert torch.equal(_logits(hf), _logits(model))
    assert torch.equal(_generate(hf), _generate(load_moe_model(tmp_path)))


@pytest.mark.parametrize(("model_type", "router"), [
    ("qwen3_moe", "spectra"), ("qwen3_moe", "hash"), ("olmoe", "topk"), ("mixtral", "switch_top2"),
    ("qwen2_moe", "expert_choice"),
])
def test_router_replaced_models_load_through_transformers(tmp_path, model_type, router):
    model = replaced(model_type, router)
    save_moe_model(model, tmp_path)
    ours, hf = load_moe_model(tmp_path), _hf_load(tmp_path)
    want = _logits(model)
    assert torch.equal(_logits(ours), want)
    assert torch.equal(_logits(hf), want)
    assert torch.equal(_generate(hf), _generate(ours))


def test_a_bfloat16_model_loads_with_its_float32_routers(tmp_path):
    """As a bf16 run builds it: the base model (and experts) in bf16, the routers in float32;
    transformers' loader constructs the model with bf16 as torch's default dtype."""
    from transformers import AutoConfig

    config = AutoConfig.for_model("llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    upcycle(model, _cfg("spectra"))
    model.eval()
    save_moe_model(model, tmp_path)
    hf = _hf_load(tmp_path)
    assert {p.dtype for p in hf.model.layers[0].mlp.router.parameters()} == {torch.float32}
    assert hf.model.layers[0].mlp.experts.down_proj.dtype == torch.bfloat16
    assert torch.equal(_logits(hf), _logits(model))
    assert torch.equal(_logits(load_moe_model(tmp_path, dtype=torch.bfloat16)), _logits(model))


def test_without_trust_remote_code_loading_raises_never_a_dense_model(tmp_path):
    save_moe_model(upcycled("llama", "topk"), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == MODEL_TYPE and config["architectures"] == ["SpectraMoEForCausalLM"]
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=False)


def test_a_weight_that_does_not_match_raises_instead_of_a_fresh_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    save_moe_model(upcycled("llama", "topk"), tmp_path)
    f = str(tmp_path / "model.safetensors")
    state = load_file(f)
    del state["model.layers.1.mlp.router.gate.weight"]
    save_file(state, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing_keys.*model\.layers\.1\.mlp\.router\.gate\.weight"):
        _hf_load(tmp_path)


def test_a_model_loaded_through_transformers_saves_and_reloads_as_itself(tmp_path):
    """save_pretrained of the transformers-loaded model (its own code, copied by transformers)
    and save_moe_model of it both give a directory that loads to the same logits."""
    model = upcycled("llama", "spectra")
    save_moe_model(model, tmp_path / "a")
    hf = _hf_load(tmp_path / "a")
    hf.save_pretrained(tmp_path / "b")
    save_moe_model(hf, tmp_path / "c")
    want = _logits(model)
    assert torch.equal(_logits(_hf_load(tmp_path / "b")), want)
    assert torch.equal(_logits(_hf_load(tmp_path / "c")), want)
    assert torch.equal(_logits(load_moe_model(tmp_path / "c")), want)


@pytest.mark.parametrize("model_type", ["llama", "gpt_neox"])
def test_a_directory_saved_before_the_modeling_code_still_loads_through_load_moe_model(tmp_path, model_type):
    """The old format: save_pretrained alone (the model's config type, GPT-NeoX's head renamed
    `embed_out` by transformers), no auto_map."""
    model = upcycled(model_type, "spectra")
    model.save_pretrained(tmp_path)
    assert "auto_map" not in json.loads((tmp_path / "config.json").read_text())
    assert torch.equal(_logits(load_moe_model(tmp_path)), _logits(model))


def test_a_dense_model_is_saved_as_the_plain_model_it_is(tmp_path):
    model = tiny_causal_lm("llama")
    save_moe_model(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llama"
    assert not list(tmp_path.glob("*.py"))


# A subprocess in which spectra (and Hydra/OmegaConf, which spectra's configuration uses) cannot
# be imported: a meta-path finder refuses them before any other finder (the editable install's
# included) is asked. It loads each directory through transformers and saves logits and tokens.
_WITHOUT_SPECTRA = textwrap.dedent("""
    import importlib.abc, json, sys

    BLOCKED = ("spectra", "omegaconf", "hydra")

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
            return None

    sys.meta_path.insert(0, Blocker())
    for name in BLOCKED:
        try:
            __import__(name)
        except ModuleNotFoundError:
            pass
        else:
            raise SystemExit(f"{name} is importable")

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    prompt = torch.load(sys.argv[1])
    for d in sys.argv[2:]:
        model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True)
        with torch.no_grad():
            logits = model(prompt).logits
        tokens = model.generate(prompt[:1], max_new_tokens=6, do_sample=False, pad_token_id=0)
        torch.save({"logits": logits, "tokens": tokens}, d + "/out.pt")
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not loaded, loaded
""")


def test_loads_where_spectra_is_not_installed(tmp_path):
    models = {"llama_spectra": upcycled("llama", "spectra"), "gpt2_hash": upcycled("gpt2", "hash"),
              "qwen3_moe_spectra": replaced("qwen3_moe", "spectra")}
    for name, model in models.items():
        save_moe_model(model, tmp_path / name)
    torch.save(PROMPT, tmp_path / "prompt.pt")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_SPECTRA, str(tmp_path / "prompt.pt"),
                           *(str(tmp_path / name) for name in models)],
                          env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, model in models.items():
        out = torch.load(tmp_path / name / "out.pt")
        assert torch.equal(out["logits"], _logits(model)), name
        assert torch.equal(out["tokens"], _generate(load_moe_model(tmp_path / name))), name


def test_the_saved_code_imports_only_torch_transformers_and_the_standard_library(tmp_path):
    """As transformers' loader reads them (`get_imports`: imports inside try/except are optional)."""
    from transformers.dynamic_module_utils import get_imports

    save_moe_model(upcycled("llama", "spectra"), tmp_path)
    files = {p.name: p for p in tmp_path.glob("*.py")}
    assert {"modeling_spectra_moe.py", "configuration_spectra_moe.py", "spectra_moe_rebuild.py",
            "spectra_routing.py", "spectra_routing_spectra.py", "spectra_config.py"} <= set(files)
    assert set(files) == {"modeling_spectra_moe.py", "configuration_spectra_moe.py", *bundle_sources()}
    for name, path in files.items():
        assert set(get_imports(path)) <= {"torch", "transformers", *sys.stdlib_module_names}, name
    assert "hydra" not in files["spectra_config.py"].read_text()


def test_slicing_keeps_what_the_wanted_names_use_and_refuses_code_it_would_drop():
    source = 'import os\nimport re\n\nX = 1\nY = re.compile("y")\n\n\ndef f():\n    return X + len(os.sep)\n\n\nf.attr = 2\n'
    sliced = slice_module("m", source, {"f"})
    assert "def f" in sliced and "X = 1" in sliced and "import os" in sliced and "f.attr = 2" in sliced
    assert "Y =" not in sliced and "import re" not in sliced
    with pytest.raises(HFNativeError, match="top-level code"):
        slice_module("m", source + "print(X)\n", {"f"})
