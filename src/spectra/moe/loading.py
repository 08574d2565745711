"""Loading base models and saving/reloading upcycled ones.

Base model: `model.source=pretrained` loads a hub id or local path with `from_pretrained`;
`model.source=config` builds a transformers config from `model.arch` (e.g. a tiny Llama),
saves it once with `save_pretrained` into a cache directory keyed by the arch, and loads it
back with `from_pretrained` — the same code path a real checkpoint takes.

Upcycled model: `save_moe_model` is `save_pretrained` (the config carries `spectra_moe`: E, k,
router and its settings) plus the modeling code that makes the directory a Hugging Face model
(moe/hf_native.py: `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` loads the
MoE without spectra installed; without trust_remote_code it raises). `load_moe_model` rebuilds
the MoE blocks from that record with the same code (moe/rebuild.py) and loads the weights, giving
identical logits; it also loads directories saved before the modeling code was written. Weights are loaded by `load_weights` (also the Trainer's
resume, train/checkpoint.py) through transformers' own loader, so its key renames (GPT-NeoX
saves `lm_head` as `embed_out`) and tied weights apply as in `from_pretrained`, and strictly: a
missing, unexpected or mis-shaped key raises WeightsMismatchError naming it. The record's
`mode` says how the blocks were made: 'upcycle' (dense MLPs -> MoE) or 'replace' (an MoE
model's gates replaced, moe/replace.py).

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
import shutil
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.modeling_utils import LoadStateDictConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from spectra.config import ModelConfig
from spectra.moe.hf_native import BASE_MODEL_TYPE_KEY, write_hf_native
from spectra.moe.rebuild import rebuild_moe

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
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_base_model(model_cfg: ModelConfig, vocab_size: int, cache_root: str | os.PathLike, seed: int = 0) -> nn.Module:
    """The dense causal LM the run starts from (see module docstring)."""

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
    """save_pretrained; `config.spectra_moe` records what load_moe_model needs. An MoE model (one
    with that record) is written as a Hugging Face model with its modeling code (moe/hf_native.py);
    a dense one (router=dense) is the base model, saved as it is.

    The weights are saved under the model's own module names: transformers would otherwise rename
    some on save (GPT-NeoX's `lm_head` as `embed_out`, the legacy per-expert layout of Mixtral and
    Qwen-MoE experts) and rename them back on load, which it does not do for custom code.
    """
    if getattr(model.config, "spectra_moe", None) is None:
        model.save_pretrained(path)
        return
    conversions = getattr(model, "_weight_conversions", None)
    model._weight_conversions = []  # save the module's own keys (see above)
    try:
        model.save_pretrained(path)
    finally:
        if conversions is None:
            del model._weight_conversions
        else:
            model._weight_conversions = conversions
    write_hf_native(model, path)


class WeightsMismatchError(ValueError):
    """Saved weights and the model they are loaded into do not match key for key."""


def checkpoint_files(path: str | os.PathLike) -> list[str]:
    """The safetensors files `save_pretrained` wrote into `path` (one file, or the shards of its index)."""

    root = Path(path)
    index = root / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [str(root / s) for s in shards]
    if (root / SAFE_WEIGHTS_NAME).is_file():
        return [str(root / SAFE_WEIGHTS_NAME)]
    raise FileNotFoundError(f"{path}: no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} (not a save_pretrained directory)")


def _mismatches(info) -> list[str]:
    """What did not load cleanly, one entry per kind, naming every key (empty when all did)."""
    problems = [f"{label} {sorted(keys)}" for label, keys in (("missing", info.missing_keys), ("unexpected", info.unexpected_keys)) if keys]
    if info.mismatched_keys:
        problems.append("shape mismatch " + ", ".join(f"{k} {tuple(a)} vs model {tuple(b)}" for k, a, b in sorted(info.mismatched_keys)))
    if info.conversion_errors:
        problems.append(f"conversion errors {dict(info.conversion_errors)}")
    return problems + list(info.error_msgs)


def _restore_tensor_objects(model: nn.Module, before: dict[str, torch.Tensor]) -> list[str]:
    """Copy the loaded values into the tensors the model had before loading and put those back;
    returns the problems found (a tied tensor that came back as two different ones).

    transformers' loader installs new Parameter objects (on its load device, requires_grad=True);
    keeping the old objects keeps their device, dtype and `requires_grad` (a frozen shared expert
    stays frozen), their tying (several names, one object) and every other reference to them.
    """
    loaded: dict[int, tuple[str, torch.Tensor]] = {}  # id(old tensor) -> (first name, its loaded value)
    problems = []
    for name, old in before.items():
        module_path, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_path)
        new = getattr(module, leaf)
        first = loaded.setdefault(id(old), (name, new))
        if first[1] is not new:  # the file held different values for two names of one tied tensor
            problems.append(f"tied {first[0]} and {name} differ in the file")
            continue
        if new is not old:
            with torch.no_grad():
                old.copy_(new)
            setattr(module, leaf, old)
    return problems


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load what `save_pretrained` wrote into `path` (`save_moe_model`, a Trainer checkpoint) into
    `model`, strictly; raises WeightsMismatchError naming every missing, unexpected or mis-shaped key.

    The keys go through transformers' own loader, as in `from_pretrained`: the model's weight
    conversions (e.g. GPT-NeoX saves `lm_head` as `embed_out`), prefix handling, and tied weights
    (a tied LM head is not saved; it is re-tied to the embedding). A key the model does not tie
    must be in the file: an untied LM head that is missing is an error, not a silent keep.
    """

    before = {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers(remove_duplicate=False))}
    load_config = LoadStateDictConfig(pretrained_model_name_or_path=str(path), weight_mapping=get_model_conversion_mapping(model))
    info, _ = type(model)._load_pretrained_model(model, None, checkpoint_files(path), load_config)
    # from_pretrained's own finishing steps that apply to a model that already has its tensors:
    # tie (removes the tied, unsaved keys from `missing`), then drop keys transformers ignores on
    # purpose (rotary inv_freq / position_ids buffers of older checkpoints).
    model.tie_weights(missing_keys=info.missing_keys, recompute_mapping=False)
    model._adjust_missing_and_unexpected_keys(info)
    # Always, also on failure: no half-swapped tensors are left behind.
    problems = _restore_tensor_objects(model, before) + _mismatches(info)
    if problems:
        raise WeightsMismatchError(f"{path}: the saved weights do not match {type(model).__name__}: " + "; ".join(problems))


def saved_base_config(path: str | os.PathLike):
    """The base model's transformers config of a directory `save_moe_model` wrote: read as it is
    from a directory saved before the modeling code was written; from a Hugging Face MoE directory
    (model_type 'spectra_moe', which transformers loads only through the saved code) rebuilt with
    the config class of `spectra_base_model_type`, the same values."""

    config_dict = json.loads((Path(path) / "config.json").read_text())
    base_type = config_dict.get(BASE_MODEL_TYPE_KEY)
    if base_type is None:
        return AutoConfig.from_pretrained(path)
    for key in ("model_type", "auto_map", "architectures", BASE_MODEL_TYPE_KEY):
        config_dict.pop(key, None)
    return CONFIG_MAPPING[base_type].from_dict(config_dict)


def load_moe_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild an upcycled model saved with `save_moe_model` and load its weights (strictly)."""

    config = saved_base_config(path)
    spec = getattr(config, "spectra_moe", None)
    if spec is None:
        raise ValueError(f"{path}: config.json has no `spectra_moe` record; not a model saved by spectra")
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    rebuild_moe(model, spec)
    load_weights(model, path)
    model.eval()
    return model
