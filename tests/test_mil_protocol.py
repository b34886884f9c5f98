"""MIL protocol without Ray: fold plans (stratified, patient-level, labels-file folds), metrics, epoch
selection, the pooled logistic-regression baseline, and the errors a labelled bag directory gives when it
cannot be trained."""

from __future__ import annotations

import logging
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from slidestream.pipelines.features import BagMeta, FeatureBagError, FeatureBags, bag_table, write_bag
from slidestream.testing.bags import write_bags
from slidestream.trainers.data import LabelledBags, TrainDataError
from slidestream.trainers.metrics import choose_threshold, classification_metrics, summarise
from slidestream.trainers.mil.loop import EarlyStopping, epoch_selector
from slidestream.trainers.mil.pooled_baseline import fit_pooled_split, pooled_baseline, pooled_features
from slidestream.trainers.mil.runner import format_table
from slidestream.trainers.splits import make_splits


@pytest.fixture(scope="module")
def bags(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("protocol-bags")
    labels = write_bags(str(root), n_slides=30, dim=16, n_instances=(4, 8))
    return str(root / "features"), labels


def _write_labels(path: Path, rows: list[tuple], header: str = "slide_id,label") -> str:
    path.write_text(header + "\n" + "\n".join(",".join(str(v) for v in row) for row in rows) + "\n")
    return str(path)


def _labels_of(labels: str) -> list[tuple[str, str]]:
    lines = Path(labels).read_text().split()[1:]
    return [tuple(line.split(",")[:2]) for line in lines]


# -- fold plans -------------------------------------------------------------------------------------------


def test_every_slide_is_tested_once_per_seed_and_parts_are_disjoint(bags):
    data = LabelledBags.open(*bags)
    splits = make_splits(data, folds=3, seeds=[0, 1], val_frac=0.25)
    assert [(s.seed, s.fold) for s in splits] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    target = data.target_of()
    for seed in (0, 1):
        mine = [s for s in splits if s.seed == seed]
        tested = Counter(sid for s in mine for sid in s.test)
        assert set(tested) == set(data.slide_ids) and set(tested.values()) == {1}
        for s in mine:
            parts = [set(s.train), set(s.val), set(s.test)]
            assert sum(map(len, parts)) == len(data.slide_ids)
            assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
            for part in parts:  # stratified: every part holds both classes
                assert {target[sid] for sid in part} == {0, 1}
            assert 0.1 < len(s.val) / (len(s.train) + len(s.val)) < 0.4
    by_seed = {seed: [sorted(s.test) for s in splits if s.seed == seed] for seed in (0, 1)}
    assert by_seed[0] != by_seed[1], "another seed must shuffle the folds differently"
    again = make_splits(data, folds=3, seeds=[0, 1], val_frac=0.25)
    assert again == splits, "the plan is a pure function of data and seeds"


def test_no_patient_straddles_parts(tmp_path):
    labels = write_bags(str(tmp_path), n_slides=36, dim=16, n_instances=(4, 6))
    # Patients of three slides each, mixing classes: a slide-level split would separate them.
    rows = [(sid, label, f"patient-{i // 3:02d}") for i, (sid, label) in enumerate(_labels_of(labels))]
    labels = _write_labels(tmp_path / "patients.csv", rows, "slide_id,label,patient_id")
    data = LabelledBags.open(str(tmp_path / "features"), labels)
    patient = dict(zip(data.slide_ids, data.patients, strict=True))
    splits = make_splits(data, folds=3, seeds=[0, 3], val_frac=0.25)
    for s in splits:
        groups = [{patient[sid] for sid in part} for part in (s.train, s.val, s.test)]
        assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2]), s
    for seed in (0, 3):
        tested = Counter(sid for s in splits if s.seed == seed for sid in s.test)
        assert set(tested) == set(data.slide_ids) and set(tested.values()) == {1}


def test_fold_column_of_the_labels_file_is_honoured(bags, tmp_path):
    features, labels = bags
    rows = [(sid, label, "abc"[i % 6 // 2]) for i, (sid, label) in enumerate(_labels_of(labels))]
    labels = _write_labels(tmp_path / "folds.csv", rows, "slide_id,label,fold")
    data = LabelledBags.open(features, labels)
    given = {f: {sid for sid, _, g in rows if g == f} for f in "abc"}
    splits = make_splits(data, folds=5, seeds=[0], val_frac=0.25)  # folds=5 is ignored
    assert [set(s.test) for s in splits] == [given["a"], given["b"], given["c"]]
    for s in splits:
        assert set(s.train) | set(s.val) == set(data.slide_ids) - set(s.test)
        assert not set(s.train) & set(s.val) and s.val


def test_a_fold_part_without_a_class_is_an_error_naming_fold_and_part(bags, tmp_path):
    features, labels = bags
    rows = _labels_of(labels)
    # Fold "c" (the third) holds only normal slides: its test part cannot be judged.
    folds = [
        (sid, label, "c" if label == "normal" and i % 3 == 0 else "ab"[i // 2 % 2])
        for i, (sid, label) in enumerate(rows)
    ]
    data = LabelledBags.open(features, _write_labels(tmp_path / "folds.csv", folds, "slide_id,label,fold"))
    with pytest.raises(
        TrainDataError,
        match=r"fold 2 \(seed 0\): the test part \(\d+ slides\) has no slide "
        r"of class\(es\) \['tumor'\]",
    ):
        make_splits(data, folds=3, seeds=[0], val_frac=0.25)


def test_fewer_slides_of_a_class_than_folds_is_an_error(bags, tmp_path):
    features, labels = bags
    rows = [(sid, "tumor" if i in (1, 3) else "normal") for i, (sid, _) in enumerate(_labels_of(labels))]
    data = LabelledBags.open(features, _write_labels(tmp_path / "two-positives.csv", rows))
    with pytest.raises(
        TrainDataError,
        match=r"two-positives.csv: 3 folds need 3 slides of each class, one class "
        r"has 2",
    ):
        make_splits(data, folds=3, seeds=[0], val_frac=0.25)


def test_too_few_patients_for_the_folds_is_an_error(bags, tmp_path):
    features, labels = bags
    rows = [(sid, label, f"p{i % 2}") for i, (sid, label) in enumerate(_labels_of(labels))]
    labels = _write_labels(tmp_path / "two-patients.csv", rows, "slide_id,label,patient_id")
    with pytest.raises(TrainDataError, match="3 folds need at least 3 patients, have 2"):
        make_splits(LabelledBags.open(features, labels), folds=3, seeds=[0], val_frac=0.25)


# -- labelled bags: what is trained, what is refused ---------------------------------------------------------


def test_bags_without_labels_are_left_out_with_a_warning(bags, tmp_path, caplog):
    features, labels = bags
    rows = _labels_of(labels)
    labels = _write_labels(tmp_path / "fewer.csv", rows[:-4])
    with caplog.at_level(logging.WARNING):
        data = LabelledBags.open(features, labels)
    left_out = {sid for sid, _ in rows[-4:]}
    assert not left_out & set(data.slide_ids)
    assert len(data.slide_ids) == len(rows) - 4
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("4 feature bag(s)" in m and "no label" in m and rows[-1][0] in m for m in warning), warning
    splits = make_splits(data, folds=2, seeds=[0], val_frac=0.25)
    assert not left_out & {sid for s in splits for sid in (*s.train, *s.val, *s.test)}


def test_labels_naming_slides_without_bags_is_an_error(bags, tmp_path):
    features, labels = bags
    rows = [*_labels_of(labels), ("slide-missing", "tumor")]
    with pytest.raises(FeatureBagError, match=r"names 1 slide\(s\) with no feature bag.*slide-missing"):
        LabelledBags.open(features, _write_labels(tmp_path / "extra.csv", rows))


def test_feature_dimension_mismatch_is_an_error_naming_both_slides(bags, tmp_path):
    features, labels = bags
    other = tmp_path / "features"
    other.mkdir()
    for path in sorted(Path(features).glob("*.parquet")):
        (other / path.name).write_bytes(path.read_bytes())
    meta = BagMeta(encoder="synthetic", dim=24, mpp=0.5, tile_px=256, code_version="test")
    feats = np.ones((5, 24), np.float32)
    write_bag(str(other / "slide-007.parquet"), bag_table(np.arange(5), np.arange(5), feats, meta))
    with pytest.raises(FeatureBagError, match=r"feature dimension differs.*D=16.*slide-007 has D=24"):
        LabelledBags.open(str(other), labels)


def test_label_values_single_class_and_class_order(bags, tmp_path):
    features, labels = bags
    rows = _labels_of(labels)
    one = _write_labels(tmp_path / "one.csv", [(sid, "tumor") for sid, _ in rows])
    with pytest.raises(TrainDataError, match="single class"):
        LabelledBags.open(features, one)
    with pytest.raises(TrainDataError, match=r"label\(s\) \['tumor'\] not in train.classes"):
        LabelledBags.open(features, labels, classes=["normal", "benign"])
    data = LabelledBags.open(features, labels, classes=["tumor", "normal"])  # the user's order wins
    assert data.classes == ["tumor", "normal"]
    assert all(data.targets[i] == (0 if lab == "tumor" else 1) for i, (_, lab) in enumerate(rows))
    numeric = _write_labels(
        tmp_path / "numeric.csv", [(sid, 10 if i % 2 else 2) for i, (sid, _) in enumerate(rows)]
    )
    assert LabelledBags.open(features, numeric).classes == ["2", "10"]  # natural, not string, order


# -- metrics -----------------------------------------------------------------------------------------------


def test_threshold_is_chosen_on_validation_by_youden_j():
    # J is best cutting between 0.6 and 0.7 (both positives in, one negative out): the middle of the gap
    assert choose_threshold([0, 0, 1, 1], [0.1, 0.6, 0.7, 0.9]) == pytest.approx(0.65)
    # cleanly separated: the cut sits midway, so a test positive at 0.9 is not called negative
    separated = choose_threshold([0, 1, 0, 1], [0.02, 0.99, 0.01, 0.98])
    assert separated == pytest.approx(0.5) and 0.9 >= separated > 0.02
    # ties in score: the cut never falls between two equal scores
    assert choose_threshold([0, 1, 1, 0], [0.2, 0.8, 0.8, 0.4]) == pytest.approx(0.6)
    assert choose_threshold([1, 1, 1], [0.2, 0.3, 0.9]) == 0.5  # one class: no ROC, the default


def test_binary_metrics_at_the_chosen_threshold_and_at_one_half():
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.1, 0.9]])
    got = classification_metrics([0, 0, 1, 1], probs, ["normal", "tumor"], threshold=0.7)
    assert got["auc"] == 1.0 and got["acc"] == 1.0 and got["f1"] == 1.0 and got["threshold"] == 0.7
    assert got["acc_at_0.5"] == 0.75
    assert got["f1_at_0.5"] == pytest.approx(0.8)  # precision 2/3, recall 1
    single = classification_metrics([1, 1], probs[:2], ["normal", "tumor"])
    assert math.isnan(single["auc"]) and single["threshold"] == 0.5


def test_multiclass_metrics_are_macro_averages():
    rng = np.random.default_rng(0)
    y = np.array([0, 1, 2] * 5)
    probs = rng.dirichlet(np.ones(3), size=15)
    got = classification_metrics(y, probs, ["a", "b", "c"])
    assert got["auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"))
    assert got["auc"] == pytest.approx(np.mean([got["auc_a"], got["auc_b"], got["auc_c"]]))
    assert got["acc"] == pytest.approx(float(np.mean(probs.argmax(1) == y)))
    perfect = classification_metrics(y, np.eye(3)[y], ["a", "b", "c"])
    assert perfect["auc"] == perfect["acc"] == perfect["f1"] == perfect["f1_c"] == 1.0


def test_summary_is_mean_and_std_ignoring_nan_and_non_numbers():
    rows = [{"auc": 0.8, "acc": math.nan, "note": "x"}, {"auc": 0.6, "acc": 0.5, "note": "y"}]
    mean, std = summarise(rows)
    assert mean == pytest.approx({"auc": 0.7, "acc": 0.5}) and std == pytest.approx({"auc": 0.1, "acc": 0.0})
    assert summarise([]) == ({}, {})


# -- early stopping ------------------------------------------------------------------------------------------


def test_early_stopping_neither_keeps_nor_stops_before_min_epochs():
    stopper = EarlyStopping("val_loss", patience=2, min_epochs=3)
    losses = [0.5, 0.8, 0.9, 0.7, 0.75, 0.8, 0.85]  # epoch 0 scores best by chance, but is under-trained
    kept, stops = [], []
    for epoch, loss in enumerate(losses):
        kept.append(stopper.update(epoch, {"val_loss": loss}))
        stops.append(stopper.should_stop(epoch))
    assert kept == [False, False, True, True, False, False, False]
    assert stops == [False, False, False, False, False, True, True]  # patience met at epoch 5
    assert stopper.best_epoch == 3
    restored = EarlyStopping("val_loss", patience=2, min_epochs=3)
    restored.load_state_dict(stopper.state_dict())
    assert restored.state_dict() == stopper.state_dict()

    # the official MHIM-MIL rule (train.keep_early_epochs): epoch 0 may be kept, only stopping waits
    official = EarlyStopping("val_loss", patience=2, min_epochs=4, keep_early=True)
    kept = [official.update(epoch, {"val_loss": loss}) for epoch, loss in enumerate(losses[:4])]
    assert kept == [True, False, False, False] and official.best_epoch == 0
    assert not official.should_stop(2) and official.should_stop(3)  # patience met at 2, stopping from 4

    auc = EarlyStopping("val_auc", patience=1, min_epochs=0)
    assert auc.update(0, {"val_auc": 0.6}) and auc.update(1, {"val_auc": 0.7})
    assert not auc.update(2, {"val_auc": math.nan})  # NaN never counts as an improvement
    assert auc.should_stop(2) and auc.best_epoch == 1


def test_fixed_epoch_selection_never_stops_and_keeps_the_last_epoch():
    cfg = {
        "selection": "fixed_epochs",
        "monitor": "val_loss",
        "patience": 1,
        "min_epochs": 0,
        "epochs": 4,
        "keep_early_epochs": False,
    }
    fixed = epoch_selector(cfg)
    for epoch, loss in enumerate([0.5, 0.9, 1.2, 1.5]):  # early stopping would keep epoch 0 and stop at 1
        assert fixed.update(epoch, {"val_loss": loss})
        assert not fixed.should_stop(epoch)
    assert fixed.best_epoch == 3
    # early_stop with min_epochs above the epochs: the last epoch can still be kept
    stop = epoch_selector({**cfg, "selection": "early_stop", "min_epochs": 10})
    assert isinstance(stop, EarlyStopping) and stop.min_epochs == 4
    assert [stop.update(e, {"val_loss": 1.0}) for e in range(4)] == [False, False, False, True]


# -- the mean+max-pooled logistic-regression baseline ----------------------------------------------------


def test_pooled_features_are_the_mean_and_max_of_the_raw_instances(tmp_path):
    meta = BagMeta(encoder="synthetic", dim=2, mpp=0.5, tile_px=256, code_version="test")
    feats = np.array([[1.0, -4.0], [3.0, 2.0], [-1.0, 5.0]], np.float32)
    write_bag(str(tmp_path / "a.parquet"), bag_table(np.arange(3), np.zeros(3), feats, meta, dtype="float32"))
    pooled = pooled_features(FeatureBags(str(tmp_path)), ["a"])
    np.testing.assert_allclose(pooled["a"], [1.0, 1.0, 3.0, 5.0])


def test_pooled_baseline_tests_each_fold_on_its_test_part_and_never_fits_on_it(tmp_path):
    labels = write_bags(
        str(tmp_path), n_slides=40, dim=8, n_instances=(4, 8), witness_frac=0.3, patients=True
    )
    data = LabelledBags.open(str(tmp_path / "features"), labels)
    splits = make_splits(data, folds=4, seeds=[0, 1], val_frac=0.25)
    result = pooled_baseline(data, splits)
    patient = dict(zip(data.slide_ids, data.patients, strict=True))
    assert [(r["seed"], r["fold"]) for r in result["folds"]] == [(s.seed, s.fold) for s in splits]
    for row, split in zip(result["folds"], splits, strict=True):
        assert row["test_ids"] == split.test
        assert not {patient[s] for s in row["test_ids"]} & {patient[s] for s in (*split.train, *split.val)}
    assert result["mean"]["auc"] == pytest.approx(np.mean([r["auc"] for r in result["folds"]]))
    assert result["mean"]["auc"] > 0.8, result["folds"]  # the witnesses shift the max-pooled features
    # Flipping the test labels flips the test AUC and nothing else: the fit and threshold never saw them.
    pooled = pooled_features(FeatureBags(data.features), data.slide_ids)
    split, target = splits[0], data.target_of()
    flipped = {**target, **{s: 1 - target[s] for s in split.test}}
    a = fit_pooled_split(split, pooled, target, data.classes, 1.0)
    b = fit_pooled_split(split, pooled, flipped, data.classes, 1.0)
    assert b["auc"] == pytest.approx(1.0 - a["auc"]) and b["threshold"] == a["threshold"]
    assert b["acc"] == pytest.approx(1.0 - a["acc"])


def test_the_printed_table_shows_the_lr_baseline_beside_the_model():
    row = {"auc": 0.9, "acc": 0.8, "f1": 0.75, "acc_at_0.5": 0.7, "f1_at_0.5": 0.6}
    lr_row = {k: v - 0.1 for k, v in row.items()}
    metrics = {
        "model": "abmil",
        "folds": [{"seed": 0, "fold": 0, **row}],
        "mean": row,
        "std": dict.fromkeys(row, 0.0),
        "pooled_lr": {
            "folds": [{"seed": 0, "fold": 0, **lr_row}],
            "mean": lr_row,
            "std": dict.fromkeys(row, 0.01),
        },
    }
    lines = format_table(metrics).splitlines()
    assert lines[1].split() == ["abmil", "0", "0", "0.9000", "0.8000", "0.7500", "0.7000", "0.6000"]
    assert lines[2].split() == ["lr", "0", "0", "0.8000", "0.7000", "0.6500", "0.6000", "0.5000"]
    assert lines[3].split()[-5:] == [
        "0.900±0.000",
        "0.800±0.000",
        "0.750±0.000",
        "0.700±0.000",
        "0.600±0.000",
    ]
    assert lines[4].split()[0] == "lr" and lines[4].split()[-1] == "0.500±0.010"
