"""KServe's v1 protocol on this handler: ``{"instances": [...]}`` in, ``{"predictions": [...]}`` out.

KServe's TorchServe runtime forwards a v1 request's JSON as it is to TorchServe
(``/v1/models/<name>:predict``, with ``Content-Type: application/json; charset=UTF-8``, which
the worker passes on as bytes). TorchServe's own ``kserve`` envelope is not used: it reads only
the first request of a dynamic batch. Here each instance, an object like the JSON form
(``{"image": "<base64>", "styles": [...], ...}``), becomes one row of the handler's batch, so
the instances of every request in a batch share one engine call. The predictions come back in
instance order. KServe v1 has no per-instance error: one bad instance fails its own request
(with the instance's index in the message), and the other requests of the batch are served.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from handler.request_parsing import RequestError, looks_like_json, parse_json

INSTANCES_KEY = "instances"
_SNIFF_BYTES = 64  # a v1 body names "instances" at its start (json.dumps of a one-key object)

Answer = tuple[int, dict]  # (HTTP status, JSON document)


@dataclass
class Expansion:
    """The rows of one TorchServe batch with every v1 request replaced by its instances."""

    rows: list = field(default_factory=list)  # one per image, in batch order
    owner: list[int] = field(default_factory=list)  # the request each row came from
    instance_counts: dict[int, int] = field(default_factory=dict)  # v1 requests -> instances
    errors: dict[int, tuple[int, str]] = field(default_factory=dict)  # v1 requests refused whole


def expand_instances(data: list, max_instances: int) -> Expansion:
    expansion = Expansion()
    for idx, row in enumerate(data):
        try:
            instances = instances_of(row, max_instances)
        except RequestError as exc:
            expansion.errors[idx] = (exc.status, exc.message)
            continue
        if instances is None:
            expansion.rows.append(row)
            expansion.owner.append(idx)
        else:
            expansion.instance_counts[idx] = len(instances)
            expansion.rows.extend({"body": instance} for instance in instances)
            expansion.owner.extend([idx] * len(instances))
    return expansion


def instances_of(row, max_instances: int) -> list[dict] | None:
    """The instances of a v1 request, or None for any other request (left to request_parsing)."""
    body = row.get("body") if isinstance(row, dict) else None
    if isinstance(body, (bytes, bytearray)) and _names_instances(body):
        body = parse_json(bytes(body))
    if not isinstance(body, dict) or INSTANCES_KEY not in body:
        return None
    others = sorted(set(body) - {INSTANCES_KEY})
    if others:
        raise RequestError(f"a v1 request holds only {INSTANCES_KEY!r}; put options in each instance "
                           f"(got {', '.join(repr(str(k)[:40]) for k in others[:8])})")
    instances = body[INSTANCES_KEY]
    if not isinstance(instances, list) or not instances:
        raise RequestError(f"{INSTANCES_KEY!r} must be a non-empty list of objects like {{\"image\": \"<base64>\"}}")
    if len(instances) > max_instances:
        raise RequestError(f"at most {max_instances} instances per request, got {len(instances)}")
    for k, instance in enumerate(instances):
        if not isinstance(instance, dict):
            raise RequestError(f"{INSTANCES_KEY}[{k}] must be an object like {{\"image\": \"<base64>\"}}")
    return instances


def _names_instances(body: bytes) -> bool:
    return looks_like_json(body) and b'"' + INSTANCES_KEY.encode() + b'"' in body[:_SNIFF_BYTES]


def merge_answers(expansion: Expansion, size: int, row_answers: list[Answer]) -> list[Answer]:
    """One answer per request: its row's, or for a v1 request its predictions (or first error)."""
    per_request: dict[int, list[Answer]] = {}
    for owner, answer in zip(expansion.owner, row_answers):
        per_request.setdefault(owner, []).append(answer)
    merged = []
    for idx in range(size):
        if idx in expansion.errors:
            status, message = expansion.errors[idx]
            merged.append((status, {"error": message}))
        elif idx not in expansion.instance_counts:
            merged.append(per_request[idx][0])
        else:
            answers = per_request[idx]
            failed = next(((k, a) for k, a in enumerate(answers) if a[0] != 200), None)
            if failed is None:
                merged.append((200, {"predictions": [document for _, document in answers]}))
            else:
                k, (status, document) = failed
                merged.append((status, {"error": f"{INSTANCES_KEY}[{k}]: {document['error']}"}))
    return merged
