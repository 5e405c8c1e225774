"""Drift: PSI per column against a reference profile, on real Parquet files."""

import json
import math

import pytest

from lepton_tasks.config.specs import find_spec
from lepton_tasks.ml.champion import ChampionSnapshot, Snapshot
from lepton_tasks.stages.drift import DriftError, decide, measure, profile, psi, verdict
from lepton_tasks.tools.demo_data import make_sensor_day

SPEC = find_spec("lepton_sensors").spec
NO_CHAMPION = Snapshot(None)


def _champion(profile_path) -> Snapshot:
    """Champion version 7, as a run's snapshot holds it, with the data profile at `profile_path`."""
    return Snapshot(ChampionSnapshot("lepton_sensors", "7", "abc", "merged.safetensors", "encoder.json", {},
                                     str(profile_path)))


def _day(tmp_path, day: str, change=None) -> list[str]:
    frame = make_sensor_day(day, rows=3000)
    if change:
        change(frame)
    path = tmp_path / f"{day}.parquet"
    frame.to_parquet(path, index=False)
    return [str(path)]


def test_psi_is_zero_for_equal_shares_and_matches_the_formula():
    assert psi({"a": 0.5, "b": 0.5}, {"a": 0.5, "b": 0.5}) == 0
    assert psi({"a": 0.5, "b": 0.5}, {"a": 0.8, "b": 0.2}) == pytest.approx(
        0.3 * math.log(0.8 / 0.5) + (-0.3) * math.log(0.2 / 0.5))


def test_the_same_process_on_another_day_is_stable_and_a_recalibrated_sensor_is_not(tmp_path):
    reference = tmp_path / "reference.json"
    reference.write_text(json.dumps(profile(_day(tmp_path, "2026-11-05"), SPEC)))
    calm = measure(_day(tmp_path, "2026-11-06"), SPEC, tmp_path / "calm", _champion(reference), 0.25, "warn")
    assert calm.max_psi < 0.1 and not calm.alarm and set(calm.columns) == {*SPEC.features, "fault"}

    def recalibrate(frame):
        frame["pressure_bar"] *= 1.35

    moved = measure(_day(tmp_path, "2026-11-07", recalibrate), SPEC, tmp_path / "moved", _champion(reference),
                    0.25, "fail")
    assert moved.alarm and moved.worst == "pressure_bar" and moved.max_psi > 1
    assert moved.columns["line"] < 0.1  # the categorical columns did not move
    html = (tmp_path / "moved" / "report.html").read_text()
    assert "pressure_bar" in html and "champion version 7" in verdict(moved) and "drift_action &#x27;fail&#x27;" in html


def test_a_new_category_and_a_moved_label_show_up(tmp_path):
    reference = tmp_path / "reference.json"
    reference.write_text(json.dumps(profile(_day(tmp_path, "2026-11-05"), SPEC)))

    def new_line_and_more_faults(frame):
        frame.loc[frame.index[:900], "line"] = "D"
        frame.loc[frame.index[:1500], "fault"] = 1

    moved = measure(_day(tmp_path, "2026-11-06", new_line_and_more_faults), SPEC, tmp_path / "m",
                    _champion(reference), 0.25, "warn")
    assert moved.columns["line"] > 0.25 and moved.columns["fault"] > 0.25


def test_without_a_champion_profile_only_this_runs_profile_is_written(tmp_path):
    first = measure(_day(tmp_path, "2026-11-05"), SPEC, tmp_path / "d", NO_CHAMPION, 0.25, "fail")
    assert first.max_psi is None and not first.alarm and first.report_path is None
    assert (tmp_path / "d" / "profile.json").is_file() and "nothing to compare" in verdict(first)


def test_the_drift_module_decides_warn_goes_on_and_fail_stops_with_the_verdict(tmp_path):
    reference = tmp_path / "reference.json"
    reference.write_text(json.dumps(profile(_day(tmp_path, "2026-11-05"), SPEC)))

    def recalibrate(frame):
        frame["pressure_bar"] *= 1.35

    heard = []
    for action in ("warn", "fail"):
        moved = measure(_day(tmp_path, "2026-11-07", recalibrate), SPEC, tmp_path / action, _champion(reference),
                        0.25, action)
        if action == "warn":
            decide(moved, heard.append)  # notified, the run goes on
        else:
            with pytest.raises(DriftError, match="stopped before training") as stopped:
                decide(moved, heard.append)
            assert stopped.value.figures["worst"] == "pressure_bar"  # the summary of a failed stage keeps them
    assert len(heard) == 2 and all("pressure_bar" in message for message in heard)
    calm = measure(_day(tmp_path, "2026-11-06"), SPEC, tmp_path / "calm", _champion(reference), 0.25, "fail")
    decide(calm, heard.append)
    assert len(heard) == 2  # within drift_max: nobody is told, nothing stops


def test_an_unreadable_champion_is_said_and_nothing_is_compared(tmp_path):
    found = Snapshot(None, "its encoder.json could not be read")
    measured = measure(_day(tmp_path, "2026-11-05"), SPEC, tmp_path / "d", found, 0.25, "fail")
    assert measured.champion is None and measured.champion_unusable == found.unusable
    assert "training starts from scratch" in measured.note and measured.max_psi is None


def _float64_shares(values, edges: list[float]) -> dict[str, float]:
    """The plain float64 definition of a column's shares: bin i holds edges[i-1] <= value < edges[i]."""
    import numpy as np

    numbers = values.astype(np.float64)
    present = numbers[~np.isnan(numbers)]
    bins = np.searchsorted(np.asarray(edges), present, side="right")
    shares = {f"b{i}": np.count_nonzero(bins == i) / len(numbers) for i in range(len(edges) + 1)}
    return {**shares, "__null__": np.count_nonzero(np.isnan(numbers)) / len(numbers)}


@pytest.mark.parametrize("seed", range(4))
def test_float32_columns_profile_and_bin_exactly_as_in_float64(seed):
    """float32 columns are partitioned and compared in float32: their deciles and counts must be those of the
    same values upcast (np.quantile's edges, and edges that no float32 can hold, values one step either side)."""
    import numpy as np

    from lepton_tasks.stages.drift import _profile_column, _shares_on

    rng = np.random.default_rng(seed)
    values = rng.standard_normal(20_001).astype(np.float32) * np.float32(10.0 ** rng.integers(-3, 4))
    values[rng.integers(0, len(values), 300)] = np.nan
    values[:2000] = np.round(values[:2000])  # ties, and signs mixed around zero
    mine = _profile_column(values, "numeric")
    upcast = values.astype(np.float64)
    assert mine["edges"] == sorted(set(np.quantile(upcast[~np.isnan(upcast)], np.linspace(0, 1, 11)[1:-1]).tolist()))
    assert mine["shares"] == pytest.approx(_float64_shares(values, mine["edges"]), abs=0)

    edges = sorted({float(v) + d for v in rng.choice(values[~np.isnan(values)], 9) for d in (0.0, 1e-12, -1e-12)})
    reference = {"kind": "numeric", "edges": edges, "shares": {}}
    assert _shares_on(values, reference) == pytest.approx(_float64_shares(values, edges), abs=0)
