"""Every file kind's one reader (``samft.engine.artifacts.kinds.KINDS``) refuses damage in one line naming
the file (and the field, where one is at fault): a missing key, a wrong type, an absurd value, nesting
too deep, a file cut short. Each kind's valid file reads back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

from samft.config import dump_yaml
from samft.engine.artifacts import exports, metrics_csv, onnx_meta, per_image_csv, state
from samft.engine.artifacts.kinds import KINDS
from samft.errors import SamftError

from conftest import tiny_config

DAMAGES = ("missing_key", "wrong_type", "absurd_value", "deep_nesting", "truncated")


def nested_text(levels: int = 3000) -> str:
    return "[" * levels + "]" * levels


def nested(levels: int = 100) -> list:
    x: list = []
    for _ in range(levels):
        x = [x]
    return x


# ---- each kind: (name of the reader's kind, valid content, how damage changes it, how it is written) ----

def _json(path: Path, data) -> None:
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)


JSON_KINDS = {
    "eval_json": ({"sets": {"all": {"n_images": 3, "metrics": {"IoU": 0.5}}}},
                  {"missing_key": (lambda d: d.pop("sets"), "'sets'"),
                   "wrong_type": (lambda d: d["sets"]["all"].update(n_images="3"), "'sets.all.n_images'"),
                   "absurd_value": (lambda d: d["sets"]["all"].update(n_images=10**15 + 1), "'sets.all.n_images'")}),
    "split_file": ({"train": [["a.png", "a_mask.png"]], "val": [["b.png", "b_mask.png"]]},
                   {"missing_key": (lambda d: d["train"][0].pop(), "'train.0'"),
                    "wrong_type": (lambda d: d.update(val="b.png"), "'val'")}),
    "architecture_json": ({"architecture": {"blocks": []}, "dense_gmacs": 1.5},
                          {"missing_key": (lambda d: d.pop("architecture"), "'architecture'"),
                           "wrong_type": (lambda d: d["architecture"].update(blocks={}), "'architecture.blocks'"),
                           "absurd_value": (lambda d: d.update(dense_gmacs=1e30), "'dense_gmacs'")}),
    "trackers_json": ({"format": "samft-trackers-1", "mlflow": {"tracking_uri": "sqlite:///m.db", "experiment_id": "1",
                                                                "run_id": "abc"}},
                      {"missing_key": (lambda d: d["mlflow"].pop("run_id"), "'mlflow.run_id'"),
                       "wrong_type": (lambda d: d["mlflow"].update(run_id=3), "'mlflow.run_id'"),
                       "absurd_value": (lambda d: d["mlflow"].update(run_id="x" * 5000), "'mlflow.run_id'")}),
    "prune_json": ({"metrics": {"source": {}}, "history": []},
                   {"missing_key": (lambda d: d.pop("metrics"), "'metrics'"),
                    "wrong_type": (lambda d: d.update(history=3), "'history'")}),
}


def make_json_kind(kind: str, path: Path, damage: str | None) -> str:
    data, damages = JSON_KINDS[kind]
    data = json.loads(json.dumps(data))
    field = ""
    if damage == "deep_nesting":
        _json(path, nested_text())
        return ""
    if damage in damages:
        change, field = damages[damage]
        change(data)
    _json(path, data)
    return field


def make_metrics_csv(path: Path, damage: str | None) -> str:
    rows = [{"kind": "step", "epoch": 0, "step": 1, "loss": 0.5}, {"kind": "epoch", "epoch": 0, "step": 2}]
    columns = ["kind", "epoch", "step", "loss"]
    field = ""
    if damage == "missing_key":
        columns, field = ["kind", "epoch", "loss"], "'step'"
    elif damage == "wrong_type":
        rows[0]["loss"], field = "abc", "'loss'"
    elif damage == "absurd_value":
        rows[1]["step"], field = "1e30", "'step'"
    metrics_csv.write(path, columns, rows)
    return field


def make_per_image_csv(path: Path, damage: str | None) -> str:
    rows = [{"image": f"{i}.png", "path": f"/data/{i}.png", "Sm": 0.5 + i / 10, "dice@0.5": 0.25, "MAE": 0.125}
            for i in range(4)]
    columns = ["Sm", "dice@0.5", "MAE"]
    field = ""
    if damage == "missing_key":
        path.write_text("path,Sm\n/data/0.png,0.5\n")
        return "'image'"
    if damage == "wrong_type":
        rows[1]["Sm"], field = "abc", "'Sm'"
    elif damage == "absurd_value":
        rows[2]["MAE"], field = 1e30, "MAE"
    per_image_csv.write(path, rows, columns)
    return field


def make_state(path: Path, damage: str | None) -> str:
    data = {"trainable": {"w": torch.ones(2)}, "optimizer": {"state": {}}, "scheduler": {},
            "progress": {"step": 3, "epoch": 0}}
    field = ""
    if damage == "missing_key":
        field = data.pop("optimizer") and "optimizer"
    elif damage == "wrong_type":
        data["scheduler"], field = [1, 2], "scheduler"
    elif damage == "absurd_value":
        data["progress"]["step"], field = -7, "'progress.step'"
    elif damage == "deep_nesting":
        data["progress"]["history"] = nested(100)
    state.write(path, data)
    return field


def make_adapter(path: Path, damage: str | None) -> str:
    meta = {"format": "samft-adapter-1", "samft_version": "x", "peft_method": "lora"}
    field = ""
    if damage == "missing_key":
        field = meta.pop("format") and "format"
    elif damage == "absurd_value":
        meta["config"], field = "x" * (1 << 17), "'config'"
    elif damage == "deep_nesting":  # the safetensors header itself nested deep
        header = json.dumps({"__metadata__": meta}).encode()[:-1] + b', "x": ' + nested_text(3000).encode() + b"}"
        path.write_bytes(len(header).to_bytes(8, "little") + header)
        return ""
    path.write_bytes(st_save({"w": torch.ones(2)}, metadata=meta))
    return field


def make_head(path: Path, damage: str | None) -> str:
    meta = {"kind": exports.HEAD, "format": exports.HEAD_FORMAT, "config_yaml": dump_yaml(tiny_config("lora")),
            "num_queries": "1", "num_classes": "1", "img_size": "64"}
    field = ""
    if damage == "missing_key":
        field = meta.pop("config_yaml") and "'config_yaml'"
    elif damage == "wrong_type":
        meta["num_queries"], field = "many", "'num_queries'"
    elif damage == "absurd_value":
        meta["num_classes"], field = str(10**12), "'num_classes'"
    elif damage == "deep_nesting":
        return make_adapter(path, damage)
    path.write_bytes(st_save({"decoder.w": torch.ones(2)}, metadata=meta))
    return field


def make_model_export(kind: str, path: Path, damage: str | None) -> str:
    record = {"peft_method": "lora", "sam_type": "tiny", "config_yaml": "model: {}",
              "state_dict": {"w": torch.ones(2)}}
    if kind == exports.PRUNED:
        record.update(architecture={"blocks": []}, merged=True)
    field = ""
    if damage == "missing_key":
        field = record.pop("config_yaml") and "'config_yaml'"
    elif damage == "wrong_type":
        record["peft_method"], field = 5, "'peft_method'"
    elif damage == "absurd_value":  # a stored kind that names no export
        exports.write_model(path, kind, record)
        data = torch.load(path, weights_only=True)
        torch.save({**data, "kind": "x" * 300}, path)
        return "'kind'"
    elif damage == "deep_nesting":
        record["extra"] = nested(20)
    exports.write_model(path, kind, record)
    return field


def make_merged(path: Path, damage: str | None) -> str:
    torch.save({"image_encoder.w": torch.ones(2)}, path)
    if damage in ("missing_key", "wrong_type", "absurd_value", "deep_nesting"):
        return make_head(exports.head_path(path), damage)  # the checkpoint is plain SAM: its head names it
    make_head(exports.head_path(path), None)
    return ""


def make_onnx(path: Path, damage: str | None) -> str:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["image"], ["logits"])], "g",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3, 4, 4])])
    data = helper.make_model(graph).SerializeToString()
    meta = {"img_size": "64", "task": "binary", "classes": []}
    field = ""
    if damage == "missing_key":
        field = meta.pop("img_size") and "'img_size'"
    elif damage == "wrong_type":
        meta["img_size"], field = "big", "'img_size'"
    elif damage == "absurd_value":
        meta["img_size"], field = str(10**9), "'img_size'"
    elif damage == "deep_nesting":
        meta["classes"], field = nested_text(3000), "'classes'"
    onnx_meta.write(path, data, meta)
    assert onnx  # imported for the skip
    return field


def make_run_config(path: Path, damage: str | None) -> str:
    text = dump_yaml(tiny_config("lora"))
    field = ""
    if damage == "wrong_type":
        text, field = text.replace("epochs: 1", "epochs: many"), "epochs"
    elif damage == "absurd_value":
        text, field = text.replace("epochs: 1", "epochs: -3"), "epochs"
    elif damage == "missing_key":
        text, field = "model:\n  type: tiny\n  nonsense_key: 1\n", "nonsense_key"
    elif damage == "deep_nesting":
        text = "model: " + nested_text(40) + "\n"
    path.write_text(text)
    return field


def make_resumes(path: Path, damage: str | None) -> str:
    entry: dict = {"time": 1.7e9, "at": "step 12", "changed": {"train.epochs": {"from": 1, "to": 2}}}
    field = ""
    if damage == "missing_key":
        field = entry.pop("at") and "'line 2.at'"
    elif damage == "wrong_type":
        entry["time"], field = "yesterday", "'line 2.time'"
    elif damage == "absurd_value":
        entry["time"], field = -5, "'line 2.time'"
    elif damage == "deep_nesting":
        entry["changed"] = {"k": nested(100)}
    good = json.dumps({"time": 1.6e9, "at": "step 6", "changed": {}})
    path.write_text(good + "\n" + json.dumps(entry) + "\n")
    return field


MAKERS = {
    **{k: (lambda kind: lambda p, d: make_json_kind(kind, p, d))(k) for k in JSON_KINDS},
    "metrics_csv": make_metrics_csv, "per_image_csv": make_per_image_csv, "state": make_state, "adapter": make_adapter, "merged_head": make_head,
    "unmerged_model": lambda p, d: make_model_export(exports.UNMERGED, p, d),
    "pruned_model": lambda p, d: make_model_export(exports.PRUNED, p, d),
    "merged_checkpoint": make_merged, "onnx_model": make_onnx, "run_config": make_run_config,
    "resumes": make_resumes,
}
NOT_APPLICABLE = {  # damage a kind cannot carry (no such field in it)
    ("split_file", "absurd_value"), ("prune_json", "absurd_value"), ("metrics_csv", "deep_nesting"),
    ("per_image_csv", "deep_nesting"),
    ("adapter", "wrong_type"),  # safetensors metadata holds strings only
}


def test_every_kind_is_covered():
    assert set(MAKERS) == set(KINDS)
    assert all(kind.format for kind in KINDS.values())


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_a_valid_file_reads(kind, tmp_path):
    path = tmp_path / f"file.{kind}"
    MAKERS[kind](path, None)
    KINDS[kind].read(path)


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_damage_is_one_line_naming_the_file(kind, damage, tmp_path):
    if (kind, damage) in NOT_APPLICABLE:
        pytest.skip(f"{kind} has no field to carry {damage}")
    path = tmp_path / f"file.{kind}"
    field = MAKERS[kind](path, None if damage == "truncated" else damage)
    if damage == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2] if kind != "metrics_csv" else data[:-4])
    with pytest.raises(SamftError) as info:
        KINDS[kind].read(path)
    message = str(info.value)
    assert "\n" not in message.strip(), message
    named = exports.head_path(path).name if kind == "merged_checkpoint" and damage != "truncated" else path.name
    assert named in message, message
    assert field in message, message
