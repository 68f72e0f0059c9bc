"""samft predict's writing path: scores computed later on a writer thread equal those computed at once, chunks
of images per job keep every count, folders are fsynced once after the files, Ctrl-C finishes what was handed
over."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from samft.data.layouts import Pair
from samft.engine.artifacts.loading import load_run
from samft.engine.infer import predict as P
from samft.engine.infer.evaluate import iter_predictions
from samft.engine.infer.writer import BackgroundWriter
from samft.tasks.task import make_task

from test_export import make_run

MULTI = dict(data={"classes": ["bg", "a", "b"]}, model={"num_mask_tokens": 5})


@pytest.mark.parametrize("kind", ["binary", "multi-class"])
def test_deferred_scores_equal_the_scores_computed_at_once_even_on_another_thread(kind, tmp_path, synthetic_dir):
    run, _ = make_run(tmp_path / "run", "conv_lora", **(MULTI if kind == "multi-class" else {}))
    loaded = load_run(run, torch.device("cpu"))
    task = make_task(loaded.cfg)
    pairs = [Pair(f, None, f.stem) for f in sorted((synthetic_dir / "images").iterdir())[:7]]
    args = (loaded.model, pairs, 3, torch.device("cpu"), task)
    eager = list(iter_predictions(*args))
    deferred = list(iter_predictions(*args, deferred=True))  # every batch's functions kept until the end
    with ThreadPoolExecutor(2) as pool:
        later = list(pool.map(lambda item: item[1](), deferred))
    assert [p for p, _, _ in deferred] == [p for p, _, _ in eager] == pairs
    for (_, want, _), got in zip(eager, later):
        assert got.dtype == np.float32 and got.shape == want.shape and np.array_equal(got, want)
    assert len({s.shape for _, s, _ in eager}) > 1  # images of different sizes: each its own


def _trained_run(tmp_path, kind):
    run, _ = make_run(tmp_path / "run", "conv_lora", **(MULTI if kind == "multi-class" else {}))
    return run


@pytest.mark.parametrize("threads", [0, 2])
@pytest.mark.parametrize("kind", ["binary", "multi-class"])
def test_chunks_keep_the_counts_and_every_mask_and_folders_are_synced_once(kind, threads, tmp_path, synthetic_dir,
                                                                        monkeypatch):
    """24 images in chunks of 8 (and a last partial one with CHUNK 5): every mask written, empty masks and class
    pixels counted as one image at a time counts them; each folder fsynced once, after its files, none per file."""
    import samft.files as files

    run = _trained_run(tmp_path, kind)
    per_file, synced = [], []
    real_sync = files.sync_dir
    monkeypatch.setattr(files, "sync_dir", lambda folder: per_file.append(folder))
    monkeypatch.setattr(P, "sync_dir", lambda folder: (synced.append((folder, sorted(q.name for q in folder.iterdir()))),
                                                       real_sync(folder)))
    monkeypatch.setattr(P, "CHUNK", 5)
    seen = []
    real_one = P._predict_one
    monkeypatch.setattr(P, "_predict_one", lambda *a: seen.append((a[2].name, real_one(*a))) or seen[-1][1])
    out = tmp_path / "out"
    written = P.predict_run(run, [str(synthetic_dir / "images")], out, with_overlay=True, device="cpu",
                            show_progress=False, write_threads=threads)
    assert len(written) == 24 and all(p.is_file() for p in written)
    assert len(list((out / "overlays").iterdir())) == 24
    assert per_file == []  # no fsync of the folder after each file
    assert sorted(f for f, _ in synced) == [out, out / "overlays"]
    assert all(len([n for n in names if n.endswith(".png")]) == 24 for _, names in synced)  # synced after writing
    labels = [np.asarray(Image.open(p)) for p in written]
    seen = [result for _, result in sorted(seen, key=lambda s: s[0])]  # two threads: in any order
    assert len(seen) == 24 and [p.name for p in written] == sorted(p.name for p in written)
    if kind == "multi-class":
        counts = sum(c for _, c in seen)
        assert counts.tolist() == np.bincount(np.concatenate([lab.ravel() for lab in labels]), minlength=3).tolist()
        assert not any(e for e, _ in seen)  # a label map is never empty
    else:
        assert all(c is None for _, c in seen)
        assert [e for e, _ in seen] == [not lab.any() for lab in labels]


def test_the_counts_reach_the_warnings(tmp_path, synthetic_dir, monkeypatch):
    """Every mask empty (a run that learnt nothing) is still said after the chunked writing."""
    run = _trained_run(tmp_path, "binary")
    monkeypatch.setattr(P, "CHUNK", 5)
    import samft.engine.infer.evaluate as E

    real = E._scores_array
    monkeypatch.setattr(E, "_scores_array", lambda *a: np.zeros_like(real(*a)))
    with pytest.warns(UserWarning, match="every one of the 24 predicted masks is empty"):
        P.predict_run(run, [str(synthetic_dir / "images")], tmp_path / "out", device="cpu", show_progress=False)


@pytest.mark.parametrize("threads", [0, 2])
def test_writer_gives_each_jobs_result(threads):
    with BackgroundWriter(threads, max_pending=2) as writer:
        futures = [writer.submit(lambda i: i * i, i) for i in range(10)]
    assert [f.result() for f in futures] == [i * i for i in range(10)]


def test_ctrl_c_finishes_the_jobs_handed_over_and_still_raises():
    release, done = threading.Event(), []

    def slow(i):
        release.wait(5)
        done.append(i)

    with pytest.raises(KeyboardInterrupt):
        with BackgroundWriter(1, max_pending=10) as writer:
            for i in range(5):
                writer.submit(slow, i)
            release.set()
            raise KeyboardInterrupt
    assert sorted(done) == [0, 1, 2, 3, 4]  # queued ones too: what the model computed is written

    def fail(i):
        raise OSError("disk full")

    with pytest.raises(KeyboardInterrupt):  # a job's error gives way to the interruption
        with BackgroundWriter(1) as writer:
            writer.submit(fail, 0)
            raise KeyboardInterrupt
