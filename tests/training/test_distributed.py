"""Training on several processes (torchrun, gloo on CPU) and resuming from checkpoints.

Two processes sharing each global batch must follow the curve of one process with that batch; the only
difference allowed is the order of floating-point sums (the ranks' gradients are averaged, each rank's
language-model forward sees half the rows). A run interrupted and resumed from its checkpoint must end
bit for bit where the uninterrupted run ends.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adapter_service.core.artifact import load_artifact
from adapter_service.core.clustering import FixedK
from adapter_service.training import checkpoint
from adapter_service.training.distributed import Processes, resolve_device, start
from adapter_service.training.export import plan_export
from adapter_service.training.hypernetwork import build_network
from adapter_service.training.trainer import TrainConfig, train
from conftest import tiny_llama
from samples import labelled_study, synthetic

CHAMELEON = Path(sys.executable).with_name("chameleon")
# Validation and training NLL of two processes against one, per evaluation: the measured differences
# are below 5e-7 (float32 sums in another order); 1e-5 is 20 times that, and 70 times below the
# smallest change between two evaluations of this run (7e-4).
CURVE_TOLERANCE = 1e-5


def _plan(model):
    return plan_export(model, ["q_proj", "v_proj"], rank=4, hidden=16, kind="mixture", bases=2)


def _train(checkpoint_dir: Path | None, lr: float = 1e-2):
    model = tiny_llama()
    plan = _plan(model)
    torch.manual_seed(0)
    network = build_network(plan.hypernetwork_config)
    config = TrainConfig(policy=FixedK(3), batch_size=12, lr=lr, max_steps=8, eval_every=2, patience=10)
    result = train(
        model,
        network,
        plan.group_modules,
        plan.manifest_base["scaling"],
        synthetic(48, 1),
        synthetic(12, 2),
        config,
        progress=False,
        checkpoint_dir=checkpoint_dir,
    )
    return result, network.state_dict()


class Interrupted(Exception):
    pass


def test_a_resumed_run_ends_exactly_where_an_uninterrupted_run_ends(tmp_path: Path, monkeypatch) -> None:
    whole, whole_state = _train(tmp_path / "whole")
    assert (tmp_path / "whole" / checkpoint.NAME).exists()

    steps = []
    real_step = torch.optim.AdamW.step

    def interrupt_at_step_6(self, *args, **kwargs):
        steps.append(1)
        if len(steps) == 6:  # after the checkpoint of step 4, before step 6's update
            raise Interrupted
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", interrupt_at_step_6)
    with pytest.raises(Interrupted):
        _train(tmp_path / "cut")
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    saved = torch.load(tmp_path / "cut" / checkpoint.NAME, weights_only=True)["state"]
    assert saved["step"] == 4 and not saved["done"]

    counted = []
    monkeypatch.setattr(
        torch.optim.AdamW, "step", lambda self, *a, **k: counted.append(1) or real_step(self, *a, **k)
    )
    resumed, resumed_state = _train(tmp_path / "cut")
    assert len(counted) == 4  # steps 5-8 only
    assert resumed.history == whole.history
    assert (resumed.best_step, resumed.best_validation_nll, resumed.steps) == (
        whole.best_step,
        whole.best_validation_nll,
        whole.steps,
    )
    assert resumed_state.keys() == whole_state.keys()
    assert all(torch.equal(resumed_state[k], whole_state[k]) for k in whole_state)

    # A finished run's checkpoint gives its result again without training.
    counted.clear()
    again, again_state = _train(tmp_path / "whole")
    assert not counted and again.history == whole.history
    assert all(torch.equal(again_state[k], whole_state[k]) for k in whole_state)


def test_a_checkpoint_of_another_run_is_refused(tmp_path: Path) -> None:
    _train(tmp_path / "run")
    with pytest.raises(ValueError, match=r"checkpoint: .* belongs to another run"):
        _train(tmp_path / "run", lr=2e-2)


def test_batches_and_jobs_are_shared_out_evenly() -> None:
    two = [Processes(rank, 2) for rank in (0, 1)]
    assert [p.shard(12) for p in two] == [slice(0, 6), slice(6, 12)]
    assert [[i for i in range(5) if p.owns(i)] for p in two] == [[0, 2, 4], [1, 3]]
    with pytest.raises(ValueError, match="batch_size: 7 rows do not split evenly over 2 processes"):
        two[0].shard(7)
    one = start("cpu", env={})
    assert (one.rank, one.world_size, one.main, one.distributed) == (0, 1, True, False)
    assert one.sum([1.5, 2]) == [1.5, 2.0] and one.shard(7) == slice(0, 7)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device: 'cuda' asked for, but torch sees no GPU"):
            resolve_device("cuda")
        assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="device: expected one of auto, cpu, cuda, got 'tpu'"):
        resolve_device("tpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chameleon(*args: str, processes: int = 1) -> subprocess.CompletedProcess:
    """`chameleon ARGS`, or under torchrun with `processes` CPU processes (gloo)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if processes == 1:
        command = [str(CHAMELEON), *args]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={processes}",
            f"--master-port={_free_port()}",
            "-m",  # as the guide writes it
            "adapter_service.cli",
            *args,
        ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


TRAIN = [
    "--targets", "v_proj", "--rank", "2", "--hidden", "8", "--prompt-tokens", "6",
    "--continuation-tokens", "8", "--batch-size", "6", "--steps", "6", "--eval-every", "2",
    "--patience", "10", "--device", "cpu",
]  # fmt: skip


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return labelled_study(tmp_path_factory.mktemp("distributed"))


def test_two_processes_follow_the_curve_of_one(study, tmp_path: Path) -> None:
    model_dir, data = study
    inputs = ("--model", str(model_dir), "--data", str(data), *TRAIN)
    _chameleon("train", *inputs, "--out", str(tmp_path / "one"))
    two = _chameleon(
        "train",
        *inputs,
        "--checkpoint-dir",
        str(tmp_path / "ckpt"),
        "--out",
        str(tmp_path / "two"),
        processes=2,
    )
    assert two.stdout.count("wrote ") == 1  # rank 0 reports and writes
    one_facts = load_artifact(tmp_path / "one").manifest.hypernetwork
    two_facts = load_artifact(tmp_path / "two").manifest.hypernetwork
    assert (one_facts["processes"], two_facts["processes"]) == (1, 2)
    curves = [[h["validation_nll"] for h in f["history"]] for f in (one_facts, two_facts)]
    assert len(curves[0]) == len(curves[1]) == 3
    assert curves[0] == pytest.approx(curves[1], abs=CURVE_TOLERANCE)
    assert curves[0][-1] < curves[0][0]  # it trained: the comparison is not of two untouched networks
    train_curves = [[h["train_nll"] for h in f["history"]] for f in (one_facts, two_facts)]
    assert train_curves[0] == pytest.approx(train_curves[1], abs=CURVE_TOLERANCE)
    assert one_facts["best_step"] == two_facts["best_step"]
    # Chameleon's checkpoint, and that of the static LoRA it is compared with, which agrees too.
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [checkpoint.NAME, "static"]
    assert (tmp_path / "ckpt" / "static" / checkpoint.NAME).exists()
    compared = [f["validation_nll"] for f in (one_facts, two_facts)]
    for key in ("base", "static", "chameleon"):
        assert compared[0][key] == pytest.approx(compared[1][key], abs=CURVE_TOLERANCE), key


def test_two_processes_share_out_a_study_and_report_what_one_process_reports(study, tmp_path: Path) -> None:
    model_dir, data = study
    inputs = ("--model", str(model_dir), "--data", str(data), *TRAIN, "--seeds", "0", "1")
    skip = ("--skip", "static-basis", "static-big", "experts")
    _chameleon("eval", *inputs, *skip, "--out", str(tmp_path / "one"))
    two = _chameleon("eval", *inputs, *skip, "--out", str(tmp_path / "two"), processes=2)
    assert two.stdout.count("| method | NLL |") == 1  # rank 0 gathers and prints the report
    reports = [json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two")]
    assert reports[0]["methods"].keys() == reports[1]["methods"].keys()
    for method, numbers in reports[0]["methods"].items():
        assert numbers["mean_nll"] == reports[1]["methods"][method]["mean_nll"], method
    runs = sorted(p.name for p in (tmp_path / "two" / "runs").iterdir())
    assert runs == sorted(p.name for p in (tmp_path / "one" / "runs").iterdir())
