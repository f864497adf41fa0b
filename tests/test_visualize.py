"""Rank-list pictures: known rankings from hand-made features, frame colours, the SYSU rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data import ExclusionRule
from data.sysu import SAME_LOCATION
from utils.base.errors import UserError
from utils.evaluation.evaluate import Features
from utils.evaluation.visualize import (
    MATCH_COLOUR,
    MISMATCH_COLOUR,
    RankListLayout,
    rank_gallery,
    rank_list_image,
    save_rank_lists,
    spread_indices,
)

# Solid colours make each gallery image recognisable inside the picture.
COLOURS = [(0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255)]


def _features(
    tmp_path: Path, name: str, vectors: list[list[float]], pids: list[int], camids: list[int]
) -> Features:
    paths = []
    for i in range(len(vectors)):
        path = tmp_path / f"{name}{i}.png"
        # 1:2 like the thumbnails, so the colour fills the whole thumbnail.
        Image.new("RGB", (16, 32), COLOURS[i % len(COLOURS)]).save(path)
        paths.append(str(path))
    feats = torch.nn.functional.normalize(torch.tensor(vectors, dtype=torch.float32), dim=1)
    return Features(feats, feats.clone(), np.array(pids), np.array(camids), paths)


def _gallery(tmp_path: Path) -> Features:
    """Gallery 0 is nearest to the query below (identity 7, camera 2); 1 is next (identity 5)."""
    vectors = [[1.0, 0.1, 0.0], [1.0, 0.4, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    return _features(tmp_path, "g", vectors, pids=[7, 5, 5, 9], camids=[2, 1, 4, 5])


def _query(tmp_path: Path, pid: int, camid: int = 3) -> Features:
    return _features(tmp_path, "q", [[1.0, 0.0, 0.0]], pids=[pid], camids=[camid])


def _first_slot(path: Path) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(frame colour, thumbnail centre colour) of the best gallery result in a saved picture."""
    left, top, right, bottom = RankListLayout().frame_box(1)
    with Image.open(path) as image:
        image = image.convert("RGB")
        frame = image.getpixel((left + 1, (top + bottom) // 2))
        centre = image.getpixel(((left + right) // 2, (top + bottom) // 2))
    return frame, centre


def test_first_result_green_when_identity_matches(tmp_path: Path) -> None:
    paths = save_rank_lists(_query(tmp_path, pid=7), _gallery(tmp_path), tmp_path / "out", k=1)
    assert paths == [tmp_path / "out" / "query00000_id7.png"]
    assert _first_slot(paths[0]) == (MATCH_COLOUR, COLOURS[0])


def test_first_result_red_when_identity_differs(tmp_path: Path) -> None:
    paths = save_rank_lists(_query(tmp_path, pid=5), _gallery(tmp_path), tmp_path / "out", k=1)
    assert _first_slot(paths[0]) == (MISMATCH_COLOUR, COLOURS[0])


def test_same_location_rule_skips_camera_2_for_camera_3_queries(tmp_path: Path) -> None:
    query, gallery = _query(tmp_path, pid=5, camid=3), _gallery(tmp_path)
    plain = save_rank_lists(query, gallery, tmp_path / "plain", k=1)
    ruled = save_rank_lists(query, gallery, tmp_path / "ruled", k=1, exclusion=SAME_LOCATION)
    assert _first_slot(plain[0]) == (MISMATCH_COLOUR, COLOURS[0])
    assert _first_slot(ruled[0]) == (MATCH_COLOUR, COLOURS[1])
    # A camera-1 query is not at the indoor infrared location: the rule leaves it alone.
    other = save_rank_lists(
        _query(tmp_path, pid=5, camid=1), gallery, tmp_path / "other", 1, exclusion=SAME_LOCATION
    )
    assert _first_slot(other[0]) == (MISMATCH_COLOUR, COLOURS[0])


def test_one_png_per_query_spread_over_the_set(tmp_path: Path) -> None:
    vectors = [[1.0, 0.0, float(i)] for i in range(5)]
    query = _features(tmp_path, "q", vectors, pids=[1, 2, 3, 4, 5], camids=[3] * 5)
    out = tmp_path / "out"
    paths = save_rank_lists(query, _gallery(tmp_path), out, k=3, top=2)
    assert [p.name for p in paths] == [
        "query00000_id1.png",
        "query00002_id3.png",
        "query00004_id5.png",
    ]
    assert sorted(out.iterdir()) == sorted(paths)
    with Image.open(paths[0]) as image:
        assert image.size[0] >= RankListLayout().size(3)[0]
    assert save_rank_lists(query, _gallery(tmp_path), tmp_path / "none", k=0) == []


def test_rank_list_image_shows_every_requested_slot(tmp_path: Path) -> None:
    gallery = _gallery(tmp_path)
    image = rank_list_image(_query(tmp_path, pid=9), gallery, 0, [3, 2])
    layout = RankListLayout()
    for slot, (g, colour) in enumerate([(3, MATCH_COLOUR), (2, MISMATCH_COLOUR)], start=1):
        left, top, right, bottom = layout.frame_box(slot)
        assert image.getpixel((left, top)) == colour
        assert image.getpixel(((left + right) // 2, (top + bottom) // 2)) == COLOURS[g]


def test_spread_indices_and_ranking() -> None:
    assert spread_indices(10, 3) == [0, 4, 9]
    assert spread_indices(10, 10) == list(range(10))
    assert spread_indices(4, 9) == [0, 1, 2, 3]
    assert spread_indices(4, 0) == []
    assert spread_indices(5, 1) == [0]
    distances = np.array([0.5, 0.1, 0.1, 0.0])
    assert rank_gallery(distances).tolist() == [3, 1, 2, 0]  # ties keep gallery order
    camids = np.array([1, 2, 2, 2])
    assert rank_gallery(distances, 3, camids, exclusion=SAME_LOCATION).tolist() == [0]
    with pytest.raises(UserError, match="camera ids"):
        rank_gallery(distances, None, camids, exclusion=SAME_LOCATION)
    # Same identity and same camera (LLCM): only the query's own identity in its camera goes.
    same = ExclusionRule(same_identity_same_camera=True)
    pids = np.array([4, 4, 5, 4])
    assert rank_gallery(distances, 2, camids, same, 4, pids).tolist() == [2, 0]
    assert rank_gallery(distances, 2, camids, same, 5, pids).tolist() == [3, 1, 0]
    with pytest.raises(UserError, match="identities"):
        rank_gallery(distances, 2, camids, same)


def test_errors(tmp_path: Path) -> None:
    query, gallery = _query(tmp_path, pid=7), _gallery(tmp_path)
    with pytest.raises(UserError, match="must be >= 0, got -1"):
        save_rank_lists(query, gallery, tmp_path / "out", k=-1)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(UserError, match=f"{blocker / 'sub'}: cannot create the output folder"):
        save_rank_lists(query, gallery, blocker / "sub", k=1)
    with pytest.raises(UserError, match="unknown feature kind"):
        save_rank_lists(query, gallery, tmp_path / "out", k=1, kind="logits")
    Path(gallery.paths[0]).unlink()
    with pytest.raises(UserError, match="g0.png: cannot read the image"):
        save_rank_lists(query, gallery, tmp_path / "out", k=1)
