"""The published dataset layouts, built as small trees, and the mask formats users bring."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from samft.config import DataConfig
from samft.data.datasets import load_pair
from samft.data.io import binary_mask_problem, read_binary_mask
from samft.data.layouts import eval_sets, split_pairs, named_test_splits, train_val_pairs
from samft.errors import DataError


def _img(path, size=(24, 32), ext=None, value=90):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size, 3), value, np.uint8)).save(path)


def _mask(path, size=(24, 32)):
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros(size, np.uint8)
    m[4:12, 6:20] = 255
    Image.fromarray(m).save(path)


def _split(folder, names, image_dir, mask_dir, image_ext=".png", mask_suffix=""):
    for n in names:
        _img(folder / image_dir / f"{n}{image_ext}")
        _mask(folder / mask_dir / f"{n}{mask_suffix}.png")


def test_pranet_polyp_layout(tmp_path):
    _split(tmp_path / "TrainDataset", [f"t{i}" for i in range(10)], "images", "masks")
    for name in ["CVC-300", "CVC-ClinicDB", "Kvasir", "CVC-ColonDB", "ETIS-LaribPolypDB"]:
        _split(tmp_path / "TestDataset" / name, [f"{name}_{i}" for i in range(2)], "images", "masks")
    data = DataConfig(format="pranet", root=str(tmp_path))
    train, val = train_val_pairs(data)
    assert len(train) + len(val) == 10 and len(val) == 1
    sets = eval_sets(data)
    assert list(sets) == ["CVC-300", "CVC-ClinicDB", "CVC-ColonDB", "ETIS-LaribPolypDB", "Kvasir"]
    assert all(len(p) == 2 for p in sets.values())


def test_sinet_cod_layout(tmp_path):
    _split(tmp_path / "TrainDataset", ["camourflage_00001", "COD10K-CAM-1"], "Imgs", "GT", ".jpg")
    for name in ["CAMO", "COD10K", "CHAMELEON", "NC4K"]:
        _split(tmp_path / "TestDataset" / name, ["a", "b", "c"], "Imgs", "GT", ".jpg")
    data = DataConfig(format="sinet", root=str(tmp_path), val_fraction=0.5)
    assert list(named_test_splits(data)) == ["CAMO", "CHAMELEON", "COD10K", "NC4K"]
    pairs = split_pairs(data, "TestDataset/CAMO")
    assert [p.image.suffix for p in pairs] == [".jpg"] * 3 and all(p.mask.suffix == ".png" for p in pairs)


def test_isic_suffix_superpixels_and_official_folders(tmp_path):
    train = tmp_path / "train"
    _split(train, ["ISIC_0000000", "ISIC_0000001"], "images", "masks", ".jpg", "_segmentation")
    _img(train / "images" / "ISIC_0000000_superpixels.png")  # shipped with ISIC 2017, not a training image
    (train / "images" / "ISIC-2017_Training_Data_metadata.csv").write_text("image_id,age\n")
    data = DataConfig(format="isic", root=str(tmp_path), val_fraction=0.5)
    pairs = split_pairs(data, "train")
    assert [p.name for p in pairs] == ["ISIC_0000000", "ISIC_0000001"]
    assert pairs[0].mask.name == "ISIC_0000000_segmentation.png"
    # the official release: two sibling folders per split, masks named *_Segmentation in 2016
    _img(tmp_path / "ISBI2016_ISIC_Part1_Test_Data" / "ISIC_0000003.jpg")
    _mask(tmp_path / "ISBI2016_ISIC_Part1_Test_GroundTruth" / "ISIC_0000003_Segmentation.png")
    pairs = split_pairs(data, "ISBI2016_ISIC_Part1_Test_Data::ISBI2016_ISIC_Part1_Test_GroundTruth")
    assert [p.mask.name for p in pairs] == ["ISIC_0000003_Segmentation.png"]


def test_sbu_shadow_layout(tmp_path):
    _split(tmp_path / "SBUTrain4KRecoveredSmall", ["lssd1", "lssd2", "lssd3"], "ShadowImages", "ShadowMasks", ".jpg")
    _split(tmp_path / "SBU-Test", ["lssd9"], "ShadowImages", "ShadowMasks", ".jpg")
    data = DataConfig(format="sbu", root=str(tmp_path), val_fraction=0.34)
    assert len(sum(train_val_pairs(data), [])) == 3
    assert {k: len(v) for k, v in eval_sets(data).items()} == {"SBU-Test": 1}


def test_voc_layout_with_split_lists(tmp_path):
    for i in ["2007_000032", "2007_000039", "2007_000063"]:
        _img(tmp_path / "JPEGImages" / f"{i}.jpg")
        p = Image.fromarray(np.zeros((24, 32), np.uint8), "P")
        (tmp_path / "SegmentationClass").mkdir(exist_ok=True)
        p.save(tmp_path / "SegmentationClass" / f"{i}.png")
    lists = tmp_path / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("2007_000032\n2007_000039\n")
    (lists / "val.txt").write_text("2007_000063\n")
    data = DataConfig(format="voc", root=str(tmp_path))
    train, val = train_val_pairs(data)
    assert [p.name for p in train] == ["2007_000032", "2007_000039"] and [p.name for p in val] == ["2007_000063"]
    assert list(eval_sets(data)) == ["val"]
    with pytest.raises(DataError, match="VOC split list not found"):
        split_pairs(data, "test")


def test_images_and_masks_in_one_folder(tmp_path):
    _img(tmp_path / "all" / "a.png")
    _mask(tmp_path / "all" / "a_mask.png")
    data = DataConfig(root=str(tmp_path), mask_suffix="_mask")
    assert [(p.image.name, p.mask.name) for p in split_pairs(data, "all::all")] == [("a.png", "a_mask.png")]


def test_ignore_patterns(tmp_path):
    _split(tmp_path / "s", ["a"], "images", "masks")
    (tmp_path / "s" / "images" / "Thumbs.db").write_bytes(b"\0")
    with pytest.raises(DataError, match=r"Thumbs.db: not an image file .*data.ignore"):
        split_pairs(DataConfig(root=str(tmp_path)), "s")
    assert len(split_pairs(DataConfig(root=str(tmp_path), ignore=["Thumbs.db"]), "s")) == 1


# ----------------------------------------------------------------------------------------------
# mask formats
# ----------------------------------------------------------------------------------------------

SHAPE = np.zeros((30, 40), bool)
SHAPE[5:20, 8:30] = True


def _pair_with_mask(tmp_path, mask_image: Image.Image, name="m.png"):
    _img(tmp_path / "img.png", size=(30, 40))
    mask_image.save(tmp_path / name)
    from samft.data.layouts import Pair

    return Pair(tmp_path / "img.png", tmp_path / name, "img")


def test_palette_mask(tmp_path):
    pal = Image.fromarray(SHAPE.astype(np.uint8), "P")
    pal.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    _, mask = load_pair(_pair_with_mask(tmp_path, pal))
    assert np.array_equal(mask.astype(bool), SHAPE)


def test_sixteen_bit_mask(tmp_path):
    _, mask = load_pair(_pair_with_mask(tmp_path, Image.fromarray(SHAPE.astype(np.uint16) * 65535)))
    assert np.array_equal(mask.astype(bool), SHAPE)


def test_rgba_mask(tmp_path):
    rgba = np.zeros((30, 40, 4), np.uint8)
    rgba[..., 3] = SHAPE * 255  # white-on-transparent exports keep the shape in alpha only
    _, mask = load_pair(_pair_with_mask(tmp_path, Image.fromarray(rgba, "RGBA")))
    assert np.array_equal(mask.astype(bool), SHAPE)
    rgba[..., :3] = (SHAPE * 255)[..., None]
    rgba[..., 3] = 255
    _, mask = load_pair(_pair_with_mask(tmp_path, Image.fromarray(rgba, "RGBA"), "m2.png"))
    assert np.array_equal(mask.astype(bool), SHAPE)


def test_noisy_jpeg_mask_is_thresholded(tmp_path):
    pair = _pair_with_mask(tmp_path, Image.fromarray(SHAPE.astype(np.uint8) * 255), "m.jpg")
    Image.fromarray(SHAPE.astype(np.uint8) * 255).save(tmp_path / "m.jpg", quality=60)
    values = np.asarray(Image.open(tmp_path / "m.jpg"))
    assert len(np.unique(values)) > 2, "the JPEG really is noisy"
    assert binary_mask_problem(values) is None
    _, mask = load_pair(pair)
    assert (mask.astype(bool) == SHAPE).mean() > 0.99


def test_class_id_and_grey_masks_are_refused(tmp_path):
    ids = Image.fromarray(SHAPE.astype(np.uint8) * 3)
    with pytest.raises(DataError, match=r"m.png: values \[0, 3\] look like class ids"):
        load_pair(_pair_with_mask(tmp_path, ids))
    grey = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40), dtype=np.uint8))
    with pytest.raises(DataError, match=r"g.png: .* mid-grey .*not a binary mask"):
        load_pair(_pair_with_mask(tmp_path, grey, "g.png"))


def _exif_jpeg(array: np.ndarray, orientation: int) -> bytes:
    im = Image.fromarray(array)
    exif = im.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif, quality=95)
    return buf.getvalue()


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_rotated_jpeg_keeps_the_mask_aligned(tmp_path, orientation):
    """Stored pixels + orientation tag: the image is shown rotated, and the mask (drawn on the stored
    pixels) turns with it."""
    raw = np.zeros((30, 40, 3), np.uint8)
    raw[SHAPE] = 255  # the object is white in the stored image
    (tmp_path / "img.jpg").write_bytes(_exif_jpeg(raw, orientation))
    Image.fromarray(SHAPE.astype(np.uint8) * 255).save(tmp_path / "m.png")
    from samft.data.layouts import Pair

    image, mask = load_pair(Pair(tmp_path / "img.jpg", tmp_path / "m.png", "img"))
    expected_hw = (30, 40) if orientation == 3 else (40, 30)
    assert image.shape[:2] == mask.shape == expected_hw
    bright = image.mean(axis=2) > 127
    assert (bright == mask.astype(bool)).mean() > 0.98


def test_exif_rotated_jpeg_with_a_mask_drawn_on_the_shown_image(tmp_path):
    raw = np.zeros((30, 40, 3), np.uint8)
    raw[SHAPE] = 255
    (tmp_path / "img.jpg").write_bytes(_exif_jpeg(raw, 6))
    shown = np.rot90(SHAPE, k=-1)  # orientation 6: displayed rotated 90 degrees clockwise
    Image.fromarray(shown.astype(np.uint8) * 255).save(tmp_path / "m.png")
    from samft.data.layouts import Pair

    image, mask = load_pair(Pair(tmp_path / "img.jpg", tmp_path / "m.png", "img"))
    assert np.array_equal(mask.astype(bool), shown)
    assert ((image.mean(axis=2) > 127) == shown).mean() > 0.98


def test_read_binary_mask_of_real_prostate_masks():
    from conftest import shared

    root = shared("mri-prostate")
    masks = sorted((root / "MRI-Prostate" / "masks").glob("*.png"))
    values = np.unique(np.concatenate([np.unique(np.asarray(Image.open(m))) for m in masks]))
    assert set(values.tolist()) <= {0, 254, 255}  # the real quirk: 254 in a binary mask
    assert all(binary_mask_problem(np.asarray(Image.open(m))) is None for m in masks)
    assert any(read_binary_mask(m).any() for m in masks)


def test_empty_splits_are_errors(tmp_path):
    (tmp_path / "s" / "images").mkdir(parents=True)
    (tmp_path / "s" / "masks").mkdir(parents=True)
    with pytest.raises(DataError, match=r"s: the split is empty"):
        split_pairs(DataConfig(root=str(tmp_path)), "s")
    (tmp_path / "list.csv").write_text("image,label\n")
    with pytest.raises(DataError, match=r"list.csv: the CSV lists no image/mask pairs"):
        split_pairs(DataConfig(root=str(tmp_path)), "list.csv")


def test_two_images_with_one_stem_are_refused_naming_both(tmp_path):
    """``0001.png`` and ``0001.jpg`` beside one ``0001.png`` mask: an error naming the files, not two pairs with
    one mask (the trust review's 'accepted in silence')."""
    import numpy as np
    from PIL import Image

    from samft.data.layouts import folder_pairs
    from samft.errors import DataError

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for name in ("0001.png", "0001.jpg", "0002.png"):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "images" / name)
    for name in ("0001.png", "0002.png"):
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "masks" / name)
    with pytest.raises(DataError, match=r"0001\.(png|jpg): has the same name as 0001\.(png|jpg)") as err:
        folder_pairs(tmp_path / "images", tmp_path / "masks")
    assert "data.ignore" in str(err.value) and "\n" not in str(err.value)


def test_a_layout_that_finds_no_pairs_names_the_one_that_does(tmp_path):
    """format: isic on masks that share the images' stems: the error names data.format=folders."""
    import numpy as np
    from PIL import Image

    from samft.config import config_from_dict
    from samft.data.layouts import train_val_pairs
    from samft.errors import DataError

    for sub in ("images", "masks"):
        (tmp_path / sub).mkdir()
        for i in range(3):
            Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / sub / f"ISIC_{i}.png")
    cfg = config_from_dict({"data": {"format": "isic", "root": str(tmp_path), "train": "."}})
    with pytest.raises(DataError, match=r"no mask found .*\(data\.format=folders finds 3 pairs there"):
        train_val_pairs(cfg.data)
