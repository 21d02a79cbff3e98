"""Training, evaluation and export of hyper-networks: everything that writes an artifact.

Depends on `core`, `models` and `data`, and on `serving.runtime` only to check an export's ONNX parity.
"""

from adapter_service.extras import require

require(
    "Training and export (chameleon train/eval/export)",
    "train",
    "torch",
    "transformers",
    "onnx",
    "onnxscript",
)

from adapter_service.training.api import TrainOutcome, evaluate, train_artifact
from adapter_service.training.recipe import RecipeError, load_recipe

__all__ = ["RecipeError", "TrainOutcome", "evaluate", "load_recipe", "train_artifact"]
