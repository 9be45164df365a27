"""mtrec plot of a race directory (series equal the replayed race), and the trade-off figure's
readability fixes: a long auxiliary task list is wrapped inside the figure, coincident points share
one label instead of hiding each other's."""

import json

import pytest
from test_race import VALID, fake_race, write_run

from mtrec.research import plot

pytest.importorskip("matplotlib")


def test_race_series_and_figure(tmp_path):
    race = fake_race(tmp_path / "race")
    for arm in race.arm_list:
        for i, seed in enumerate(race.seeds):
            write_run(tmp_path / "race" / arm.run_name(seed), VALID[arm.name][i])
    from mtrec.research.race import summarize

    series = plot.race_series(summarize(tmp_path / "race"))
    assert list(series) == ["metabalance(relax=0.3)", "pcgrad", "ew", "single", "gradcraft"]  # the ranking
    assert series["ew"]["epochs"] == [1, 2]
    assert series["ew"]["means"] == pytest.approx([sum(v[e] for v in VALID["ew"]) / 3 for e in (0, 1)])
    assert series["single"] == {"epochs": [1], "means": [pytest.approx(sum(v[0] for v in VALID["single"]) / 3)],
                                "stopped_at": 1, "winner": False}
    assert series["metabalance(relax=0.3)"]["winner"] and series["metabalance(relax=0.3)"]["stopped_at"] is None
    written, notes = plot.plot(tmp_path / "race", tmp_path / "fig")
    assert [p.name for p in written] == ["race_auc.png", "race_auc.svg"] and notes == []
    assert written[0].read_bytes()[:4] == b"\x89PNG"


def test_coincident_points_share_one_label():
    points = [("ew", 0.900, 0.800), ("famo", 0.950, 0.850), ("cograd", 0.9001, 0.8001), ("mgda", 0.905, 0.81)]
    assert plot.label_groups(points) == [("ew, cograd", 0.900, 0.800), ("famo", 0.950, 0.850),
                                         ("mgda", 0.905, 0.81)]
    assert plot.label_groups([("a", 1.0, 1.0), ("b", 1.0, 1.0)]) == [("a, b", 1.0, 1.0)]  # zero spans
    assert plot.label_groups([]) == []


def test_a_six_task_tradeoff_keeps_its_labels_inside_the_figure(tmp_path, monkeypatch):
    tasks = ["label_income_50k", "label_never_married", "label_has_capital_gains", "label_self_employed",
             "label_veteran_benefits", "label_moved_last_year"]
    groups = []
    for balancer, x in (("ew", 0.90), ("cograd", 0.90), ("famo", 0.93)):
        per_task = {t: {"auc": {"per_seed": {1: x, 2: x + 0.001}}} for t in tasks}
        groups.append({"model": "mmoe", "balancer": balancer, "seeds": [1, 2], "tasks": per_task})
    summary = {"tasks": tasks, "target": tasks[0], "groups": groups}
    figures = []
    monkeypatch.setattr(plot, "_save", lambda fig, out, name: figures.append(fig) or [])
    plot._figure_tradeoff(plot.tradeoff_points(summary, "auc"), summary, "auc", tmp_path)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = figures[0]
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    ax = fig.axes[0]
    label = ax.yaxis.label
    assert "\n" in label.get_text() and all(t in label.get_text().replace("\n", " ") for t in tasks[1:])
    box, page = label.get_window_extent(renderer), fig.bbox
    assert page.y0 <= box.y0 and box.y1 <= page.y1 and page.x0 <= box.x0, (box, page)
    texts = sorted(t.get_text() for t in ax.texts)
    assert texts == ["ew, cograd", "famo"]  # EW and CoGrad coincide: one label naming both
    json.dumps(summary)  # the stand-in summary is plain data, as compare's is
