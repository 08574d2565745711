"""Batch collation for rows made by `build_datasets` (packed or padded)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .sft import ROUTING_MASK

MODEL_KEYS = ("input_ids", "labels", "position_ids")


@dataclass
class PackedCollator:
    """List of rows -> dict of LongTensors [B, S] for a Hugging Face causal LM.

    Always input_ids, labels, position_ids; attention_mask only when the rows have one (unpacked
    data). For packed rows no attention_mask is sent on purpose: transformers 5 then builds the
    block-diagonal (per-document) causal mask from position_ids -- provided the model runs with
    use_cache=False (a KV cache disables that detection).

    routing_mask ([B, S], 1 = real token, 0 = padding) is sent when the rows have it and
    include_routing_mask=True (the default): it is how the routers of an upcycled model learn
    where the packed pad block is. The model's routing pre-hook (spectra.moe.context) pops it
    before the forward runs, so only a model with that hook may receive it; a plain (dense)
    model gets include_routing_mask=False.

    `domain_ids` is dropped (the model's forward must not receive it) unless
    include_domain_ids=True, for analysis loops that pop it before calling the model.
    """

    include_domain_ids: bool = False
    include_routing_mask: bool = True

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("PackedCollator got an empty batch")
        keys = list(MODEL_KEYS)
        if "attention_mask" in rows[0]:
            keys.append("attention_mask")
        if self.include_routing_mask and ROUTING_MASK in rows[0]:
            keys.append(ROUTING_MASK)
        if self.include_domain_ids:
            keys.append("domain_ids")
        # torch.as_tensor accepts lists or tensors (a dataset formatted as torch) alike.
        return {k: torch.stack([torch.as_tensor(r[k], dtype=torch.long) for r in rows]) for k in keys}
