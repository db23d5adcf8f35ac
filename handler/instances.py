"""KServe's v1 protocol on this handler: ``{"instances": [...]}`` in, ``{"predictions": [...]}`` out.

KServe's TorchServe runtime forwards a v1 request's JSON as it is to TorchServe
(``/v1/models/<name>:predict`` or ``/predictions/<name>``; with ``Content-Type:
application/json`` the worker hands the handler a parsed dict, with ``application/json;
charset=UTF-8`` bytes, with ``text/*`` a str: all three are read). TorchServe's own ``kserve``
envelope must stay off (deploy/kserve/config/config.properties): it reads only the first
request of a dynamic batch. Here each instance, an object like the JSON form
(``{"image": "<base64>", "styles": [...], ...}``), becomes one row of the handler's batch, so
the instances of every request in a batch are captioned together. The predictions come back
in instance order. KServe v1 has no per-instance error: one bad instance fails its own request
(with the instance's index in the message; its sibling instances are not captioned), and the
other requests of the batch are served.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from handler.request_parsing import ROUTING_KEYS, RequestError, describe_keys, looks_like_json, parse_json

logger = logging.getLogger(__name__)

INSTANCES_KEY = "instances"
# 32 instances x 3 styles x 8 captions of 128 random tokens (~840 JSON characters each) are
# ~650 kB, under TorchServe's 1 MiB max_response_size; the handler also checks every reply.
MAX_INSTANCES_LIMIT = 32

Answer = tuple[int, dict]  # (HTTP status, JSON document)


@dataclass
class Expansion:
    """The rows of one TorchServe batch with every v1 request replaced by its instances."""

    rows: list = field(default_factory=list)  # one per image, in batch order
    owner: list[int] = field(default_factory=list)  # the request each row came from
    v1_requests: set[int] = field(default_factory=set)  # requests that came as {"instances": [...]}
    errors: dict[int, tuple[int, str]] = field(default_factory=dict)  # requests refused whole

    def siblings_of_failures(self, failed_rows) -> set[int]:
        """Rows of v1 requests that already have a failed instance: captioning them is wasted."""
        failed_requests = {self.owner[row] for row in failed_rows if self.owner[row] in self.v1_requests}
        return {row for row, owner in enumerate(self.owner) if owner in failed_requests} - set(failed_rows)


def expand_instances(data: list, max_instances: int, refused: dict[int, tuple[int, str]] | None = None) -> Expansion:
    """The batch's rows, v1 requests expanded; the requests in `refused` (index: (status,
    message)) and v1 requests that cannot be read contribute no row, only their error."""
    expansion = Expansion(errors=dict(refused or {}))
    for idx, row in enumerate(data):
        if idx in expansion.errors:
            continue
        try:
            instances = instances_of(row, max_instances)
        except RequestError as exc:
            expansion.errors[idx] = (exc.status, exc.message)
            continue
        except MemoryError:
            expansion.errors[idx] = (507, "out of memory while reading the request")
            continue
        except Exception as exc:  # noqa: BLE001 - one request's failure stays its own
            logger.error("reading request %d of the batch failed", idx, exc_info=True)
            expansion.errors[idx] = (500, f"internal error while reading the request ({type(exc).__name__})")
            continue
        if instances is None:
            expansion.rows.append(row)
            expansion.owner.append(idx)
        else:
            expansion.v1_requests.add(idx)
            expansion.rows.extend({"body": instance} for instance in instances)
            expansion.owner.extend([idx] * len(instances))
    return expansion


def instances_of(row, max_instances: int) -> list[dict] | None:
    """The instances of a v1 request, or None for any other request (left to request_parsing)."""
    body = row.get("body") if isinstance(row, dict) else None
    if isinstance(body, str):  # a text/* body, decoded by the worker
        body = body.encode("utf-8")
    if isinstance(body, (bytes, bytearray)) and _names_instances(body):
        body = parse_json(bytes(body))
    if not isinstance(body, dict) or INSTANCES_KEY not in body:
        return None
    fields = sorted(set(row) - {"body"} - ROUTING_KEYS)
    if fields:  # URL query or form fields: their options would apply to no instance
        raise RequestError(f"a v1 request carries its options in each instance; got other fields "
                           f"{describe_keys(dict.fromkeys(fields))}")
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
    """Whether a JSON body may be a v1 request: it names "instances" somewhere (a byte search:
    about 15 ms for a 32 MB body, against a parse that other JSON requests do in the decode
    pool; a false hit is parsed here, found to be no v1 request and left to request_parsing)."""
    return looks_like_json(body) and b'"' + INSTANCES_KEY.encode() + b'"' in body


def merge_answers(expansion: Expansion, size: int, row_answers: list[Answer], skipped=frozenset(),
                  shared=frozenset()) -> list[Answer]:
    """One answer per request: its row's, or for a v1 request its predictions, or its first
    failed instance's error (rows in `skipped` were not run, or not used, because of it). Rows
    in `shared` failed for a reason that is not theirs (their engine call or the whole batch ran
    out of memory or crashed): such an error names no instance."""
    per_request: dict[int, list[Answer | None]] = {}
    shared_instances: dict[int, set[int]] = {}
    for row, (owner, answer) in enumerate(zip(expansion.owner, row_answers)):
        instances = per_request.setdefault(owner, [])
        if row in shared:
            shared_instances.setdefault(owner, set()).add(len(instances))
        instances.append(None if row in skipped else answer)
    merged = []
    for idx in range(size):
        if idx in expansion.errors:
            status, message = expansion.errors[idx]
            merged.append((status, {"error": message}))
        elif idx not in expansion.v1_requests:
            merged.append(per_request[idx][0])
        else:
            merged.append(merge_instances(per_request[idx], shared_instances.get(idx, set())))
    return merged


def merge_instances(answers: list[Answer | None], shared=frozenset()) -> Answer:
    """A v1 request's answer from its instances' (None: not run): the predictions, or the first
    instance's own failure (named), or else the first shared failure (not named)."""
    failures = [(k, answer) for k, answer in enumerate(answers) if answer is not None and answer[0] != 200]
    if not failures:
        return 200, {"predictions": [document for _, document in answers]}
    own = [(k, answer) for k, answer in failures if k not in shared]
    if not own:  # only its engine call's or the batch's failure: no instance to name
        return failures[0][1]
    k, (status, document) = own[0]
    return status, {"error": f"{INSTANCES_KEY}[{k}]: {document['error']}"}
