from pathlib import Path

import pytest
import yaml

from samft.config import (Config, config_from_dict, describe_fields, dump_yaml, load_config, parse_override, to_dict)
from samft.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_paper_settings():
    cfg = config_from_dict({})
    assert cfg.peft.method == "conv_lora"
    c = cfg.peft.conv_lora
    assert (c.rank, c.alpha, c.experts, c.top_k, c.gate_scales_output) == (3, 32.0, 8, 1, False)
    assert c.expert_scales() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.grad_clip) == (1e-4, 1e-4, 1.0)
    assert cfg.protocol == "samft" and cfg.loss.bce == "mean"
    assert cfg.loss.aux.balance == 1.0  # the paper's: 1.0 binary, 2.0 multi-class (tests/test_protocol.py)
    assert (cfg.loss.class_weight, cfg.loss.mask_bce_weight, cfg.loss.mask_dice_weight) == (10.0, 5.0, 5.0)
    assert cfg.loss.no_object_weight == 0.1 and cfg.model.num_mask_tokens == 10 and cfg.train.metric == "auto"


def test_every_field_has_help():
    rows = describe_fields(Config)
    assert len(rows) > 40
    assert all(help_ for _, _, help_ in rows), [k for k, _, h in rows if not h]


def test_unknown_key_suggests_the_nearest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train.lrr' \(did you mean 'train.lr'\?\)") as e:
        load_config(path)
    assert str(path) in str(e.value)


def test_unknown_section():
    with pytest.raises(ConfigError, match="unknown config key 'modle'.*did you mean 'model'"):
        config_from_dict({"modle": {}})


@pytest.mark.parametrize("override, message", [
    ("train.lr=fast", r"train.lr: expected float, got 'fast'"),
    ("train.epochs=2.5", r"train.epochs: expected int, got 2.5"),
    ("train.progress=maybe", r"train.progress: expected bool"),
    ("model.type=vit_hh", r"model.type: 'vit_hh' is not one of .*did you mean 'vit_h'"),
    ("train.batch_size=0", r"train.batch_size: 0 is below the minimum 1"),
    ("peft.method=conv-lora", r"peft.method: 'conv-lora' is not one of .*did you mean 'conv_lora'"),
    ("model.img_size=100", r"not a multiple of 16"),
    ("peft.conv_lora.scales=[1,2]", r"2 scales for 8 experts"),
    ("peft.lora.targets=[qkv,fc]", r"unknown \['fc'\]"),
    ("train", r"expected key=value"),
])
def test_bad_overrides_name_key_and_value(override, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({}, [override])


def test_overrides_are_coerced_to_field_types():
    cfg = config_from_dict({}, ["train.lr=3e-4", "train.epochs=7", "train.progress=false",
                                "model.checkpoint=null", "peft.conv_lora.scales=[1, 2, 4]",
                                "peft.conv_lora.experts=3", "data.test.Kvasir=TestDataset/Kvasir",
                                "output.dir=runs/x", "peft.lora.alpha=16"])
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 7 and cfg.train.progress is False
    assert cfg.model.checkpoint is None
    assert cfg.peft.conv_lora.scales == [1.0, 2.0, 4.0]
    assert cfg.data.test == {"Kvasir": "TestDataset/Kvasir"}
    assert cfg.peft.lora.alpha == 16.0 and isinstance(cfg.peft.lora.alpha, float)


def test_parse_override_keeps_strings_with_equals():
    assert parse_override("data.root=/a=b") == (["data", "root"], "/a=b")


def test_resolved_config_round_trips_and_keeps_only_the_active_method():
    cfg = config_from_dict({"peft": {"method": "lora", "lora": {"rank": 5}}})
    data = yaml.safe_load(dump_yaml(cfg))
    assert set(data["peft"]) == {"method", "lora"}
    again = config_from_dict(data)
    assert to_dict(again) == to_dict(cfg)


def test_output_dir_defaults_to_config_name(tmp_path):
    path = tmp_path / "polyp_small.yaml"
    path.write_text("model: {type: tiny}\n")
    assert load_config(path).output.dir == str(Path("runs") / "polyp_small")


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(scalar)


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_load(name):
    cfg = load_config(ROOT / "configs" / name)
    assert cfg.peft.method == "conv_lora"


def test_polyp_config_is_the_paper_setup():
    cfg = load_config(ROOT / "configs" / "polyp.yaml")
    assert cfg.model.type == "vit_b" and cfg.model.img_size == 1024
    assert cfg.peft.conv_lora.rank == 3 and cfg.peft.conv_lora.alpha == 32 and cfg.peft.conv_lora.experts == 8
    assert set(cfg.data.test) == {"CVC-300", "CVC-ClinicDB", "Kvasir", "CVC-ColonDB", "ETIS-LaribPolypDB"}


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs" / "examples").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_example_configs_load(path):
    """Every example config of the README's "Your own data" section is valid as written."""
    from samft.config import load_config

    cfg = load_config(path)
    assert cfg.data.root.startswith("data/") and cfg.model.checkpoint


@pytest.mark.parametrize("classes", [["background", "cat", "cat"], ["background", "Cat", "cat "]])
def test_duplicate_class_names_are_refused(classes):
    """Two classes of one name (case and surrounding spaces ignored) are an error naming both ids."""
    from samft.config import config_from_dict
    from samft.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data\.classes: .* \(class 2\) has the same name as class 1"):
        config_from_dict({"data": {"classes": classes}})


def test_one_path_where_a_list_is_expected_is_a_one_element_list():
    """``data.unlabelled=frames/`` as users write it (a list of str fields only; other lists stay strict)."""
    from samft.config import config_from_dict, load_config  # noqa: F401
    from samft.errors import ConfigError

    cfg = config_from_dict({"data": {"unlabelled": "frames/"}})
    assert cfg.data.unlabelled == ["frames/"]
    cfg = config_from_dict({}, ["data.unlabelled=frames/"])
    assert cfg.data.unlabelled == ["frames/"]
    with pytest.raises(ConfigError, match="model.tiny.global_attn_indexes: expected list of int"):
        config_from_dict({"model": {"tiny": {"global_attn_indexes": "1"}}})


def test_a_choice_in_other_letters_is_suggested():
    from samft.config import config_from_dict
    from samft.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data\.format: 'VOC' is not one of .*\(did you mean 'voc'\?\)"):
        config_from_dict({"data": {"format": "VOC"}})


@pytest.mark.parametrize("override,key", [("output.dir=", "output.dir"), ("data.root=", "data.root"),
                                          ("output.dir=' '", "output.dir")])
def test_an_empty_folder_value_is_one_line_not_a_silent_default(override, key):
    """The attack round: output.dir= trained into runs/run and data.root= read the current folder, in silence."""
    from samft.config import config_from_dict
    from samft.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"{key}: empty"):
        config_from_dict({}, [override])
