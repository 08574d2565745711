"""`make results`: the paper's tables filled by real runs (results/plan.yaml -> results/).

plan     results/plan.yaml -> cells (families x axes x seeds), with the dense bases they upcycle from
runner   trains the bases and cells, workers at a time, committing each finished cell's small files
report   results/runs -> the paper's tables, figures, index.html and the H1-H7 verdicts

The top layer: it runs train.py in subprocesses and reads run directories through spectra.analysis.
"""
