"""Training: Trainer assembly, callbacks, DeepSpeed, the run directory."""

from spectra.train.run import run

__all__ = ["run"]
