"""Bad input through the real command line (in-process): every case exits 2 with one line naming the file
or value, never a traceback; crafted files never execute code; nothing the user owns is overwritten."""

from __future__ import annotations

import errno
import fcntl
import inspect
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from typer.testing import CliRunner

from samft.cli import app
from samft.data.synthetic import write_dataset
from samft.errors import SamftError
from samft.engine.artifacts.state import load_resume_state, save_resume_state

from conftest import TINY

runner = CliRunner()
PAYLOAD = "EXECUTED"  # the marker file a crafted pickle would create


def cli(*args: str, cwd: Path):
    old = os.getcwd()
    os.chdir(cwd)
    try:
        result = runner.invoke(app, [str(a) for a in args], catch_exceptions=True, env={"COLUMNS": "300"})
    finally:
        os.chdir(old)
    return result, " ".join(result.output.split())


def _base_config(data: Path, out: str = "runs/x") -> dict:
    return {"model": TINY, "peft": {"method": "lora"},
            "data": {"root": str(data), "train": ".", "val_fraction": 0.25, "num_workers": 0},
            "train": {"epochs": 1, "batch_size": 4, "lr": 1e-3, "device": "cpu", "save_every": 1},
            "output": {"dir": out}}


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> dict:
    """One tiny run, trained once: its folder and its data (copied per test before anything is changed)."""
    from samft.config import config_from_dict
    from samft.engine.train.loop import train

    root = tmp_path_factory.mktemp("bad_input")
    data = write_dataset(root / "data", n=8, seed=4)
    cfg = config_from_dict({**_base_config(data, str(root / "run")), "train": {
        **_base_config(data)["train"], "progress": False}})
    run = train(cfg, show_progress=False)
    return {"root": root, "run": run, "data": data}


@dataclass
class Ctx:
    tmp: Path
    trained: dict

    @property
    def data(self) -> Path:
        return self.trained["data"]

    def run(self) -> Path:
        """A private copy of the trained run (its config points at the shared data)."""
        dst = self.tmp / "run"
        if not dst.exists():
            shutil.copytree(self.trained["run"], dst)
        return dst

    def config(self, **sections) -> Path:
        cfg = _base_config(self.data)
        for key, value in sections.items():
            cfg[key] = {**cfg.get(key, {}), **value}
        path = self.tmp / "c.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    def dataset(self, n: int = 6) -> Path:
        """A private dataset to damage."""
        return write_dataset(self.tmp / "d", n=n, seed=5)


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _data_check(c: Ctx, data: Path, **data_opts) -> list[str]:
    return ["data", "check", "--config", c.config(data={"root": str(data), **data_opts})]


# --- each case: (arguments built in a fresh folder, the text the one-line error must contain) --------------

def config_cases() -> dict[str, Callable]:
    def bad_yaml(c):
        (c.tmp / "bad.yaml").write_text("model: [unclosed\n")
        return ["train", "--config", "bad.yaml"], "bad.yaml: not valid YAML"

    def yaml_tag(c):
        (c.tmp / "tag.yaml").write_text(f"model: !!python/object/apply:os.system ['touch {PAYLOAD}']\n")
        return ["train", "--config", "tag.yaml"], "tag.yaml: not valid YAML"

    def not_mapping(c):
        (c.tmp / "list.yaml").write_text("- a\n- b\n")
        return ["info", "--config", "list.yaml"], "list.yaml: expected a mapping of sections"

    def binary_config(c):
        (c.tmp / "bin.yaml").write_bytes(b"\xff\xfe\x00\x81" * 10)
        return ["info", "--config", "bin.yaml"], "bin.yaml: not a text file"

    def missing_config(c):
        return ["train", "--config", "nowhere.yaml"], "config file not found: nowhere.yaml"

    def unknown_key(c):
        return ["info", "--config", c.config(), "train.lrr=1"], "unknown config key 'train.lrr'"

    def unknown_section(c):
        (c.tmp / "u.yaml").write_text("trian: {epochs: 1}\n")
        return ["info", "--config", "u.yaml"], "unknown config key 'trian' (did you mean 'train'?)"

    def no_equals(c):
        return ["info", "--config", c.config(), "train.lr"], "override 'train.lr': expected key=value"

    def wrong_int(c):
        return ["info", "--config", c.config(), "train.epochs=two"], "train.epochs: expected int, got 'two'"

    def wrong_bool(c):
        return ["info", "--config", c.config(), "train.compile=maybe"], "train.compile: expected bool, got 'maybe'"

    def wrong_list(c):
        return ["info", "--config", c.config(), "data.classes=5"], "data.classes: expected list of str, got 5"

    def below_minimum(c):
        return ["info", "--config", c.config(), "train.epochs=0"], "train.epochs: 0 is below the minimum 1"

    def bad_choice(c):
        return ["info", "--config", c.config(), "peft.method=loraa"], "did you mean 'lora'"

    def img_size(c):
        return ["info", "--config", c.config(), "model.img_size=70"], "model.img_size: 70 is not a multiple of 16"

    cases = {"bad_yaml": bad_yaml, "yaml_tag": yaml_tag, "not_mapping": not_mapping, "binary_config": binary_config,
             "missing_config": missing_config, "unknown_key": unknown_key, "unknown_section": unknown_section,
             "no_equals": no_equals, "wrong_int": wrong_int, "wrong_bool": wrong_bool, "wrong_list": wrong_list,
             "below_minimum": below_minimum, "bad_choice": bad_choice, "img_size": img_size}
    for key, value, shown in [("train.lr", "nan", "nan"), ("train.lr", "inf", "inf"), ("train.lr", "-.inf", "-inf"),
                              ("train.weight_decay", ".nan", "nan"), ("train.grad_clip", "inf", "inf"),
                              ("loss.aux.balance", "nan", "nan"), ("eval.threshold", "inf", "inf"),
                              ("data.val_fraction", "nan", "nan"), ("peft.lora.alpha", "inf", "inf"),
                              ("train.min_lr_ratio", "1e999", "inf")]:
        cases[f"nonfinite_{key}={value}"] = (
            lambda c, k=key, v=value, s=shown: (["train", "--config", c.config(), f"{k}={v}"],
                                                f"{k}: {s} is not a finite number"))

    def nan_in_file(c):
        path = c.config()
        path.write_text(path.read_text().replace("lr: 0.001", "lr: .nan"))
        return ["train", "--config", path], "c.yaml: train.lr: nan is not a finite number"

    cases["nonfinite_in_file"] = nan_in_file
    return cases


def data_cases() -> dict[str, Callable]:
    def missing_root(c):
        return _data_check(c, c.tmp / "nowhere"), "nowhere: split not found"

    def missing_mask(c):
        d = c.dataset()
        (d / "masks" / "0003.png").unlink()
        return _data_check(c, d), "0003.png: no mask found"

    def orphan_mask(c):
        d = c.dataset()
        (d / "images" / "0002.png").unlink()
        return _data_check(c, d), f"{d / 'masks' / '0002.png'}: mask without an image"

    def zero_byte_image(c):
        d = c.dataset()
        (d / "images" / "0001.png").write_bytes(b"")
        return _data_check(c, d), "images/0001.png"

    def truncated_image(c):
        d = c.dataset()
        p = d / "images" / "0001.png"
        p.write_bytes(p.read_bytes()[:200])
        return _data_check(c, d), "images/0001.png"

    def text_as_image(c):
        d = c.dataset()
        (d / "images" / "0004.png").write_text("not an image at all")
        return _data_check(c, d), "images/0004.png"

    def stray_file(c):
        d = c.dataset()
        (d / "images" / "notes.txt").write_text("hello")
        return _data_check(c, d), "notes.txt: not an image file in the image folder"

    def mask_size(c):
        d = c.dataset()
        _png(d / "masks" / "0002.png", np.zeros((10, 12), np.uint8))
        return _data_check(c, d), "masks/0002.png: mask size 12x10 differs from its image"

    def mask_values(c):
        d = c.dataset()
        with Image.open(d / "images" / "0002.png") as im:
            w, h = im.size
        _png(d / "masks" / "0002.png", (np.arange(w * h).reshape(h, w) % 7 * 30).astype(np.uint8))
        return _data_check(c, d), "masks/0002.png"

    def class_out_of_range(c):
        d = c.dataset()
        with Image.open(d / "images" / "0002.png") as im:
            w, h = im.size
        _png(d / "masks" / "0002.png", np.full((h, w), 7, np.uint8))
        return (["data", "check", "--config", c.config(data={"root": str(d), "classes": ["bg", "a", "b"]})],
                "masks/0002.png")

    def empty_split(c):
        (c.tmp / "e" / "images").mkdir(parents=True)
        (c.tmp / "e" / "masks").mkdir(parents=True)
        return _data_check(c, c.tmp / "e"), "the split is empty"

    def csv_header(c):
        (c.tmp / "l.csv").write_text("image,segmentation\na.png,b.png\n")
        return _data_check(c, c.data, train=str(c.tmp / "l.csv")), "needs an 'image' column and a 'label'"

    def csv_short_row(c):
        (c.tmp / "l.csv").write_text(f"image,label\n{c.data}/images/0000.png,{c.data}/masks/0000.png\n"
                                     f"{c.data}/images/0001.png\n")
        return _data_check(c, c.data, train=str(c.tmp / "l.csv")), "l.csv: line 3 has 1 columns"

    def csv_empty(c):
        (c.tmp / "l.csv").write_text("\n")
        return _data_check(c, c.data, train=str(c.tmp / "l.csv")), "l.csv: the CSV is empty"

    def csv_missing_file(c):
        rows = "".join(f"{c.data}/images/{i:04d}.png,{c.data}/masks/{i:04d}.png\n" for i in range(6))
        (c.tmp / "l.csv").write_text(rows + f"{c.data}/images/0099.png,{c.data}/masks/0099.png\n")
        return _data_check(c, c.data, train=str(c.tmp / "l.csv")), "0099.png"

    return {"missing_root": missing_root, "missing_mask": missing_mask, "orphan_mask": orphan_mask,
            "zero_byte_image": zero_byte_image, "truncated_image": truncated_image, "text_as_image": text_as_image,
            "stray_file": stray_file, "mask_size": mask_size, "mask_values": mask_values,
            "class_out_of_range": class_out_of_range, "empty_split": empty_split, "csv_header": csv_header,
            "csv_short_row": csv_short_row, "csv_empty": csv_empty, "csv_missing_file": csv_missing_file}


def _tamper_adapter(run: Path, change: Callable[[dict, dict], None]) -> Path:
    path = run / "adapter.safetensors"
    data = path.read_bytes()
    tensors = st_load(data)
    meta = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])["__metadata__"]
    change(tensors, meta)
    path.write_bytes(st_save(tensors, metadata=meta))
    return path


def _first_key(tensors: dict) -> str:
    return sorted(k for k in tensors if k.startswith("decoder."))[0]


def _payload_pickle(c: Ctx, path: Path) -> None:
    class Payload:
        def __reduce__(self):
            return open, (str(c.tmp / PAYLOAD), "w")

    torch.save({"trainable": {}, "optimizer": {}, "scheduler": {}, "progress": {}, "x": Payload()}, path)


def run_cases() -> dict[str, Callable]:
    cases: dict[str, Callable] = {}
    for cmd in ("eval", "predict", "resume"):
        def command(c, run, cmd=cmd):
            if cmd == "eval":
                return ["eval", "--run", run]
            if cmd == "predict":
                return ["predict", c.data / "images", "--run", run, "--out", c.tmp / "p"]
            return ["train", "--resume", run]

        def corrupt(c, command=command):
            run = c.run()
            (run / "config.yaml").write_text("model: {type: tiny\npeft: [")
            return command(c, run), f"{run / 'config.yaml'}: the run's config is not valid YAML"

        def tagged(c, command=command):
            run = c.run()
            text = (run / "config.yaml").read_text()
            (run / "config.yaml").write_text(f"x: !!python/object/apply:os.system ['touch {PAYLOAD}']\n" + text)
            return command(c, run), f"{run / 'config.yaml'}: the run's config is not valid YAML"

        def unknown(c, command=command):
            run = c.run()
            (run / "config.yaml").write_text((run / "config.yaml").read_text() + "extra: 1\n")
            return command(c, run), f"{run / 'config.yaml'}: unknown config key 'extra'"

        def nonfinite(c, command=command):
            run = c.run()
            (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("lr: 0.001", "lr: .inf"))
            return command(c, run), f"{run / 'config.yaml'}: train.lr: inf is not a finite number"

        cases.update({f"{cmd}_corrupt_config": corrupt, f"{cmd}_tagged_config": tagged,
                      f"{cmd}_unknown_key_in_config": unknown, f"{cmd}_nonfinite_config": nonfinite})

    def not_a_run(c):
        (c.tmp / "empty").mkdir()
        return ["eval", "--run", c.tmp / "empty"], "empty: not a run directory (config.yaml not found)"

    def no_adapter(c):
        run = c.run()
        (run / "adapter.safetensors").unlink()
        return ["eval", "--run", run], "no adapter.safetensors yet"

    def adapter_bytes(content: bytes, message: str):
        def case(c):
            run = c.run()
            (run / "adapter.safetensors").write_bytes(content)
            return ["eval", "--run", run], f"{run / 'adapter.safetensors'}: {message}"
        return case

    def adapter_truncated(c):
        run = c.run()
        p = run / "adapter.safetensors"
        p.write_bytes(p.read_bytes()[:-64])
        return ["predict", c.data / "images", "--run", run, "--out", c.tmp / "p"], f"{p}: not a valid safetensors"

    def adapter_nan(value: float):
        def case(c):
            run = c.run()
            key = {}

            def poison(t, m):
                key["k"] = _first_key(t)
                t[key["k"]] = t[key["k"]].clone().fill_(value)

            p = _tamper_adapter(run, poison)
            return (["predict", c.data / "images", "--run", run, "--out", c.tmp / "p"],
                    f"{p}: tensor {key['k']} holds")
        return case

    def adapter_shape(c):
        run = c.run()
        key = {}

        def reshape(t, m):
            key["k"] = _first_key(t)
            t[key["k"]] = torch.zeros(3, 3, 3)

        p = _tamper_adapter(run, reshape)
        return ["eval", "--run", run], f"{p}: tensor {key['k']} has shape (3, 3, 3)"

    def adapter_missing_tensor(c):
        run = c.run()
        p = _tamper_adapter(run, lambda t, m: t.pop(_first_key(t)))
        return ["eval", "--run", run], f"{p}: adapter does not fit this model: 1 missing tensors"

    def adapter_other_method(c):
        run = c.run()
        p = _tamper_adapter(run, lambda t, m: m.update(peft_method="ssf"))
        return ["eval", "--run", run], f"{p}: adapter was trained with PEFT method 'ssf'"

    def adapter_other_format(c):
        run = c.run()
        p = _tamper_adapter(run, lambda t, m: m.update(format="something-else"))
        return ["eval", "--run", run], f"{p}: not a samft adapter"

    def base_checkpoint_junk(c):
        (c.tmp / "junk.pth").write_bytes(os.urandom(3000))
        return ["train", "--config", c.config(model={"checkpoint": str(c.tmp / "junk.pth")})], "junk.pth"

    def base_checkpoint_truncated(c):
        torch.save({"image_encoder.pos_embed": torch.zeros(1, 4, 4, 32)}, c.tmp / "cut.pth")
        (c.tmp / "cut.pth").write_bytes((c.tmp / "cut.pth").read_bytes()[:300])
        return ["train", "--config", c.config(model={"checkpoint": str(c.tmp / "cut.pth")})], "cut.pth"

    def base_checkpoint_pickle(c):
        _payload_pickle(c, c.tmp / "evil.pth")
        return ["train", "--config", c.config(model={"checkpoint": str(c.tmp / "evil.pth")})], "evil.pth"

    cases.update({"not_a_run": not_a_run, "no_adapter": no_adapter,
                  "adapter_zero_bytes": adapter_bytes(b"", "not a valid safetensors file"),
                  "adapter_random": adapter_bytes(os.urandom(2048), "not a valid safetensors file"),
                  "adapter_truncated": adapter_truncated, "adapter_nan": adapter_nan(float("nan")),
                  "adapter_inf": adapter_nan(float("inf")), "adapter_other_shape": adapter_shape,
                  "adapter_missing_tensor": adapter_missing_tensor, "adapter_other_method": adapter_other_method,
                  "adapter_other_format": adapter_other_format, "base_checkpoint_junk": base_checkpoint_junk,
                  "base_checkpoint_truncated": base_checkpoint_truncated,
                  "base_checkpoint_pickle": base_checkpoint_pickle})
    return cases


def resume_cases() -> dict[str, Callable]:
    def state(c, write: Callable[[Path], None], message: str):
        run = c.run()
        path = run / "state.safetensors"
        write(path)
        return ["train", "--resume", run], (f"{path}: ", message)

    def change_state(change: Callable[[dict], None]) -> Callable[[Path], None]:
        def write(path: Path) -> None:
            s = load_resume_state(path)
            change(s)
            save_resume_state(path, s)
        return write

    def first_trainable(c) -> str:
        return sorted(load_resume_state(c.trained["run"] / "state.safetensors")["trainable"])[0]

    def nan_trainable(s):
        s["trainable"][sorted(s["trainable"])[0]].fill_(float("nan"))

    def other_size(s):
        k = sorted(s["trainable"])[0]
        s["trainable"][k] = torch.zeros(*[d + 1 for d in s["trainable"][k].shape])

    def export_file(path):
        torch.save({"image_encoder.pos_embed": torch.zeros(2)}, path)

    def adapter_file(path):
        shutil.copy(path.parent / "adapter.safetensors", path)

    def no_state(c):  # a folder that is not a run (no config.yaml): nothing to resume
        run = c.run()
        (run / "config.yaml").unlink()
        return ["train", "--resume", run], "not a run directory"

    def locked(c):
        run = c.run()
        handle = open(run / ".lock", "w")
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        c.trained.setdefault("handles", []).append(handle)  # held until the session ends
        return ["train", "--resume", run, "train.epochs=2"], f"{run}: another samft process is training"

    def occupied(c):
        run = c.run()
        return ["train", "--config", c.config(output={"dir": str(run)})], f"{run}: already holds a run"

    return {
        "state_pickle_payload": lambda c: state(c, lambda p: _payload_pickle(c, p), "was not loaded"),
        "state_export": lambda c: state(c, export_file, "not a samft resumable state (no trainable"),
        "state_adapter": lambda c: state(c, adapter_file, "not a samft resumable state (metadata format "
                                                           "'samft-adapter-1'"),
        "state_truncated": lambda c: state(c, lambda p: p.write_bytes(p.read_bytes()[:-50]),
                                           "not a valid safetensors file"),
        "state_random": lambda c: state(c, lambda p: p.write_bytes(os.urandom(5000)), "neither a safetensors"),
        "state_zero_bytes": lambda c: state(c, lambda p: p.write_bytes(b""), "neither a safetensors"),
        "state_nan": lambda c: state(c, change_state(nan_trainable), f"tensor {first_trainable(c)} holds"),
        "state_other_size": lambda c: state(c, change_state(other_size), f"tensor {first_trainable(c)} has shape"),
        "state_missing_key": lambda c: state(c, change_state(lambda s: s.pop("optimizer")),
                                             "not a samft resumable state (no optimizer"),
        "state_bad_progress": lambda c: state(c, change_state(lambda s: s.__setitem__("progress", [1])),
                                              "progress is a list, expected a mapping"),
        "state_optimizer_of_another_run": lambda c: state(c, change_state(
            lambda s: s["optimizer"]["param_groups"].pop()), "does not fit this run (ValueError"),
        "state_unknown_progress": lambda c: state(c, change_state(
            lambda s: s["progress"].__setitem__("bogus", 1)), "does not fit this run (TypeError"),
        "state_bad_rng": lambda c: state(c, change_state(
            lambda s: s["progress"]["rng"].__setitem__("python", (3, (1, 2), None))), "does not fit this run"),
        "no_state": no_state, "locked": locked, "occupied": occupied,
    }


def output_cases() -> dict[str, Callable]:
    def onto_inputs(c):
        (c.tmp / "imgs").mkdir()
        shutil.copy(c.data / "images" / "0000.png", c.tmp / "imgs" / "a.png")
        return (["predict", c.tmp / "imgs", "--run", c.run(), "--out", c.tmp / "imgs", "--overwrite"],
                f"{c.tmp / 'imgs' / 'a.png'}: --out {c.tmp / 'imgs'} would write a mask onto this input image")

    def onto_run_files(c):
        run = c.run()
        (c.tmp / "i").mkdir()
        shutil.copy(c.data / "images" / "0000.png", c.tmp / "i" / "curves.jpg")
        return (["predict", c.tmp / "i", "--run", run, "--out", run, "--overwrite"],
                f"{(run / 'curves.png').resolve()}: is a run's own file")

    def onto_hard_link(c):
        (c.tmp / "imgs").mkdir()
        (c.tmp / "o").mkdir()
        shutil.copy(c.data / "images" / "0000.png", c.tmp / "imgs" / "a.png")
        os.link(c.tmp / "imgs" / "a.png", c.tmp / "o" / "a.png")  # the same file under another name
        return (["predict", c.tmp / "imgs", "--run", c.run(), "--out", c.tmp / "o", "--overwrite"],
                f"{c.tmp / 'imgs' / 'a.png'}: --out {c.tmp / 'o'} would write a mask onto this input image")

    def out_is_file(c):
        (c.tmp / "f.txt").write_text("mine")
        return (["predict", c.data / "images" / "0000.png", "--run", c.run(), "--out", c.tmp / "f.txt"],
                f"{c.tmp / 'f.txt'}: --out is an existing file")

    def out_exists(c):
        (c.tmp / "o").mkdir()
        (c.tmp / "o" / "0001.png").write_text("mine")
        return (["predict", c.data / "images", "--run", c.run(), "--out", c.tmp / "o"],
                f"{c.tmp / 'o' / '0001.png'}: already exists in {c.tmp / 'o'} (1 of the 8 output file(s) exist)")

    def overlay_exists(c):
        (c.tmp / "o" / "overlays").mkdir(parents=True)
        (c.tmp / "o" / "overlays" / "0003.png").write_text("mine")
        return (["predict", c.data / "images", "--run", c.run(), "--out", c.tmp / "o", "--overlay"],
                f"{c.tmp / 'o' / 'overlays' / '0003.png'}: already exists")

    def out_read_only(c):
        return (["predict", c.data / "images" / "0000.png", "--run", c.run(), "--out", "/sys/samft-test-out"],
                "/sys/samft-test-out: cannot create the output folder")

    def missing_input(c):
        return ["predict", "missing.png", "--run", c.run()], "missing.png: no such file, folder or pattern"

    def empty_folder(c):
        (c.tmp / "none").mkdir()
        return ["predict", c.tmp / "none", "--run", c.run()], "none: folder holds no images"

    def no_match(c):
        return ["predict", str(c.tmp / "*.jpg"), "--run", c.run()], "*.jpg: pattern matched no files"

    def bad_input_image(c):
        (c.tmp / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
        return ["predict", c.tmp / "bad.png", "--run", c.run(), "--out", c.tmp / "o"], "bad.png"

    def zero_byte_input(c):
        (c.tmp / "zero.png").write_bytes(b"")
        return ["predict", c.tmp / "zero.png", "--run", c.run(), "--out", c.tmp / "o"], "zero.png"

    def export_exists(c):
        (c.tmp / "m.pth").write_text("mine")
        return ["export", "--merged", c.tmp / "m.pth", "--run", c.run()], f"{c.tmp / 'm.pth'}: already exists"

    def export_head_exists(c):
        (c.tmp / "m.head.safetensors").write_text("mine")
        return (["export", "--merged", c.tmp / "m.pth", "--run", c.run()],
                f"{c.tmp / 'm.head.safetensors'}: already exists")

    def export_run_file(name: str):
        def case(c):
            run = c.run()
            return (["export", "--merged", run / name, "--run", run, "--overwrite"],
                    f"{(run / name).resolve()}: is a run's own file")
        return case

    def export_folder(c):
        return ["export", "--merged", c.tmp, "--run", c.run()], f"{c.tmp}: is a folder"

    def export_unwritable(c):
        return (["export", "--merged", "/sys/samft-test/m.pth", "--run", c.run()],
                "/sys/samft-test/m.pth: cannot write the export")

    def export_image_name(c):
        return (["export", "--merged", c.tmp / "model.png", "--run", c.run()],
                f"{c.tmp / 'model.png'}: --merged writes a PyTorch checkpoint; give a name ending in .pth or .pt")

    def export_onnx_name(c):
        return (["export", "--onnx", c.tmp / "model.png", "--run", c.run()],
                f"{c.tmp / 'model.png'}: --onnx writes an ONNX graph; give a name ending in .onnx")

    def export_onnx_onto_run_file(c):
        run = c.run()
        return (["export", "--onnx", run / "adapter.safetensors", "--run", run, "--overwrite"],
                f"{(run / 'adapter.safetensors').resolve()}: is a run's own file")

    def demo_exists(c):
        write_dataset(c.tmp / "demo", n=3)
        return ["demo-data", c.tmp / "demo", "--n", "5"], f"{c.tmp / 'demo' / 'images' / '0000.png'}: already exists"

    def demo_unwritable(c):
        return ["demo-data", "/sys/samft-demo", "--n", "2"], "/sys/samft-demo: cannot write the dataset"

    def score_empty_gt(c):
        (c.tmp / "gt").mkdir()
        (c.tmp / "pred").mkdir()
        return (["score", "--pred", c.tmp / "pred", "--gt", c.tmp / "gt"],
                f"{c.tmp / 'gt'}: the ground-truth folder holds no masks")

    def score_missing_pred(c):
        return (["score", "--pred", c.tmp / "nothing", "--gt", c.data / "masks"],
                f"{c.tmp / 'nothing'}: prediction folder not found")

    def score_unmatched(c):
        (c.tmp / "pred").mkdir()
        shutil.copy(c.data / "masks" / "0000.png", c.tmp / "pred" / "0000.png")
        return (["score", "--pred", c.tmp / "pred", "--gt", c.data / "masks"],
                f"{c.tmp / 'pred'}: no prediction for 7 of 8 masks")

    def score_bad_npy(c):
        (c.tmp / "pred").mkdir()
        (c.tmp / "gt").mkdir()
        shutil.copy(c.data / "masks" / "0000.png", c.tmp / "gt" / "0000.png")
        np.save(c.tmp / "pred" / "0000.npy", np.full((4, 4), 3.0))
        return (["score", "--pred", c.tmp / "pred", "--gt", c.tmp / "gt"],
                "0000.npy: probabilities must lie in [0, 1]")

    def eval_data_syntax(c):
        return ["eval", "--run", c.run(), "--data", "oops"], "--data 'oops': expected NAME=PATH"

    def eval_data_missing(c):
        return ["eval", "--run", c.run(), "--data", f"x={c.tmp / 'gone'}"], "gone: split not found"

    return {"predict_onto_inputs": onto_inputs, "predict_onto_hard_link": onto_hard_link,
            "predict_onto_run_files": onto_run_files,
            "predict_out_is_file": out_is_file,
            "predict_out_exists": out_exists, "predict_overlay_exists": overlay_exists,
            "predict_out_read_only": out_read_only, "predict_missing_input": missing_input,
            "predict_empty_folder": empty_folder, "predict_no_match": no_match,
            "predict_bad_image": bad_input_image, "predict_zero_byte_image": zero_byte_input,
            "export_exists": export_exists, "export_head_exists": export_head_exists,
            **{f"export_onto_{n}": export_run_file(n) for n in ("state.safetensors", "adapter.safetensors",
                                                               "adapter_last.safetensors", "config.yaml",
                                                               "metrics.csv")},
            "export_folder": export_folder, "export_unwritable": export_unwritable,
            "export_image_name": export_image_name, "export_onnx_name": export_onnx_name,
            "export_onnx_onto_run_file": export_onnx_onto_run_file,
            "demo_data_exists": demo_exists, "demo_data_unwritable": demo_unwritable,
            "score_empty_gt": score_empty_gt, "score_missing_pred": score_missing_pred,
            "score_unmatched": score_unmatched, "score_bad_npy": score_bad_npy,
            "eval_data_syntax": eval_data_syntax, "eval_data_missing": eval_data_missing}


CASES = {**config_cases(), **data_cases(), **run_cases(),
         **resume_cases(), **output_cases()}


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_there_are_enough_cases():
    assert len(CASES) >= 60


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_clear_line(name, tmp_path, trained):
    ctx = Ctx(tmp_path, trained)
    data_before = _snapshot(trained["data"])
    args, message = CASES[name](ctx)
    result, output = cli(*args, cwd=tmp_path)
    assert "Traceback" not in output, output
    assert result.exit_code == 2, f"exit {result.exit_code}: {output} {result.exception!r}"
    for part in (message,) if isinstance(message, str) else message:
        assert part in output, output
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert errors == lines[-1:], f"one error line, the last: {lines[-3:]}"  # data check lists problems above it
    assert not (tmp_path / PAYLOAD).exists(), "a crafted file executed code"
    assert _snapshot(trained["data"]) == data_before, "an input was changed"


def test_refusals_keep_every_file(tmp_path, trained):
    """A refused predict/export/demo-data leaves the user's files byte for byte; --overwrite replaces
    outputs but never inputs or a run's files."""
    ctx = Ctx(tmp_path, trained)
    run = ctx.run()
    run_before = _snapshot(run)
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "0001.png").write_text("mine")
    assert cli("predict", ctx.data / "images", "--run", run, "--out", tmp_path / "o", cwd=tmp_path)[0].exit_code == 2
    assert (tmp_path / "o" / "0001.png").read_text() == "mine" and len(list((tmp_path / "o").iterdir())) == 1
    result, out = cli("predict", ctx.data / "images", "--run", run, "--out", tmp_path / "o", "--overwrite",
                      cwd=tmp_path)
    assert result.exit_code == 0 and "wrote 8 mask(s)" in out, out
    with Image.open(tmp_path / "o" / "0001.png") as m:
        assert m.mode == "L"
    for name in ("state.safetensors", "adapter.safetensors", "config.yaml"):
        assert cli("export", "--merged", run / name, "--run", run, "--overwrite", cwd=tmp_path)[0].exit_code == 2
    assert _snapshot(run) == run_before


def test_same_stems_get_distinct_names_inside_out(tmp_path, trained):
    """x.png + x.jpg in one folder, and x.png in two folders: four distinct masks, all inside --out,
    and the printed count is the number of files."""
    ctx = Ctx(tmp_path, trained)
    src = ctx.data / "images" / "0000.png"
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        shutil.copy(src, tmp_path / folder / "x.png")
    Image.open(src).convert("RGB").save(tmp_path / "a" / "x.jpg")
    result, out = cli("predict", tmp_path / "a", tmp_path / "b" / "x.png", "--run", ctx.run(), "--out",
                      tmp_path / "o", cwd=tmp_path)
    assert result.exit_code == 0, out
    written = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert len(written) == 3 and "wrote 3 mask(s)" in out, (written, out)
    assert written == ["a_x_jpg.png", "a_x_png.png", "b_x.png"]
    assert "warning: 3 input(s) share a file stem" in out, out


def test_same_stems_in_folders_directly_under_root(tmp_path):
    """The reported case: /a/x.png and /b/x.png once gave an absolute name (written outside --out)."""
    from samft.data.layouts import distinct_names

    names = distinct_names([Path("/a/x.png"), Path("/b/x.png"), Path("/x.png"), Path("/a/.x.png")])
    assert names == ["a_x", "b_x", "x", "_.x"]
    for n in names:
        assert not Path(n).is_absolute() and "/" not in n and n not in (".", "..")


def test_eroFS_is_one_line(tmp_path, trained, monkeypatch):
    """--out on a read-only file system (EROFS when the folder is created): one line naming it."""
    ctx = Ctx(tmp_path, trained)
    real = Path.mkdir

    def read_only(self, *args, **kwargs):
        if "ro" in self.parts:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    result, out = cli("predict", ctx.data / "images" / "0000.png", "--run", ctx.run(), "--out", tmp_path / "ro",
                      cwd=tmp_path)
    assert result.exit_code == 2 and "Traceback" not in out
    assert f"{tmp_path / 'ro'}: cannot create the output folder (Read-only file system)" in out


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_ctrl_c_during_eval_or_predict(tmp_path, trained, monkeypatch, command):
    """Ctrl-C: one word, exit 130 (the shell's code for SIGINT), no traceback, no half-written mask."""
    import samft.engine.infer.evaluate as evaluate

    ctx = Ctx(tmp_path, trained)
    real = evaluate.iter_predictions

    def interrupted(*args, **kwargs):
        for k, item in enumerate(real(*args, **kwargs)):
            if k == 1:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(evaluate, "iter_predictions", interrupted)  # eval's and predict's (evaluate.predictions)
    args = ["eval", "--run", ctx.run()] if command == "eval" else [
        "predict", ctx.data / "images", "--run", ctx.run(), "--out", tmp_path / "o"]
    result, out = cli(*args, cwd=tmp_path)
    assert result.exit_code == 130 and "interrupted" in out and "Traceback" not in out, out
    if command == "predict":
        assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["0000.png"]  # whole files only
    else:
        assert not (ctx.run() / "eval.json").exists()


class _SystemPayload:
    """Unpickling this runs ``touch MARKER`` in the current folder (``os.system`` as the global)."""

    def __reduce__(self):
        return os.system, (f"touch {PAYLOAD}",)


@pytest.mark.parametrize("where", ["model_checkpoint", "eval_run_model", "predict_run_model", "legacy_state",
                                   "search_state"])
def test_a_code_pickle_is_not_loaded_and_never_advised_to_be(where, tmp_path, trained):
    """Every torch.load in samft refuses a pickle naming code, says it was not loaded, and never repeats
    torch's advice to re-run with weights_only=False."""
    ctx = Ctx(tmp_path, trained)
    evil = tmp_path / "evil.pth"
    torch.save({"image_encoder.pos_embed": torch.zeros(1), "x": _SystemPayload()}, evil)
    if where == "search_state":
        from samft.engine.artifacts.fileio import atomic_torch_save
        from samft.prune.search_state import SearchCheckpoint, load_search_state

        old = os.getcwd()
        os.chdir(tmp_path)
        try:
            with pytest.raises(SamftError) as info:
                load_search_state(SearchCheckpoint(evil, every=1, write=atomic_torch_save))
        finally:
            os.chdir(old)
        out, code = str(info.value), 2
    else:
        if where == "legacy_state":
            run = ctx.run()
            (run / "state.safetensors").unlink()
            shutil.copy(evil, run / "state.pt")
        args = {"model_checkpoint": ["train", "--config", ctx.config(model={"checkpoint": str(evil)})],
                "eval_run_model": ["eval", "--run", evil, "--data", f"t={ctx.data}"],
                "predict_run_model": ["predict", ctx.data / "images", "--run", evil, "--out", tmp_path / "o"],
                "legacy_state": ["train", "--resume", tmp_path / "run"]}[where]
        result, out = cli(*args, cwd=tmp_path)
        code = result.exit_code
        assert [line for line in result.output.splitlines() if line.strip()][-1].startswith("error:"), out
    assert code == 2 and "Traceback" not in out, out
    assert "contains Python code or objects" in out and "was not loaded" in out, out
    assert "weights_only" not in out and "trusted source" not in out, out
    assert not (tmp_path / PAYLOAD).exists(), "the payload ran"


@pytest.mark.parametrize("command", ["train", "eval", "predict", "predict_tiled", "eval_cuda"])
def test_out_of_memory_is_one_line_saying_what_to_set(command, tmp_path, trained, monkeypatch):
    """An allocator's failure in the forward pass (CPU's RuntimeError, CUDA's OutOfMemoryError) is one line:
    what did not fit and what to set, never a traceback."""
    from samft.model.semantic import SemanticSAM

    def no_memory(self, *args, **kwargs):
        if command == "eval_cuda":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 274877906944 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(SemanticSAM, "forward", no_memory)
    ctx = Ctx(tmp_path, trained)
    images = ctx.data / "images"
    args, expected = {
        "train": (["train", "--config", ctx.config(train={"batch_size": 3}, model={"img_size": 64})],
                  ["out of CPU memory: a batch of 3 image(s) at model.img_size=64 did not fit", "train.batch_size",
                   "model.img_size", "train.grad_checkpointing=true"]),
        "eval": (["eval", "--run", ctx.run()], ["out of CPU memory: whole images", "--tile 1024", "eval.batch_size"]),
        "eval_cuda": (["eval", "--run", ctx.run()], ["out of GPU memory: whole images", "--tile"]),
        "predict": (["predict", images, "--run", ctx.run(), "--out", tmp_path / "o"],
                    ["out of CPU memory: whole images", "--tile 1024", "eval.batch_size"]),
        "predict_tiled": (["predict", images, "--run", ctx.run(), "--out", tmp_path / "o", "--tile", "64"],
                          ["out of CPU memory: eval.batch_size tiles of 64 x 64 px", "a smaller --tile"]),
    }[command]
    result, out = cli(*args, cwd=tmp_path)
    assert result.exit_code == 2 and "Traceback" not in out, f"{out} {result.exception!r}"
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error: out of"), lines[-3:]
    for part in expected:
        assert part in out, out
    assert "alloc_cpu.cpp" not in out and "Tried to allocate" not in out


def test_a_bug_is_not_reported_as_out_of_memory(tmp_path, trained, monkeypatch):
    from samft.model.semantic import SemanticSAM

    def bug(self, *args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(SemanticSAM, "forward", bug)
    result, out = cli("eval", "--run", Ctx(tmp_path, trained).run(), cwd=tmp_path)
    assert result.exit_code != 2 and isinstance(result.exception, RuntimeError) and "out of" not in out


@pytest.mark.parametrize("command", ["eval", "predict"])
@pytest.mark.parametrize("options, message", [
    (["--tile", "0"], "--tile 0: expected at least 32 pixels"),
    (["--overlap", "16"], "--overlap 16: only used with --tile SIZE"),
])
def test_tile_zero_and_overlap_without_tile_are_refused(command, options, message, tmp_path, trained):
    """--tile 0 used to mean 'no tiles' and --overlap without --tile was ignored, both in silence."""
    ctx = Ctx(tmp_path, trained)
    args = ["eval", "--run", ctx.run()] if command == "eval" else [
        "predict", ctx.data / "images", "--run", ctx.run(), "--out", tmp_path / "o"]
    result, out = cli(*args, *options, cwd=tmp_path)
    assert result.exit_code == 2 and out.startswith("error: ") and message in out, out
    assert not (tmp_path / "o").exists() and not (ctx.run() / "eval.json").exists()


@pytest.mark.parametrize("command", ["predict", "eval", "train"])
def test_worker_counts_are_capped_and_said_once(command, tmp_path, trained, monkeypatch):
    """predict --workers 48 for one image, a run config with data.num_workers: 64 (eval, training): the
    DataLoaders get at most one process per CPU and per batch, and one warning line says so."""
    import samft.engine.infer.evaluate as evaluate
    import samft.engine.train.streams as streams

    asked: list[int] = []

    def spy(real):
        def loader(*args, num_workers=0, **kwargs):
            asked.append(num_workers)
            return real(*args, num_workers=0, **kwargs)  # no processes forked in the test
        return loader

    monkeypatch.setattr(evaluate, "DataLoader", spy(evaluate.DataLoader))
    monkeypatch.setattr(streams, "DataLoader", spy(streams.DataLoader))
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    ctx = Ctx(tmp_path, trained)
    if command == "predict":
        args = ["predict", ctx.data / "images" / "0000.png", "--run", ctx.run(), "--out", tmp_path / "o",
                "--workers", "48"]
        said = "--workers=48: using 1 data-loading process(es), as there are 1 batch(es) to load"
    else:
        run = ctx.run()
        text = (run / "config.yaml").read_text().replace("num_workers: 0", "num_workers: 64")
        assert "num_workers: 64" in text
        (run / "config.yaml").write_text(text)
        args = ["eval", "--run", run, "--data", f"all={ctx.data}"] if command == "eval" else [
            "train", "--config", ctx.config(data={"num_workers": 64}, output={"dir": str(tmp_path / "r")})]
        said = "data.num_workers=64: using 2 data-loading process(es), as there are 2 batch(es) to load"
    result, out = cli(*args, cwd=tmp_path)
    assert result.exit_code == 0, f"{out} {result.exception!r}"
    assert asked and max(asked) <= 3, asked
    assert f"warning: {said}" in out, out
    assert out.count("warning: data.num_workers=64") <= 1 and out.count("warning: --workers") <= 1, out
    assert "worker processes in total" not in out, out  # torch's own warning: no loader was left uncapped


# --- the numeric options of eval / predict / score / export x the kinds of value a user can type -----------
# (prune's numeric options are checked in tests/test_prune_cli.py)

KINDS = {"negative": ("-1", "-0.5"), "zero": ("0", "0"), "nan": ("nan", "nan"), "inf": ("inf", "inf"),
         "wrong_type": ("abc", "abc")}  # (an int option's text, a float option's)
TYPER = "typer"  # Typer refuses it itself (usage error, exit 2) before samft runs
OK = "ok"  # legal: the command runs
GRID = {  # (command, option, is_float) -> {kind: TYPER, OK, or the text of samft's one-line error}
    ("eval", "--tile", False): {"negative": "--tile -1: expected at least 32 pixels",
                                "zero": "--tile 0: expected at least 32 pixels"},
    ("eval", "--overlap", False): {"negative": "--overlap -1: expected 0 to half the tile (32)", "zero": OK},
    ("predict", "--tile", False): {"negative": "--tile -1: expected at least 32 pixels",
                                   "zero": "--tile 0: expected at least 32 pixels"},
    ("predict", "--overlap", False): {"negative": "--overlap -1: expected 0 to half the tile (32)", "zero": OK},
    ("predict", "--workers", False): {"negative": TYPER, "zero": OK},
    ("score", "--threshold", True): {"negative": "--threshold -0.5: expected a probability between 0 and 1",
                                     "zero": OK, "nan": "--threshold nan: expected a probability between 0 and 1",
                                     "inf": "--threshold inf: expected a probability between 0 and 1"},
    ("export", "--opset", False): {"negative": "--opset -1: expected 14 to 20", "zero": "--opset 0: expected 14 to 20"},
}
CELLS = [(cmd, opt, is_float, kind, GRID[(cmd, opt, is_float)].get(kind, TYPER))
         for (cmd, opt, is_float) in GRID for kind in KINDS]


def _grid_args(c: Ctx, command: str, option: str, value: str) -> list:
    if command == "eval":
        extra = ["--tile", "64"] if option == "--overlap" else []
        return ["eval", "--run", c.run(), *extra, option, value]
    if command == "predict":
        extra = ["--tile", "64"] if option == "--overlap" else []
        return ["predict", c.data / "images" / "0000.png", "--run", c.run(), "--out", c.tmp / "o", *extra,
                option, value]
    if command == "score":
        return ["score", "--pred", c.data / "masks", "--gt", c.data / "masks", option, value]
    return ["export", "--onnx", c.tmp / "m.onnx", "--run", c.run(), option, value]


def test_the_grid_covers_every_numeric_option():
    import typing

    numeric = set()
    for command in app.registered_commands:
        name = command.name or command.callback.__name__
        if name not in ("eval", "predict", "score", "export"):
            continue
        hints = typing.get_type_hints(command.callback)
        for param, default in inspect.signature(command.callback).parameters.items():
            if set(typing.get_args(hints[param]) or (hints[param],)) & {int, float}:
                numeric.add((name, default.default.param_decls[0]))
    assert numeric == {(cmd, opt) for cmd, opt, _ in GRID}, numeric


@pytest.mark.parametrize("command, option, is_float, kind, expected", CELLS,
                         ids=[f"{c}{o}-{k}" for c, o, _, k, _ in CELLS])
def test_numeric_option_grid(command, option, is_float, kind, expected, tmp_path, trained):
    """Every cell exits 2 with one line naming the option and value (or Typer's own usage error where it
    refuses the type), or 0 where the value is legal."""
    ctx = Ctx(tmp_path, trained)
    value = KINDS[kind][1 if is_float else 0]
    result, out = cli(*_grid_args(ctx, command, option, value), cwd=tmp_path)
    assert "Traceback" not in out, out
    if expected == OK:
        assert result.exit_code == 0, f"{out} {result.exception!r}"
        return
    assert result.exit_code == 2, f"exit {result.exit_code}: {out} {result.exception!r}"
    if expected == TYPER:
        assert f"Invalid value for '{option}'" in out, out
        return
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {expected}"), lines


def test_a_file_that_is_no_pickle_is_not_called_code(tmp_path):
    """torch refuses any non-tensor file with the same 'Weights only load failed' text: only a pickle that names
    a global is said to contain code; an image offered as a model is 'another kind of file'."""
    import numpy as np
    import torch
    from PIL import Image

    from samft.errors import load_failure

    png = tmp_path / "image.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(png)
    try:
        torch.load(png, weights_only=True)
    except Exception as e:  # noqa: BLE001 (whatever torch raises)
        said = load_failure(e)
    assert "another kind of file" in said and "code" not in said and "weights_only" not in said


def test_a_bad_mask_in_a_loader_worker_is_one_line(tmp_path):
    """eval --data with masks of the wrong kind (class ids 0..2 for a binary run) read in worker processes:
    one error line naming the mask, not the worker's 20-30-line traceback."""
    import numpy as np
    from PIL import Image

    from samft.data.datasets import EvalDataset, collate
    from samft.data.workers import surfaced
    from samft.errors import DataError
    from torch.utils.data import DataLoader

    for sub in ("images", "masks"):
        (tmp_path / sub).mkdir()
    for i in range(2):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / f"{i}.png")
        Image.fromarray(np.full((8, 8), 2 * i, np.uint8).clip(0, 2)).save(tmp_path / "masks" / f"{i}.png")
    from samft.data.layouts import folder_pairs

    pairs = folder_pairs(tmp_path / "images", tmp_path / "masks")
    pairs[1] = pairs[1].__class__(pairs[1].image, tmp_path / "masks" / "missing.png", pairs[1].name)
    loader = DataLoader(EvalDataset(pairs, 32), batch_size=1, num_workers=1, collate_fn=collate)
    with pytest.raises(DataError) as err:
        list(surfaced(loader))
    assert "\n" not in str(err.value) and "missing.png" in str(err.value) and "Traceback" not in str(err.value)


BOMB = "x-anchors:\n  a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"  a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 9))


@pytest.mark.timeout(60)
def test_a_yaml_alias_bomb_is_one_line_not_a_hang(tmp_path):
    """Nine levels of ten-fold aliases in under 1 KiB (10^9 nodes): refused where the alias stands, in a user's
    config, an override and a run's config.yaml."""
    from samft.config import load_config
    from samft.engine.artifacts import run_config
    from samft.errors import ConfigError

    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    assert len(BOMB) < 1024
    with pytest.raises(ConfigError, match=r"bomb\.yaml: not valid YAML: aliases \(\*name\) are not read"):
        load_config(path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(BOMB)
    with pytest.raises(ConfigError, match="aliases"):
        run_config.read(tmp_path / "run" / "config.yaml")
    assert load_config(_plain(tmp_path), ["train.lr=&a 0.1"]).train.lr == 0.1  # an anchor alone is harmless


def _plain(tmp_path):
    path = tmp_path / "plain.yaml"
    path.write_text("train: {epochs: 1}\n")
    return path


def test_eval_never_replaces_a_users_model_eval_json(tmp_path):
    """The attack round's data loss: eval of an exported model replaced a user's MODEL.eval.json. Now refused in
    one line before any scoring, the file unchanged."""
    from samft.engine.artifacts import eval_json
    from samft.errors import SamftError

    mine = tmp_path / "m.eval.json"
    for content in ('{"mine": "important"}', "[1, 2, 3]", "not json"):
        mine.write_text(content)
        with pytest.raises(SamftError, match=r"m\.eval\.json: exists but is not samft's evaluation results"):
            eval_json.check_ours(mine)
        with pytest.raises(SamftError, match="never replaces it"):
            eval_json.update(mine, {"sets": {"x": {"n_images": 1, "metrics": {}}}})
        assert mine.read_text() == content
