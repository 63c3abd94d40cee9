"""The shared JSON helpers: atomic writes, named read errors, JSON-safe values."""
import json

import numpy as np
import pytest
import torch

from dit4dit.jsonio import read_json, to_jsonable, write_json


def test_to_jsonable_makes_plain_values():
    out = to_jsonable({1: (np.float32(1.5), np.arange(3), torch.tensor(2.0), torch.ones(2)),
                       "nan": float("nan"), "flag": np.bool_(True), "obj": object})
    assert out["1"] == [1.5, [0, 1, 2], 2.0, [1.0, 1.0]]
    assert out["nan"] is None and out["flag"] is True and out["obj"].startswith("<class")
    json.dumps(out, allow_nan=False)


def test_write_json_is_atomic_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = write_json(tmp_path / "sub" / "a.json", {"a": 1})
    assert read_json(path) == {"a": 1} and [p.name for p in path.parent.iterdir()] == ["a.json"]

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("dit4dit.jsonio.os.replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_json(path, {"a": 2})
    assert read_json(path) == {"a": 1} and [p.name for p in path.parent.iterdir()] == ["a.json"]


def test_read_json_names_file_and_purpose(tmp_path):
    with pytest.raises(RuntimeError, match=r"nope\.json: missing run summary"):
        read_json(tmp_path / "nope.json", "run summary", error=RuntimeError)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match=r"bad\.json: invalid JSON in stats"):
        read_json(tmp_path / "bad.json", "stats")
