"""The sidecar: the gRPC service that clusters batch statistics and runs the exported hyper-network.

Depends on `core` and onnxruntime; never on torch, the training side or a plugin.
"""

from adapter_service.extras import require

require("The adapter service (chameleon serve)", "sidecar", "onnxruntime", "onnx")
