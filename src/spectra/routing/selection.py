"""Expert selection from routing scores (METHOD.md §2 step 7).

`topk_select`   plain per-token top-k.
`quota_topk`    top-k under a HARD per-expert capacity: every real token gets k distinct experts,
                no expert serves more than `capacity` real tokens, no token is dropped.

Quota algorithm (vectorised over tokens; Python loops only over rounds and experts)
---------------------------------------------------------------------------------
Phase 1, proposal rounds (a capacitated, token-proposing greedy):
    every token that still needs experts proposes to its best expert that it does not hold yet
    and that still has room; each expert accepts its proposals by descending score (ties: lower
    token index first) up to its remaining room (one stable sort + a per-expert running count);
    rejected tokens propose to their next best expert with room in the next round.
    A round without rejections advances every proposing token, and a round with a rejection fills
    an expert, so phase 1 ends after at most E + k rounds.
Phase 2, repair swaps (only when capacity is tight, e.g. α = 1):
    the greedy can strand a token t whose experts-with-room R are all already in its own set S(t)
    (e.g. E=3, k=2: t0 and t1 took {e0, e1}, t2 holds e2 and nothing else has room). Then a
    two-edge swap always exists: pick r ∈ R and a *full* token u with r ∉ S(u) and some
    f ∈ S(u) \\ S(t) (|S(u)| = k > |S(t)| makes f exist; a counting argument — f is full, r is
    not, t holds r but not f — makes u exist); u gives f to t and takes r. Loads of f are unchanged,
    r gains one (it had room), both sets stay distinct. Swaps are batched per expert r (up to
    min(room_r, #stuck, #donors) at once; donors are the full tokens that lose least, i.e. with
    the largest score_u(r) − min_{f ∈ S(u)} score_u(f); f is chosen to maximise
    score_t(f) − score_u(f)), looping over experts, until nobody is stuck.

Feasibility needs capacity · E ≥ N · k (guaranteed by α ≥ 1, which config validation enforces).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = ["QuotaResult", "quota_capacity", "quota_topk", "topk_select"]

_BIG = 1e30  # scores are clamped to ±_BIG so that -inf can mean "not allowed"


def topk_select(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Per-token top-k: scores [N, E] -> expert index [N, k] (long), best first."""
    return scores.topk(k, dim=-1).indices


def quota_capacity(num_tokens: int, k: int, num_experts: int, capacity_factor: float) -> int:
    """Hard per-expert capacity cap = ceil(α · N · k / E).

    The product is rounded to 9 decimals before `ceil` so float noise (1.1 · 100 / 10 =
    11.000000000000002) does not add a slot.
    """
    return int(math.ceil(round(capacity_factor * num_tokens * k / num_experts, 9)))


class QuotaResult(NamedTuple):
    """Result of `quota_topk`.

    index:  [N, k] long, k distinct experts per token, best (by score) first.
    load:   [E] long, real tokens assigned to each expert (≤ capacity).
    rounds: proposal rounds used (phase 1).
    swaps:  repair swaps used (phase 2; 0 unless capacity was tight).
    """

    index: torch.Tensor
    load: torch.Tensor
    rounds: int
    swaps: int


def _proposal_round(s, held, need, load, capacity: int, tok, neg_inf):
    """One round of phase 1 over the tokens `tok`; updates held/need/load in place, no host sync.

    Each token of `tok` that still needs an expert proposes to its best-scoring expert with room;
    each expert accepts its proposers by (score desc, token asc) up to its room. Tokens that do
    not propose queue in a dummy group E that accepts nobody, so `tok` may hold every token.

    s [N, E] scores; held [N, E] bool; need [N] long; load [E] long; tok [P] ascending token ids.
    Returns a 0-dim bool tensor: did any token propose?
    """
    e = s.shape[1]
    room = capacity - load  # [E]
    avail = ~held[tok] & (room > 0).unsqueeze(0)  # [P, E]
    proposing = (need[tok] > 0) & avail.any(dim=1)  # [P]
    s_tok = s[tok]  # [P, E]
    choice = torch.where(avail, s_tok, neg_inf).argmax(dim=1)  # [P] best expert with room
    sc = s_tok.gather(1, choice.unsqueeze(1)).squeeze(1)  # [P]
    group = torch.where(proposing, choice, e)  # [P] non-proposers queue in a dummy group E
    # Order proposals by (expert asc, score desc, token asc): two stable sorts.
    order = torch.argsort(-sc, stable=True)  # [P]
    order = order[torch.argsort(group[order], stable=True)]  # [P]
    grp_sorted = group[order]  # [P]
    counts = torch.bincount(grp_sorted, minlength=e + 1)  # [E + 1]
    first = torch.cumsum(counts, 0) - counts  # [E + 1] start of each expert's group
    room_ext = torch.cat([room, room.new_zeros(1)])  # [E + 1] the dummy group accepts nobody
    place = torch.arange(tok.numel(), device=tok.device) - first[grp_sorted]  # [P] place in the queue
    acc = torch.empty_like(proposing)
    acc[order] = place < room_ext[grp_sorted]  # [P] accepted, by token
    held[tok, choice] |= acc
    need.index_add_(0, tok, -acc.to(need.dtype))
    load.scatter_add_(0, choice, acc.to(load.dtype))
    return proposing.any()


@torch.no_grad()
def quota_topk(
    scores: torch.Tensor, k: int, capacity: int, valid: torch.Tensor | None = None, n_valid: int | None = None
) -> QuotaResult:
    """Capacity-constrained top-k selection (see the module docstring for the algorithm).

    scores: [N, E] (higher = preferred; e.g. log Q); k: experts per token; capacity: max real
    tokens per expert; valid: [N] bool (padding rows get a plain top-k that uses no capacity);
    n_valid: valid.sum() when the caller already has it (saves a host sync).
    Raises ValueError when capacity · E < N_valid · k or k > E (no feasible assignment).

    Host syncs: none in the first k proposal rounds, one per later round (usually a few) and one
    at the end; the repair phase, which only tight capacities reach, syncs per expert.
    """
    n, e = scores.shape
    if k > e:
        raise ValueError(f"k={k} exceeds the number of experts {e}")
    device = scores.device
    if valid is None:
        valid = torch.ones(n, dtype=torch.bool, device=device)
    valid = valid.reshape(-1).to(torch.bool)  # [N]
    s = scores.detach().float().nan_to_num(nan=-_BIG, posinf=_BIG, neginf=-_BIG).clamp(-_BIG, _BIG)  # [N, E]
    if n_valid is None:
        n_valid = int(valid.sum())
    if capacity * e < n_valid * k:
        raise ValueError(f"capacity {capacity} x {e} experts cannot serve {n_valid} tokens x k={k}")

    held = torch.zeros(n, e, dtype=torch.bool, device=device)  # [N, E] current assignment
    need = torch.where(valid, k, 0).to(torch.long)  # [N] experts still to assign
    load = torch.zeros(e, dtype=torch.long, device=device)  # [E]
    neg_inf = torch.tensor(float("-inf"), device=device)
    tokens = torch.arange(n, device=device)  # [N]

    # Phase 1: proposal rounds. The first k over all tokens (no host sync: nearly every token
    # proposes in them anyway, and a round in which nobody proposes changes nothing) ...
    rounds_t = torch.zeros((), dtype=torch.long, device=device)  # rounds in which someone proposed
    for _ in range(k):
        rounds_t += _proposal_round(s, held, need, load, capacity, tokens, neg_inf)
    # ... then over the tokens still proposing only: one host sync per round (`nonzero`).
    rounds = 0
    while True:
        avail = ~held & (capacity - load > 0).unsqueeze(0)  # [N, E]
        tok = ((need > 0) & avail.any(dim=1)).nonzero().squeeze(1)  # [P] ascending
        if tok.numel() == 0:
            break
        rounds += 1
        _proposal_round(s, held, need, load, capacity, tok, neg_inf)
        if rounds > n_valid * k + e + 1:  # unreachable (bound is E + k); guards against a bug
            raise RuntimeError("quota_topk: proposal rounds did not terminate")
    masked_rounds, stranded = torch.stack([rounds_t, (need > 0).any().long()]).tolist()
    rounds += masked_rounds

    # Phase 2: repair swaps for tokens stranded by the greedy.
    swaps = 0
    while stranded and bool((need > 0).any()):
        progressed = False
        for r in ((capacity - load) > 0).nonzero().flatten().tolist():  # loop over experts
            stuck = (need > 0).nonzero().squeeze(1)  # [T]
            if stuck.numel() == 0:
                break
            donor_mask = valid & (need == 0) & ~held[:, r]  # [N] full tokens lacking r
            m = min(capacity - int(load[r]), stuck.numel(), int(donor_mask.sum()))
            if m <= 0:
                continue
            t = stuck[torch.argsort(need[stuck], descending=True, stable=True)[:m]]  # [m]
            # Donors that lose least: u's gain from trading its worst held expert for r.
            worst = torch.where(held, s, torch.full_like(s, _BIG)).min(dim=1).values  # [N]
            u = torch.where(donor_mask, s[:, r] - worst, neg_inf).topk(m).indices  # [m]
            cand = held[u] & ~held[t]  # [m, E] experts u can hand to t (never empty)
            f = torch.where(cand, s[t] - s[u], neg_inf).argmax(dim=1)  # [m]
            held[u, f] = False
            held[u, r] = True
            held[t, f] = True
            need[t] -= 1
            load[r] += m
            swaps += m
            progressed = True
        if not progressed:  # impossible when capacity * E >= N * k (see module docstring)
            raise RuntimeError("quota_topk: repair made no progress")

    ranked = torch.where(held, s, neg_inf)  # [N, E] only the held experts compete
    index = torch.where(valid.unsqueeze(1), ranked.topk(k, dim=1).indices, s.topk(k, dim=1).indices)  # [N, k]
    return QuotaResult(index=index, load=load, rounds=rounds, swaps=swaps)
