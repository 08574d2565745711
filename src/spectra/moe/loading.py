"""Loading base models and saving/reloading upcycled ones.

Base model: `model.source=pretrained` loads a hub id or local path with `from_pretrained`;
`model.source=config` builds a transformers config from `model.arch` (e.g. a tiny Llama),
saves it once with `save_pretrained` into a cache directory keyed by the arch, and loads it
back with `from_pretrained` — the same code path a real checkpoint takes.

Upcycled model: `save_moe_model` is `save_pretrained` (the config carries `spectra_moe`: E, k,
router and its settings); `load_moe_model` rebuilds the MoE blocks from that record and loads
the weights, giving identical logits. The record's `mode` says how the blocks were made:
'upcycle' (dense MLPs -> MoE) or 'replace' (an MoE model's gates replaced, moe/replace.py).

Tokenizer larger than the model's vocabulary (e.g. the paper's SmolVLM-256M-Instruct tokenizer,
49,280 tokens, on SmolLM2-135M's 49,152-row embedding): `load_base_model` grows the embedding
(and a tied or untied LM head) to `len(tokenizer)` with `resize_token_embeddings`; the new
rows start at the mean of the old ones (transformers' mean resizing). A smaller tokenizer
leaves the embedding as is (unused rows cost memory, nothing else).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from spectra.config import ModelConfig, SpectraConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_attn_implementation(name: str) -> str:
    """'auto' -> flash_attention_2 when flash-attn imports and CUDA is there, else sdpa."""
    if name != "auto":
        return name
    try:
        import flash_attn  # noqa: F401

        if torch.cuda.is_available():
            return "flash_attention_2"
    except ImportError:
        pass
    return "sdpa"


def build_config_model_dir(model_cfg: ModelConfig, vocab_size: int, cache_root: str | os.PathLike, seed: int) -> Path:
    """Build `model.arch` with random init, save_pretrained it once, return its directory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = dict(OmegaConf.to_container(OmegaConf.create(dict(model_cfg.arch)), resolve=True))
    arch.setdefault("vocab_size", vocab_size)
    key = hashlib.sha256(json.dumps({"arch": arch, "seed": seed}, sort_keys=True).encode()).hexdigest()[:12]
    out = Path(cache_root) / f"{model_cfg.name}-{key}"
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    model_type = arch.pop("model_type")
    config = AutoConfig.for_model(model_type, **arch)
    with torch.random.fork_rng(devices=[]):  # building must not move the run's global RNG
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    os.makedirs(out.parent, exist_ok=True)
    try:
        os.replace(tmp, out)  # atomic: a half-written directory is never taken for a model
    except OSError:  # another process won the race
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_base_model(model_cfg: ModelConfig, vocab_size: int, cache_root: str | os.PathLike, seed: int = 0) -> nn.Module:
    """The dense causal LM the run starts from (see module docstring)."""
    from transformers import AutoModelForCausalLM

    if model_cfg.source == "config":
        path = str(build_config_model_dir(model_cfg, vocab_size, cache_root, seed))
    else:
        path = model_cfg.pretrained
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=_DTYPES[model_cfg.dtype],
            attn_implementation=resolve_attn_implementation(model_cfg.attn_implementation),
        )
    except OSError as e:
        raise FileNotFoundError(f"model.pretrained={path!r} could not be loaded: {str(e).splitlines()[0]}") from None
    if vocab_size > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(vocab_size)  # token ids >= old vocab would index out of range
    return model


def save_moe_model(model: nn.Module, path: str | os.PathLike) -> None:
    """save_pretrained; `config.spectra_moe` records what load_moe_model needs."""
    model.save_pretrained(path)


def spec_to_config(spec: dict) -> SpectraConfig:
    """The typed config of the routing groups recorded in `config.spectra_moe`."""
    merged = OmegaConf.merge(OmegaConf.structured(SpectraConfig), {k: spec[k] for k in ("moe", "router", "osr", "quota")})
    return OmegaConf.to_object(merged)


def load_moe_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild an upcycled model saved with `save_moe_model` and load its weights."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from spectra.moe.replace import replace_routers
    from spectra.moe.upcycle import upcycle

    config = AutoConfig.from_pretrained(path)
    spec = getattr(config, "spectra_moe", None)
    if spec is None:
        raise ValueError(f"{path}: config.json has no `spectra_moe` record; not a model saved by spectra")
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    cfg = spec_to_config(spec)
    if spec.get("mode") == "replace":  # an MoE model whose gates were replaced: same again
        replace_routers(model, cfg)
    elif cfg.router.name != "dense":  # records without `mode` predate router replacement
        upcycle(model, cfg)
    state = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if isinstance(getattr(model, "_tied_weights_keys", None), dict):
        tied = set(model._tied_weights_keys)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the rebuilt model; missing={missing[:5]} unexpected={unexpected[:5]}")
    model.tie_weights()
    model.eval()
    return model
