"""Two evaluations merging into one eval.json at once lose no set: the read-merge-write runs under the
file's lock (``.eval.json.lock``), separate from the run's training lock."""

from __future__ import annotations

import multiprocessing

from samft.engine.artifacts import eval_json

N = 40


def _entry() -> dict:
    return {"n_images": 1, "metrics": {"iou": 0.5}}


def _merge_many(path: str, who: str) -> None:
    for i in range(N):  # a new set name each time: a lost update loses a set for good
        eval_json.update(path, {"run": who, "scoring": "original_resolution", "sets": {f"{who}{i}": _entry()}})


def test_concurrent_merges_keep_every_set(tmp_path):
    path = tmp_path / "eval.json"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_merge_many, args=(str(path), who)) for who in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    sets = eval_json.read(path)["sets"]
    assert sorted(sets) == sorted(f"{who}{i}" for who in "ab" for i in range(N))
    assert eval_json.lock_path(path) == tmp_path / ".eval.json.lock"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".eval.json.lock", "eval.json"]  # no temporary left
