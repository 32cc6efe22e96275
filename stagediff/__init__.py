"""stagediff: stage-wise model diffing — find what fine-tuning changed inside a language model."""

import os

# OpenMP threads that wait for work by spinning steal the CPU from each other and from any other
# job: on two cores shared with other busy processes a small SAE step (d 128 -> 1024, batch 1024)
# ran at 0.6 steps/s spinning and 17.8 passively (README, "Under load"). Set before torch loads
# OpenMP; an explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from stagediff.errors import StagediffError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["StagediffError", "__version__"]
