"""The quality gate between fine-tuning and bulk annotation: the figure it reads, the threshold, and the one line
an operator gets (what was measured, the bar, what to do). The flow's behaviour on either side of the bar is
tested in tests/test_corpus_flow.py."""

import pytest

from schemas.configs import SmallAnnotatorStagesConfig
from schemas.reports import FinetuneReport
from tasks.finetune import quality_gate


def _report(quality: dict) -> FinetuneReport:
    return FinetuneReport(checkpoint="/w/annotator/model", version="encoder:x", base="all-MiniLM-L6-v2",
                          parameters=28_784_644, train_docs=12, holdout_docs=4, train_examples=12, steps=7, epochs=0.5,
                          train_seconds=5.0, holdout_quality=quality)


def test_below_the_bar_names_the_figure_the_threshold_and_the_fix():
    gate = quality_gate(_report({"f1": 0.0, "entity_value_f1": 0.024, "value_f1": 0.089}), 0.25)
    assert not gate.passed and gate.action == "stop"
    assert gate.figure == pytest.approx(0.024) and gate.threshold == 0.25
    line = gate.decision
    assert "\n" not in line
    assert "held-out seed (entity, value) F1 is 0.024, below small_annotator.min_f1 0.25" in line
    assert "12 seed documents, 0.5 epochs in 5 s" in line
    assert "stopping before bulk annotation, the warehouse untouched" in line
    assert "more seed documents (small_annotator.seed_docs)" in line and "train longer" in line


def test_seed_only_says_the_warehouse_gets_the_seed_annotations_only():
    gate = quality_gate(_report({"entity_value_f1": 0.1}), 0.25, "seed_only")
    assert not gate.passed and gate.action == "seed only"
    assert "the warehouse gets the seed's annotations only" in gate.decision


def test_at_or_above_the_bar_the_corpus_is_annotated():
    for figure in (0.25, 0.9):
        gate = quality_gate(_report({"f1": 0.1, "entity_value_f1": figure}), 0.25)
        assert gate.passed and gate.action == "bulk annotation"
        assert f"(entity, value) F1 {figure:.3f} >= small_annotator.min_f1 0.25" in gate.decision


def test_a_report_without_the_pair_level_is_gated_on_triplet_f1():
    gate = quality_gate(_report({"f1": 0.1}), 0.25)
    assert not gate.passed and "held-out seed triplet F1 is 0.100" in gate.decision


def test_no_threshold_or_nothing_held_out_lets_the_run_go_on_and_says_why():
    gate = quality_gate(_report({"entity_value_f1": 0.0}), None)
    assert gate.passed and "min_f1 unset" in gate.decision
    gate = quality_gate(_report({}), 0.25)
    assert gate.passed and "no held-out seed documents" in gate.decision


def test_the_default_bar_and_action():
    cfg = SmallAnnotatorStagesConfig()
    assert cfg.min_f1 == 0.25 and cfg.below_min_f1 == "stop"
