"""The evaluation routine: flip averaging, re-ranking, one extraction per image, results from the
protocols, and a data set added as one class."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import train
from data import (
    DataSet,
    ExclusionRule,
    ImageList,
    ListedImage,
    Protocol,
    ProtocolSettings,
    TrainFiles,
    get_dataset,
    image_files,
    load_train_set,
    normalize,
    read_ids,
    register_dataset,
    registered_datasets,
    sysu_gallery,
    sysu_query,
)
from data import registry as registry_module
from data.registry import DataSetRegistry
from data.sysu import sysu_train_files
from utils.base.cli import build
from utils.base.modality import Modality
from utils.engine.build import check_data_root
from utils.engine.evaluation import evaluate_training_run
from utils.engine.options import data_parser
from utils.engine.settings import DataSettings, EvalSettings
from utils.evaluation.evaluate import (
    ProtocolFeatures,
    evaluate_protocols,
    extract_features,
    mean_std,
    score,
)
from utils.evaluation.metrics import eval_ranking, summarize
from utils.evaluation.rerank import RerankSettings, euclidean_distances, rerank

CPU = torch.device("cpu")
SIZE = (16, 8)


class HalvesModel(nn.Module):
    """Features from the image halves: "pool" is flip-invariant, "bnneck" is not.

    pool = channel means of the whole image; bnneck = (left-half channel means, right-half
    channel means, the modality). Records every batch it sees.
    """

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor, modality: Modality) -> tuple[torch.Tensor, torch.Tensor]:
        self.seen.append(x.shape[0])
        half = x.shape[3] // 2
        left, right = x[..., :half].mean(dim=(2, 3)), x[..., half:].mean(dim=(2, 3))
        flag = torch.full((x.shape[0], 1), float(modality) + 1.0)
        return x.mean(dim=(2, 3)), torch.cat([left, right, flag], dim=1)


def _images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, *SIZE, 3), dtype=np.uint8)


def test_flip_sums_the_mirror_features_then_normalises() -> None:
    images = _images(5)
    model = HalvesModel()
    pool, feat = extract_features(model, images, Modality.VISIBLE, CPU, batch_size=2, flip=True)
    # By hand: the image and its mirror through the model, summed, then L2-normalised.
    x = normalize(torch.from_numpy(images))
    plain_pool, plain_feat = model(x, Modality.VISIBLE)
    mirror_pool, mirror_feat = model(x.flip(3), Modality.VISIBLE)
    expected_feat = nn.functional.normalize(plain_feat + mirror_feat, dim=1)
    torch.testing.assert_close(feat, expected_feat)
    # Left and right halves trade places in the mirror: the sum holds left + right twice.
    torch.testing.assert_close(feat[:, :3], feat[:, 3:6])
    unflipped = extract_features(model, images, Modality.VISIBLE, CPU, batch_size=2)[1]
    assert not torch.allclose(unflipped, feat)
    # pool is the same for an image and its mirror: flip averaging leaves it unchanged.
    unflipped_pool = extract_features(model, images, Modality.VISIBLE, CPU, batch_size=2)[0]
    torch.testing.assert_close(pool, unflipped_pool)
    torch.testing.assert_close(pool, nn.functional.normalize(plain_pool + mirror_pool, dim=1))


def test_flip_invariant_on_symmetric_images() -> None:
    half = _images(4)[:, :, : SIZE[1] // 2]
    symmetric = np.concatenate([half, half[:, :, ::-1]], axis=2)
    model = HalvesModel()
    plain = extract_features(model, symmetric, Modality.INFRARED, CPU)
    flipped = extract_features(model, symmetric, Modality.INFRARED, CPU, flip=True)
    for a, b in zip(plain, flipped, strict=True):
        torch.testing.assert_close(a, b)


def _run(root: Path, model: nn.Module, draws: list[int], **kwargs) -> tuple:
    dataset = get_dataset("sysu")
    protocols = dataset.protocols(ProtocolSettings(mode="all", shot=1))
    kept: list[ProtocolFeatures] = []
    results = evaluate_protocols(
        model, dataset, str(root), protocols, 1, draws, CPU, SIZE, 8, keep=kept, **kwargs
    )
    return results, kept


def test_each_image_is_extracted_once_and_draws_are_scored_apart(toy_sysu: Path) -> None:
    model = HalvesModel()
    draws = [0, 1, 2]
    results, kept = _run(toy_sysu, model, draws)
    query_paths = sysu_query(toy_sysu, "all")[0]
    galleries = [sysu_gallery(toy_sysu, "all", 1, d) for d in draws]
    union = sorted({p for g in galleries for p in g[0]})
    assert sum(model.seen) == len(query_paths) + len(union)
    ((protocol, result),) = results
    (features,) = kept
    assert features.query.paths == query_paths and features.gallery.paths == union
    mask = features.membership()
    assert mask.shape == (3, len(union)) and mask.sum(axis=1).tolist() == [
        len(g[0]) for g in galleries
    ]
    per_draw = []
    for position, (paths, pids, cams) in enumerate(galleries):
        gallery = features.gallery_of(position)
        assert gallery.paths == paths and gallery.pids.tolist() == pids.tolist()
        assert gallery.camids.tolist() == cams.tolist()
        per_draw.append(score(features.query, gallery, protocol.exclusion, dedup_cmc=True))
    assert result["per_trial"] == per_draw and result["trials"] == draws
    assert {k: result[k] for k in ("pool", "bnneck")} == mean_std(per_draw)
    assert result["flip"] is False
    # With flip every image goes through the model twice, and the result says so.
    model.seen.clear()
    flipped, _ = _run(toy_sysu, model, draws, flip=True)
    assert sum(model.seen) == 2 * (len(query_paths) + len(union))
    assert flipped[0][1]["flip"] is True


def _settings(
    root: Path, dataset: str, flip: bool, rerank: RerankSettings | None = None
) -> tuple[DataSettings, EvalSettings]:
    data = DataSettings(str(root), dataset, None, *SIZE)
    return data, EvalSettings("cpu", "none", 16, flip, rerank, "all")


def test_training_evaluation_keys_and_draws(toy_sysu: Path, toy_regdb: Path) -> None:
    model = HalvesModel()
    monitor = evaluate_training_run(model, *_settings(toy_sysu, "sysu", False), False, CPU)
    assert list(monitor) == ["sysu_all"] and monitor["sysu_all"]["trials"] == [0]
    final = evaluate_training_run(model, *_settings(toy_sysu, "sysu", True), True, CPU)
    assert list(final) == ["sysu_all_flip"]  # flip-averaged numbers are named as such
    assert final["sysu_all_flip"]["trials"] == list(range(10))
    assert final["sysu_all_flip"]["flip"] is True
    regdb = evaluate_training_run(model, *_settings(toy_regdb, "regdb", False), True, CPU)
    assert list(regdb) == ["regdb_v2i", "regdb_i2v"]
    # One fixed gallery: no draws.
    assert set(regdb["regdb_v2i"]) == {"pool", "bnneck", "flip", "rerank"}
    assert regdb["regdb_v2i"]["rerank"] is False  # never re-ranked unless asked


def test_rerank_scores_each_draw_on_its_own_queries_and_gallery(toy_sysu: Path) -> None:
    settings = RerankSettings(k1=4, k2=2, lambda_value=0.5)
    results, kept = _run(toy_sysu, HalvesModel(), [0, 5], rerank=settings)
    ((protocol, result),) = results
    assert result["rerank"] == {"k1": 4, "k2": 2, "lambda_value": 0.5}
    features = kept[0]
    query = features.query
    for position in (0, 1):
        gallery = features.gallery_of(position)
        expected = {}
        for kind in ("pool", "bnneck"):
            q, g = query.get(kind).numpy(), gallery.get(kind).numpy()
            distances = rerank(
                euclidean_distances(q, g), euclidean_distances(q, q), euclidean_distances(g, g),
                k1=4, k2=2, lambda_value=0.5,
            )  # fmt: skip
            expected[kind] = summarize(
                *eval_ranking(
                    distances,
                    query.pids,
                    gallery.pids,
                    query.camids,
                    gallery.camids,
                    protocol.exclusion,
                    True,
                )  # fmt: skip
            )
        assert result["per_trial"][position] == expected
        plain = score(query, gallery, protocol.exclusion, dedup_cmc=True)
        assert result["per_trial"][position] != plain
    # Not asked, not done.
    ((_, plain_result),), _ = _run(toy_sysu, HalvesModel(), [0])
    assert plain_result["rerank"] is False


def test_training_evaluation_marks_rerank_in_its_keys(toy_regdb: Path) -> None:
    flags = ["--data_root", str(toy_regdb), "--flip", "--k1", "3", "--k2", "1"]
    flags += ["--lambda_value", "0.2"]
    parsed = train.get_args_parser().parse_args([*flags, "--rerank"])
    evaluation = build(EvalSettings, vars(parsed))
    assert evaluation.rerank == RerankSettings(3, 1, 0.2)
    data = DataSettings(str(toy_regdb), "regdb", None, *SIZE)
    results = evaluate_training_run(HalvesModel(), data, evaluation, True, CPU)
    assert list(results) == ["regdb_v2i_flip_rerank", "regdb_i2v_flip_rerank"]
    assert results["regdb_i2v_flip_rerank"]["rerank"] == {"k1": 3, "k2": 1, "lambda_value": 0.2}
    # Without --rerank there is no re-ranking (its parameters alone are refused: issue 16).
    plain = train.get_args_parser().parse_args(["--data_root", str(toy_regdb), "--flip"])
    assert build(EvalSettings, vars(plain)).rerank is None


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"k1": 0}, "k1 must be an integer >= 1, got 0"),
        ({"k2": 1.5}, "k2 must be an integer >= 1, got 1.5"),
        ({"lambda_value": 1.01}, "lambda_value must lie in [0, 1], got 1.01"),
    ],
)
def test_rerank_settings_are_checked(values: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        RerankSettings(**values)
    assert RerankSettings().describe() == "re-ranked k1=20 k2=6 lambda=0.3"


@pytest.mark.parametrize("flip", [False, True])
def test_score_defaults_to_no_rule_and_standard_cmc(toy_regdb: Path, flip: bool) -> None:
    dataset = get_dataset("regdb")
    kept: list[ProtocolFeatures] = []
    protocols = dataset.protocols(ProtocolSettings(direction="v2i"))
    ((_, result),) = evaluate_protocols(
        HalvesModel(), dataset, str(toy_regdb), protocols, 1, [0], CPU, SIZE, flip=flip, keep=kept
    )
    query, gallery = kept[0].query, kept[0].gallery_of(0)
    assert gallery.paths == protocols[0].gallery(str(toy_regdb), 1, 0).paths  # the index order
    assert {k: result[k] for k in ("pool", "bnneck")} == score(query, gallery)


# ----- a new data set is one class, registered ---------------------------------------------------
def _visible_queries(root: str, split: int) -> ImageList:
    paths, pids, cams = [], [], []
    for pid in sorted(read_ids(os.path.join(root, "exp/test_id.txt"))):
        for cam in (1, 2):
            files = image_files(os.path.join(root, f"cam{cam}", f"{pid:04d}"))
            paths += files
            pids += [pid] * len(files)
            cams += [cam] * len(files)
    return ImageList(paths, np.asarray(pids), np.asarray(cams), Modality.VISIBLE)


def _infrared_gallery(root: str, split: int, draw: int) -> ImageList:
    paths, pids, cams = sysu_gallery(root, "all", 1, draw)  # any drawn list will do
    return ImageList(paths, pids, cams % 3, Modality.INFRARED)  # cameras shared: 1, 2, 0


class ToySet(DataSet):
    """A data set written the way a new one would be: one class, nothing elsewhere."""

    name, title, short_title = "toyset", "Toy set", "Toy"
    ema_decay, ema_overwrite_every, gallery_draws = 0.9, 3, 2

    def expected_files(self, split: int, parts: Sequence[str]) -> list[str]:
        return ["cam1/", "cam2/", "exp/train_id.txt", "exp/test_id.txt"]

    def check_lists(self, root: str, split: int, parts: Sequence[str]) -> None:
        read_ids(os.path.join(root, "exp/test_id.txt"))

    def train_files(self, root: str, split: int) -> TrainFiles:
        return TrainFiles(*sysu_train_files(root))

    def make_protocols(self, settings: ProtocolSettings) -> tuple[Protocol, ...]:
        rule = ExclusionRule(same_identity_same_camera=True)
        return (Protocol("v2i", "v2i", _visible_queries, _infrared_gallery, rule, True),)

    def test_images(self, root: str, split: int) -> list[ListedImage]:
        return [ListedImage(p) for p in _visible_queries(root, split).paths]


def test_a_new_data_set_is_one_class_and_a_registry_entry(
    toy_sysu: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry_module, "DATASETS", DataSetRegistry(registered_datasets()))
    register_dataset(ToySet)
    args = data_parser().parse_args(["--data_root", str(toy_sysu), "--dataset", "toyset"])
    check_data_root(args.dataset, args.data_root, args.trial)
    train_set = load_train_set("toyset", toy_sysu, SIZE, cache_dir=tmp_path, progress=False)
    assert (tmp_path / "toyset_16x8").is_dir() and train_set.num_classes == 10
    data = DataSettings(args.data_root, args.dataset, args.trial, *SIZE)
    evaluation = EvalSettings("cpu", "none", 16)
    results = evaluate_training_run(HalvesModel(), data, evaluation, True, CPU)
    assert list(results) == ["toyset_v2i"] and results["toyset_v2i"]["trials"] == [0, 1]
    # Its rule is applied: scoring without it gives other numbers.
    kept: list[ProtocolFeatures] = []
    dataset = get_dataset("toyset")
    ((protocol, result),) = evaluate_protocols(
        HalvesModel(), dataset, str(toy_sysu), dataset.protocols(ProtocolSettings()), 1, [0],
        CPU, SIZE, keep=kept,
    )  # fmt: skip
    query, gallery = kept[0].query, kept[0].gallery_of(0)
    (drawn,) = result["per_trial"]
    assert drawn == score(query, gallery, protocol.exclusion, dedup_cmc=True)
    assert drawn != score(query, gallery, dedup_cmc=True)
