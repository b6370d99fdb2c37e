"""examples/grafana_dashboard.json reads what /metrics exports: every series a panel queries is one
serve/metrics.py's registry writes (with Prometheus' suffixes: a counter's _total, a histogram's
_bucket/_sum/_count), every exported metric is on some panel, and the file is an importable Grafana
dashboard (a datasource input, panels with unique ids and PromQL targets)."""
from __future__ import annotations

import json
import re
from pathlib import Path

from epserve.serve.metrics import ServeMetrics

DASHBOARD = Path(__file__).resolve().parent.parent / "examples" / "grafana_dashboard.json"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exported_series() -> dict[str, str]:
    """series name -> its metric family, from the registry an ingress replica serves on /metrics."""
    out = {}
    for fam in ServeMetrics().registry.collect():
        for suffix in SUFFIXES[fam.type]:
            out[fam.name + suffix] = fam.name
    return out


def queried_series(dash: dict) -> set[str]:
    return {m for p in dash["panels"] for t in p["targets"] for m in re.findall(r"\bepserve_[a-z_]+", t["expr"])}


def test_every_panel_queries_only_what_metrics_exports():
    dash = json.loads(DASHBOARD.read_text())
    unknown = queried_series(dash) - set(exported_series())
    assert not unknown, f"panels query series /metrics never exports: {sorted(unknown)}"


def test_every_exported_metric_is_on_a_panel():
    series = exported_series()
    shown = {series[s] for s in queried_series(json.loads(DASHBOARD.read_text())) if s in series}
    assert shown == set(series.values()), f"not on any panel: {sorted(set(series.values()) - shown)}"


def test_the_file_is_an_importable_grafana_dashboard():
    dash = json.loads(DASHBOARD.read_text())
    assert [i["pluginId"] for i in dash["__inputs"]] == ["prometheus"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and all(p["targets"] for p in dash["panels"])
    for p in dash["panels"]:
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}" and all(t["expr"].strip() for t in p["targets"])
        assert {"h", "w", "x", "y"} <= set(p["gridPos"])


def test_a_misspelled_series_would_be_caught():
    dash = json.loads(DASHBOARD.read_text())
    dash["panels"][0]["targets"][0]["expr"] = "rate(epserve_request_total[1m])"
    assert "epserve_request_total" in queried_series(dash) - set(exported_series())
