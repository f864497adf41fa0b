"""Architecture configs: slot order, the authors' .cfg, this project's JSON, errors, converter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from model.arch import SHARED, SPLIT, Arch, load_arch, save_arch, slot_names
from utils.base.cli import run_cli
from utils.base.errors import UserError
from utils.convert_arch import main as convert_main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def expected_order(depth: int) -> list[str]:
    """The authors' cfg order, written out independently of the code under test."""
    blocks = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3)}[depth]
    per_block = 3 if depth == 50 else 2
    names = ["bn1"]
    for stage in range(1, 5):
        # Bottleneck stages all project; basic-block layer1 keeps its width and has no shortcut.
        if depth == 50 or stage > 1:
            names.append(f"layer{stage}.0.downsample.bn")
        for block in range(blocks[stage - 1]):
            names += [f"layer{stage}.{block}.bn{k}" for k in range(1, per_block + 1)]
    return names


def one_split_cfg(count: int, position: int) -> str:
    """A cfg line of ``count`` ones (shared) with a single 0 (split) at 1-based ``position``."""
    tokens = ["1"] * count
    tokens[position - 1] = "0"
    return " ".join(tokens) + "\n"


@pytest.mark.parametrize("depth,count", [(50, 53), (34, 36), (18, 20)])
def test_slot_names_follow_authors_order(depth: int, count: int) -> None:
    """slot_names lists stem, then per stage the downsample BN first, then each block's BNs."""
    names = slot_names(depth)
    assert len(names) == count
    assert names == expected_order(depth)
    assert len(set(names)) == count


@pytest.mark.parametrize(
    "depth,position,slot",
    [
        (50, 1, "bn1"),
        (50, 2, "layer1.0.downsample.bn"),
        (50, 3, "layer1.0.bn1"),
        (50, 5, "layer1.0.bn3"),
        (50, 6, "layer1.1.bn1"),
        (50, 12, "layer2.0.downsample.bn"),
        (50, 13, "layer2.0.bn1"),
        (50, 25, "layer3.0.downsample.bn"),
        (50, 44, "layer4.0.downsample.bn"),
        (50, 53, "layer4.2.bn3"),
        (18, 2, "layer1.0.bn1"),
        (18, 6, "layer2.0.downsample.bn"),
        (18, 20, "layer4.1.bn2"),
    ],
)
def test_cfg_position_maps_to_slot(tmp_path: Path, depth: int, position: int, slot: str) -> None:
    """A 0 at a given cfg position splits exactly that slot; every 1 is shared."""
    path = tmp_path / "config.cfg"
    path.write_text(one_split_cfg(len(slot_names(depth)), position))
    arch = load_arch(path)
    assert arch.depth == depth
    assert arch.split_slots() == [slot]
    assert sum(choice == SHARED for choice in arch.slots.values()) == len(arch.slots) - 1
    # And back: to_cfg writes the 0 at the same position.
    assert arch.to_cfg().split()[position - 1] == "0"
    assert arch.to_cfg().split().count("0") == 1


def test_cfg_zero_is_split_one_is_shared(tmp_path: Path) -> None:
    """In the authors' format 0 means split and 1 shared (not the other way round)."""
    path = tmp_path / "all_zero.cfg"
    path.write_text(" ".join(["0"] * 53) + "\n")
    assert set(load_arch(path).slots.values()) == {SPLIT}
    path.write_text(" ".join(["1"] * 53) + "\n")
    assert set(load_arch(path).slots.values()) == {SHARED}
    assert Arch.uniform(18, SPLIT).to_cfg() == " ".join(["0"] * 20)
    assert Arch.uniform(18, SHARED).to_cfg() == " ".join(["1"] * 20)


@pytest.mark.parametrize("depth", [50, 34, 18])
def test_cfg_json_cfg_round_trip(tmp_path: Path, depth: int) -> None:
    """.cfg -> JSON -> .cfg gives back the identical text, and JSON keeps every choice."""
    count = len(slot_names(depth))
    text = " ".join("0" if (i * 7 + depth) % 3 == 0 else "1" for i in range(count)) + "\n"
    assert "0" in text and "1" in text
    src = tmp_path / "config.cfg"
    src.write_text(text)
    arch = load_arch(src)
    save_arch(arch, tmp_path / "arch.json")
    data = json.loads((tmp_path / "arch.json").read_text())
    assert data["format"] == "cmnas-arch"
    assert data["version"] == 1
    assert data["depth"] == depth
    assert data["slots"] == arch.slots
    again = load_arch(tmp_path / "arch.json")
    assert again.slots == arch.slots
    save_arch(again, tmp_path / "back.cfg")
    assert (tmp_path / "back.cfg").read_text() == text


def test_json_slot_order_does_not_matter(tmp_path: Path) -> None:
    """A JSON file listing slots in any order gives the same cfg as the canonical order."""
    arch = Arch.uniform(50, SHARED)
    arch.slots["layer2.0.downsample.bn"] = SPLIT
    data = arch.to_dict()
    data["slots"] = dict(reversed(list(data["slots"].items())))
    path = tmp_path / "reversed.json"
    path.write_text(json.dumps(data))
    loaded = load_arch(path)
    assert list(loaded.slots) == slot_names(50)
    assert loaded.to_cfg().split()[11] == "0"


@pytest.mark.parametrize(
    "name,depth",
    [
        ("all_shared.json", 50),
        ("all_split.json", 50),
        ("two_stream.json", 50),
        ("resnet18_all_shared.json", 18),
        ("resnet18_all_split.json", 18),
        ("resnet18_two_stream.json", 18),
    ],
)
def test_shipped_configs_load(name: str, depth: int) -> None:
    """Every shipped config loads, with the expected depth and slot count, and its content."""
    arch = load_arch(CONFIGS / name)
    assert arch.depth == depth
    assert list(arch.slots) == slot_names(depth)
    assert len(arch.slots) == (53 if depth == 50 else 20)
    assert load_arch(CONFIGS / name, depth=depth).slots == arch.slots
    if "all_shared" in name:
        assert set(arch.slots.values()) == {SHARED}
    elif "all_split" in name:
        assert set(arch.slots.values()) == {SPLIT}
    else:
        for slot, choice in arch.slots.items():
            in_stream = slot == "bn1" or slot.startswith("layer1.")
            assert choice == (SPLIT if in_stream else SHARED), slot


def _arch_json(**changes: object) -> dict:
    """A valid all-shared ResNet-50 JSON dict with some fields changed."""
    data = Arch.uniform(50, SHARED).to_dict()
    data.update(changes)
    return data


def _write(path: Path, content: str | dict) -> Path:
    path.write_text(content if isinstance(content, str) else json.dumps(content, indent=2))
    return path


def _slots_without(name: str) -> dict[str, str]:
    slots = dict.fromkeys(slot_names(50), SHARED)
    del slots[name]
    return slots


BAD_INPUTS = [
    pytest.param("short.cfg", "0 1 0\n", None, ["3 values", "53 (ResNet-50)"], id="cfg-count"),
    pytest.param("empty.cfg", "\n", None, ["0 values", "expected 53"], id="cfg-empty"),
    pytest.param(
        "token.cfg",
        " ".join(["1"] * 6 + ["2"] + ["1"] * 46),
        None,
        ["value 7 is '2'", "expected 0 (split) or 1 (shared)"],
        id="cfg-token",
    ),
    pytest.param(
        "word.cfg",
        " ".join(["1"] * 52 + ["shared"]),
        None,
        ["value 53 is 'shared'", "expected 0 (split) or 1 (shared)"],
        id="cfg-word",
    ),
    pytest.param(
        "unknown.json",
        _arch_json(slots={**dict.fromkeys(slot_names(50), SHARED), "layer5.0.bn1": SPLIT}),
        None,
        ["unknown slot", "layer5.0.bn1", "ResNet-50"],
        id="json-unknown-slot",
    ),
    pytest.param(
        "missing.json",
        _arch_json(slots=_slots_without("layer2.1.bn2")),
        None,
        ["1 slot(s) missing", "layer2.1.bn2", "expected 53"],
        id="json-missing-slot",
    ),
    pytest.param(
        "both.json",
        _arch_json(slots={**dict.fromkeys(slot_names(50), SHARED), "layer3.2.bn1": "both"}),
        None,
        ["layer3.2.bn1", "'both'", "expected 'shared' or 'split'"],
        id="json-bad-value",
    ),
    pytest.param(
        "depth.json", _arch_json(), 18, ["ResNet-50", "expected 18"], id="json-depth-mismatch"
    ),
    pytest.param("depth.cfg", "1 " * 53, 18, ["53 values", "expected 20"], id="cfg-depth-mismatch"),
    pytest.param(
        "broken.json",
        '{\n  "depth": 50,\n  "slots": {,\n}\n',
        None,
        ["invalid JSON", "line 3"],
        id="json-syntax",
    ),
    pytest.param(
        "format.json",
        _arch_json(format="other-arch"),
        None,
        ["format is 'other-arch'", "expected 'cmnas-arch'"],
        id="json-format",
    ),
    pytest.param(
        "version.json",
        _arch_json(version=2),
        None,
        ["version 2 is not supported", "expected 1"],
        id="json-version",
    ),
    pytest.param(
        "strdepth.json", _arch_json(depth="50"), None, ["'depth'", "18, 34 or 50"], id="json-str"
    ),
    pytest.param(
        "slots.json", _arch_json(slots=["bn1"]), None, ["'slots' must be an object"], id="slots"
    ),
    pytest.param(
        "typo.json",
        {**_arch_json(), "slot": {}, "notes": "x"},
        None,
        ["unknown key(s) 'slot', 'notes'", "expected format, version, depth, slots, provenance"],
        id="json-unknown-keys",
    ),
    pytest.param(
        "depth101.json",
        _arch_json(depth=101, slots={}),
        None,
        ["101", "18, 34, 50"],
        id="json-unsupported-depth",
    ),
]


@pytest.mark.parametrize("name,content,depth,expected", BAD_INPUTS)
def test_bad_architecture_files_name_file_and_expectation(
    tmp_path: Path, name: str, content: str | dict, depth: int | None, expected: list[str]
) -> None:
    """Each malformed file fails with one UserError naming the file and what was expected."""
    path = _write(tmp_path / name, content)
    with pytest.raises(UserError) as info:
        load_arch(path, depth=depth)
    message = str(info.value)
    assert str(path) in message
    for fragment in expected:
        assert fragment in message
    assert "\n" not in message


@pytest.mark.parametrize("kind", ["json", "cfg"])
def test_a_byte_order_mark_is_skipped(tmp_path: Path, kind: str) -> None:
    """A file saved with a UTF-8 byte-order mark (Windows editors) reads as without one."""
    arch = Arch.uniform(50, SHARED)
    arch.slots["layer3.1.bn2"] = SPLIT
    plain = tmp_path / f"plain.{kind}"
    save_arch(arch, plain)
    marked = tmp_path / f"marked.{kind}"
    marked.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    assert load_arch(marked).slots == load_arch(plain).slots == arch.slots


def test_every_written_architecture_has_only_known_keys(tmp_path: Path) -> None:
    """What this project writes (configs/, save_arch, checkpoints) passes the key check."""
    for config in sorted(CONFIGS.glob("*.json")):
        load_arch(config)
    saved = tmp_path / "arch.json"
    save_arch(Arch.uniform(18, SPLIT, source="search", split_probability=[0.5] * 20), saved)
    assert load_arch(saved).provenance["source"] == "search"


def test_unsupported_depth_is_a_user_error(tmp_path: Path) -> None:
    """A JSON architecture for an unsupported depth is refused, saying which depths exist."""
    path = _write(tmp_path / "depth101.json", _arch_json(depth=101, slots={}))
    with pytest.raises(UserError, match=r"101.*expected one of 18, 34, 50"):
        load_arch(path)
    with pytest.raises(UserError, match="18, 34, 50"):
        Arch.uniform(101, SHARED)


def test_missing_file_is_named(tmp_path: Path) -> None:
    """A missing architecture file gives a UserError naming the path."""
    path = tmp_path / "nowhere" / "arch.json"
    with pytest.raises(UserError, match="architecture file not found") as info:
        load_arch(path)
    assert str(path) in str(info.value)


def test_arch_rejects_bad_slots_in_code() -> None:
    """Building an Arch directly validates slot names and values too."""
    with pytest.raises(UserError, match="missing"):
        Arch(18, {"bn1": SHARED})
    slots = dict.fromkeys(slot_names(18), SHARED)
    slots["bn1"] = "both"
    with pytest.raises(UserError, match="'both'"):
        Arch(18, slots)


def test_converter_cfg_to_json_and_back_in_process(tmp_path: Path) -> None:
    """run_cli(convert_arch.main) converts .cfg -> JSON and JSON -> .cfg, text identical."""
    text = one_split_cfg(53, 12)
    src = _write(tmp_path / "config.cfg", text)
    assert run_cli(convert_main, [str(src), str(tmp_path / "out" / "arch.json")]) == 0
    data = json.loads((tmp_path / "out" / "arch.json").read_text())
    assert data["depth"] == 50
    assert [slot for slot, choice in data["slots"].items() if choice == SPLIT] == [
        "layer2.0.downsample.bn"
    ]
    back = tmp_path / "back.cfg"
    assert run_cli(convert_main, [str(tmp_path / "out" / "arch.json"), str(back)]) == 0
    assert back.read_text() == text
    # --depth accepts the matching depth.
    assert run_cli(convert_main, [str(src), str(tmp_path / "d.json"), "--depth", "50"]) == 0


def test_converter_error_path_in_process(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A bad input gives exit 2, one 'error:' line on stderr, no traceback, no output file."""
    src = _write(tmp_path / "bad.cfg", "0 1 2\n")
    dst = tmp_path / "arch.json"
    assert run_cli(convert_main, [str(src), str(dst)]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: ")
    assert str(src) in lines[0]
    assert "Traceback" not in err
    assert not dst.exists()
    assert list(tmp_path.iterdir()) == [src]
    # Depth mismatch through the flag is refused the same way.
    good = _write(tmp_path / "good.cfg", one_split_cfg(53, 2))
    assert run_cli(convert_main, [str(good), str(dst), "--depth", "18"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert not dst.exists()


def test_converter_into_read_only_folder(
    tmp_path: Path, read_only_folder: Path, capsys: pytest.CaptureFixture
) -> None:
    """Writing into a read-only folder (or onto a folder) is one line naming the file, exit 2."""
    src = _write(tmp_path / "config.cfg", one_split_cfg(53, 2))
    dst = read_only_folder / "deeper" / "arch.json"
    assert run_cli(convert_main, [str(src), str(dst)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {dst}: cannot write (folder {read_only_folder} is not writable)\n"
    assert list(read_only_folder.iterdir()) == []
    assert run_cli(convert_main, [str(src), str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path}: is a folder, expected a file name\n"
    assert run_cli(convert_main, [str(src), str(src / "arch.json")]) == 2
    assert capsys.readouterr().err == (
        f"error: {src / 'arch.json'}: cannot write ({src} is a file, not a folder)\n"
    )


def test_converter_subprocess(tmp_path: Path) -> None:
    """`python -m utils.convert_arch` as a program: a bad input exits 2 with one error line."""
    missing = tmp_path / "missing.cfg"
    out = tmp_path / "never.json"
    result = subprocess.run(
        [sys.executable, "-m", "utils.convert_arch", str(missing), str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert str(missing) in lines[0] and "not found" in lines[0]
    assert "Traceback" not in result.stderr
    assert not out.exists()
