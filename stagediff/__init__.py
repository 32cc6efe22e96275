"""stagediff: stage-wise model diffing — find what fine-tuning changed inside a language model."""

from stagediff.errors import StagediffError

__version__ = "0.1.0"
__all__ = ["StagediffError", "__version__"]
