"""Domain metrics (METHOD.md §5, "Domain"): which experts serve which data domains.

Counts are over served assignments (real tokens, slot not dropped): a token routed to k experts
contributes k assignments, one to each of its experts.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from spectra.metrics.balance import _tensor


class ExpertPurity(NamedTuple):
    per_expert: torch.Tensor  # [E] float64, nan for an expert that served nothing
    weighted_mean: float  # Σ_e load_e · purity_e / Σ_e load_e


def domain_expert_counts(expert_index, served, domain_ids, num_experts: int, num_domains: int) -> torch.Tensor:
    """n[d, e] = served assignments of domain-d tokens to expert e. Returns [D_dom, E] float64.

    expert_index: [N, k]; served: [N, k] bool; domain_ids: [N] integer (ignored where no slot
    is served, so padding may carry any id, e.g. −1).
    """
    idx = _tensor(expert_index, torch.long)
    s = _tensor(served, torch.bool)
    dom = _tensor(domain_ids, torch.long)
    if idx.dim() != 2 or s.shape != idx.shape or dom.shape != idx.shape[:1]:
        raise ValueError(
            f"expert_index, served must be [N, k] and domain_ids [N]; "
            f"got {tuple(idx.shape)}, {tuple(s.shape)}, {tuple(dom.shape)}"
        )
    dom = dom.unsqueeze(-1).expand_as(idx)[s]  # [M] one entry per served assignment
    exp = idx[s]
    if exp.numel() and (exp.min() < 0 or exp.max() >= num_experts):
        raise ValueError(f"expert_index out of range [0, {num_experts})")
    if dom.numel() and (dom.min() < 0 or dom.max() >= num_domains):
        raise ValueError(f"domain_ids of served tokens out of range [0, {num_domains})")
    counts = torch.zeros(num_domains * num_experts, dtype=torch.float64, device=exp.device)
    counts.index_add_(0, dom * num_experts + exp, torch.ones_like(exp, dtype=torch.float64))
    return counts.reshape(num_domains, num_experts)


def domain_affinity(expert_index, served, domain_ids, num_experts: int, num_domains: int) -> torch.Tensor:
    """P(expert | domain): A[d, e] = n[d, e] / Σ_e' n[d, e'], rows sum to 1 over experts.

    A domain with no served assignment gets a row of nan. Returns [D_dom, E] float64.
    """
    n = domain_expert_counts(expert_index, served, domain_ids, num_experts, num_domains)
    return n / n.sum(-1, keepdim=True)  # 0/0 -> nan for empty domains


def expert_purity(expert_index, served, domain_ids, num_experts: int, num_domains: int) -> ExpertPurity:
    """Per expert, the share of its assignments that come from its most frequent domain.

        purity_e = max_d n[d, e] / Σ_d n[d, e]        (nan for an unused expert)
        weighted_mean = Σ_e max_d n[d, e] / Σ_{d,e} n[d, e]     (load-weighted mean of purity_e)

    1 = every expert serves a single domain; 1 / D_dom is the floor for evenly mixed experts.
    weighted_mean is nan if nothing was served.
    """
    n = domain_expert_counts(expert_index, served, domain_ids, num_experts, num_domains)
    top, load = n.max(dim=0).values, n.sum(dim=0)  # [E], [E]
    return ExpertPurity(per_expert=top / load, weighted_mean=float(top.sum() / load.sum()))


def expert_top_keywords(
    token_texts_per_expert: dict[int, list[str]], top_n: int = 10, with_scores: bool = False
) -> dict[int, list[str]] | dict[int, list[tuple[str, float]]]:
    """TF-IDF top keywords per expert, each expert's served tokens forming one document.

    Uses scikit-learn's `TfidfVectorizer` with its defaults (raw term counts, smooth idf
    ln((1 + n_docs) / (1 + df)) + 1, l2-normalised rows) and each token string as one term
    (no further tokenisation; surrounding whitespace stripped, empty strings dropped, case kept).
    Experts with no tokens get [] and are not documents (they do not change the idf).
    Keywords are ordered by score, ties by term; zero-score terms are not returned.
    Returns {expert: [term, ...]} or, with `with_scores`, {expert: [(term, score), ...]}.
    """
    # deliberately lazy: scikit-learn costs ~1.5 s to import and only the report calls this, while
    # every training process imports this module (through the routing monitor)
    from sklearn.feature_extraction.text import TfidfVectorizer

    result: dict = {e: [] for e in sorted(token_texts_per_expert)}
    docs = {e: [t.strip() for t in token_texts_per_expert[e] if t.strip()] for e in result}
    experts = [e for e in result if docs[e]]  # an expert with no tokens is no document (no idf effect)
    if not experts:
        return result
    vectorizer = TfidfVectorizer(analyzer=_identity, lowercase=False)
    tfidf = vectorizer.fit_transform([docs[e] for e in experts]).toarray()  # [n_experts, vocab]
    vocab = vectorizer.get_feature_names_out()
    for row, e in zip(tfidf, experts):
        ranked = sorted((-score, term) for term, score in zip(vocab, row) if score > 0)[:top_n]
        result[e] = [(term, -neg) for neg, term in ranked] if with_scores else [term for _, term in ranked]
    return result


def _identity(doc: list[str]) -> list[str]:
    """Analyzer for pre-tokenised documents (module-level so the vectorizer stays picklable)."""
    return doc
