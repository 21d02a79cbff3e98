"""What every role shares, on numpy and protobuf only: the artifact format, the wire codec, the compact
(mixture) form and the clustering of statistics. Nothing here imports onnxruntime, torch or gRPC."""
