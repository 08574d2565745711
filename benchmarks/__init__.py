"""Speed and memory benchmarks of the routing stack; they print ratios, tests never assert them.

    make bench                      # full mode: every section, writes benchmarks/RESULTS.md
    make bench-quick                # small sizes, seconds per section
    python -m benchmarks.run_all --quick --out /tmp/RESULTS.md
    python -m benchmarks.bench_layer --device cuda --dtype bfloat16   # one section on a GPU host

Sections (one module each; `run(args) -> Section`):
    bench_breakdown      Table 9: where a SPECTRA MoE layer's forward+backward time goes
    bench_layer          SPECTRA layer vs Switch top-k layer (same E, k, H, N)
    bench_experts        grouped_mm experts vs a dense MLP of k x width and vs a loop over experts
    bench_routing_scale  Sinkhorn + quota selection vs N and E
    bench_gru            the router GRU over sequence length: time and peak memory
    bench_sweep          sweep overhead: trial wall time minus its training time
    bench_hf_block       our MoE block vs Hugging Face's Qwen3-MoE block (same weights)
    bench_demo_train     `make demo`'s model: SPECTRA vs top-k training tokens/s, in one process
Every target's threshold is in targets.py (one table); run_all ends with the Targets table.
Every figure that matters is a ratio of two timings taken in the same process, minutes apart at
most, so a busy or shared machine shifts both sides alike.
"""
