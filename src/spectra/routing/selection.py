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


@torch.no_grad()
def quota_topk(scores: torch.Tensor, k: int, capacity: int, valid: torch.Tensor | None = None) -> QuotaResult:
    """Capacity-constrained top-k selection (see the module docstring for the algorithm).

    scores: [N, E] (higher = preferred; e.g. log Q); k: experts per token; capacity: max real
    tokens per expert; valid: [N] bool (padding rows get a plain top-k that uses no capacity).
    Raises ValueError when capacity · E < N_valid · k or k > E (no feasible assignment).
    """
    n, e = scores.shape
    if k > e:
        raise ValueError(f"k={k} exceeds the number of experts {e}")
    device = scores.device
    if valid is None:
        valid = torch.ones(n, dtype=torch.bool, device=device)
    valid = valid.reshape(-1).to(torch.bool)  # [N]
    s = scores.detach().float().nan_to_num(nan=-_BIG, posinf=_BIG, neginf=-_BIG).clamp(-_BIG, _BIG)  # [N, E]
    n_valid = int(valid.sum())
    if capacity * e < n_valid * k:
        raise ValueError(f"capacity {capacity} x {e} experts cannot serve {n_valid} tokens x k={k}")

    held = torch.zeros(n, e, dtype=torch.bool, device=device)  # [N, E] current assignment
    need = torch.where(valid, k, 0).to(torch.long)  # [N] experts still to assign
    load = torch.zeros(e, dtype=torch.long, device=device)  # [E]
    neg_inf = torch.tensor(float("-inf"), device=device)

    # Phase 1: proposal rounds.
    rounds = 0
    while True:
        room = capacity - load  # [E]
        avail = ~held & (room > 0).unsqueeze(0)  # [N, E]
        proposing = (need > 0) & avail.any(dim=1)  # [N]
        tok = proposing.nonzero().squeeze(1)  # [P], ascending token index
        if tok.numel() == 0:
            break
        rounds += 1
        choice = torch.where(avail[tok], s[tok], neg_inf).argmax(dim=1)  # [P] best expert with room
        sc = s[tok, choice]  # [P]
        # Order proposals by (expert asc, score desc, token asc): two stable sorts.
        order = torch.argsort(-sc, stable=True)  # [P]
        order = order[torch.argsort(choice[order], stable=True)]  # [P]
        exp_sorted = choice[order]  # [P]
        counts = torch.bincount(exp_sorted, minlength=e)  # [E]
        first = torch.cumsum(counts, 0) - counts  # [E] start of each expert's group
        rank = torch.arange(tok.numel(), device=device) - first[exp_sorted]  # [P] place in queue
        ok = rank < room[exp_sorted]  # [P] accepted
        acc_tok, acc_exp = tok[order][ok], exp_sorted[ok]
        held[acc_tok, acc_exp] = True
        need[acc_tok] -= 1
        load += torch.bincount(acc_exp, minlength=e)
        if rounds > n_valid * k + e + 1:  # unreachable (bound is E + k); guards against a bug
            raise RuntimeError("quota_topk: proposal rounds did not terminate")

    # Phase 2: repair swaps for tokens stranded by the greedy.
    swaps = 0
    while bool((need > 0).any()):
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
