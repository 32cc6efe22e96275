"""stagediff: stage-wise model diffing — find what fine-tuning changed inside a language model."""

import os

# OpenMP threads that wait for work by spinning steal the CPU from each other and from any other
# job: beside one busy process on two cores a small SAE step ran 30x slower (0.6 vs 17.8 steps/s,
# docs/PERFORMANCE.md). Waiting passively costs little alone. Set before torch loads OpenMP;
# an explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from stagediff.errors import StagediffError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["StagediffError", "__version__"]
