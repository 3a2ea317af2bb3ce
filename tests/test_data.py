"""The dataset layer: specs, the seeded holdout splits, each dataset kind read from files written here."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moevit.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataSpec,
    denormalize,
    find_unreadable,
    make_loader,
    open_dataset,
    parse_spec,
    split_indices,
)

S = 16  # image size for every test: small keeps the file fast

# label -> (common name, scientific name, colour). taxa.csv is written out of order and with label 10, so a wrong
# (file-order or lexicographic) class order shows.
TAXA = {
    "2": ("Blue Jay", "Cyanocitta cristata", (0, 0, 255)),
    "10": ("Northern Cardinal", "Cardinalis cardinalis", (255, 0, 0)),
    "0": ("American Goldfinch", "Spinus tristis", (0, 255, 0)),
}
TRAIN_PER_TAXON, TEST_PER_TAXON = 5, 2
CORRUPT_ID = "9999"


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def _solid(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (24, 20), mode: str = "RGB") -> None:
    Image.new("RGB", size, colour).convert(mode).save(path)


@pytest.fixture
def ssw60(tmp_path: Path) -> Path:
    """A miniature SSW60 iNat part: 3 taxa, 5 train + 2 test images each, one corrupt train .jpg, extra columns."""
    root = tmp_path / "ssw60"
    (root / "images_inat").mkdir(parents=True)
    _write_csv(
        root / "taxa.csv",
        ["label", "common_name", "scientific_name", "family"],
        [[label, common, sci, "Aves"] for label, (common, sci, _) in TAXA.items()],
    )
    rows: list[list[object]] = []
    asset = 100
    for label, (_, _, colour) in TAXA.items():
        for split, count in (("train", TRAIN_PER_TAXON), ("test", TEST_PER_TAXON)):
            for _ in range(count):
                _solid(root / "images_inat" / f"{asset}.jpg", colour)
                rows.append([asset, label, split, 20, 24, "someone"])
                asset += 1
    (root / "images_inat" / f"{CORRUPT_ID}.jpg").write_bytes(b"\xff\xd8\xff garbage, not a jpeg" * 4)
    rows.append([CORRUPT_ID, "0", "train", 20, 24, "someone"])
    _write_csv(root / "images_inat.csv", ["asset_id", "label", "split", "height", "width", "observer"], rows)
    return root


def _paths(ds) -> set[str]:
    return {str(p) for p in ds.items}


# ------------------------------------------------------------------------------------------------------- specs


def test_parse_spec_forms_and_round_trip(tmp_path: Path) -> None:
    assert parse_spec("digits") == DataSpec(kind="digits")
    assert parse_spec(f"ssw60:{tmp_path}") == DataSpec(kind="ssw60", path=tmp_path)
    assert parse_spec(f"folder:{tmp_path}").path == tmp_path
    assert parse_spec("synthetic") == DataSpec(kind="synthetic", classes=4, per_class=20, seed=0, size=64)
    spec = parse_spec("synthetic:classes=3, per_class=7,seed=5")
    assert (spec.classes, spec.per_class, spec.seed, spec.size) == (3, 7, 5, 64)
    for text in ("digits", "synthetic:classes=3,per_class=7,seed=5,size=64", f"ssw60:{tmp_path}"):
        assert str(parse_spec(text)) == text
        assert parse_spec(str(parse_spec(text))) == parse_spec(text)


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("imagenet:/data", "unknown kind 'imagenet'"),
        ("/data/ssw60", "unknown kind"),
        ("", "empty"),
        ("ssw60", "ssw60:PATH"),
        ("folder:", "folder:PATH"),
        ("digits:5", "digits takes no argument"),
        ("synthetic:classes", "not key=value"),
        ("synthetic:classes=four", "not an integer"),
        ("synthetic:colour=3", "unknown synthetic option 'colour'"),
        ("synthetic:classes=1", "classes must be >= 2"),
        ("synthetic:seed=1,seed=2", "given twice"),
    ],
)
def test_parse_spec_rejects_malformed(spec: str, needle: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_spec(spec)
    assert needle in str(err.value)
    assert repr(spec) in str(err.value)  # the message names the spec it rejects


def test_open_dataset_rejects_unknown_kind_and_split() -> None:
    with pytest.raises(ValueError, match="unknown kind 'mnist'"):
        open_dataset("mnist", image_size=S, split="train")
    with pytest.raises(ValueError, match="unknown kind 'mnist'"):
        open_dataset(DataSpec(kind="mnist"), image_size=S, split="train")
    with pytest.raises(ValueError, match="split 'validation'"):
        open_dataset("synthetic", image_size=S, split="validation")


# ------------------------------------------------------------------------------------------------------ splits


def test_split_indices_seeded_disjoint_and_covering() -> None:
    n = 1000
    parts = split_indices(n, seed=3)
    assert parts == split_indices(n, seed=3)
    assert parts["eval"] != split_indices(n, seed=4)["eval"]
    train, evl, search, val = (set(parts[k]) for k in ("train", "eval", "search-train", "val"))
    assert len(evl) == 200 and len(train) == 800
    assert not train & evl and train | evl == set(range(n))
    assert len(val) == 80 and not search & val and search | val == train
    assert parts["eval"] != sorted(range(800, 1000))  # random, not the tail
    # val comes from its own stream: another val_fraction leaves train/eval exactly where they were
    other = split_indices(n, seed=3, val_fraction=0.25)
    assert other["train"] == parts["train"] and other["eval"] == parts["eval"] and len(other["val"]) == 200
    with pytest.raises(ValueError, match="eval_fraction"):
        split_indices(n, seed=0, eval_fraction=1.0)
    with pytest.raises(ValueError, match="need >= 3"):
        split_indices(2, seed=0)


# ------------------------------------------------------------------------------------------------------- SSW60


def test_ssw60_classes_taxa_and_splits(ssw60: Path) -> None:
    spec = f"ssw60:{ssw60}"
    train = open_dataset(spec, image_size=S, split="train", seed=1)
    evl = open_dataset(spec, image_size=S, split="eval", seed=1)
    test = open_dataset(spec, image_size=S, split="test", seed=1)
    # class index = taxa.csv sorted by label, numerically: 0, 2, 10
    assert train.classes == ["American Goldfinch", "Blue Jay", "Northern Cardinal"]
    assert [t.label for t in train.taxa] == ["0", "2", "10"]
    assert train.taxa[2].scientific_name == "Cardinalis cardinalis"
    assert train.class_info()[1] == {
        "index": 1,
        "name": "Blue Jay",
        "label": "2",
        "common_name": "Blue Jay",
        "scientific_name": "Cyanocitta cristata",
    }
    n_train_rows = 3 * TRAIN_PER_TAXON + 1
    assert not _paths(train) & _paths(evl)
    assert len(train) + len(evl) == n_train_rows
    assert len(evl) == round(0.2 * n_train_rows)
    assert len(test) == 3 * TEST_PER_TAXON and test.class_counts() == [TEST_PER_TAXON] * 3
    assert not _paths(test) & (_paths(train) | _paths(evl))
    assert _paths(open_dataset(spec, image_size=S, split="eval", seed=1)) == _paths(evl)
    assert "ssw60" in train.describe() and f"{len(train)} images" in train.describe()
    assert "test split" in test.describe()


def test_ssw60_corrupt_image_is_reported_and_skipped(ssw60: Path, caplog: pytest.LogCaptureFixture) -> None:
    spec = f"ssw60:{ssw60}"
    datasets = [open_dataset(spec, image_size=S, split=split, seed=0) for split in ("train", "eval")]
    corrupt = str(ssw60 / "images_inat" / f"{CORRUPT_ID}.jpg")
    holder = next(ds for ds in datasets if corrupt in _paths(ds))
    bad_index = [str(p) for p in holder.items].index(corrupt)
    # green (class 0, American Goldfinch) in ImageNet normalisation; JPEG is lossy, hence the tolerance
    green = (torch.tensor([0.0, 1.0, 0.0]) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    colours = {0: green}
    with caplog.at_level(logging.WARNING, logger="moevit.data"):
        for ds in datasets:
            for i in range(len(ds)):
                x, y = ds[i]
                assert x.shape == (3, S, S) and x.dtype == torch.float32 and isinstance(y, int)
                if y in colours:
                    assert torch.allclose(x.mean(dim=(1, 2)), colours[y], atol=0.1)
        substitute_x, substitute_y = holder[bad_index]  # a second access: no second warning
    n = len(holder)
    expected_x, expected_y = holder[(bad_index + 1) % n]  # the deterministic substitute: the next index
    assert substitute_y == expected_y and torch.equal(substitute_x, expected_x)
    assert [path for path, _ in holder.skipped] == [corrupt]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and corrupt in warnings[0].getMessage()
    other = next(ds for ds in datasets if ds is not holder)
    assert other.skipped == []
    assert "1 unreadable skipped" in holder.describe()


def test_find_unreadable_and_verify(ssw60: Path) -> None:
    corrupt = str(ssw60 / "images_inat" / f"{CORRUPT_ID}.jpg")
    all_images = sorted((ssw60 / "images_inat").glob("*.jpg"))
    found = find_unreadable(all_images + [ssw60 / "images_inat" / "missing.jpg"])
    assert [p for p, _ in found] == [corrupt, str(ssw60 / "images_inat" / "missing.jpg")]
    assert all(reason for _, reason in found)
    train = open_dataset(f"ssw60:{ssw60}", image_size=S, split="train", seed=0)
    evl = open_dataset(f"ssw60:{ssw60}", image_size=S, split="eval", seed=0)
    ds = train if corrupt in _paths(train) else evl
    n = len(ds)
    assert [p for p, _ in ds.verify()] == [corrupt] and len(ds) == n
    assert [p for p, _ in ds.verify(drop=True)] == [corrupt]
    assert len(ds) == n - 1 == len(ds.targets) and corrupt not in _paths(ds)
    assert ds.verify() == []


def _rewrite_csv(path: Path, drop_column: str | None = None, set_label: str | None = None) -> None:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    header = [c for c in rows[0] if c != drop_column]
    if set_label is not None:
        rows[-1]["label"] = set_label
    _write_csv(path, header, [[r[c] for c in header] for r in rows])


@pytest.mark.parametrize(
    ("file", "column"), [("images_inat.csv", "split"), ("images_inat.csv", "label"), ("taxa.csv", "common_name")]
)
def test_ssw60_missing_column_names_file_and_column(ssw60: Path, file: str, column: str) -> None:
    _rewrite_csv(ssw60 / file, drop_column=column)
    with pytest.raises(ValueError) as err:
        open_dataset(f"ssw60:{ssw60}", image_size=S, split="train")
    assert file in str(err.value) and f"missing column(s) {column}" in str(err.value)


def test_ssw60_label_not_in_taxa(ssw60: Path) -> None:
    _rewrite_csv(ssw60 / "images_inat.csv", set_label="77")
    with pytest.raises(ValueError) as err:
        open_dataset(f"ssw60:{ssw60}", image_size=S, split="test")
    message = str(err.value)
    assert "images_inat.csv" in message and "'77'" in message and "taxa.csv" in message


def test_ssw60_missing_files(tmp_path: Path, ssw60: Path) -> None:
    (ssw60 / "taxa.csv").unlink()
    with pytest.raises(ValueError, match=r"taxa\.csv: file not found"):
        open_dataset(f"ssw60:{ssw60}", image_size=S, split="train")
    with pytest.raises(ValueError, match="no images_inat/ directory"):
        open_dataset(f"ssw60:{tmp_path}", image_size=S, split="train")


# ------------------------------------------------------------------------------------------------ image folder


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "traps"
    colours = {"fox": (255, 0, 0), "deer": (0, 0, 255), "bear": (255, 255, 255)}
    for name, colour in colours.items():  # created out of order: classes must come back sorted
        (root / name / "night").mkdir(parents=True)
        for j in range(4):
            _solid(root / name / f"{j}.png", colour)
        _solid(root / name / "night" / "n.PNG", colour)  # nested and upper-case suffix: still an image
        (root / name / "notes.txt").write_text("not an image")
    _solid(root / "bear" / "grey.png", (255, 255, 255), mode="L")  # greyscale file: becomes 3 equal channels
    return root


def test_folder_classes_values_and_splits(folder: Path) -> None:
    spec = f"folder:{folder}"
    train = open_dataset(spec, image_size=S, split="train", seed=0)
    evl = open_dataset(spec, image_size=S, split="eval", seed=0)
    test = open_dataset(spec, image_size=S, split="test", seed=0)
    assert train.classes == ["bear", "deer", "fox"] and train.taxa is None
    assert len(train) + len(evl) == 3 * 5 + 1
    assert not _paths(train) & _paths(evl)
    assert all(Path(p).suffix.lower() == ".png" for p in _paths(train) | _paths(evl))
    assert _paths(test) == _paths(evl) and "test = eval" in test.describe()
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    expected = {0: torch.tensor([1.0, 1.0, 1.0]), 1: torch.tensor([0.0, 0.0, 1.0]), 2: torch.tensor([1.0, 0.0, 0.0])}
    for ds in (train, evl):
        for i in range(len(ds)):
            x, y = ds[i]
            assert x.shape == (3, S, S)
            # PNG is lossless and a solid image stays solid when resized: exact ImageNet-normalised values
            target = ((expected[y] - mean) / std).view(3, 1, 1).expand(3, S, S)
            assert torch.allclose(x, target, atol=1e-5), (ds.items[i], y)
    assert train.skipped == [] and evl.skipped == []


def test_folder_empty_class_and_no_classes(tmp_path: Path, folder: Path) -> None:
    (folder / "wolf").mkdir()
    (folder / "wolf" / "readme.txt").write_text("no pictures yet")
    with pytest.raises(ValueError) as err:
        open_dataset(f"folder:{folder}", image_size=S, split="train")
    assert str(folder / "wolf") in str(err.value) and "no images" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        open_dataset(f"folder:{tmp_path / 'empty'}", image_size=S, split="train")
    with pytest.raises(ValueError, match="is not a directory"):
        open_dataset(f"folder:{tmp_path / 'nowhere'}", image_size=S, split="train")


# ------------------------------------------------------------------------------------------- digits, synthetic


def test_digits() -> None:
    train = open_dataset("digits", image_size=S, split="train", seed=0)
    evl = open_dataset("digits", image_size=S, split="eval", seed=0)
    test = open_dataset("digits", image_size=S, split="test", seed=0)
    assert train.classes == [str(d) for d in range(10)]
    assert len(train) + len(evl) == 1797 and len(evl) == 359
    assert not set(train.items) & set(evl.items)
    assert test.items == evl.items and test.targets == evl.targets
    assert sorted(set(train.targets)) == list(range(10))
    x, y = train[0]
    assert x.shape == (3, S, S) and x.dtype == torch.float32 and 0 <= y < 10
    raw = denormalize(x)
    assert torch.allclose(raw[0], raw[1], atol=1e-5) and torch.allclose(raw[0], raw[2], atol=1e-5)
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5 and raw.max() > 0.5  # ink present, values in range


def test_synthetic_deterministic_and_learnable() -> None:
    spec = "synthetic:classes=4,per_class=25,seed=7,size=32"
    a = open_dataset(spec, image_size=S, split="train", seed=0)
    b = open_dataset(spec, image_size=S, split="train", seed=0)
    assert len(a) == 80 and a.classes == ["class0", "class1", "class2", "class3"]
    assert all(torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1] for i in range(len(a)))
    other = open_dataset("synthetic:classes=4,per_class=25,seed=8,size=32", image_size=S, split="train", seed=0)
    assert not torch.equal(a[0][0], other[0][0])
    x, _ = a[0]
    assert x.shape == (3, S, S) and x.dtype == torch.float32
    raw = denormalize(x)
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    assert raw.std(dim=(1, 2)).max() > 0.15  # a pattern (stripes, blob), not a flat colour plus noise
    # distinct per class: nearest class-mean of the raw pixels already separates the eval holdout
    evl = open_dataset(spec, image_size=S, split="eval", seed=0)
    features = torch.stack([a[i][0].mean(dim=(1, 2)) for i in range(len(a))])
    labels = torch.tensor(a.targets)
    centroids = torch.stack([features[labels == c].mean(0) for c in range(4)])
    hits = sum(int(torch.cdist(evl[i][0].mean(dim=(1, 2))[None], centroids).argmin()) == evl[i][1] for i in range(20))
    assert hits >= 18


def test_train_transform_and_flip_only_on_training_splits() -> None:
    spec = "synthetic:classes=2,per_class=10,size=16"
    plain = open_dataset(spec, image_size=S, split="train")
    mirrored = open_dataset(spec, image_size=S, split="train", train_transform=lambda t: t.flip(-1))
    x, _ = plain[0]
    assert torch.equal(mirrored[0][0], x.flip(-1))
    ignored = open_dataset(spec, image_size=S, split="eval", train_transform=lambda t: t.flip(-1), flip=True)
    assert ignored.transform is None
    flipping = open_dataset(spec, image_size=S, split="search-train", flip=True)
    unflipped, _ = open_dataset(spec, image_size=S, split="search-train")[0]
    seen = []
    for _ in range(20):
        y, _ = flipping[0]
        assert torch.equal(y, unflipped) or torch.equal(y, unflipped.flip(-1))
        seen.append(torch.equal(y, unflipped))
    assert set(seen) == {True, False}  # p = 0.5: sometimes as is, sometimes mirrored


def test_search_train_and_val_carved_from_train() -> None:
    spec = "synthetic:classes=3,per_class=20,size=8"
    kwargs = dict(image_size=S, seed=2)
    train = set(open_dataset(spec, split="train", **kwargs).items)
    search = set(open_dataset(spec, split="search-train", **kwargs).items)
    val = set(open_dataset(spec, split="val", **kwargs).items)
    evl = set(open_dataset(spec, split="eval", **kwargs).items)
    assert val and search and not val & search and val | search == train and not val & evl


def test_make_loader_seeded() -> None:
    ds = open_dataset("synthetic:classes=3,per_class=10,size=8", image_size=S, split="train")

    def labels(seed: int) -> list[int]:
        return [int(y) for _, ys in make_loader(ds, batch_size=4, shuffle=True, seed=seed) for y in ys]

    assert labels(1) == labels(1) and sorted(labels(1)) == sorted(ds.targets)
    orders = {tuple(labels(s)) for s in range(5)}
    assert len(orders) > 1
    xb, yb = next(iter(make_loader(ds, batch_size=4, shuffle=False, seed=0)))
    assert xb.shape == (4, 3, S, S) and yb.dtype == torch.int64
    assert np.array_equal(yb.numpy(), np.array(ds.targets[:4]))


def test_a_decompression_bomb_is_refused_from_its_header():
    """69 bytes of PNG declaring 1 x 67,108,864 RGB pixels: refused before decoding (it would take ~2.4 GB)."""
    import time

    from moevit.data import UnreadableImageError, load_image

    bomb = bytes.fromhex("89504e470d0a1a0a0000000d494844520000000104000000080200000006c7d1770000000c49444154789c6360a0"
                         "3d00000064000186643c350000000049454e44ae426082")
    t0 = time.monotonic()
    with pytest.raises(UnreadableImageError, match="pixel limit"):
        load_image(bomb, 64)
    assert time.monotonic() - t0 < 1.0


def test_a_data_subset_keeps_a_seeded_share_of_every_class():
    full = open_dataset("synthetic:classes=3,per_class=20,size=16", image_size=16, split="train", seed=0)
    half = full.subset(0.5, seed=0)
    counts = full.class_counts()
    assert half.class_counts() == [math.floor(c * 0.5 + 0.5) for c in counts]
    assert set(half.items) <= set(full.items) and half.subset(1.0, seed=3) is half
    assert half.items == full.subset(0.5, seed=0).items  # the same share for every training seed
    assert half.items != full.subset(0.5, seed=1).items
    assert full.subset(0.01, seed=0).class_counts() == [1, 1, 1]  # never a class left out
    assert "a seeded 0.5 of each class" in half.describe()
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="data fraction must be in"):
            full.subset(bad, seed=0)
