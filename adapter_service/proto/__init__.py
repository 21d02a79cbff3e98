"""Generated gRPC/protobuf code for chameleon.v1 (by scripts/gen_proto.py; do not edit by hand)."""
