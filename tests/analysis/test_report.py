"""analyze's output set: no folder mixes two runs' files or looks finished when it is not."""

import json
import os

import pytest

from opsd_jax.analysis import report


def _fake_plots(monkeypatch, fail_at=None):
    def plot(name):
        def draw(result, path):
            if name == fail_at:
                raise KeyboardInterrupt("killed")  # what a kill looks like from here
            with open(path, "w") as f:
                f.write(f"{name} of run {result['run']}")
        return draw
    monkeypatch.setattr(report, "markdown", lambda result: f"report of run {result['run']}")
    monkeypatch.setattr(report, "public", lambda result: result)
    for name in ("plot_fork_rates", "plot_marker_rates", "plot_advantages"):
        monkeypatch.setattr(report, name, plot(name))


def test_an_interrupted_rewrite_leaves_no_metrics_and_no_stale_files(tmp_path, monkeypatch):
    out = str(tmp_path / "analysis")
    _fake_plots(monkeypatch)
    report.write_outputs({"run": 1}, out)
    assert sorted(os.listdir(out)) == sorted(report.OUTPUT_FILES)
    _fake_plots(monkeypatch, fail_at="plot_marker_rates")
    with pytest.raises(KeyboardInterrupt):
        report.write_outputs({"run": 2}, out)
    assert sorted(os.listdir(out)) == ["fork_rates.png", "report.md"]  # run 2's, and no metrics.json
    assert open(os.path.join(out, "report.md")).read() == "report of run 2"
    _fake_plots(monkeypatch)
    report.write_outputs({"run": 3}, out)
    assert json.load(open(os.path.join(out, "metrics.json"))) == {"run": 3}
    assert all("run 3" in open(os.path.join(out, name)).read() for name in report.OUTPUT_FILES[:-1])
