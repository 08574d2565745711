"""Expert selection from routing scores (METHOD.md §2 step 7).

`topk_select`   plain per-token top-k.
`group_limited_topk`  per-token top-k inside the token's best expert groups (DeepSeek-V3).
`quota_topk`    top-k under a HARD per-expert capacity: every real token gets k distinct experts,
                no expert serves more than `capacity` real tokens, no token is dropped.

What quota_topk approximates: x_{t,e} ∈ {0, 1} maximising Σ s_{t,e} x_{t,e} subject to
Σ_e x_{t,e} = k per real token and Σ_t x_{t,e} ≤ capacity per expert, a transportation problem
(exact by min-cost flow, which is far too slow per layer and step). A score of −inf marks a
forbidden pair (t, e): it is chosen only when no assignment of finite pairs exists.

Quota algorithm (vectorised over tokens; Python loops only over rounds, experts and moves)
---------------------------------------------------------------------------------------
Phase 1, proposal rounds (a capacitated, token-proposing greedy):
    every token that still needs experts proposes to its best expert that it does not hold yet,
    that still has room and that is not forbidden to it; each expert accepts its proposals by
    descending score (ties: the token missing more experts first, then the lower index) up to
    its remaining room (stable sorts + a per-expert running count); rejected tokens propose to
    their next best expert with room in the next round. A round without rejections advances every proposing token, and a round with
    a rejection fills an expert, so phase 1 ends after at most E + k rounds.
Phase 2, repair (only when the greedy strands a token: tight capacity, e.g. α = 1, or
forbidden pairs). A stranded token t has no allowed expert with room outside its own set S(t)
(e.g. E=3, k=2: t0 and t1 took {e0, e1}, t2 holds e2 and nothing else has room). Its free slots
are filled by augmenting moves, best total score first:
    - two-hop move at (r, f): t takes f ∉ S(t) from a token u that holds f and moves to r, an
      expert with room that u does not hold. Only r's load changes (+1); the total score changes
      by s_t(f) + s_u(r) − s_u(f) (a direct move, t takes r itself, when allowed). Each batch
      scores every (r, f) at once ([N, chunk of r, E] maxima), takes the r with the best move,
      lets every stranded token pick its best f at r, pairs the i-th best taker of an f with
      the i-th best donor of f (the gain is a t-term plus a u-term, so no other pairing of those
      tokens scores more) and applies the pairs best first, one move per token, while they gain
      at least the best move into any other expert. Without forbidden pairs a move always exists:
      |S(u)| = k > |S(t)| gives f ∈ S(u) \ S(t) for a full token u, and some full u lacks a given
      r ∈ R (f is full, r is not, t holds r but not f).
    - with forbidden pairs a slot may need a longer chain t → f₀, u₁: f₀ → f₁, …, u_j: f_{j-1} → r.
      A breadth-first search over experts (edge y → z when a token holding y may take z) finds
      the shortest; a shortest chain never uses a token twice (a token fit for two hops would
      give a shorter chain). When no chain exists the allowed pairs admit no complete assignment
      (Ford–Fulkerson: the allowed assignment is a maximum flow), and only then does the slot
      take a forbidden expert (directly when one has room, else by a two-hop move).
Phase 3, polish (only after a repair): improving moves, best first, while one gains more than a
rounding tolerance (at most 2·E·k batches):
    - direct: t drops its worst expert g and takes r (room), gain s_t(r) − s_t(g);
    - two-hop: t drops g and takes f from u, u moves to r, gain s_t(f) − s_t(g) + s_u(r) − s_u(f).
    A stranded token holds what nobody else wanted (the repair fills its free slots, but it keeps
    the bad experts the greedy gave it); polishing moves that mass onto better experts with room.
    Identical tokens (N=24, E=8, k=5, α=1.25) end at the optimal loads [19×6, 6, 0].

Quality against the exact optimum (tests/test_selection.py, an integer program): identical
tokens are exact (the need tie-break of phase 1, and repair + polish when a tie-free order strands
the same tokens anyway). In general the greedy is not optimal and has no worst-case bound (a 2×2
example reaches the worst assignment); on the tests' random families the gap (opt − ours) /
(opt − worst feasible) measured at most 0.30, mean 0.01. Polishing every batch, not only after a
repair, cuts that to 0.03 but costs ~100× phase 1 on CPU (N = 8k), so it is not done.

Feasibility needs capacity · E ≥ N · k (guaranteed by α ≥ 1, which config validation enforces).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import NamedTuple

import torch

__all__ = ["QuotaResult", "expert_capacity", "group_limited_topk", "quota_topk", "topk_select"]

_BIG = 1e30  # scores are clamped to ±_BIG; forbidden (−inf) pairs are tracked by a mask
_TOL = 1e-6  # polish accepts a move only if it gains more than _TOL · max|score| (fp32 rounding)


def topk_select(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Per-token top-k: scores [N, E] -> expert index [N, k] (long), best first."""
    return scores.topk(k, dim=-1).indices


def group_limited_topk(scores: torch.Tensor, k: int, num_groups: int = 1, group_topk: int = 1) -> torch.Tensor:
    """Group-limited top-k (DeepSeek-V3's node-limited routing; Megatron-Core's
    moe_router_num_groups / moe_router_group_topk), scores [N, E] -> expert index [N, k], best first.

    The E experts form `num_groups` consecutive groups of g = E / num_groups (expert e is in group
    e // g). Per token:
        group score  = sum of the group's top-min(2, g) scores                    [N, G]
                       (DeepSeek-V3's `scores_for_choice.topk(2).sum`)
        kept groups  = the token's `group_topk` best groups                        [N, group_topk]
        experts      = top-k of the scores, experts outside the kept groups excluded
    num_groups = 1 is plain top-k. Needs k <= group_topk · g (config: GateRouterConfig.check_for).
    Ties in either top-k fall to torch.topk's order.
    """
    if num_groups == 1:
        return scores.topk(k, dim=-1).indices
    n, e = scores.shape
    g = e // num_groups
    group_score = scores.view(n, num_groups, g).topk(min(2, g), dim=-1).values.sum(-1)  # [N, G]
    kept = group_score.topk(group_topk, dim=-1).indices  # [N, group_topk]
    mask = torch.zeros(n, num_groups, dtype=torch.bool, device=scores.device).scatter_(1, kept, True)  # [N, G]
    allowed = mask.repeat_interleave(g, dim=1)  # [N, E]
    return scores.masked_fill(~allowed, float("-inf")).topk(k, dim=-1).indices


def expert_capacity(num_tokens: int, k: int, num_experts: int, capacity_factor: float) -> int:
    """Assignments one expert may take: ceil(cf · N · k / E), the one capacity formula.

    N = real tokens, k = assignments per token, E = experts, cf = capacity factor. Used by the
    SPECTRA quota (quota.capacity_factor, α), Switch's token dropping (router.capacity_factor) and
    Expert Choice (router.ec_capacity_factor, with k = 1: each expert takes ceil(cf · N / E) tokens).

    Computed exactly on the decimal the user wrote (cf's shortest repr, e.g. 1.1 = 11/10), so float
    noise cannot add a slot: in float64 1.1 · 100 / 10 is 11.000000000000002, whose ceiling is 12.
    The capacity factor's range (> 0; ≥ 1 for the quota) is checked in the config schema.
    """
    cf = Fraction(repr(float(capacity_factor)))
    return math.ceil(cf * num_tokens * k / num_experts)


class QuotaResult(NamedTuple):
    """Result of `quota_topk`.

    index:  [N, k] long, k distinct experts per token, best (by score) first.
    load:   [E] long, real tokens assigned to each expert (≤ capacity).
    rounds: proposal rounds used (phase 1).
    swaps:  slots filled by the repair (phase 2; 0 unless the greedy stranded a token).
    polish: token moves made by the polish (phase 3; 0 unless phase 2 ran).
    """

    index: torch.Tensor
    load: torch.Tensor
    rounds: int
    swaps: int
    polish: int = 0


def _proposal_round(s, allowed, held, need, load, capacity: int, tok, neg_inf):
    """One round of phase 1 over the tokens `tok`; updates held/need/load in place, no host sync.

    Each token of `tok` that still needs an expert proposes to its best-scoring allowed expert
    with room; each expert accepts its proposers by (score desc, need desc, token asc) up to its
    room.
    Tokens that do not propose queue in a dummy group E that accepts nobody, so `tok` may hold
    every token.

    s [N, E] scores; allowed [N, E] bool (not forbidden); held [N, E] bool; need [N] long;
    load [E] long; tok [P] ascending token ids. Returns a 0-dim bool tensor: did any token propose?
    """
    e = s.shape[1]
    room = capacity - load  # [E]
    avail = ~held[tok] & allowed[tok] & (room > 0).unsqueeze(0)  # [P, E]
    proposing = (need[tok] > 0) & avail.any(dim=1)  # [P]
    s_tok = s[tok]  # [P, E]
    choice = torch.where(avail, s_tok, neg_inf).argmax(dim=1)  # [P] best expert with room
    sc = s_tok.gather(1, choice.unsqueeze(1)).squeeze(1)  # [P]
    group = torch.where(proposing, choice, e)  # [P] non-proposers queue in a dummy group E
    # Order proposals by (expert asc, score desc, need desc, token asc): three stable sorts. On
    # equal scores the token missing more experts goes first: it has fewer chances left, and
    # identical tokens then share the good experts instead of the same tokens losing every
    # tie and ending on the worst ones.
    order = torch.argsort(-need[tok], stable=True)  # [P]
    order = order[torch.argsort(-sc[order], stable=True)]  # [P]
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


class _Assignment:
    """The assignment under construction, shared by the phases (tensors updated in place).

    s [N, E] clamped scores; allowed [N, E] (pair not forbidden); valid [N]; held [N, E];
    need [N] experts still missing per real token; load [E] real tokens per expert.
    """

    def __init__(self, s, allowed, valid, k: int, capacity: int):
        n, e = s.shape
        self.s, self.allowed, self.valid, self.capacity = s, allowed, valid, capacity
        self.held = torch.zeros(n, e, dtype=torch.bool, device=s.device)
        self.need = torch.where(valid, k, 0).to(torch.long)
        self.load = torch.zeros(e, dtype=torch.long, device=s.device)
        self.neg_inf = torch.tensor(float("-inf"), device=s.device)

    def donor_gain(self, r: int, allowed: torch.Tensor) -> torch.Tensor:
        """[N, E]: s_u(r) − s_u(f) for a token u that holds f, lacks r and may take r; else −inf."""
        may = (allowed[:, r] & ~self.held[:, r]).unsqueeze(1)  # [N, 1]
        return torch.where(self.held & may, self.s[:, r : r + 1] - self.s, self.neg_inf)

    def donor_best(self, rooms: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """[R, E]: the best donor term max_u (s_u(r) − s_u(f)) for each r of `rooms` [R] and f.

        Vectorised over chunks of rooms ([N, c, E] at a time, at most ~8M elements).
        """
        n, e = self.s.shape
        c = max(1, (1 << 23) // max(1, n * e))
        out = []
        for lo in range(0, rooms.numel(), c):  # loop over chunks of experts
            rs = rooms[lo : lo + c]  # [c]
            may = allowed[:, rs] & ~self.held[:, rs]  # [N, c]
            gain = self.s[:, rs].unsqueeze(2) - self.s.unsqueeze(1)  # [N, c, E] s_u(r) − s_u(f)
            d = torch.where(self.held.unsqueeze(1) & may.unsqueeze(2), gain, self.neg_inf)  # [N, c, E]
            out.append(d.max(dim=0).values)  # [c, E]
        return torch.cat(out)  # [R, E]

    def best_room(self, a: torch.Tensor, allowed: torch.Tensor):
        """The expert with room whose best move gains most, and the best gain elsewhere.

        A move into r is direct (t takes r) or two-hop via f (t takes f from a donor u, u moves
        to r). a [N, E]: a taker's gain for taking f (−inf where it may not); allowed: which r a
        donor may move to. The best pair at (r, f) is the best taker with the best donor (they
        differ: a donor holds f, a taker does not). Returns (r, runner_up) or None when no
        expert has room or no move exists. Two host syncs.
        """
        rooms = ((self.capacity - self.load) > 0).nonzero().flatten()  # [R]
        if rooms.numel() == 0:
            return None
        a_best = a.max(dim=0).values  # [E] best taker per f
        two_hop = (a_best + self.donor_best(rooms, allowed)).max(dim=1).values  # [R]; −inf at f = r
        gains = torch.maximum(two_hop, a_best[rooms]).tolist()  # [R]; direct: take r itself
        rooms = rooms.tolist()
        i = max(range(len(rooms)), key=gains.__getitem__)
        if gains[i] == float("-inf"):
            return None
        runner_up = max(gains[:i] + gains[i + 1 :], default=float("-inf"))
        return rooms[i], runner_up

    def batch_at(self, r: int, a: torch.Tensor, allowed: torch.Tensor, floor: float, min_gain: float, drop_worst: bool) -> int:
        """Apply a batch of non-conflicting moves into expert r; returns how many (≥ 1 when
        `best_room` chose r and its best gain > min_gain).

        Every taker t (finite row of a [N, E]) picks its best option at r: direct, or via the f
        maximising a[t, f] + (f's best donor term). Takers of one f are ranked by gain and the
        i-th is paired with f's i-th best donor (no other pairing of those tokens scores more).
        Pairs are then taken best first while gain ≥ floor (the best gain into another expert)
        and > min_gain, skipping any pair whose tokens already serve a better pair (a token moves
        once per batch, in one role), up to r's room. drop_worst: a taker gives up its worst
        expert (polish) instead of filling a free slot (repair).
        """
        n, e = a.shape
        room_r = self.capacity - int(self.load[r])
        kk = min(room_r, n)
        d = self.donor_gain(r, allowed)  # [N, E]; column r is −inf (no u holds and lacks r)
        dv, du = d.topk(kk, dim=0)  # [K, E] best donors per f, best first
        opt = a + dv[0]  # [N, E] two-hop via f with f's best donor
        opt[:, r] = a[:, r]  # direct move into r
        f = opt.argmax(dim=1)  # [N] each taker's option
        gain = opt.gather(1, f.unsqueeze(1)).squeeze(1)  # [N]
        # Rank takers within their f (gain desc, token asc): two stable sorts.
        order = torch.argsort(-gain, stable=True)  # [N]
        order = order[torch.argsort(f[order], stable=True)]
        f_sorted = f[order]
        counts = torch.bincount(f_sorted, minlength=e)  # [E]
        first = torch.cumsum(counts, 0) - counts  # [E] start of each f's group
        rank = torch.empty_like(f)
        rank[order] = torch.arange(n, device=f.device) - first[f_sorted]  # [N]
        direct = f == r
        rk = rank.clamp(max=kk - 1)  # [N]
        pair = torch.where(direct, a[:, r], a.gather(1, f.unsqueeze(1)).squeeze(1) + dv[rk, f])  # [N]
        pair = torch.where(direct | (rank < kk), pair, self.neg_inf)
        donor = torch.where(direct, -1, du[rk, f])  # [N] −1: no donor
        cand = ((pair > min_gain) & (pair >= floor)).nonzero().squeeze(1)  # [C] taker ids
        cand = cand[torch.argsort(-pair[cand], stable=True)]  # best first
        c = cand.numel()
        if c == 0:
            return 0
        dn = donor[cand]  # [C]
        pos = torch.arange(c, device=f.device)
        has_donor = dn >= 0
        seen = torch.full((n,), c, dtype=torch.long, device=f.device)  # first pair using each token
        seen.scatter_reduce_(0, cand, pos, "amin")
        seen.scatter_reduce_(0, dn[has_donor], pos[has_donor], "amin")
        ok = (seen[cand] == pos) & (~has_donor | (seen[dn.clamp(min=0)] == pos))  # [C]
        t = cand[ok][:room_r]  # [m] takers
        u, ft = donor[t], f[t]  # [m]
        m = t.numel()
        if drop_worst:
            worst = torch.where(self.held[t], self.s[t], _BIG).argmin(dim=1)  # [m]
            self.held[t, worst] = False
            self.load.index_add_(0, worst, -torch.ones_like(worst))
        else:
            self.need[t] -= 1
        self.held[t, ft] = True
        two = u >= 0
        self.held[u[two], ft[two]] = False
        self.held[u[two], r] = True
        self.load[r] += m
        return m

    def move(self, a: torch.Tensor, allowed: torch.Tensor, min_gain: float, drop_worst: bool) -> int:
        """One batch of moves into the best expert with room (0: no move gains > min_gain)."""
        best = self.best_room(a, allowed)
        if best is None:
            return 0
        r, runner_up = best
        return self.batch_at(r, a, allowed, runner_up, min_gain, drop_worst)

    def fill(self, allowed: torch.Tensor) -> int:
        """Repair: a batch of direct or two-hop moves for stranded tokens using `allowed` pairs."""
        a = torch.where((self.need > 0).unsqueeze(1) & ~self.held & allowed, self.s, self.neg_inf)  # [N, E]
        return self.move(a, allowed, float("-inf"), drop_worst=False)

    def augment(self) -> int:
        """Repair: one shortest chain of allowed moves for a stranded slot (BFS over experts).

        Returns 1 if a chain was applied, 0 if none exists (then no assignment of allowed pairs
        can fill every slot). Host-side BFS on [E, E]; only reached when pairs are forbidden.
        """
        held, s = self.held, self.s
        stuck = self.need > 0  # [N]
        free = ~held & self.allowed & self.valid.unsqueeze(1)  # [N, E] pairs a token may add
        start = (free & stuck.unsqueeze(1)).any(dim=0).tolist()  # [E] a stranded token may take
        adj = ((held.T.float() @ free.float()) > 0).tolist()  # [E, E] some holder of y may take z
        room = (self.load < self.capacity).tolist()  # [E]
        e = len(room)
        parent = {y: -1 for y in range(e) if start[y]}
        frontier = list(parent)
        end = next((y for y in frontier if room[y]), None)
        while end is None and frontier:
            nxt = []
            for y in frontier:
                for z in range(e):
                    if adj[y][z] and z not in parent:
                        parent[z] = y
                        nxt.append(z)
                        if room[z] and end is None:
                            end = z
            frontier = nxt
        if end is None:
            return 0
        path = [end]
        while parent[path[-1]] >= 0:
            path.append(parent[path[-1]])
        path.reverse()  # f₀, f₁, …, r
        t = int(torch.where(stuck & free[:, path[0]], s[:, path[0]], self.neg_inf).argmax())
        hops = [(int(torch.where(held[:, y] & free[:, z], s[:, z] - s[:, y], self.neg_inf).argmax()), y, z)
                for y, z in zip(path, path[1:])]
        self.held[t, path[0]] = True
        self.need[t] -= 1
        for u, y, z in hops:
            self.held[u, y] = False
            self.held[u, z] = True
        self.load[path[-1]] += 1
        return 1

    def repair(self) -> int:
        """Phase 2: fill every stranded slot (see the module docstring). Returns slots filled."""
        anything = torch.ones_like(self.allowed)
        filled = 0
        while bool((self.need > 0).any()):
            got = self.fill(self.allowed) or self.augment() or self.fill(anything)
            if not got:  # impossible when capacity * E >= N * k (see module docstring)
                raise RuntimeError("quota_topk: repair made no progress")
            filled += got
        return filled

    def polish(self, takers: torch.Tensor, budget: int) -> int:
        """Phase 3: batches of improving moves by the tokens `takers` [N] bool, best first, at
        most `budget` batches. Returns the number of token moves."""
        scale = float(self.s.abs().masked_fill(~self.allowed, 0.0).max())
        tol = _TOL * max(1.0, scale)
        may = (takers & self.valid & (self.need == 0)).unsqueeze(1)  # [N, 1]
        moves = 0
        for _ in range(budget):
            worst = torch.where(self.held, self.s, _BIG).min(dim=1, keepdim=True).values  # [N, 1]
            a = torch.where(may & ~self.held & self.allowed, self.s - worst, self.neg_inf)  # [N, E]
            m = self.move(a, self.allowed, tol, drop_worst=True)
            if m == 0:
                break
            moves += m
        return moves


@torch.no_grad()
def quota_topk(
    scores: torch.Tensor, k: int, capacity: int, valid: torch.Tensor | None = None, n_valid: int | None = None
) -> QuotaResult:
    """Capacity-constrained top-k selection (see the module docstring for the algorithm).

    scores: [N, E] (higher = preferred; e.g. log Q; −inf = forbidden pair); k: experts per
    token; capacity: max real tokens per expert; valid: [N] bool (padding rows get a plain top-k
    that uses no capacity); n_valid: valid.sum() when the caller already has it (saves a sync).
    Raises ValueError when capacity · E < N_valid · k or k > E (no feasible assignment).

    Host syncs: none in the first k proposal rounds, one per later round (usually a few) and one
    at the end; the repair and polish phases, which only tight capacities (or forbidden pairs)
    reach, sync per move.
    """
    n, e = scores.shape
    if k > e:
        raise ValueError(f"k={k} exceeds the number of experts {e}")
    device = scores.device
    if valid is None:
        valid = torch.ones(n, dtype=torch.bool, device=device)
    valid = valid.reshape(-1).to(torch.bool)  # [N]
    raw = scores.detach().float()  # [N, E]
    allowed = ~(torch.isneginf(raw) | torch.isnan(raw))  # [N, E] −inf / NaN: forbidden pair
    s = raw.nan_to_num(nan=-_BIG, posinf=_BIG, neginf=-_BIG).clamp(-_BIG, _BIG)  # [N, E]
    if n_valid is None:
        n_valid = int(valid.sum())
    if capacity * e < n_valid * k:
        raise ValueError(f"capacity {capacity} x {e} experts cannot serve {n_valid} tokens x k={k}")

    st = _Assignment(s, allowed, valid, k, capacity)
    held, need, load = st.held, st.need, st.load
    tokens = torch.arange(n, device=device)  # [N]

    # Phase 1: proposal rounds. The first k over all tokens (no host sync: nearly every token
    # proposes in them anyway, and a round in which nobody proposes changes nothing) ...
    rounds_t = torch.zeros((), dtype=torch.long, device=device)  # rounds in which someone proposed
    for _ in range(k):
        rounds_t += _proposal_round(s, allowed, held, need, load, capacity, tokens, st.neg_inf)
    # ... then over the tokens still proposing only: one host sync per round (`nonzero`).
    rounds = 0
    while True:
        avail = ~held & allowed & (capacity - load > 0).unsqueeze(0)  # [N, E]
        tok = ((need > 0) & avail.any(dim=1)).nonzero().squeeze(1)  # [P] ascending
        if tok.numel() == 0:
            break
        rounds += 1
        _proposal_round(s, allowed, held, need, load, capacity, tok, st.neg_inf)
        if rounds > n_valid * k + e + 1:  # unreachable (bound is E + k); guards against a bug
            raise RuntimeError("quota_topk: proposal rounds did not terminate")
    masked_rounds, stranded = torch.stack([rounds_t, (need > 0).any().long()]).tolist()
    rounds += masked_rounds

    # Phases 2 and 3: repair stranded tokens, then polish what the repair left.
    swaps = polished = 0
    if stranded:
        was_stranded = need > 0  # [N]
        swaps = st.repair()
        polished = st.polish(was_stranded, budget=2 * e * k)

    ranked = torch.where(held, s, st.neg_inf)  # [N, E] only the held experts compete
    index = torch.where(valid.unsqueeze(1), ranked.topk(k, dim=1).indices, s.topk(k, dim=1).indices)  # [N, k]
    return QuotaResult(index=index, load=load, rounds=rounds, swaps=swaps, polish=polished)
