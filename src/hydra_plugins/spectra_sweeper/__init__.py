"""Hydra plugin: the Optuna sweeper with spectra's trial hygiene (see optuna_sweeper.py).

Hydra discovers sweepers only inside the `hydra_plugins` namespace package, hence this package
(no `hydra_plugins/__init__.py`: it is shared with the other installed plugins).
"""
