"""LLCM reader: training index files, query lists and the authors' per-trial gallery draw; the
LLCM data-set plug-in: its protocols (both directions, the swapped-roles variant) and checks."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from data import ProtocolSettings, get_dataset
from data import llcm_gallery as exported_gallery
from data import llcm_query as exported_query
from data.llcm import (
    INFRARED_CAMS,
    LLCM,
    NUM_TRIALS,
    SAME_IDENTITY_AND_CAMERA,
    VISIBLE_CAMS,
    llcm_gallery,
    llcm_query,
    llcm_train_files,
)
from utils.base.errors import UserError
from utils.base.modality import Modality
from utils.evaluation.evaluate import ProtocolFeatures, evaluate_protocols, score
from utils.evaluation.metrics import eval_llcm, pairwise_distance, summarize

from llcm_tree import (  # isort: skip
    FOLDERS,
    TEST_ID_LINE,
    TEST_IDS,
    TEST_INFRARED,
    TEST_VISIBLE,
    TRAIN_INFRARED,
    TRAIN_VISIBLE,
    make_llcm_tree,
    write_image,
)


@pytest.fixture()
def llcm(tmp_path: Path) -> Path:
    return make_llcm_tree(tmp_path / "LLCM")


@pytest.fixture()
def keep_global_random() -> Iterator[None]:
    """Restore the global ``random`` state after a test that seeds it."""
    state = random.getstate()
    yield
    random.setstate(state)


def _layout(modality: Modality) -> dict:
    return TEST_VISIBLE if modality is Modality.VISIBLE else TEST_INFRARED


def _cams(modality: Modality) -> tuple[int, ...]:
    return VISIBLE_CAMS if modality is Modality.VISIBLE else INFRARED_CAMS


def _folder_of(root: Path, modality: Modality, pid: int, cam: int) -> Path:
    return root / FOLDERS[modality] / f"cam{cam}" / f"{pid:04d}"


def test_constants() -> None:
    assert VISIBLE_CAMS == (1, 2, 3, 4, 5, 6, 7, 8, 9)
    assert INFRARED_CAMS == (1, 2, 4, 5, 6, 7, 8, 9)
    assert NUM_TRIALS == 10


# --- training files --------------------------------------------------------------------------


def test_train_files_follow_the_index_files(llcm: Path) -> None:
    visible_paths, visible_pids, infrared_paths, infrared_pids = llcm_train_files(llcm)
    assert visible_paths == [os.path.join(str(llcm), rel) for rel, _ in TRAIN_VISIBLE]
    assert infrared_paths == [os.path.join(str(llcm), rel) for rel, _ in TRAIN_INFRARED]
    assert visible_pids == [label for _, label in TRAIN_VISIBLE]
    assert infrared_pids == [label for _, label in TRAIN_INFRARED]
    assert all(isinstance(p, str) and os.path.isabs(p) for p in visible_paths + infrared_paths)
    assert all(type(label) is int for label in visible_pids + infrared_pids)


def test_train_line_naming_a_missingwrite_image(llcm: Path) -> None:
    index = llcm / "idx" / "train_nir.txt"
    lines = index.read_text().splitlines()
    lines.insert(2, "nir/0351/0351_c06_missing_nir.jpg 0")
    index.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError) as err:
        llcm_train_files(llcm)
    message = str(err.value)
    assert message.startswith(f"{index}:3: ")
    assert "nir/0351/0351_c06_missing_nir.jpg does not exist" in message
    assert "\n" not in message


@pytest.mark.parametrize("bad", ["vis/0351/a.jpg", "vis/0351/a.jpg one", "/abs/vis/0351/a.jpg 0"])
def test_train_malformed_line(llcm: Path, bad: str) -> None:
    index = llcm / "idx" / "train_vis.txt"
    index.write_text("\n" + index.read_text() + bad + "\n")  # a leading blank line still counts
    with pytest.raises(UserError) as err:
        llcm_train_files(llcm)
    line_no = len(TRAIN_VISIBLE) + 2
    assert str(err.value) == (
        f"{index}:{line_no}: expected 'relative/path.jpg label' with the path relative to the "
        f"data root, found {bad!r}"
    )


def test_train_index_without_images(llcm: Path) -> None:
    index = llcm / "idx" / "train_vis.txt"
    index.write_text("\n")
    with pytest.raises(UserError, match=r"train_vis\.txt: lists no images$"):
        llcm_train_files(llcm)


# --- root check ------------------------------------------------------------------------------


def test_root_check_names_every_missing_entry(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError) as err:
        LLCM().check_layout(empty)
    assert str(err.value) == (
        f"--data_root {empty}: not a LLCM folder (--dataset llcm): missing idx/train_vis.txt, "
        "idx/train_nir.txt, idx/test_id.txt, test_vis/, test_nir/"
    )
    with pytest.raises(UserError, match="folder not found"):
        LLCM().check_layout(tmp_path / "nowhere")


def test_missing_index_file_is_named_by_every_reader(llcm: Path) -> None:
    (llcm / "idx" / "train_nir.txt").unlink()
    expected = f"--data_root {llcm}: not a LLCM folder (--dataset llcm): missing idx/train_nir.txt"
    for call in (
        lambda: llcm_train_files(llcm),
        lambda: llcm_query(llcm, "visible"),
        lambda: llcm_gallery(llcm, "infrared", 0),
    ):
        with pytest.raises(UserError) as err:
            call()
        assert str(err.value) == expected


# --- queries ---------------------------------------------------------------------------------


@pytest.mark.parametrize("modality", [Modality.VISIBLE, Modality.INFRARED])
def test_query_is_every_test_image_in_order(llcm: Path, modality: Modality) -> None:
    paths, pids, cams = llcm_query(llcm, modality.name.lower())
    layout = _layout(modality)
    assert isinstance(paths, list) and all(isinstance(p, str) for p in paths)
    assert pids.dtype == np.int64 and cams.dtype == np.int64
    expected = []
    for pid in TEST_IDS:
        for cam in _cams(modality):
            folder = _folder_of(llcm, modality, pid, cam)
            if folder.is_dir():
                expected += sorted(str(p) for p in folder.iterdir())
    assert len(paths) == sum(sum(c.values()) for c in layout.values())
    assert paths == expected
    for path, pid, cam in zip(paths, pids, cams, strict=True):
        assert Path(path).parent == _folder_of(llcm, modality, pid, cam)
    # the enum member gives the same lists as its name
    enum_paths, enum_pids, enum_cams = llcm_query(llcm, modality)
    assert enum_paths == paths
    assert np.array_equal(enum_pids, pids) and np.array_equal(enum_cams, cams)


def test_query_counts_per_identity_and_camera(llcm: Path) -> None:
    _, pids, cams = llcm_query(llcm, "visible")
    pairs = list(zip(pids.tolist(), cams.tolist(), strict=True))
    # ids ascending first, then the camera order
    assert pairs == sorted(pairs)
    assert pairs.count((12, 4)) == 3 and (12, 3) not in pairs
    assert len(pairs) == 32
    _, pids, cams = llcm_query(llcm, "infrared")
    pairs = list(zip(pids.tolist(), cams.tolist(), strict=True))
    assert pairs == sorted(pairs)
    assert pairs.count((5, 2)) == 4 and len(pairs) == 20
    assert 3 not in cams.tolist()


def test_query_rejects_an_unknown_modality(llcm: Path) -> None:
    with pytest.raises(UserError) as err:
        llcm_query(llcm, "thermal-ish")
    assert str(err.value) == "modality 'thermal-ish': expected 'visible' or 'infrared'"


# --- gallery ---------------------------------------------------------------------------------


def _reference_gallery(root: Path, modality: Modality, trial: int) -> list[str]:
    """Independent re-statement of the authors' draw with the GLOBAL generator."""
    ids = [int(t) for t in (root / "idx" / "test_id.txt").read_text().strip().split(",")]
    folder = "test_vis" if modality is Modality.VISIBLE else "test_nir"
    numbers = (1, 2, 3, 4, 5, 6, 7, 8, 9) if folder == "test_vis" else (1, 2, 4, 5, 6, 7, 8, 9)
    cameras = [f"{folder}/cam{c}" for c in numbers]
    random.seed(trial)
    drawn = []
    for pid in sorted(f"{i:04d}" for i in ids):  # ascending as 4-digit strings
        for cam in cameras:
            img_dir = os.path.join(str(root), cam, pid)
            if os.path.isdir(img_dir):
                drawn.append(random.choice(sorted(img_dir + "/" + n for n in os.listdir(img_dir))))
    return drawn


@pytest.mark.parametrize("modality", [Modality.VISIBLE, Modality.INFRARED])
def test_gallery_is_one_image_per_existing_folder(llcm: Path, modality: Modality) -> None:
    paths, pids, cams = llcm_gallery(llcm, modality, 0)
    assert pids.dtype == np.int64 and cams.dtype == np.int64
    folders = [(p, c) for p in TEST_IDS for c in _cams(modality) if c in _layout(modality)[p]]
    assert list(zip(pids.tolist(), cams.tolist(), strict=True)) == folders
    for path, pid, cam in zip(paths, pids, cams, strict=True):
        assert Path(path).parent == _folder_of(llcm, modality, pid, cam)
        assert Path(path).is_file()


@pytest.mark.usefixtures("keep_global_random")
@pytest.mark.parametrize("modality", ["visible", "infrared"])
def test_gallery_reproduces_the_authors_draw(llcm: Path, modality: str) -> None:
    galleries = []
    for trial in range(NUM_TRIALS):
        paths, _, _ = llcm_gallery(llcm, modality, trial)
        assert paths == _reference_gallery(llcm, Modality.parse(modality), trial)
        assert llcm_gallery(llcm, modality, trial)[0] == paths  # same trial, same gallery
        galleries.append(tuple(paths))
    # different trials differ for at least one folder (here: most pairs differ)
    assert len(set(galleries)) > 1
    assert galleries[0] != galleries[1]


def test_gallery_leaves_the_global_generator_alone(llcm: Path, keep_global_random: None) -> None:
    random.seed(123)
    expected = random.random()
    random.seed(123)
    llcm_gallery(llcm, "visible", 4)
    assert random.random() == expected


@pytest.mark.parametrize("trial", [-1, 10, 1.5, "1", None])
def test_gallery_rejects_trials_outside_0_to_9(llcm: Path, trial: object) -> None:
    with pytest.raises(UserError) as err:
        llcm_gallery(llcm, "visible", trial)  # type: ignore[arg-type]
    assert str(err.value) == f"--trial {trial!r}: LLCM gallery trials are 0-9 (default: all 10)"


# --- identities and cameras from the folders -------------------------------------------------


@pytest.mark.usefixtures("keep_global_random")
def test_root_path_containing_cam_reads_the_folders(tmp_path: Path) -> None:
    root = make_llcm_tree(tmp_path / "cam7_0099" / "cam_data" / "LLCM")
    for modality in (Modality.VISIBLE, Modality.INFRARED):
        paths, pids, cams = llcm_query(root, modality)
        assert len(paths) == sum(sum(c.values()) for c in _layout(modality).values())
        for path, pid, cam in zip(paths, pids, cams, strict=True):
            assert Path(path).parent == _folder_of(root, modality, pid, cam)
        paths, pids, cams = llcm_gallery(root, modality, 3)
        assert paths == _reference_gallery(root, modality, 3)
        assert set(pids.tolist()) == set(TEST_IDS)
        assert set(cams.tolist()) == {c for cs in _layout(modality).values() for c in cs}
    visible_paths, _, _, _ = llcm_train_files(root)
    assert all(p.startswith(str(root) + os.sep) for p in visible_paths)


# --- test id file ----------------------------------------------------------------------------


def test_malformed_test_id_line(llcm: Path) -> None:
    index = llcm / "idx" / "test_id.txt"
    index.write_text("40,5\n12,x7\n")
    with pytest.raises(UserError) as err:
        llcm_query(llcm, "visible")
    assert str(err.value) == f"{index}:2: expected comma-separated integer ids, found 'x7'"


def test_test_id_without_image_folders(llcm: Path) -> None:
    index = llcm / "idx" / "test_id.txt"
    index.write_text("40,5,12,77,3\n")
    with pytest.raises(UserError) as err:
        llcm_gallery(llcm, "infrared", 0)
    assert str(err.value) == f"{index}: test ids without images in test_vis/ or test_nir/: 3, 77"


def test_test_id_with_folders_in_one_modality_only_is_kept(llcm: Path) -> None:
    write_image(llcm / "test_nir" / "cam6" / "0088" / "0088_c06_a.jpg", 1)
    (llcm / "idx" / "test_id.txt").write_text("40,5,12,88\n")
    _, pids, cams = llcm_query(llcm, "infrared")
    assert pids.tolist()[-1] == 88 and cams.tolist()[-1] == 6
    _, pids, _ = llcm_gallery(llcm, "visible", 0)
    assert 88 not in pids.tolist()


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("40,5,12,5", "ids listed more than once: 5"),
        ("40,5,-1", "ids outside 0..9999: -1"),
        ("\n", "lists no test ids"),
    ],
)
def test_bad_test_id_lists(llcm: Path, line: str, expected: str) -> None:
    index = llcm / "idx" / "test_id.txt"
    index.write_text(line + "\n")
    with pytest.raises(UserError) as err:
        llcm_query(llcm, "visible")
    assert str(err.value) == f"{index}: {expected}"


# --- the data-set plug-in --------------------------------------------------------------------


def _same_list(got, expected: tuple, modality: Modality) -> None:
    assert got.paths == expected[0] and got.modality is modality
    np.testing.assert_array_equal(got.pids, expected[1])
    np.testing.assert_array_equal(got.cams, expected[2])


def test_plugin_defaults_and_public_imports() -> None:
    dataset = get_dataset("llcm")
    assert (dataset.name, dataset.title) == ("llcm", "LLCM")
    assert (dataset.ema_decay, dataset.ema_overwrite_every) == (0.997, 2)
    assert (dataset.num_splits, dataset.gallery_draws) == (1, NUM_TRIALS)
    assert dataset.draws_of(None) == list(range(10)) and dataset.draws_of(3) == [3]
    assert dataset.split_of(7) == 1
    with pytest.raises(UserError, match=r"^--trial 10: LLCM gallery trials are 0-9"):
        dataset.check_trial(10, testing=True)
    assert exported_query is llcm_query and exported_gallery is llcm_gallery


def test_protocols_are_both_directions_with_the_camera_rule(llcm: Path) -> None:
    dataset = get_dataset("llcm")
    root = str(llcm)
    v2i, i2v = dataset.protocols(ProtocolSettings())
    assert [(p.name, p.key) for p in (v2i, i2v)] == [("v2i", "v2i"), ("i2v", "i2v")]
    for protocol, query, gallery in (
        (v2i, Modality.VISIBLE, Modality.INFRARED),
        (i2v, Modality.INFRARED, Modality.VISIBLE),
    ):
        assert protocol.exclusion == SAME_IDENTITY_AND_CAMERA and protocol.dedup_cmc
        assert not protocol.swap_roles
        _same_list(protocol.query(root, 1), llcm_query(llcm, query), query)
        for draw in (0, 9):
            _same_list(protocol.gallery(root, 1, draw), llcm_gallery(llcm, gallery, draw), gallery)
    assert dataset.result_name(v2i, 1) == "llcm v2i" and dataset.record_key(i2v) == "llcm_i2v"
    only = dataset.protocols(ProtocolSettings(direction="i2v"))
    assert [p.name for p in only] == ["i2v"]
    with pytest.raises(UserError, match="^--direction 'up': expected v2i, i2v or both$"):
        dataset.protocols(ProtocolSettings(direction="up"))


def test_swapped_roles_variant_is_its_own_protocol(llcm: Path) -> None:
    dataset = get_dataset("llcm")
    (swapped,) = dataset.protocols(ProtocolSettings(direction="v2i", v2i_roles="swapped"))
    assert (swapped.name, swapped.key, swapped.swap_roles) == (
        "v2i roles-swapped",
        "v2i_roles_swapped",
        True,
    )
    # The lists are v2i's; only the scoring swaps them.
    _same_list(swapped.query(str(llcm), 1), llcm_query(llcm, "visible"), Modality.VISIBLE)
    _same_list(
        swapped.gallery(str(llcm), 1, 4), llcm_gallery(llcm, "infrared", 4), Modality.INFRARED
    )
    assert swapped.exclusion == SAME_IDENTITY_AND_CAMERA and swapped.dedup_cmc
    assert dataset.result_name(swapped, 1) == "llcm v2i roles-swapped"
    assert dataset.record_key(swapped) == "llcm_v2i_roles_swapped"
    names = [p.name for p in dataset.protocols(ProtocolSettings(v2i_roles="both"))]
    assert names == ["v2i", "v2i roles-swapped", "i2v"]
    with pytest.raises(UserError, match="^--v2i_roles swapped: .* --direction i2v leaves"):
        dataset.protocols(ProtocolSettings(direction="i2v", v2i_roles="swapped"))
    with pytest.raises(UserError, match="^--v2i_roles 'up': expected defined, swapped or both$"):
        dataset.protocols(ProtocolSettings(v2i_roles="up"))
    # The other data sets have no such variant: asking for it is an error naming them.
    for name in ("sysu", "regdb"):
        settings = ProtocolSettings(v2i_roles="swapped")
        title = get_dataset(name).title
        with pytest.raises(UserError, match=f"^--v2i_roles swapped: {title} has no swapped-roles"):
            get_dataset(name).protocols(settings)


def test_root_check_and_lists_through_the_plugin(llcm: Path) -> None:
    dataset = get_dataset("llcm")
    dataset.check_root(llcm, 1, ("train", "test"))
    expected = sum(sum(c.values()) for c in (*TEST_VISIBLE.values(), *TEST_INFRARED.values()))
    assert dataset.check_test_images(llcm) == expected
    train = dataset.train_files(str(llcm), 1)
    assert train == llcm_train_files(llcm)
    (llcm / "idx" / "train_vis.txt").unlink()
    (llcm / "test_nir").rename(llcm / "test_ir")
    with pytest.raises(UserError) as err:
        dataset.check_root(llcm, 1, ("test",))
    assert str(err.value) == (
        f"--data_root {llcm}: not a LLCM folder (--dataset llcm): missing idx/train_vis.txt, "
        "test_nir/"
    )


def test_check_root_names_index_lines(llcm: Path) -> None:
    dataset = get_dataset("llcm")
    index = llcm / "idx" / "train_nir.txt"
    index.write_text(index.read_text() + "nir/0007/gone.jpg 1\n")
    with pytest.raises(UserError, match=rf"^{index}:7: image nir/0007/gone.jpg does not exist"):
        dataset.check_root(llcm, 1, ("train",))
    ids = llcm / "idx" / "test_id.txt"
    ids.write_text("5,x\n")
    with pytest.raises(UserError, match=rf"^{ids}:1: expected comma-separated integer ids"):
        dataset.check_root(llcm, 1, ("test",))
    broken = next((llcm / "test_nir" / "cam2" / "0005").iterdir())
    ids.write_text(TEST_ID_LINE + "\n")
    broken.write_bytes(b"not an image")
    with pytest.raises(UserError, match=rf"^test image {broken} is not a readable image"):
        dataset.check_test_images(llcm)


class ColourModel(nn.Module):
    """Channel means of four horizontal bands (pool) and of the whole image (bnneck)."""

    def forward(self, x: torch.Tensor, modality: Modality) -> tuple[torch.Tensor, torch.Tensor]:
        bands = x.reshape(x.shape[0], x.shape[1], 4, -1).mean(dim=3).flatten(1)
        return bands, x.mean(dim=(2, 3)) + float(modality)


def test_swapped_roles_rank_each_drawn_image_against_all_queries(llcm: Path) -> None:
    dataset = get_dataset("llcm")
    protocols = dataset.protocols(ProtocolSettings(direction="v2i", v2i_roles="both"))
    kept: list[ProtocolFeatures] = []
    results = evaluate_protocols(
        ColourModel(), dataset, str(llcm), protocols, 1, [0, 3], torch.device("cpu"), (16, 8),
        keep=kept,
    )  # fmt: skip
    (v2i, defined), (swapped_protocol, swapped) = results
    assert swapped_protocol.swap_roles and not v2i.swap_roles
    for position, draw in enumerate((0, 3)):
        features = kept[1]
        visible, infrared = features.query, features.gallery_of(position)
        assert infrared.paths == llcm_gallery(llcm, "infrared", draw)[0]
        for kind in ("pool", "bnneck"):
            # The reference script's arithmetic: gallery x query, then the gallery as queries.
            dist = pairwise_distance(infrared.get(kind), visible.get(kind))
            expected = summarize(
                *eval_llcm(dist, infrared.pids, visible.pids, infrared.camids, visible.camids)
            )
            assert swapped["per_trial"][position][kind] == pytest.approx(expected, abs=1e-9)
        assert defined["per_trial"][position] == score(
            visible, infrared, SAME_IDENTITY_AND_CAMERA, dedup_cmc=True
        )
    assert defined["per_trial"] != swapped["per_trial"]
