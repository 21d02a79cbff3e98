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
