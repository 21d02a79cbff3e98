"""The generated code in adapter_service/proto/ must be what scripts/gen_proto.py makes of proto/ now."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    committed = ROOT / "adapter_service" / "proto"
    generated = sorted(p.name for p in tmp_path.iterdir())
    assert generated == ["adapter_service_pb2.py", "adapter_service_pb2.pyi", "adapter_service_pb2_grpc.py"]
    stale = [name for name in generated if (tmp_path / name).read_text() != (committed / name).read_text()]
    assert not stale, f"{stale} are stale: run `python scripts/gen_proto.py` and commit the result"


def test_service_descriptor() -> None:
    from adapter_service.proto import adapter_service_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["AdapterService"]
    assert service.full_name == "chameleon.v1.AdapterService"
    assert [m.name for m in service.methods] == ["GetManifest", "Adapt"]
