"""metrics.yaml declares exactly the handler's metrics (`handler/metrics.py`), with the same
types, units and dimensions: in Prometheus mode the frontend exports only declared metrics,
and the worker rejects a value whose declaration differs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from handler.metrics import METRICS

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
TORCHSERVE_OWN = {"PredictionTime"}  # emitted by TorchServe's worker code, not the handler


def declared_model_metrics() -> dict[str, tuple[str, str, list[str]]]:
    document = yaml.safe_load((REPO / "metrics.yaml").read_text())
    return {spec["name"]: (kind, spec["unit"], spec["dimensions"])
            for kind, specs in document["model_metrics"].items() for spec in specs}


def test_every_handler_metric_is_declared_with_its_type_and_unit():
    declared = declared_model_metrics()
    assert set(declared) - TORCHSERVE_OWN == set(METRICS)
    for name, (unit, kind) in METRICS.items():
        assert declared[name][:2] == (kind.value, unit), name
        assert declared[name][2] == ["ModelName", "Level"], name


def test_a_metrics_failure_never_reaches_the_requests(caplog):
    """`emit` is best effort: whatever the metrics library raises is logged, not raised into the
    batch (whose answers are ready by then)."""
    from types import SimpleNamespace

    from handler.metrics import emit_batch

    def broken(*args, **kwargs):
        raise ValueError("dimension mismatch")

    context = SimpleNamespace(metrics=SimpleNamespace(add_metric=broken))
    with caplog.at_level("WARNING", logger="handler.metrics"):
        emit_batch(context, batch_size=2, requests=2, errors=0, server_errors=0, decode_ms=1.0,
                   stats={"encode_ms": 1.0, "new_tokens": 3}, handler_ms=5.0)
    warned = {r.getMessage() for r in caplog.records}
    assert "could not record metric CaptionBatchesTotal" in warned and len(warned) >= len(METRICS) - 2
