"""Sweeps: cells and their resume, sweep progress, Optuna study hygiene and the sweep loop,
what a SLURM launch submits. Above `train` (a cell is a run), below `analysis`.

- cells.py          sweep progress, grid size, the end-of-multirun report (Hydra callback)
- study_hygiene.py  Optuna storage, stale trials, resume counting, heartbeats, sampler reseeding
- optuna_sweep.py   the sweep loop behind `hydra/sweeper=spectra_optuna` (the plugin is a shell)
- slurm.py          the sbatch script a launcher config submits (`python -m spectra.sweep.slurm`)
"""
