"""An interrupted SPViT search continues from its saved state to exactly the uninterrupted result."""

from __future__ import annotations

import warnings

import pytest
import torch

from samft.engine.artifacts.fileio import atomic_torch_save
from samft.model import build_model
from samft.prune.errors import PruneError
from samft.prune.flops import encoder_block_flops, gmacs
from samft.prune.search import search
from samft.prune.search_state import SearchCheckpoint, load_search_state, save_search_state

from conftest import tiny_config


def _model():
    torch.manual_seed(0)
    cfg = tiny_config("lora", model={"attention": "eager"}, peft={"method": "lora", "lora": {"targets": ["qkv"],
                                                                                              "rank": 2}})
    return build_model(cfg).model.eval()


def _batches(n=3, size=64):
    gen = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    masks = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2).long()[None]
    return [{"image": torch.randn(1, 3, size, size, generator=gen) + masks[:, None] * 2.0, "mask": masks}
            for _ in range(n)]


class Stop(Exception):
    pass


def test_an_interrupted_search_resumes_to_the_same_result(tmp_path):
    batches = _batches()
    model = _model()
    kw = dict(target_gmacs=0.8 * gmacs(encoder_block_flops(model.image_encoder, 64)["total"]), steps=8, arch_lr=0.2,
              lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = search(model, lambda: batches, **kw)
        ckpt = SearchCheckpoint(tmp_path / "search_state.pt", every=3, write=atomic_torch_save,
                                identity={"target_gmacs": kw["target_gmacs"]})

        def stop(record):
            if record["step"] == 5:
                raise Stop

        with pytest.raises(Stop):
            search(_model(), lambda: batches, log=stop, checkpoint=ckpt, **kw)
        assert load_search_state(ckpt)["step"] == 3  # the last save before the interruption
        resumed = _model()  # a new process: the dense run again, another global RNG state
        torch.manual_seed(1234)
        result = search(resumed, lambda: batches, checkpoint=ckpt, **kw)
    assert [r["step"] for r in result.history] == list(range(1, 9))
    assert result.history == full.history and result.arch == full.arch and result.lam == full.lam
    for (name, a), (_, b) in zip(model.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_a_foreign_or_broken_search_state_is_refused(tmp_path):
    model = _model()
    opt = torch.optim.AdamW(model.decoder.parameters())
    ckpt = SearchCheckpoint(tmp_path / "s.pt", every=1, write=atomic_torch_save,
                            identity={"target_gmacs": 1.0, "steps": 10})
    save_search_state(ckpt, 2, model, opt, None, 3.0, [])
    assert load_search_state(ckpt)["step"] == 2
    other = SearchCheckpoint(ckpt.path, every=1, write=atomic_torch_save, identity={"target_gmacs": 2.0, "steps": 10})
    with pytest.raises(PruneError, match="target_gmacs=1.0.*2.0"):
        load_search_state(other)
    ckpt.path.write_bytes(b"garbage")
    with pytest.raises(PruneError, match="not a readable search state"):
        load_search_state(ckpt)
    assert load_search_state(SearchCheckpoint(tmp_path / "none.pt", every=1, write=atomic_torch_save)) is None
