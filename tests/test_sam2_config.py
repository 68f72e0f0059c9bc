"""model.family: sam | sam2 — the sizes each family accepts and what SAM 2.1 refuses, in one line each."""

from __future__ import annotations

import pytest

from samft.config import FAMILIES, SAM2_TYPES, config_from_dict
from samft.errors import ConfigError


def test_default_family_is_sam():
    cfg = config_from_dict({})
    assert (cfg.model.family, cfg.model.type) == ("sam", "vit_b")
    assert FAMILIES == ("sam", "sam2")


@pytest.mark.parametrize("size", SAM2_TYPES)
def test_sam2_sizes_accepted(size):
    cfg = config_from_dict({"model": {"family": "sam2", "type": size}})
    assert cfg.model.type == size


@pytest.mark.parametrize("family, size", [("sam2", "vit_b"), ("sam", "hiera_t")])
def test_type_of_the_other_family_is_one_line_naming_both(family, size):
    with pytest.raises(ConfigError) as e:
        config_from_dict({"model": {"family": family, "type": size}})
    msg = str(e.value)
    assert "\n" not in msg and repr(size) in msg and repr(family) in msg


@pytest.mark.parametrize("model, words", [
    ({"img_size": 48}, "multiple of 32"),
    ({"attention": "bra"}, "bra is not available"),
    ({"pruned": "x.safetensors"}, "SPViT pruning is for SAM 1 only"),
    ({"tiny_hiera": {"stages": [1, 1, 1]}}, "four stages"),
])
def test_sam2_refusals(model, words):
    with pytest.raises(ConfigError, match=words) as e:
        config_from_dict({"model": {"family": "sam2", "type": "tiny", "img_size": 64, **model}})
    assert "\n" not in str(e.value)


def test_sam2_sizes_other_than_1024():
    assert config_from_dict({"model": {"family": "sam2", "type": "hiera_t", "img_size": 512}}).model.img_size == 512
    with pytest.raises(ConfigError, match="not a multiple of 32"):
        config_from_dict({"model": {"family": "sam2", "type": "hiera_t", "img_size": 1008}})
