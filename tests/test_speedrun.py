"""benchmarks/speedrun.py's figures: bits-per-byte over the whole validation split of a run's own corpus, strided or
in the non-overlapping windows training's validation reads, and the table with each variant's
mean and seed spread."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def speedrun():
    spec = importlib.util.spec_from_file_location("speedrun", REPO / "benchmarks" / "speedrun.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["speedrun"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_strided_bpb_scores_the_whole_validation_split(speedrun, tiny_run):
    record = json.loads((tiny_run / "run.json").read_text())
    strided, _ = speedrun.strided_bpb(tiny_run, 0.5)
    plain, _ = speedrun.strided_bpb(tiny_run, 1.0)
    # each token predicted with at least half a context instead of from none up: a 30-step model barely uses it
    assert strided == pytest.approx(plain, rel=0.05) and strided != plain
    # the non-overlapping reading is what training's validation reports, over the same split and bytes
    assert plain == pytest.approx(record["final"]["val/bpb"], rel=0.02)


def test_the_table_gives_each_variant_its_mean_and_spread(speedrun, tmp_path):
    results = [speedrun.Result("record", seed, 100.0, 190.0, 900.0, 20.0, 1000, 1e12, 0.2, bpb, tmp_path)
               for seed, bpb in enumerate((1.60, 1.64, 1.62))]
    results.append(speedrun.Result("baseline", 0, 1700.0, 3000.0, 1800.0, 120.0, 1000, 1e12, None, 1.876, tmp_path))
    lines = speedrun.table(results, budget_s=1800)
    assert lines[-2] == ("record: mean val bpb 1.6200 over 3 seed(s), spread 0.0400 (sd 0.0200); "
                         "wall 120-120 s of a 1800 s budget")
    assert lines[-1].startswith("baseline: mean val bpb 1.8760 over 1 seed(s); wall 1820-1820 s")
    assert lines[4].endswith("1.8760  over budget")  # training plus evaluation past 30 minutes is flagged


def test_the_baseline_runs_in_turn_with_the_record_at_its_first_seeds_only(speedrun):
    assert speedrun.run_order(3, ["record", "baseline"], 1) == [("record", 0), ("baseline", 0), ("record", 1),
                                                               ("record", 2)]
    assert speedrun.run_order(2, ["record", "baseline"], 2) == [("record", 0), ("baseline", 0), ("record", 1),
                                                               ("baseline", 1)]
    assert speedrun.run_order(2, ["record"], 1) == [("record", 0), ("record", 1)]


def test_a_named_variant_is_the_record_with_its_overrides_run_in_turn_at_the_baseline_seeds(speedrun):
    assert speedrun.parse_variant("adamw=optimizer=adamw optimizer.lr=1e-3") == (
        "adamw", ["optimizer=adamw", "optimizer.lr=1e-3"])
    assert speedrun.run_order(2, ["record", "baseline", "adamw"], 1) == [("record", 0), ("baseline", 0),
                                                                        ("adamw", 0), ("record", 1)]
    for bad in ("record=optimizer=adamw", "adamw=", "two words=optimizer=adamw"):
        with pytest.raises(speedrun.argparse.ArgumentTypeError, match="expected NAME="):
            speedrun.parse_variant(bad)


def test_variants_are_the_record_with_their_overrides_and_a_repeated_name_is_refused(speedrun):
    variants = speedrun.build_variants(["experiment=x"], True, [("adamw", ["optimizer=adamw"])])
    assert variants == {"record": ["experiment=x"], "baseline": ["experiment=x", *speedrun.BASELINE_OVERRIDES],
                        "adamw": ["experiment=x", "optimizer=adamw"]}
    with pytest.raises(ValueError, match="--variant adamw given more than once"):
        speedrun.build_variants(["experiment=x"], False, [("adamw", ["optimizer=adamw"]), ("adamw", ["optimizer.lr=1"])])
