"""Hydra plugin: `hydra/sweeper=spectra_optuna`, a thin shell over spectra.sweep.optuna_sweep.

Hydra discovers sweepers only inside the `hydra_plugins` namespace package, hence this package
(no `hydra_plugins/__init__.py`: it is shared with the other installed plugins).
"""
