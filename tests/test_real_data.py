"""Real images with real masks from ../shared/data (skipped with a reason when absent)."""

import json

import numpy as np
from PIL import Image

from samft.engine.infer.evaluate import evaluate_run
from samft.engine.infer.predict import predict_run
from samft.engine.train.loop import train

from conftest import shared, tiny_config


def test_em_cells_train_eval_predict(tmp_path):
    root = shared("em-cells")
    cfg = tiny_config("conv_lora",
                      data={"root": str(root), "train": ".", "image_dir": "Images", "mask_dir": "Labels",
                            "val_fraction": 0.2},
                      train={"epochs": 1, "batch_size": 4, "lr": 1e-3, "progress": False},
                      output={"dir": str(tmp_path / "em")})
    run = train(cfg, show_progress=False)
    results = evaluate_run(run, show_progress=False)
    val = results["sets"]["val"]
    assert val["n_images"] == 6
    assert all(np.isfinite(v) for v in val["metrics"].values())
    assert json.loads((run / "eval.json").read_text()) == results
    written = predict_run(run, [str(root / "Images" / "0.png"), str(root / "Images" / "1.png")], tmp_path / "p",
                          show_progress=False)
    for path in written:
        with Image.open(path) as m:
            assert m.size == (512, 512)
            assert set(np.unique(np.asarray(m))) <= {0, 255}
