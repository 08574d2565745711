"""spectra: a research framework for Mixture-of-Experts routing (SPECTRA and baselines).

Layout (one job per sub-package, data flows one way):
    routing/   routers, each returning a `RoutingOutput`
    moe/       the MoE block (experts + shared expert), upcycling, router replacement
    metrics/   pure functions on `RoutingOutput` + the recorder that logs them
    data/      bundled corpus, tokenizer, chat formatting, packing
    train/     Trainer assembly, callbacks, run directory
    analysis/  run directories -> pandas -> tables and figures
"""

__version__ = "0.1.0"
