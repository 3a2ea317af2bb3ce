"""The scenes benchmark: deterministic generation, class balance, blank share, burst-wise splits, JPEG files whose
EXIF times the project's own metadata reader reads and groups into the bursts, and generation speed."""

from __future__ import annotations

import csv
import time
from datetime import datetime

import numpy as np
import pytest
from moevit.coordinator.fieldmeta import SOURCE_EXIF_ORIGINAL, assign_sequences, read_image_meta
from PIL import Image

from moevit.cli.scenes import main as scenes_main
from moevit.data import open_dataset, parse_spec
from moevit.scenes import BLANK, SHAPE_TRAITS, SPECIES, SceneSpec, burst_layout, class_names, generate, morph_of, render


def test_same_spec_same_pixels_and_another_seed_differs():
    spec = SceneSpec(classes=3, per_class=4, size=48, seed=5)
    a, fa = generate(spec)
    b, fb = generate(spec)
    assert fa == fb and np.array_equal(a, b)
    c, _ = generate(SceneSpec(classes=3, per_class=4, size=48, seed=6))
    assert not np.array_equal(a, c)
    # one frame rendered alone (lazy datasets) is the same as in the whole set
    assert np.array_equal(render(spec, fa[5]), a[5])


@pytest.mark.slow
def test_rendering_in_several_processes_gives_the_same_pixels():
    spec = SceneSpec(classes=4, per_class=60, size=32, seed=2)
    one, frames = generate(spec)
    assert len(frames) >= 256  # the size from which generate() uses processes
    two, frames2 = generate(spec, workers=2)
    assert frames2 == frames and np.array_equal(one, two)
    assert str(parse_spec("scenes:per_class=20,workers=2")).endswith("workers=2")


def test_class_balance_and_blank_share():
    spec = SceneSpec(classes=4, per_class=17, size=32)
    counts = {}
    for f in burst_layout(spec):
        counts[f.name] = counts.get(f.name, 0) + 1
    assert counts == {name: 17 for name in class_names(spec)}  # default: blank as many as one species
    half = SceneSpec(classes=4, per_class=17, size=32, blank=0.5)
    frames = burst_layout(half)
    assert sum(f.name == BLANK for f in frames) == 68 == sum(f.name != BLANK for f in frames)
    none = SceneSpec(classes=4, per_class=17, size=32, blank=0.0)
    assert BLANK not in class_names(none)


def test_bursts_have_3_to_5_frames_and_move():
    spec = SceneSpec(classes=2, per_class=30, size=64)
    frames = burst_layout(spec)
    sizes: dict[int, int] = {}
    for f in frames:
        sizes[f.burst] = sizes.get(f.burst, 0) + 1
    lengths = list(sizes.values())
    assert all(3 <= n <= 5 for n in lengths[:-1]) and max(lengths) <= 5
    images, _ = generate(spec)
    first = [i for i, f in enumerate(frames) if f.name != BLANK and f.frame == 0][0]
    step = np.abs(images[first].astype(int) - images[first + 1].astype(int)).mean()
    other = np.abs(images[first].astype(int) - images[first + 5].astype(int)).mean()
    assert 0 < step < other  # frames of a burst differ a little, another burst a lot


def test_species_are_distinct_and_named_ones_outnumber_ten():
    assert len(SPECIES) >= 10 and len({s.name for s in SPECIES}) == len(SPECIES)
    with pytest.raises(ValueError, match="named species"):
        SceneSpec(classes=len(SPECIES) + 1)
    assert len(class_names(SceneSpec(classes=30, zoo=2))) == 31  # random species for pretraining


def test_crossed_morphs_tell_a_pair_apart_only_by_shape_and_coat_together():
    spec = SceneSpec(classes=3, morphs=1)
    sp = list(SPECIES[:3])
    fox, jackal = sp[0], sp[1]
    shape = lambda s: tuple(getattr(s, k) for k in SHAPE_TRAITS)  # noqa: E731
    coat = lambda s: (s.pattern, s.base, s.accent, s.belly, s.tail_tip)  # noqa: E731
    looks = {(i, second): morph_of(spec, sp, i, second) for i in range(3) for second in (False, True)}
    # fox comes as the fox or as the jackal; jackal as fox-shaped with a jackal's coat or the reverse
    assert (shape(looks[0, False]), coat(looks[0, False])) == (shape(fox), coat(fox))
    assert (shape(looks[0, True]), coat(looks[0, True])) == (shape(jackal), coat(jackal))
    assert (shape(looks[1, False]), coat(looks[1, False])) == (shape(fox), coat(jackal))
    assert (shape(looks[1, True]), coat(looks[1, True])) == (shape(jackal), coat(fox))
    # so each shape and each coat belongs to both species; only the combination names one
    for part in (shape, coat):
        assert {part(looks[0, m]) for m in (False, True)} == {part(looks[1, m]) for m in (False, True)}
    assert len({(shape(v), coat(v)) for k, v in looks.items() if k[0] < 2}) == 4
    assert looks[0, True].name == "red_fox" and looks[1, False].name == "jackal"
    assert looks[2, False] == looks[2, True] == sp[2]  # the odd class out keeps one look
    assert morph_of(SceneSpec(classes=3), sp, 1, True) == jackal  # without morphs nothing changes
    # both morphs occur, burst by burst, and the spec round-trips
    opts = parse_spec("scenes:classes=2,per_class=40,size=32,morphs=1").scenes
    assert str(opts).endswith("morphs=1") and str(parse_spec(str(opts)).scenes) == str(opts)
    plain = parse_spec("scenes:classes=2,per_class=40,size=32").scenes
    a, frames = generate(opts.scene)
    b, _ = generate(plain.scene)
    fox_bursts = {f.burst for f in frames if f.name == "red_fox"}
    same = [np.array_equal(a[i], b[i]) for i, f in enumerate(frames) if f.burst in fox_bursts and f.frame == 0]
    assert 0 < sum(same) < len(same)  # some fox bursts drawn as the fox (same pixels), others as the jackal
    with pytest.raises(ValueError, match="morphs"):
        parse_spec("scenes:morphs=2")
    with pytest.raises(ValueError, match="classes >= 2"):
        SceneSpec(classes=1, morphs=1)


def test_spec_parsing_and_errors():
    spec = parse_spec("scenes:classes=5,per_class=12,size=64,blank=0.5,seed=3,split_seed=7")
    assert spec.kind == "scenes" and spec.scenes.scene.classes == 5 and spec.scenes.split_seed == 7
    assert str(parse_spec(str(spec))) == str(spec)
    for bad, msg in [("scenes:colour=3", "unknown scenes option"), ("scenes:classes=x", "not an integer"),
                     ("scenes:blank=1.5", "blank"), ("scenes:size", "not key=value"),
                     ("scenes:seed=1,seed=2", "given twice"), ("scenes:workers=0", "workers must be >= 1")]:
        with pytest.raises(ValueError, match=msg):
            parse_spec(bad)


def test_splits_are_drawn_over_bursts_per_class_and_fixed_by_split_seed():
    spec = "scenes:classes=4,per_class=40,size=32,split_seed=3"
    parts = {s: open_dataset(spec, image_size=32, split=s, seed=99) for s in ("search-train", "val", "eval")}
    bursts = {s: {d.items[i] for i in range(len(d))} for s, d in parts.items()}
    frames = burst_layout(parse_spec(spec).scenes.scene)
    of = {s: {frames[i].burst for i in idx} for s, idx in bursts.items()}
    assert not (of["search-train"] & of["val"]) and not (of["search-train"] & of["eval"])
    assert not (of["val"] & of["eval"])
    assert all(c > 0 for d in parts.values() for c in d.class_counts())  # every class in every split
    again = open_dataset(spec, image_size=32, split="eval", seed=0)  # split_seed wins over the caller's seed
    assert again.items == parts["eval"].items
    x, y = parts["eval"][0]
    assert x.shape == (3, 32, 32) and 0 <= y < 5


def test_written_jpegs_carry_exif_times_that_group_into_bursts(tmp_path):
    out = tmp_path / "scenes"
    assert scenes_main(["--out", str(out), "--classes", "3", "--per-class", "9", "--size", "64"]) == 0
    with (out / "manifest.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 36
    items = []
    for row in rows:
        meta = read_image_meta(out / row["file"])
        assert meta.time_source == SOURCE_EXIF_ORIGINAL and meta.serial == "SCN0001"
        assert meta.datetime == row["datetime"]
        items.append((row["file"], row["file"].split("/")[0], datetime.fromisoformat(meta.datetime)))
    seq = assign_sequences(items, 60.0)
    by_seq: dict[str, set[str]] = {}
    for row in rows:
        by_seq.setdefault(seq[row["file"]].seq_id, set()).add(row["burst"])
    assert all(len(b) == 1 for b in by_seq.values())  # no sequence mixes bursts
    assert len(by_seq) == len({r["burst"] for r in rows})  # and every burst is one sequence
    folder = open_dataset(f"folder:{out}", image_size=64, split="train")
    assert folder.classes == class_names(SceneSpec(classes=3, per_class=9, size=64))
    assert scenes_main(["--out", str(out)]) == 2  # refuses to write into a non-empty folder
    crossed_out = tmp_path / "crossed"
    assert scenes_main(["--out", str(crossed_out), "--classes", "2", "--per-class", "6", "--size", "64",
                        "--morphs", "1", "--quality", "100"]) == 0
    crossed, frames = generate(SceneSpec(classes=2, per_class=6, size=64, morphs=1))
    plain, _ = generate(SceneSpec(classes=2, per_class=6, size=64))
    err = {"crossed": [], "plain": []}
    for i, f in enumerate(frames):
        if f.name == "jackal":  # every jackal burst is drawn in a crossed morph
            written = np.asarray(Image.open(crossed_out / "jackal" / f"jackal_{f.class_burst:04d}_{f.frame}.jpg"))
            err["crossed"].append(np.abs(written.astype(int) - crossed[i]).mean())
            err["plain"].append(np.abs(written.astype(int) - plain[i]).mean())
    assert np.mean(err["crossed"]) < np.mean(err["plain"]) - 0.5  # the files hold the crossed frames (JPEG loss)


@pytest.mark.slow
def test_2000_images_at_128px_take_under_a_minute_of_cpu():
    # CPU time of this process, not wall time: the test machine is shared, and wall time would measure the others
    t0 = time.process_time()
    images, frames = generate(SceneSpec(classes=10, per_class=182, size=128, seed=11))
    cpu = time.process_time() - t0
    assert len(frames) == 2002 and images.shape == (2002, 128, 128, 3)
    assert cpu < 60.0, f"{cpu:.1f} s of CPU for 2002 images"
