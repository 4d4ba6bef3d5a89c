"""docs/metrics.md is generated from the catalog; this fails when someone forgot to regenerate it."""

from agent.catalog import render_docs
from tests.support import ROOT


def test_metrics_doc_is_current():
    page = (ROOT / "docs" / "metrics.md").read_text(encoding="utf-8")
    assert page == render_docs(), (
        "docs/metrics.md is stale: regenerate with `.venv/bin/python -m agent.catalog --docs > docs/metrics.md`")
