"""The Grafana dashboard and the chart's metrics wiring: every panel's query names a metric the
operator exports (finetune_operator.metrics.EXPORTED), the copy in examples/ is the chart's, the
chart's ConfigMap carries the file under Grafana's sidecar label, and the Deployment serves
/metrics on the port the Service and ServiceMonitor scrape (real helm)."""

from __future__ import annotations

import json
import re

from kube_tools import CHART, REPO, helm_template

from finetune_operator import metrics as m

DASHBOARD = CHART / "dashboards" / "finetune-operator.json"
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


def exported(name: str) -> bool:
    return name in m.EXPORTED or any(name.endswith(s) and name[: -len(s)] in m.EXPORTED for s in HISTOGRAM_SUFFIXES)


def test_every_panel_queries_metrics_the_operator_exports():
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len(panels) >= 10 and len({p["id"] for p in panels}) == len(panels)
    used = set()
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = set(re.findall(r"\bfinetune_[a-z_]+\b", target["expr"]))
            assert names, (panel["title"], target["expr"])
            assert all(exported(n) for n in names), (panel["title"], names - set(m.EXPORTED))
            used |= names
    for wanted in ("finetune_jobs", "finetune_job_loss", "finetune_job_tokens_per_second", "finetune_job_eta_seconds",
                   "finetune_job_restarts", "finetune_reconcile_duration_seconds_bucket", "finetune_api_errors_total"):
        assert wanted in used, wanted
    for variable in dashboard["templating"]["list"]:
        query = variable.get("definition") or ""
        assert all(exported(n) for n in re.findall(r"\bfinetune_[a-z_]+\b", query)), query


def test_the_examples_copy_is_the_charts():
    assert (REPO / "examples" / "grafana" / "finetune-operator-dashboard.json").read_text() == DASHBOARD.read_text()


def test_the_chart_ships_the_dashboard_for_grafanas_sidecar_and_scrapes_metrics():
    objs = helm_template({"metrics": {"enabled": True, "serviceMonitor": {"enabled": True}},
                          "grafana": {"dashboard": {"enabled": True, "namespace": "monitoring"}}})
    (dashboard,) = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-dashboard")]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["namespace"] == "monitoring"
    assert json.loads(dashboard["data"]["finetune-operator.json"]) == json.loads(DASHBOARD.read_text())

    (deployment,) = [o for o in objs if o["kind"] == "Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert "--metrics-address=0.0.0.0:8081" in container["args"]
    assert {"name": "metrics", "containerPort": 8081, "protocol": "TCP"} in container["ports"]
    (service,) = [o for o in objs if o["kind"] == "Service"]
    assert {"name": "metrics", "port": 8081, "targetPort": "metrics", "protocol": "TCP"} in service["spec"]["ports"]
    (monitor,) = [o for o in objs if o["kind"] == "ServiceMonitor"]
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics" and monitor["spec"]["endpoints"][0]["path"] == "/metrics"


def test_metrics_off_serves_nothing_and_no_dashboard_by_default():
    objs = helm_template({"metrics": {"port": 0}})
    (deployment,) = [o for o in objs if o["kind"] == "Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert "--metrics-address=" in container["args"] and all(p["name"] != "metrics" for p in container["ports"])
    assert not [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-dashboard")]
