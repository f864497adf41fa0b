"""The architecture search: searchable slots, the alternating steps, derivation, the CLI."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import search
import train
from model import (
    SHARED,
    SPLIT,
    Arch,
    Routing,
    build_model,
    find_slots,
    load_arch,
    slot_names,
)
from model.bn import route_split
from model.search import (
    SearchableBN,
    arch_parameter_names,
    arch_parameters,
    build_supernet,
    derive_arch,
    hard_mode,
    split_probabilities,
)
from utils.base.cli import run_cli
from utils.engine.options import search_settings
from utils.engine.search import ARCH_FILE, SearchTrainer, split_identities
from utils.engine.settings import DataSettings, SearchSettings, TrainSettings
from utils.engine.signals import Interrupted
from utils.evaluation.heatmap import heatmap_from_jsonl, read_split_history

H, W = 64, 32
TINY = [
    "--depth", "18", "--img_h", str(H), "--img_w", str(W), "--batch_size", "4",
    "--num_pos", "2", "--pretrained", "none", "--test_batch", "64", "--log_freq", "1",
    "--arch_fraction", "0.4", "--max_steps", "2", "--ema_decay", "0", "--no-channels_last",
]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Run this module's tiny networks on one thread.

    Their tensors are too small to gain from a second thread, and on a busy machine OpenMP
    threads waiting for each other made a tiny search 7x slower (66 s against 9 s).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sysu(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic SYSU-MM01: 10 training identities (8 train + 2 val), 4 test."""
    from data.toy import make_sysu

    root = tmp_path_factory.mktemp("data") / "sysu"
    make_sysu(root, 0, train_ids=8, val_ids=2, test_ids=4, images_per_camera=3, height=H, width=W)
    return root


def search_argv(sysu: Path, out: Path, *extra: str) -> list[str]:
    """Command line of a tiny search on ``sysu`` writing under ``out``."""
    return [
        "--data_root", str(sysu), "--cache_dir", str(sysu.parent / "cache"),
        "--save", str(out), *TINY, *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def searched(sysu: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run folder of a tiny 3-epoch search (1 warm-up epoch), keeping every checkpoint."""
    out = tmp_path_factory.mktemp("runs")
    argv = search_argv(
        sysu, out, "--epochs", "3", "--arch_warmup", "1", "--arch_freq", "1",
        "--arch_lr", "0.05", "--save_freq", "1", "--note", "first",
    )  # fmt: skip
    assert run_cli(search.main, argv) == 0
    return out / "first"


def make_trainer(sysu: Path, out: Path, *extra: str) -> SearchTrainer:
    """A SearchTrainer built as search.main builds it (a fresh run: nothing to resume)."""
    args = search.get_args_parser().parse_args(search_argv(sysu, out, *extra))
    return SearchTrainer(search_settings(vars(args)))


def history(run: Path) -> list[dict[str, float]]:
    """The split probabilities logged for each epoch."""
    lines = (run / "log.jsonl").read_text().splitlines()
    return [json.loads(line)["split_probability"] for line in lines]


# ----- the searchable slot --------------------------------------------------------------------
def _randomise(slot: SearchableBN) -> None:
    """Give each branch its own affine parameters so the choices differ visibly."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for bn in slot.branches().values():
            bn.weight.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
            bn.bias.copy_(torch.randn(bn.num_features, generator=gen))


@pytest.mark.parametrize("favoured", [SHARED, SPLIT])
def test_strong_alpha_computes_its_choice(favoured: str) -> None:
    slot = SearchableBN(6)
    _randomise(slot)
    with torch.no_grad():
        slot.alpha.copy_(torch.tensor([12.0, -12.0] if favoured == SHARED else [-12.0, 12.0]))
    x = torch.randn(8, 6, 5, 3) * 3 + 1
    routing = Routing.from_halves(5, 3)
    reference = copy.deepcopy(slot)
    if favoured == SHARED:
        expected = reference.shared(x)
    else:
        expected = route_split(x, routing, reference.visible, reference.infrared)
    other = reference.shared(x) if favoured == SPLIT else expected
    assert slot.choice() == favoured
    assert slot.split_probability() == pytest.approx(float(favoured == SPLIT), abs=1e-9)
    out = slot(x, routing)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    if favoured == SPLIT:
        assert not torch.allclose(out, other, atol=1e-2)


def test_soft_forward_is_the_weighted_mix_and_hard_mode_computes_one_branch() -> None:
    slot = SearchableBN(4, tau=2.0)
    _randomise(slot)
    with torch.no_grad():
        slot.alpha.copy_(torch.tensor([0.3, 1.1]))
    x = torch.randn(6, 4, 3, 2)
    routing = Routing.from_halves(2, 4)
    ref = copy.deepcopy(slot)
    w = torch.softmax(torch.tensor([0.3, 1.1]) / 2.0, dim=0)
    expected = w[0] * ref.shared(x) + w[1] * route_split(x, routing, ref.visible, ref.infrared)
    torch.testing.assert_close(slot(x, routing), expected)
    # Hard mode: only the split pair runs, so the shared BN's statistics stay put.
    shared_mean = slot.shared.running_mean.clone()
    visible_mean = slot.visible.running_mean.clone()
    slot.set_hard(SPLIT)
    out = slot(x, routing)
    torch.testing.assert_close(out, route_split(x, routing, ref.visible, ref.infrared))
    assert torch.equal(slot.shared.running_mean, shared_mean)
    assert not torch.equal(slot.visible.running_mean, visible_mean)


def test_gumbel_samples_in_training_and_uses_the_softmax_in_eval() -> None:
    torch.manual_seed(0)
    slot = SearchableBN(2, relaxation="gumbel", tau=0.5)
    with torch.no_grad():
        slot.alpha.copy_(torch.tensor([0.2, -0.4]))
    samples = torch.stack([slot.mixing_weights() for _ in range(50)])
    torch.testing.assert_close(samples.sum(1), torch.ones(50))
    assert samples[:, 1].std() > 0.05
    slot.eval()
    torch.testing.assert_close(slot.mixing_weights(), torch.softmax(slot.alpha / 0.5, 0))


def test_supernet_parameters_and_imagenet_initialisation(tmp_path: Path) -> None:
    net = build_supernet(18, 5)
    slots = find_slots(net)
    assert list(slots) == slot_names(18)
    assert list(split_probabilities(net)) == slot_names(18)
    assert all(isinstance(s, SearchableBN) for s in slots.values())
    alphas = arch_parameters(net)
    names = arch_parameter_names(net)
    assert len(alphas) == len(names) == 20 and all(n.endswith(".alpha") for n in names)
    weights = [p for n, p in net.named_parameters() if n not in names]
    assert len(alphas) + len(weights) == len(list(net.parameters()))
    assert not {id(p) for p in alphas} & {id(p) for p in weights}
    # A torchvision-layout file fills every branch of every slot; the alphas stay at zero.
    plain = build_model(Arch.uniform(18, SHARED), 5)
    state = {}
    for key, value in plain.backbone.state_dict().items():
        key = key.replace(".shared.", ".").replace("downsample.conv", "downsample.0")
        state[key.replace("downsample.bn", "downsample.1")] = value + 0.5
    state["fc.weight"] = torch.zeros(1000, 512)
    torch.save(state, tmp_path / "resnet18.pth")
    net = build_supernet(18, 5, pretrained=str(tmp_path / "resnet18.pth"))
    slot = find_slots(net)["layer2.0.downsample.bn"]
    for bn in slot.branches().values():
        torch.testing.assert_close(bn.weight, state["layer2.0.downsample.1.weight"])
    assert all(not a.detach().any() and a.requires_grad for a in arch_parameters(net))
    assert "backbone.bn1.alpha" in net.state_dict()


# ----- the search loop -----------------------------------------------------------------------
def test_identity_split_is_disjoint_covering_and_seeded() -> None:
    pids = list(range(100, 140))
    weights, arch = split_identities(pids, 0.2, seed=3, min_ids=4)
    assert len(arch) == 8 and len(weights) == 32
    assert not set(weights) & set(arch) and sorted(weights + arch) == pids
    assert split_identities(pids, 0.2, 3, 4) == (weights, arch)
    assert split_identities(pids, 0.2, 4, 4) != (weights, arch)


def _snapshot(trainer: SearchTrainer) -> dict[str, dict[str, torch.Tensor]]:
    """Copies of the alphas, the network weights, their gradients and the BN statistics."""
    model = trainer.model_without_ddp
    alpha_names = arch_parameter_names(model)
    params = dict(model.named_parameters())
    return {
        "alpha": {n: p.detach().clone() for n, p in params.items() if n in alpha_names},
        "weights": {n: p.detach().clone() for n, p in params.items() if n not in alpha_names},
        "grads": {
            n: p.grad.clone()
            for n, p in params.items()
            if p.grad is not None and n not in alpha_names
        },
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
    }


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_alphas_change_only_in_arch_steps_and_weights_only_in_weight_steps(
    sysu: Path, tmp_path: Path
) -> None:
    trainer = make_trainer(sysu, tmp_path, "--arch_warmup", "1", "--arch_freq", "1")
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not in_optimizer & {id(p) for p in arch_parameters(trainer.model_without_ddp)}
    seen = []
    original = trainer.architecture_step

    def spy(epoch: int, step: int) -> dict[str, torch.Tensor]:
        seen.append(_snapshot(trainer))
        out = original(epoch, step)
        seen.append(_snapshot(trainer))
        return out

    trainer.architecture_step = spy  # type: ignore[method-assign]
    trainer.model.train()
    batch = trainer.sampler.batch(0, 0)

    # Warm-up epoch: a weights step only.
    trainer.epoch, trainer.step = 0, 0
    before = _snapshot(trainer)
    trainer.training_step(*batch)
    trainer.global_step += 1
    after = _snapshot(trainer)
    assert not seen
    assert _same(before["alpha"], after["alpha"])
    assert not _same(before["weights"], after["weights"])

    # After the warm-up: the weights step, then an architecture step.
    trainer.epoch, trainer.step = 1, 0
    trainer.training_step(*batch)
    entry, exit_ = seen
    assert _same(after["alpha"], entry["alpha"])
    assert not _same(after["weights"], entry["weights"])
    assert not _same(entry["alpha"], exit_["alpha"])
    for part in ("weights", "grads", "buffers"):
        assert _same(entry[part], exit_[part]), part
    assert all(p.grad is not None for p in arch_parameters(trainer.model_without_ddp))


def test_temperature_schedule() -> None:
    train = TrainSettings(DataSettings("data"), Path("run"), epochs=11)
    gumbel = SearchSettings(train, relaxation="gumbel", tau=1.0, tau_max=5.0, tau_min=0.5)
    fake = SimpleNamespace(search=replace(gumbel, arch_warmup=1))
    taus = [SearchTrainer.temperature(fake, e) for e in range(11)]  # type: ignore[arg-type]
    assert taus[0] == taus[1] == 5.0 and taus[-1] == pytest.approx(0.5)
    assert all(a > b for a, b in zip(taus[1:], taus[2:], strict=False))
    fake.search = replace(fake.search, relaxation="softmax")
    assert SearchTrainer.temperature(fake, 7) == 1.0  # type: ignore[arg-type]


def test_tiny_search_writes_arch_log_and_heatmap(searched: Path) -> None:
    per_epoch = history(searched)
    assert len(per_epoch) == 3
    assert set(per_epoch[0].values()) == {0.5}  # warm-up: alphas untouched
    moved = max(abs(p - 0.5) for p in per_epoch[-1].values())
    assert moved > 0.01
    records = [json.loads(line) for line in (searched / "log.jsonl").read_text().splitlines()]
    assert records[-1]["arch_steps"] == 2 and "arch_loss" in records[-1]
    assert 0 <= records[-1]["arch_rank1"] <= 100 and 0 < records[-1]["arch_mAP"] <= 100

    arch = load_arch(searched / ARCH_FILE)
    assert arch.depth == 18 and list(arch.slots) == slot_names(18)
    probabilities = arch.provenance["split_probability"]
    for name, choice in arch.slots.items():
        assert choice == (SPLIT if probabilities[name] > 0.5 else SHARED)
        assert probabilities[name] == pytest.approx(per_epoch[-1][name], abs=1e-4)
    provenance = arch.provenance
    assert provenance["source"] == "search" and provenance["dataset"] == "sysu"
    assert provenance["epochs"] == 3 and provenance["seed"] == 0
    assert provenance["arch_fraction"] == 0.4 and provenance["relaxation"] == "softmax"
    assert provenance["tau"] == 1.0 and provenance["commit"]

    with Image.open(searched / "search_heatmap.png") as image:
        image.verify()
        assert image.format == "PNG"
    slots, epochs, matrix = read_split_history(searched)
    assert slots == slot_names(18) and epochs == [1, 2, 3] and matrix.shape == (20, 3)
    assert (searched / "results.json").is_file()


def test_identity_sets_of_a_run_are_disjoint_and_cover(sysu: Path, searched: Path) -> None:
    state = torch.load(searched / "checkpoint_latest.pth", weights_only=True)
    arch_ids, weight_ids = state["search"]["arch_ids"], state["search"]["weight_ids"]
    train_ids = [int(i) for name in ("train", "val") for i in _ids(sysu, name)]
    assert not set(arch_ids) & set(weight_ids)
    assert sorted(arch_ids + weight_ids) == sorted(train_ids)
    assert len(arch_ids) == 4
    assert state["num_classes"] == len(weight_ids)
    # The checkpoint's header names the derived architecture.
    assert state["arch"]["slots"] == load_arch(searched / ARCH_FILE).slots


def _ids(root: Path, split: str) -> list[str]:
    return (root / "exp" / f"{split}_id.txt").read_text().strip().split(",")


def test_same_seed_same_search_and_resume_continues_exactly(
    sysu: Path, searched: Path, tmp_path: Path
) -> None:
    argv = search_argv(
        sysu, tmp_path, "--arch_warmup", "1", "--arch_freq", "1",
        "--arch_lr", "0.05", "--no-eval_arch",
    )  # fmt: skip
    # Two epochs of the same search: nothing in them depends on the total epoch count.
    assert run_cli(search.main, [*argv, "--epochs", "2", "--note", "again"]) == 0
    assert history(tmp_path / "again") == history(searched)[:2]
    checkpoint = searched / "checkpoint_ep002.pth"
    resumed = [*argv, "--epochs", "3", "--note", "resumed", "--resume", str(checkpoint)]
    assert run_cli(search.main, resumed) == 0
    assert history(tmp_path / "resumed") == history(searched)[2:]


def test_stop_mid_epoch_and_resume_continues_exactly(sysu: Path, tmp_path: Path) -> None:
    extra = (
        "--epochs", "2", "--arch_warmup", "0", "--arch_freq", "1", "--arch_lr", "0.05",
        "--no-eval_arch",
    )  # fmt: skip
    assert run_cli(search.main, search_argv(sysu, tmp_path, *extra, "--note", "whole")) == 0
    trainer = make_trainer(sysu, tmp_path, *extra, "--note", "stopped")
    original = trainer.architecture_step

    def stop_after(epoch: int, step: int) -> dict[str, torch.Tensor]:
        out = original(epoch, step)
        if (epoch, step) == (1, 0):
            trainer.request_stop()
        return out

    trainer.architecture_step = stop_after  # type: ignore[method-assign]
    with pytest.raises(Interrupted) as stopped:
        trainer.train()
    state = torch.load(stopped.value.checkpoint, weights_only=True)
    assert (state["epoch"], state["step_in_epoch"]) == (1, 1)
    assert state["search"]["arch_losses"]["count"] == 1
    # Resumed without --note: the run continues in its own folder.
    resume = search_argv(sysu, tmp_path, *extra, "--resume", str(stopped.value.checkpoint))
    assert run_cli(search.main, resume) == 0
    assert history(tmp_path / "stopped") == history(tmp_path / "whole")
    lines = (tmp_path / "stopped" / "log.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert records[-1]["arch_steps"] == 2


def test_gumbel_search_anneals_the_temperature(sysu: Path, tmp_path: Path) -> None:
    argv = search_argv(
        sysu, tmp_path, "--relaxation", "gumbel", "--epochs", "3", "--arch_warmup", "1",
        "--arch_freq", "1", "--max_steps", "1", "--no-eval_arch", "--note", "gumbel",
    )  # fmt: skip
    assert run_cli(search.main, argv) == 0
    run = tmp_path / "gumbel"
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["tau"] for r in records] == [5.0, 5.0, 0.5]
    assert [r["arch_steps"] for r in records] == [0, 1, 1]
    provenance = load_arch(run / ARCH_FILE).provenance
    assert provenance["relaxation"] == "gumbel" and provenance["tau"] == 0.5
    assert (provenance["tau_max"], provenance["tau_min"]) == (5.0, 0.5)


def test_derived_architecture_trains(sysu: Path, searched: Path, tmp_path: Path) -> None:
    argv = [
        "--data_root", str(sysu), "--cache_dir", str(sysu.parent / "cache"),
        "--save", str(tmp_path), "--config_path", str(searched / ARCH_FILE),
        "--img_h", str(H), "--img_w", str(W), "--batch_size", "4", "--num_pos", "2",
        "--pretrained", "none", "--epochs", "1", "--max_steps", "1", "--test_batch", "64",
        "--no-channels_last", "--note", "derived",
    ]  # fmt: skip
    assert run_cli(train.main, argv) == 0
    results = json.loads((tmp_path / "derived" / "results.json").read_text())
    assert "sysu_all" in results


def test_heatmap_from_jsonl_redraws(searched: Path, tmp_path: Path) -> None:
    path = heatmap_from_jsonl(searched, str(tmp_path / "again.png"))
    with Image.open(path) as image:
        width, height = image.size
    assert width > 200 and height > 20 * 14


def test_derive_arch_and_hard_mode_match_the_alphas() -> None:
    net = build_supernet(18, 3)
    with torch.no_grad():
        for i, alpha in enumerate(arch_parameters(net)):
            alpha.copy_(torch.tensor([0.0, 1.0 if i % 3 == 0 else -1.0]))
    arch = derive_arch(net, {"source": "test"})
    assert arch.split_slots() == [n for i, n in enumerate(slot_names(18)) if i % 3 == 0]
    assert arch.provenance["split_probability"] == pytest.approx(
        {k: round(v, 6) for k, v in split_probabilities(net).items()}
    )
    # Hard mode computes exactly what the derived network computes with the same weights.
    derived = build_model(arch, 3)
    derived.load_state_dict(
        {k: v for k, v in net.state_dict().items() if k in derived.state_dict()}
    )
    x = torch.randn(4, 3, H, W)
    net.eval(), derived.eval()
    with hard_mode(net) as used:
        assert used.slots == arch.slots
        torch.testing.assert_close(net(x, "infrared")[1], derived(x, "infrared")[1])
    assert all(s.hard_choice is None for s in find_slots(net).values())


# ----- command line ---------------------------------------------------------------------------
def _error_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--arch_fraction", "1.5"], "--arch_fraction 1.5: expected a value in (0, 1)"),
        (["--arch_fraction", "0"], "--arch_fraction 0"),
        (["--arch_warmup", "5", "--epochs", "5"], "--arch_warmup 5"),
        (["--tau_min", "6"], "--tau_min 6.0 is above --tau_max 5.0"),
        (["--test_freq", "2"], "never runs the test protocol"),
    ],
)
def test_cli_rejects_bad_options(
    sysu: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    assert run_cli(search.main, [*search_argv(sysu, tmp_path), *extra]) == 2
    (line,) = _error_lines(capsys)
    assert message in line


def test_cli_rejects_a_split_with_too_few_identities(
    sysu: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = search_argv(sysu, tmp_path, "--batch_size", "12", "--num_pos", "2")
    assert run_cli(search.main, argv) == 2
    (line,) = _error_lines(capsys)
    assert "6 for the weights and 4 for the architecture" in line
    assert "at least --batch_size/--num_pos = 6" in line
    assert not list(tmp_path.iterdir())  # rejected before the run folder was created


def test_resume_refuses_a_training_checkpoint(
    sysu: Path, searched: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = torch.load(searched / "checkpoint_ep001.pth", weights_only=True)
    del state["search"]
    torch.save(state, tmp_path / "train.pth")
    argv = search_argv(sysu, tmp_path, "--resume", str(tmp_path / "train.pth"))
    assert run_cli(search.main, argv) == 2
    (line,) = _error_lines(capsys)
    assert "not a search checkpoint" in line


def test_parser_defaults() -> None:
    parser = search.get_args_parser()
    defaults = {
        "depth": 50, "epochs": 40, "arch_fraction": 0.2, "relaxation": "softmax", "tau": 1.0,
        "tau_max": 5.0, "tau_min": 0.5, "arch_lr": 3e-3, "arch_weight_decay": 1e-3,
        "arch_warmup": 10, "arch_freq": 6, "eval_arch": True, "test_freq": 0,
        "config_path": None,
    }  # fmt: skip
    assert {k: parser.get_default(k) for k in defaults} == defaults
