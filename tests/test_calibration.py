"""Calibrated confidence and the blank filter: temperature scaling fitted on val and stored in the checkpoint,
the ECE and reliability diagram, the blank threshold for an animal recall, and blank / person / vehicle images in
MegaDetector output (synthetic models and labels that include 'blank')."""

from __future__ import annotations

import json
import math

import pytest
import torch
from moevit.coordinator import results as res

from moevit.calibration import (
    Calibration,
    blank_threshold_for_recall,
    expected_calibration_error,
    fit_temperature,
    read_calibration,
    write_calibration,
)
from moevit.checkpoint import load_checkpoint, model_fingerprint, save_checkpoint
from tests.deploy import small_moe_model
from tests.test_results import check_megadetector

LABELS = ("blank", "red fox", "person", "vehicle")


def _overconfident(n: int = 4000, classes: int = 5, scale: float = 3.0, seed: int = 0):
    """Labels drawn from softmax(z): z is calibrated by construction, so ``scale * z`` is over-confident by T=scale."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, classes, generator=g) * 1.5
    y = torch.multinomial(z.softmax(-1), 1, generator=g).squeeze(1)
    return z * scale, y


def test_temperature_scaling_recovers_the_over_confidence_and_lowers_ece():
    logits, y = _overconfident()
    t = fit_temperature(logits, y)
    assert t == pytest.approx(3.0, rel=0.1)
    before = expected_calibration_error(logits.softmax(-1), y)
    after = expected_calibration_error((logits / t).softmax(-1), y)
    assert before > 0.1 and after < 0.03
    # top-1 never changes
    assert torch.equal(logits.argmax(-1), (logits / t).argmax(-1))


def test_ece_by_hand():
    # 4 images, all with confidence 0.8 (one bin), 2 right: |0.5 - 0.8| = 0.3
    probs = torch.tensor([[0.8, 0.2]] * 4)
    assert expected_calibration_error(probs, torch.tensor([0, 0, 1, 1])) == pytest.approx(0.3)
    # two bins: 0.9 (both right) and 0.6 (one right of two): (2/4)*0.1 + (2/4)*0.1
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    assert expected_calibration_error(probs, torch.tensor([0, 0, 0, 1])) == pytest.approx(0.1)


def test_blank_threshold_keeps_the_asked_animal_recall():
    # 25 animal images with P(blank) 0.00, 0.04, ..., 0.96; at 96 % recall 24 must stay: t just above 0.92
    p = torch.arange(25, dtype=torch.float64) * 0.04
    animal = torch.ones(25, dtype=torch.bool)
    t = blank_threshold_for_recall(p, animal, 0.96)
    assert 0.92 < t < 0.92 + 1e-6
    assert float((p[animal] < t).double().mean()) == pytest.approx(24 / 25)
    # blanks do not move it; recall 1.0 keeps every animal
    p2 = torch.cat([p, torch.full((10,), 0.99)])
    animal2 = torch.cat([animal, torch.zeros(10, dtype=torch.bool)])
    assert blank_threshold_for_recall(p2, animal2, 0.96) == t
    assert blank_threshold_for_recall(p2, animal2, 1.0) > 0.96
    with pytest.raises(ValueError, match="no animal images"):
        blank_threshold_for_recall(p, torch.zeros(25, dtype=torch.bool))


def test_calibration_lives_in_the_checkpoint_and_keeps_the_fingerprint(tmp_path):
    model = small_moe_model(layers=(8,), num_experts=2, num_classes=4, labels=LABELS, image_size=32,
                            calib_size=32)
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    assert read_calibration(path) == Calibration(blank_class=0)  # default: blank when it is the top class
    cal = Calibration(1.7, 0, 0.42, "synthetic val", {"ece_val_after": 0.01})
    write_calibration(path, cal)
    assert read_calibration(path) == cal
    assert model_fingerprint(load_checkpoint(path)) == model_fingerprint(model)
    probs = cal.probs(torch.tensor([[2.0, 1.0, 0.0, 0.0]]))
    assert probs[0, 0] == pytest.approx(math.exp(2 / 1.7) / sum(math.exp(v / 1.7) for v in (2, 1, 0, 0)))
    assert cal.is_blank(torch.tensor([[0.45, 0.5, 0.03, 0.02], [0.41, 0.5, 0.05, 0.04]])).tolist() == [True, False]


def test_moe_calibrate_fits_on_val_and_reports_on_eval(tmp_path, capsys):
    from moevit.cli.calibrate import main

    model = small_moe_model(layers=(8,), num_experts=2, num_classes=4, labels=LABELS, image_size=32,
                            calib_size=32)
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    rc = main(["--model", str(path), "--data", "synthetic:classes=4,per_class=30,size=32", "--plot",
               str(tmp_path / "rel.png"), "--json", "--threads", "1"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    cal = read_calibration(path)
    assert cal.temperature == pytest.approx(report["temperature"], abs=1e-4) and cal.blank_class == 0
    assert cal.blank_threshold == pytest.approx(report["blank_threshold"], abs=1e-6)
    assert report["val_animal_recall"] >= 0.96
    assert report["ece_val_after"] <= report["ece_val_before"] + 1e-9  # fitted on val: never worse there
    assert (tmp_path / "rel.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["--model", str(path), "--data", "synthetic:classes=4", "--recall", "1.5"]) == 2


# ---------------------------------------------------------------------------------- MegaDetector output


def _rec(file, top, blank=None, t="2024-05-01T06:00:00"):
    r = {"file": file, "model": "fp", "prediction": top[0][0], "label": LABELS[top[0][0]], "confidence": top[0][1],
         "top5": [list(p) for p in top], "degraded": False, "datetime": t, "time_source": "exif:DateTimeOriginal",
         "time_flags": []}
    if blank is not None:
        r["blank"] = blank
    return r


def test_blank_person_vehicle_in_megadetector_output():
    records = [_rec("c/empty.jpg", [(0, 0.9), (1, 0.1)], blank=True),
               _rec("c/fox.jpg", [(1, 0.7), (0, 0.2), (2, 0.1)], blank=False, t="2024-05-01T06:00:10"),
               _rec("c/walker.jpg", [(2, 0.6), (0, 0.3), (1, 0.1)], blank=False, t="2024-05-01T09:00:00"),
               _rec("c/truck.jpg", [(0, 0.5), (3, 0.45), (1, 0.05)], blank=False, t="2024-05-01T12:00:00")]
    doc = res.build_megadetector(records, labels=LABELS, fingerprint="fp")
    check_megadetector(doc, whole_image=False)
    assert doc["detection_categories"] == {"1": "animal", "2": "person", "3": "vehicle"}
    ims = {im["file"]: im for im in doc["images"]}
    assert ims["c/empty.jpg"]["detections"] == [] and ims["c/empty.jpg"]["moevit_classifications"][0] == ["0", 0.9]
    fox, walker, truck = (ims[f"c/{n}.jpg"]["detections"][0] for n in ("fox", "walker", "truck"))
    assert (fox["category"], fox["conf"]) == ("1", 0.8)  # conf = 1 - P(blank)
    assert (walker["category"], walker["conf"]) == ("2", 0.7)
    # blank top-1 but under the threshold (not filtered): the top non-blank class names the category
    assert (truck["category"], truck["conf"]) == ("3", 0.5)
    # the burst empty + fox is labelled by its non-blank frame
    assert ims["c/empty.jpg"]["seq_id"] == ims["c/fox.jpg"]["seq_id"]
    assert ims["c/empty.jpg"]["moevit_sequence_classification"][0] == "1"
    # resume reads the records back, blank flag and all
    assert res.records_from_megadetector(doc) == [{k: v for k, v in r.items() if k not in ("time_source",
                                                  "time_flags", "datetime")} | {
        k: r[k] for k in ("datetime", "time_source", "time_flags")} for r in records]


def test_models_without_special_classes_keep_the_animal_only_output():
    doc = res.build_megadetector([_rec("a.jpg", [(1, 0.7), (0, 0.3)])], labels=("cat", "dog"), fingerprint="fp")
    assert doc["detection_categories"] == {"1": "animal"}
    check_megadetector(doc)


class _FakeRuntime:
    """What cli._classify uses of a SplitRuntime: classify(), fingerprint, calibration."""

    def __init__(self, logits, calibration):
        self.logits, self.calibration, self.fingerprint = logits, calibration, "fp"

    def classify(self, x):
        from moevit.coordinator.runtime import BatchResult

        n = len(x)
        return BatchResult(logits=self.logits[:n], degraded=torch.zeros(n, dtype=torch.bool), failures=[],
                           seconds=0.01)


def test_the_batch_run_applies_the_temperature_and_the_blank_threshold():
    from moevit.coordinator.cli import _classify, _Item

    logits = torch.tensor([[2.0, 1.0, 0.0, 0.0], [0.5, 1.0, 0.0, 0.0]])
    cal = Calibration(2.0, 0, 0.3)
    items = [_Item(f"c/{i}.jpg", lambda: (torch.zeros(3, 8, 8), None), None) for i in range(2)]
    recs = _classify(_FakeRuntime(logits, cal), items, list(LABELS), {}, [])
    p = (logits / 2.0).softmax(-1)
    assert [r["confidence"] for r in recs] == [round(float(p[0].max()), 4), round(float(p[1].max()), 4)]
    # P(blank) 0.45 and 0.27 after T = 2: the first is filtered at 0.3, the second kept
    assert [r["blank"] for r in recs] == [True, False]


def test_moe_eval_reports_the_stored_calibration(tmp_path, capsys):
    from moevit.cli.eval import main as eval_main

    model = small_moe_model(layers=(8,), num_experts=2, num_classes=4, labels=LABELS, image_size=32,
                            calib_size=32)
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    data = ["--data", "synthetic:classes=4,per_class=30,size=32", "--threads", "1", "--json"]
    assert eval_main(["--model", str(path), *data]) == 0
    assert "calibration" not in json.loads(capsys.readouterr().out)  # not calibrated: nothing to report
    write_calibration(path, Calibration(2.5, 0, 0.3, "synthetic val"))
    assert eval_main(["--model", str(path), *data]) == 0
    c = json.loads(capsys.readouterr().out)["calibration"]
    assert c["temperature"] == 2.5 and c["fitted_on"] == "synthetic val" and c["blank_threshold"] == 0.3
    assert 0 <= c["ece_before"] <= 1 and 0 <= c["ece_after"] <= 1
    assert 0 <= c["animal_recall"] <= 1 and 0 <= c["blanks_filtered"] <= 1
