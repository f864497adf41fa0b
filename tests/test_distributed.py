"""Multi-process training: 2 CPU processes (gloo) under torchrun on synthetic SYSU-MM01 data.

One launch of ``python -m torch.distributed.run --nproc_per_node 2 --standalone`` runs train.py's
``main`` with one addition: at the end of the run (the Trainer's ``on_train_end`` hook, on every
rank, before the process group closes) each rank's weights are gathered on rank 0 and compared.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from data.sampler import CrossModalitySampler

REPO = Path(__file__).resolve().parents[1]
H, W = 64, 32
WORLD = 2

# train.py's main plus a rank comparison in the Trainer's end-of-run hook.
RANK_CHECK = '''
"""train.py under torchrun; afterwards rank 0 writes how far the ranks' weights differ."""
import json
import sys

import torch
import torch.distributed as dist
from torch import nn

import train
from utils.base.cli import run_cli
from utils.engine.trainer import Trainer

REPORT = sys.argv.pop(1)


def flat(tensors):
    return torch.cat([t.detach().reshape(-1).float() for t in tensors])


def gather(tensor, world_size):
    out = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(out, tensor)
    return out


def weight_diffs(trainer):
    """Largest difference of any rank's parameters/buffers (model and EMA) from rank 0's."""
    world = trainer.dist.world_size
    diffs = {}
    for name, module in (("model", trainer.model_without_ddp), ("ema", trainer.ema.module)):
        for kind, tensors in (("params", module.parameters()), ("buffers", module.buffers())):
            copies = gather(flat(tensors), world)
            diffs[f"{name}_{kind}"] = max(float((c - copies[0]).abs().max()) for c in copies)
    return diffs


REPORT_DATA = {}
train_one_epoch = Trainer.train_one_epoch


def train_then_compare(self, epoch):
    # Every rank comes here; the weights are compared before any evaluation or EMA copy.
    losses = train_one_epoch(self, epoch)
    REPORT_DATA.setdefault("after_first_epoch", weight_diffs(self))
    return losses


def compare_ranks(self, results):
    # The end-of-run hook: every rank, after the final evaluation, before the group closes.
    REPORT_DATA["end"] = weight_diffs(self)
    identities = [None] * self.dist.world_size
    dist.all_gather_object(identities, self.sampler.batch_identities(0, 0).tolist())
    REPORT_DATA.update(
        world_size=self.dist.world_size,
        ddp=isinstance(self.model, nn.parallel.DistributedDataParallel),
        backend=dist.get_backend(),
        first_batch_identities=identities,
    )
    if self.dist.is_main:
        with open(REPORT, "w") as handle:
            json.dump(REPORT_DATA, handle)


Trainer.train_one_epoch = train_then_compare
Trainer.on_train_end = compare_ranks
sys.exit(run_cli(train.main))
'''


@pytest.fixture(scope="module")
def sysu(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic SYSU-MM01: 10 training identities (8 train + 2 val), 4 test."""
    from data.toy import make_sysu

    root = tmp_path_factory.mktemp("data") / "sysu"
    make_sysu(root, 0, train_ids=8, val_ids=2, test_ids=4, images_per_camera=4, height=H, width=W)
    return root


def torchrun(
    script: Path, first: str, sysu: Path, cwd: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    """``script first`` on WORLD CPU processes under torchrun with a tiny train.py command line."""
    # fmt: off
    argv = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
        "--standalone", str(script), first,
        "--data_root", str(sysu), "--dataset", "sysu", "--device", "cpu",
        "--config_path", str(REPO / "configs" / "resnet18_two_stream.json"),
        "--img_h", str(H), "--img_w", str(W), "--batch_size", "8", "--num_pos", "4",
        "--max_steps", "2", "--test_freq", "1", "--log_freq", "1",
        "--pretrained", "none", "--test_batch", "64", "--no-channels_last", *extra,
    ]
    # fmt: on
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        # One thread per process: two processes share the test machine's cores.
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False
    )


@pytest.fixture(scope="module")
def ddp_run(sysu: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two epochs of 2 steps on 2 processes, an evaluation after each; returns what it left."""
    work = tmp_path_factory.mktemp("ddp")
    script = work / "train_check_ranks.py"
    script.write_text(RANK_CHECK)
    report = work / "ranks.json"
    done = torchrun(
        script, str(report), sysu, work, "--epochs", "2", "--save", str(work / "runs"),
        "--note", "ddp", "--cache_dir", str(work / "cache"),
    )  # fmt: skip
    return {
        "returncode": done.returncode,
        "output": done.stdout[-4000:] + done.stderr[-4000:],
        "run": work / "runs" / "ddp",
        "report": json.loads(report.read_text()) if report.exists() else None,
    }


def test_two_processes_train_and_rank0_writes_the_run(ddp_run: dict[str, Any]) -> None:
    """The run finishes; DDP really ran on 2 gloo ranks; rank 0 logged, saved and evaluated."""
    assert ddp_run["returncode"] == 0, ddp_run["output"]
    report = ddp_run["report"]
    assert report is not None, ddp_run["output"]
    assert report["world_size"] == WORLD and report["ddp"] and report["backend"] == "gloo"
    run: Path = ddp_run["run"]
    for name in ("checkpoint_latest.pth", "log.txt", "log.jsonl", "results.json", "results.md"):
        assert (run / name).is_file(), name
    epochs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    # One line per epoch, written once (by rank 0 only); the first carries its evaluation.
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert all(e["step"] == 2 * e["epoch"] for e in epochs)
    assert "sysu_all_pool_rank1" in epochs[0]
    results = json.loads((run / "results.json").read_text())
    assert len(results["sysu_all"]["trials"]) == 10
    checkpoint = torch.load(run / "checkpoint_latest.pth", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 2
    assert not any(key.startswith("module.") for key in checkpoint["model"])


def test_ranks_train_on_different_identities(ddp_run: dict[str, Any]) -> None:
    """Each rank's batch holds its own identities (the ranks do not repeat each other's work)."""
    report = ddp_run["report"]
    assert report is not None, ddp_run["output"]
    first, second = report["first_batch_identities"]
    assert len(first) == len(second) == 2
    assert not set(first) & set(second)


def test_ranks_keep_identical_weights_while_training(ddp_run: dict[str, Any]) -> None:
    """Averaged gradients keep every rank's parameters bit-identical through the steps.

    Compared after the first epoch, before the EMA is copied into the live model.
    BN running statistics stay per rank (DDP hands rank 0's to all before each forward).
    """
    report = ddp_run["report"]
    assert report is not None, ddp_run["output"]
    assert report["after_first_epoch"]["model_params"] == 0.0


def test_ranks_keep_identical_weights(ddp_run: dict[str, Any]) -> None:
    """Every rank holds the same parameters and EMA parameters, also after the evaluations.

    The ranks initialise with different seeds; the engine must start every rank and its EMA
    from rank 0's weights, or ``--ema_overwrite`` would copy diverging EMAs into the models.
    """
    report = ddp_run["report"]
    assert report is not None, ddp_run["output"]
    for moment in ("after_first_epoch", "end"):
        assert report[moment]["ema_params"] == 0.0, moment
        assert report[moment]["model_params"] == 0.0, moment


def test_ddp_checkpoint_loads_in_one_process(
    ddp_run: dict[str, Any], sysu: Path, tmp_path: Path
) -> None:
    """test.py (one process) scores the 2-process run's checkpoint, EMA and live weights."""
    spec = importlib.util.spec_from_file_location("cmnas_test_script", REPO / "test.py")
    assert spec is not None and spec.loader is not None
    test_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(test_script)
    assert ddp_run["returncode"] == 0, ddp_run["output"]
    checkpoint = ddp_run["run"] / "checkpoint_latest.pth"
    for ema in (False, True):
        out = tmp_path / f"scores_{ema}.json"
        argv = [
            "--data_root", str(sysu), "--dataset", "sysu", "--weights", str(checkpoint),
            "--img_h", str(H), "--img_w", str(W), "--device", "cpu", "--test_batch", "64",
            "--trial", "0", "--save_json", str(out),
        ] + (["--ema"] if ema else [])  # fmt: skip
        assert test_script.main(argv) == 0
        scores = json.loads(out.read_text())["results"]
        (result,) = scores.values()
        assert 0.0 <= result["pool"]["rank1"] <= 100.0


@pytest.mark.parametrize("seed", [0, 3])
def test_sampler_gives_each_rank_its_own_identities(seed: int) -> None:
    """Ranks get disjoint identities in every batch, aligned halves and the same step count."""
    rng = np.random.default_rng(seed)
    visible = rng.integers(0, 40, size=500)
    infrared = rng.integers(0, 40, size=230)
    samplers = [
        CrossModalitySampler(visible, infrared, 16, 4, seed, rank=r, world_size=WORLD)
        for r in range(WORLD)
    ]
    single = CrossModalitySampler(visible, infrared, 16, 4, seed)
    assert len(samplers[0]) == len(samplers[1]) == 500 // (16 * WORLD) + 1
    assert len(single) == 500 // 16 + 1
    for epoch in (0, 1):
        for sampler in samplers:
            sampler.set_epoch(epoch)
        batches = [list(sampler) for sampler in samplers]
        assert len(batches[0]) == len(batches[1]) == len(samplers[0])
        for step, pair in enumerate(zip(*batches, strict=True)):
            ids = [s.batch_identities(epoch, step) for s in samplers]
            assert not set(ids[0].tolist()) & set(ids[1].tolist())
            for sampler_ids, (v_idx, i_idx) in zip(ids, pair, strict=True):
                expected = np.repeat(sampler_ids, 4)
                np.testing.assert_array_equal(visible[v_idx], expected)
                np.testing.assert_array_equal(infrared[i_idx], expected)


# train.py's main, stopped right after the resume: each rank writes the random states it got.
RESUME_CHECK = '''
"""train.py --resume under torchrun; each rank writes its restored random states and exits."""
import sys

import torch
import torch.distributed as dist

import train
from utils.base.cli import run_cli
from utils.engine.trainer import Trainer

OUT = sys.argv.pop(1)
resume = Trainer.resume


def resume_then_report(self):
    resume(self)
    torch.save(self.state.state_dict(), f"{OUT}.rank{self.dist.rank}")
    dist.barrier()
    sys.exit(0)


Trainer.resume = resume_then_report
sys.exit(run_cli(train.main))
'''


def test_ddp_resume_restores_each_ranks_own_random_states(
    ddp_run: dict[str, Any], sysu: Path, tmp_path: Path
) -> None:
    """The checkpoint holds every rank's random states; a resume gives each rank its own."""
    assert ddp_run["returncode"] == 0, ddp_run["output"]
    checkpoint_path = ddp_run["run"] / "checkpoint_latest.pth"
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    by_rank = checkpoint["random_by_rank"]
    assert len(by_rank) == WORLD
    # Each rank's augmentation stream is its own (seeded with the rank), rank 0's the default.
    assert not torch.equal(by_rank[0]["aug_rng"], by_rank[1]["aug_rng"])
    assert torch.equal(by_rank[0]["aug_rng"], checkpoint["aug_rng"])
    script = tmp_path / "resume_check.py"
    script.write_text(RESUME_CHECK)
    out = tmp_path / "restored"
    done = torchrun(
        script, str(out), sysu, tmp_path, "--epochs", "3", "--resume", str(checkpoint_path),
        "--cache_dir", str(ddp_run["run"].parent / "cache"),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for rank in range(WORLD):
        restored = torch.load(f"{out}.rank{rank}", map_location="cpu", weights_only=True)
        assert torch.equal(restored["aug_rng"], by_rank[rank]["aug_rng"]), rank
        assert torch.equal(restored["rng"]["torch"], by_rank[rank]["rng"]["torch"]), rank
        assert torch.equal(restored["rng"]["numpy"], by_rank[rank]["rng"]["numpy"]), rank
        assert restored["rng"]["python"] == by_rank[rank]["rng"]["python"], rank
