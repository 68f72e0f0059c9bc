import numpy as np
import pytest
import torch
from PIL import Image

from samft.config import DataConfig
from samft.data.datasets import EvalDataset, TrainDataset, load_pair
from samft.data.layouts import Pair, csv_pairs, eval_sets, folder_pairs, split_pairs, train_val_pairs
from samft.data.io import binarize, read_binary_mask, read_image
from samft.data.transforms import SamTransform, valid_mask
from samft.errors import DataError

from conftest import shared


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _pair_folder(root, names=("a", "b", "c"), size=(30, 40)):
    for n in names:
        _save(root / "images" / f"{n}.png", np.full((*size, 3), 100, np.uint8))
        mask = np.zeros(size, np.uint8)
        mask[5:15, 5:20] = 255
        _save(root / "masks" / f"{n}.png", mask)
    return root


def test_folder_pairs_match_by_stem_and_suffix(tmp_path):
    _save(tmp_path / "imgs" / "ISIC_1.jpg", np.zeros((8, 8, 3), np.uint8))
    _save(tmp_path / "gt" / "ISIC_1_segmentation.png", np.zeros((8, 8), np.uint8))
    pairs = folder_pairs(tmp_path / "imgs", tmp_path / "gt", "_segmentation")
    assert pairs == [Pair(tmp_path / "imgs" / "ISIC_1.jpg", tmp_path / "gt" / "ISIC_1_segmentation.png", "ISIC_1")]


def test_missing_mask_names_the_image(tmp_path):
    _pair_folder(tmp_path)
    (tmp_path / "masks" / "b.png").unlink()
    with pytest.raises(DataError, match=r"images/b.png: no mask found .*1 of 3 images have no mask"):
        folder_pairs(tmp_path / "images", tmp_path / "masks")


def test_non_image_file_in_image_folder(tmp_path):
    _pair_folder(tmp_path)
    (tmp_path / "images" / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"notes.txt: not an image file in the image folder"):
        folder_pairs(tmp_path / "images", tmp_path / "masks")


def test_corrupt_and_truncated_images_are_errors(tmp_path):
    _pair_folder(tmp_path)
    bad = tmp_path / "images" / "a.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match=r"a.png: cannot read image: the file is corrupt, truncated"):
        read_image(bad)
    good = tmp_path / "images" / "b.png"
    _save(good, np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="b.png: cannot read image"):
        read_image(good)


def test_size_mismatch(tmp_path):
    _pair_folder(tmp_path)
    _save(tmp_path / "masks" / "a.png", np.zeros((31, 40), np.uint8))
    pair = folder_pairs(tmp_path / "images", tmp_path / "masks")[0]
    with pytest.raises(DataError, match=r"masks/a.png: mask size 40x31 differs from its image .*a.png \(40x30\)"):
        load_pair(pair)


def test_binarize_rule():
    assert binarize(np.array([0, 1, 1])).tolist() == [False, True, True]
    assert binarize(np.array([0, 127, 128, 254, 255])).tolist() == [False, False, True, True, True]
    assert binarize(np.array([0, 65535], np.uint16)).tolist() == [False, True]


def test_grey_and_rgba_images_become_rgb(tmp_path):
    _save(tmp_path / "g.png", np.full((5, 6), 77, np.uint8))
    Image.fromarray(np.full((5, 6, 4), 9, np.uint8), "RGBA").save(tmp_path / "r.png")
    Image.fromarray(np.full((5, 6), 4000, np.uint16)).save(tmp_path / "w.png")
    assert read_image(tmp_path / "g.png").shape == (5, 6, 3)
    assert read_image(tmp_path / "r.png").shape == (5, 6, 3)
    sixteen = read_image(tmp_path / "w.png")
    assert sixteen.dtype == np.uint8 and sixteen.max() > 0


def test_csv_with_header_and_index_column(tmp_path):
    _pair_folder(tmp_path / "d")
    (tmp_path / "list.csv").write_text(",image,label\n0,d/images/a.png,d/masks/a.png\n1,d/images/b.png,d/masks/b.png\n")
    pairs = csv_pairs(tmp_path / "list.csv")
    assert [p.name for p in pairs] == ["a", "b"]
    assert pairs[1].mask == tmp_path / "d" / "masks" / "b.png"


def test_csv_errors(tmp_path):
    (tmp_path / "bad.csv").write_text("image,other\nx,y\n")
    with pytest.raises(DataError, match="needs an 'image' column"):
        csv_pairs(tmp_path / "bad.csv")
    (tmp_path / "empty.csv").write_text("\n")
    with pytest.raises(DataError, match="the CSV is empty"):
        csv_pairs(tmp_path / "empty.csv")


def test_headerless_csv_of_real_prostate_data():
    """finetune-SAM's headerless CSV: nested image folders, mask paths with a stray leading '/'."""
    root = shared("mri-prostate")
    pairs = csv_pairs(root / "MRI-Prostate" / "train_5shot.csv")
    assert len(pairs) >= 5
    for p in pairs:
        image, mask = load_pair(p)
        assert image.shape[2] == 3 and mask.shape == image.shape[:2]
        assert set(np.unique(mask)) <= {0, 1}


def test_split_paths_and_holdout(tmp_path):
    _pair_folder(tmp_path / "train", names=[f"s{i}" for i in range(10)])
    data = DataConfig(root=str(tmp_path), train="train", val_fraction=0.2)
    train, val = train_val_pairs(data)
    assert len(train) == 8 and len(val) == 2
    assert not {p.name for p in train} & {p.name for p in val}
    assert train_val_pairs(data) == (train, val), "the hold-out split is deterministic"
    assert eval_sets(data) == {"val": val}
    assert list(eval_sets(data, {"X": "train"})) == ["X"]
    with pytest.raises(DataError, match="split not found"):
        split_pairs(data, "nope")


def test_train_transform_keeps_aspect_and_pads(tmp_path):
    _pair_folder(tmp_path, names=["a"], size=(30, 60))
    ds = TrainDataset(folder_pairs(tmp_path / "images", tmp_path / "masks"), 64, hflip=0.5, seed=0)
    item = ds[0]
    assert item["image"].shape == (3, 64, 64) and item["mask"].shape == (64, 64)
    assert item["valid_hw"].tolist() == [32, 64]
    assert torch.all(item["image"][:, 32:] == 0) and item["mask"][32:].sum() == 0
    assert set(item["mask"].unique().tolist()) <= {0, 1}


def test_augmentation_is_a_function_of_seed_epoch_and_index(tmp_path):
    rng = np.random.default_rng(0)
    for n in "ab":
        _save(tmp_path / "images" / f"{n}.png", rng.integers(0, 255, (20, 20, 3), dtype=np.uint8))
        _save(tmp_path / "masks" / f"{n}.png", np.zeros((20, 20), np.uint8))
    ds = TrainDataset(folder_pairs(tmp_path / "images", tmp_path / "masks"), 32, hflip=0.5, seed=3)
    flips = []
    for epoch in range(8):
        ds.set_epoch(epoch)
        first = ds[0]["image"]
        assert torch.equal(first, ds[0]["image"])
        flips.append(first)
    assert any(not torch.equal(flips[0], f) for f in flips[1:]), "some epochs flip, some do not"


def test_eval_dataset_keeps_original_ground_truth(tmp_path):
    _pair_folder(tmp_path, names=["a"], size=(30, 50))
    item = EvalDataset(folder_pairs(tmp_path / "images", tmp_path / "masks"), 64)[0]
    assert item["orig_hw"].tolist() == [30, 50]
    assert item["gt"].shape == (30, 50) and item["gt"].sum() == 10 * 15


def test_valid_mask():
    m = valid_mask(torch.tensor([[2, 3], [4, 1]]), 4)
    assert m.shape == (2, 1, 4, 4)
    assert m[0, 0].sum() == 6 and m[1, 0].sum() == 4 and m[0, 0, 1, 2] == 1 and m[0, 0, 2, 0] == 0


def test_real_em_cells_load_as_binary():
    root = shared("em-cells")
    pairs = folder_pairs(root / "Images", root / "Labels")
    assert len(pairs) == 30
    mask = read_binary_mask(pairs[0].mask)
    assert mask.shape == (512, 512) and 0 < mask.mean() < 1
    out = SamTransform(128)(read_image(pairs[0].image), mask.astype(np.uint8))
    assert out["image"].shape == (3, 128, 128) and out["valid_hw"].tolist() == [128, 128]


def test_a_multi_frame_image_uses_its_first_frame_and_says_so_once(tmp_path, monkeypatch):
    """Animated GIF / multi-page TIFF: the first frame, with one warning per process naming the file."""
    import warnings

    from PIL import Image

    import samft.data.io as io_mod

    monkeypatch.setattr(io_mod, "_MULTI_FRAME_WARNED", [False])
    frames = [Image.fromarray(np.full((6, 5, 3), v, np.uint8)) for v in (10, 200)]
    for name in ("a.tif", "b.gif"):
        frames[0].save(tmp_path / name, save_all=True, append_images=frames[1:])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = io_mod.read_image(tmp_path / "a.tif")
        io_mod.read_image(tmp_path / "b.gif")
    assert first.shape == (6, 5, 3) and int(first[0, 0, 0]) == 10
    said = [str(w.message) for w in caught if "frames" in str(w.message)]
    assert len(said) == 1 and "a.tif" in said[0] and "first frame" in said[0]


def test_pillows_pixel_guard_is_named_and_samft_max_image_pixels_raises_it(tmp_path, monkeypatch):
    """An image over Pillow's decompression-bomb guard is 'too large', with the variable that lets a user decode
    images they trust (for --tile); the variable is the guard then, and Pillow's own is left as it was."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow refuses over twice this
    path = tmp_path / "big.png"
    Image.fromarray(np.full((100, 120, 3), 7, np.uint8)).save(path)
    monkeypatch.delenv("SAMFT_MAX_IMAGE_PIXELS", raising=False)
    with pytest.raises(DataError, match=r"big.png: the image is not corrupt but too large to decode \(12,000 pixels, "
                                        r".*set SAMFT_MAX_IMAGE_PIXELS=N"):
        read_image(path)
    monkeypatch.setenv("SAMFT_MAX_IMAGE_PIXELS", "20_000")
    assert read_image(path).shape == (100, 120, 3) and Image.MAX_IMAGE_PIXELS == 1000
    monkeypatch.setenv("SAMFT_MAX_IMAGE_PIXELS", "11999")
    with pytest.raises(DataError, match=r"big.png: the image has 12,000 pixels, over SAMFT_MAX_IMAGE_PIXELS=11,999"):
        read_image(path)
    monkeypatch.setenv("SAMFT_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(DataError, match=r"SAMFT_MAX_IMAGE_PIXELS='lots': expected a positive number of pixels"):
        read_image(path)
