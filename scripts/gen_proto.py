"""Regenerate the Python code for proto/ into adapter_service/proto/ (the one place it lives).

    python scripts/gen_proto.py            # rewrite adapter_service/proto/
    python scripts/gen_proto.py --out DIR  # write elsewhere (the staleness test compares the two)

grpc_tools emits `from chameleon.v1 import ...`, which only works with proto/ on sys.path; the
import is rewritten so the generated modules live inside the package.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTO_FILE = "chameleon/v1/adapter_service.proto"
DEFAULT_OUT = ROOT / "adapter_service" / "proto"
GENERATED = ("adapter_service_pb2.py", "adapter_service_pb2.pyi", "adapter_service_pb2_grpc.py")


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        rc = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{PROTO_ROOT}",
                f"--python_out={tmp}",
                f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}",
                str(PROTO_ROOT / PROTO_FILE),
            ]
        )
        if rc != 0:
            raise SystemExit(f"protoc failed with exit code {rc}")
        written = []
        for name in GENERATED:
            text = (Path(tmp) / "chameleon" / "v1" / name).read_text()
            text = text.replace("from chameleon.v1 import", "from adapter_service.proto import")
            target = out / name
            target.write_text(text)
            written.append(target)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    for path in generate(args.out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
