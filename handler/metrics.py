"""Per-batch custom metrics of the caption handler.

TorchServe 0.12 only exports a backend (model) metric on the Prometheus endpoint when the
frontend knows it: either declared under ``model_metrics`` in the file named by
``metrics_config`` (this project's ``metrics.yaml``, next to ``config.properties``) or
auto-detected with ``model_metrics_auto_detect=true``. We declare them: the names, types
and dimensions below must match ``metrics.yaml`` exactly (the worker loads the same file and
rejects a value whose dimensions differ from the declaration).

Every metric carries the dimensions ``ModelName`` and ``Level`` (``Level=Model``), added by
``context.metrics`` itself; the frontend adds ``Hostname``.
"""

from __future__ import annotations

import logging

from ts.metrics.metric_type_enum import MetricTypes

logger = logging.getLogger(__name__)

# name -> (unit, type). Counters accumulate (use rate() in Prometheus; the ratio
# CaptionRequestsTotal / CaptionBatchesTotal is the mean batch size, CaptionHandlerMsTotal /
# CaptionBatchesTotal the mean batch time); gauges hold the last batch only (at GPU rates one of
# hundreds between scrapes); the histogram has every batch's time, in seconds (the frontend's
# Prometheus client buckets it at its defaults, 5 ms to 10 s and +Inf: percentiles up to 10 s).
METRICS = {
    "CaptionBatchesTotal": ("count", MetricTypes.COUNTER),
    "CaptionRequestsTotal": ("count", MetricTypes.COUNTER),
    "CaptionTokensTotal": ("count", MetricTypes.COUNTER),
    "CaptionErrorsTotal": ("count", MetricTypes.COUNTER),
    "CaptionServerErrorsTotal": ("count", MetricTypes.COUNTER),
    "CaptionHandlerMsTotal": ("ms", MetricTypes.COUNTER),
    "CaptionBatchSize": ("count", MetricTypes.GAUGE),
    "CaptionDecodeImageMs": ("ms", MetricTypes.GAUGE),
    "CaptionEncodeMs": ("ms", MetricTypes.GAUGE),
    "CaptionPrefillMs": ("ms", MetricTypes.GAUGE),
    "CaptionGenerateMs": ("ms", MetricTypes.GAUGE),
    "CaptionHandlerMs": ("ms", MetricTypes.GAUGE),
    "CaptionBatchSeconds": ("s", MetricTypes.HISTOGRAM),
}


def emit(context, name: str, value: float) -> None:
    """Record one value; never lets a metrics problem fail a request."""
    metrics = getattr(context, "metrics", None)
    if metrics is None:
        return
    unit, kind = METRICS[name]
    try:
        # A fresh `dimensions` list each call: the library appends its default dimensions
        # to the list it is given (and its default argument is a shared mutable list).
        metrics.add_metric(name, value, unit, idx=None, dimensions=[], metric_type=kind)
    except Exception:  # noqa: BLE001 - metrics are best effort
        logger.warning("could not record metric %s", name, exc_info=True)


def emit_batch(context, *, batch_size: int, requests: int, errors: int, server_errors: int, decode_ms: float,
               stats: dict | None, handler_ms: float) -> None:
    """All metrics of one handled batch. `errors`: requests answered with an error status,
    `server_errors` the 5xx among them (a client's bad input is not the service failing).
    `stats` is the engine's ``last_stats`` (None when the batch never reached the model)."""
    emit(context, "CaptionBatchesTotal", 1)
    emit(context, "CaptionBatchSize", batch_size)
    emit(context, "CaptionRequestsTotal", requests)
    emit(context, "CaptionErrorsTotal", errors)
    emit(context, "CaptionServerErrorsTotal", server_errors)
    emit(context, "CaptionHandlerMsTotal", round(handler_ms, 3))
    emit(context, "CaptionDecodeImageMs", round(decode_ms, 3))
    if stats:
        for key, name in (("encode_ms", "CaptionEncodeMs"), ("prefill_ms", "CaptionPrefillMs"),
                          ("generate_ms", "CaptionGenerateMs")):
            if stats.get(key) is not None:
                emit(context, name, round(float(stats[key]), 3))
        if stats.get("new_tokens") is not None:
            emit(context, "CaptionTokensTotal", int(stats["new_tokens"]))
    emit(context, "CaptionHandlerMs", round(handler_ms, 3))
    emit(context, "CaptionBatchSeconds", round(handler_ms / 1000, 6))
