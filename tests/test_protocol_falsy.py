"""A protocol option the user sets to a falsy value (0, 0.0, false) keeps that value.

``apply_protocol`` fills an option only while it is ``None`` ("follow the protocol"); a 0 or false is a
choice (``loss.set.points=0``: every pixel; ``loss.aux.balance=0``: no balance loss; ...), not a gap.
"""

from __future__ import annotations

import pytest

from samft.config import config_from_dict, load_config
from samft.config.protocol import OPTIONS, differences, protocol_value
from samft.errors import ConfigError

# every option of OPTIONS that admits a falsy value, the CLI override that sets it, and the value it gives
FALSY = {
    "eval.resize_gt_to_input": ("false", False),
    "train.adam_eps": ("0", 0.0),
    "loss.aux.balance": ("0", 0.0),
    "loss.class_weight": ("0", 0.0),
    "loss.mask_bce_weight": ("0", 0.0),
    "loss.mask_dice_weight": ("0", 0.0),
    "loss.set.points": ("0", 0),
    "loss.set.cost_class": ("0", 0.0),
    "loss.set.cost_mask": ("0", 0.0),
    "loss.set.cost_dice": ("0", 0.0),
}
MULTI = {"data": {"classes": ["bg", "thing"]}}


def get(cfg, dotted):
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def test_the_other_options_admit_no_falsy_value():
    """So FALSY covers every option where the mistake could happen."""
    for dotted in set(OPTIONS) - set(FALSY):
        for text in ("0", "false", '""'):
            with pytest.raises(ConfigError):
                config_from_dict({"protocol": "autogluon", **MULTI}, [f"{dotted}={text}"])


@pytest.mark.parametrize("protocol", ["autogluon", "samft"])
@pytest.mark.parametrize("dotted", sorted(FALSY))
def test_a_falsy_override_is_kept(protocol, dotted):
    text, value = FALSY[dotted]
    cfg = config_from_dict({"protocol": protocol, **MULTI}, [f"{dotted}={text}"])
    got = get(cfg, dotted)
    assert got == value and type(got) is type(value) and got is not None
    if protocol == "autogluon":  # every AutoGluon value is truthy: the override must show as a difference
        assert protocol_value(cfg, dotted)
        assert differences(cfg)[dotted] == (value, protocol_value(cfg, dotted))


def test_falsy_values_from_a_yaml_file_and_overrides_are_kept(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("protocol: autogluon\ndata:\n  classes: [bg, thing]\nloss:\n  set:\n    points: 0\n"
                    "  aux:\n    balance: 0.0\neval:\n  resize_gt_to_input: false\n")
    cfg = load_config(path, ["loss.class_weight=0", "loss.set.cost_dice=0"])
    assert (cfg.loss.set.points, cfg.loss.aux.balance, cfg.eval.resize_gt_to_input) == (0, 0.0, False)
    assert (cfg.loss.class_weight, cfg.loss.set.cost_dice) == (0.0, 0.0)
    assert (cfg.loss.mask_bce_weight, cfg.loss.set.cost_mask) == (1.0, 5.0)  # the protocol's, untouched
    # samft's matcher costs follow the loss weights, a zero weight included; an explicit zero cost wins
    cfg = config_from_dict(MULTI, ["loss.class_weight=0", "loss.set.cost_mask=0", "loss.mask_bce_weight=3"])
    assert (cfg.loss.set.cost_class, cfg.loss.set.cost_mask, cfg.loss.set.cost_dice) == (0.0, 0.0, 5.0)
