"""Hash routing (Roller et al. 2021): experts from a fixed hash of the token id, nothing learned.

For token id `x` and slot j = 0 .. k-1 (P = 2**31 - 1, a Mersenne prime):

    h_j(x) = ((a_j * x + b_j) mod P) mod (E - j)          a rank among the E - j unused experts
    expert_j(x) = the h_j(x)-th (0-based, ascending order) expert not in {expert_0 .. expert_{j-1}}

so the k experts of a token are distinct (sampling without replacement driven by k hashes).
The constants are fixed integers (see `hash_constants`), salted by the layer:
    s = HASH_SEED + salt * 2**32,   salt = the decoder layer index with router.hash_per_layer
                                    (conf/router/hash.yaml), else 0
    a_j = 1 + splitmix64(s + 2j) mod (P - 1),   b_j = splitmix64(s + 2j + 1) mod P;
so every layer splits the vocabulary its own way (Roller et al. draw a different random hash
per layer); salt 0 (layer 0, or hash_per_layer=false as in models saved before the key) is the
original unsalted hash. Slot j's constants do not depend on k, so top-1 and top-2 hash agree on
the first expert. Pure integer arithmetic (no Python `hash()`, which is salted per process, no
torch RNG): the same assignment in every process, torch version and device.
With ids < 2**32 the product a_j * x < 2**63 fits in int64.

Balance: for uniformly distributed ids each h_j is (close to) uniform, hence every slot's expert
is uniform over the experts left, and every expert's marginal load is N * k / E.

Weights are 1/k per slot (0 at padding); `probs` is the uniform distribution over the token's k
hashed experts. The router has no parameters (the constants are non-persistent buffers, rebuilt
identically at construction). It needs `inputs.input_ids`. Router knobs other than top_k and
hash_per_layer are ignored.
"""

from __future__ import annotations

import torch

from spectra.config import HashRouterConfig
from spectra.routing.base import Router, RoutingInputs, RoutingOutput, dispatch_counts_of, register_router
from spectra.routing.softmax_gate import expert_slots_per_token

HASH_PRIME = 2**31 - 1
HASH_SEED = 20210330  # fixed forever: changing it changes which expert every token id goes to


def _splitmix64(x: int) -> int:
    """One SplitMix64 step (constants of Vigna's splitmix64.c): a fixed integer mixer, no torch RNG."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def hash_constants(k: int, salt: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b), each [k] int64, for slots j < k of the hash salted by `salt` (a layer index >= 0).

    s = HASH_SEED + salt * 2**32 (the slot offsets 2j + 1 < 2**32, so no two salts share a seed)
    a_j = 1 + splitmix64(s + 2j) mod (P - 1)   in [1, P)
    b_j = splitmix64(s + 2j + 1) mod P         in [0, P)
    Pure integer arithmetic, so the hash is the same on every torch version and device.
    """
    if salt < 0:
        raise ValueError(f"hash salt (layer index) must be >= 0, got {salt}")
    seed = HASH_SEED + salt * 2**32
    a = [1 + _splitmix64(seed + 2 * j) % (HASH_PRIME - 1) for j in range(k)]
    b = [_splitmix64(seed + 2 * j + 1) % HASH_PRIME for j in range(k)]
    return torch.tensor(a, dtype=torch.long), torch.tensor(b, dtype=torch.long)


def hash_experts(ids: torch.Tensor, a: torch.Tensor, b: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Distinct hashed experts per token id.

    ids: [N] int64 token ids; a, b: [k] int64 constants; returns expert_index [N, k] int64 with
    expert_j = the h_j-th still-unused expert, h_j = ((a_j * id + b_j) mod P) mod (E - j).
    """
    n, k = ids.shape[0], a.shape[0]
    free = torch.ones(n, num_experts, dtype=torch.bool, device=ids.device)  # [N, E] unused experts
    rows = torch.arange(n, device=ids.device)
    slots = []
    for j in range(k):  # k is small (<= E); the loop is over slots, not tokens
        rank = torch.remainder(a[j] * ids + b[j], HASH_PRIME) % (num_experts - j)  # [N]
        free_rank = free.long().cumsum(-1) - 1  # [N, E], rank of each expert among the unused ones
        expert = (free & (free_rank == rank.unsqueeze(-1))).long().argmax(-1)  # [N], exactly one hit
        free[rows, expert] = False
        slots.append(expert)
    return torch.stack(slots, dim=-1)  # [N, k]


@register_router("hash")
class HashRouter(Router):
    """Fixed multiplicative hash of the token id -> k distinct experts, weights 1/k."""

    config_class = HashRouterConfig

    def __init__(self, config: HashRouterConfig, hidden_size: int, num_experts: int, layer_idx: int = 0):
        rc = HashRouterConfig.of(config).check_for(num_experts)  # k distinct experts: k <= E
        k = rc.top_k
        super().__init__(hidden_size, num_experts, k)
        # Salted by the layer with hash_per_layer (absent in configs saved before the key: unsalted).
        self.salt = layer_idx if rc.hash_per_layer else 0
        a, b = hash_constants(k, self.salt)
        # Buffers, not parameters: they follow .to(device) but are not trained nor saved.
        self.register_buffer("hash_a", a, persistent=False)
        self.register_buffer("hash_b", b, persistent=False)

    def forward(self, inputs: RoutingInputs) -> RoutingOutput:
        if inputs.input_ids is None:
            raise ValueError("hash router: RoutingInputs.input_ids is None; hash routing needs the token ids")
        valid = inputs.flat_valid  # [N]
        ids = inputs.input_ids.reshape(-1).long()  # [N]
        expert_index = hash_experts(ids, self.hash_a, self.hash_b, self.num_experts)  # [N, k]
        served = valid.unsqueeze(-1).expand_as(expert_index)  # [N, k]; nothing is ever dropped
        weight = torch.full(expert_index.shape, 1.0 / self.top_k, device=ids.device)
        weight = torch.where(served, weight, 0.0)  # [N, k], 0 at padding
        probs = torch.zeros(ids.shape[0], self.num_experts, device=ids.device)
        probs.scatter_(1, expert_index, 1.0 / self.top_k)  # [N, E], uniform over the hashed set
        diag = {"expert_slots_per_token": expert_slots_per_token(served, valid)}
        return RoutingOutput(
            expert_index=expert_index,
            expert_weight=weight,
            probs=probs,
            dropped=torch.zeros_like(served),
            valid=valid,
            dispatch_counts=dispatch_counts_of(expert_index, served, self.num_experts),
            diagnostics=diag,
        )
