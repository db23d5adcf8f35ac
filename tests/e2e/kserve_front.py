"""KServe's model server in front of TorchServe, as KServe's TorchServe runtime runs it.

Runs in its own virtual environment with the ``kserve`` release of that runtime image
(``tests/e2e/kserve-requirements.txt``; ``make test`` builds ``.venv-kserve``), never in the
project's: it imports nothing from this repository. ``tests/e2e/test_kserve.py`` starts it.

In the runtime's pod, a KServe ``Model`` per TorchServe model listens on 8080 and, for the v1
protocol, forwards each request with ``kserve.Model``'s own ``predict`` to TorchServe's
``/v1/models/<name>:predict`` (its ``predictor_host``), after waiting for a READY worker on the
management API. This is that model, with the addresses and timeout given on the command line.
Written for this project's tests, not the runtime's wrapper itself. (Option names differ from
kserve's own, which its model server also reads from the command line.)

    python tests/e2e/kserve_front.py --model-name captioner --predictor-host 127.0.0.1:8085 \
        --management-url http://127.0.0.1:8085 --front-port 8080
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.error
import urllib.request

import kserve
from kserve.model import PredictorConfig

READY_POLL_S = 1.0


class TorchServeFront(kserve.Model):
    """A KServe model whose predictions come from TorchServe (v1, no transformation)."""

    def __init__(self, name: str, predictor_host: str, management_url: str, timeout_s: int, ready_timeout_s: float):
        super().__init__(name, PredictorConfig(predictor_host, predictor_request_timeout_seconds=timeout_s))
        self.management_url = management_url.rstrip("/")
        self.ready_timeout_s = ready_timeout_s

    def load(self) -> bool:
        """Ready once TorchServe reports a READY worker for the model."""
        deadline = time.monotonic() + self.ready_timeout_s
        while not self.ready and time.monotonic() < deadline:
            self.ready = self._has_ready_worker()
            if not self.ready:
                time.sleep(READY_POLL_S)
        if not self.ready:
            raise SystemExit(f"{self.name}: no READY worker at {self.management_url} "
                             f"after {self.ready_timeout_s:.0f} s")
        return self.ready

    def _has_ready_worker(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.management_url}/models/{self.name}", timeout=5) as response:
                versions = json.load(response)
        except (urllib.error.URLError, OSError, ValueError):
            return False
        return any(worker.get("status") == "READY" for version in versions for worker in version.get("workers", []))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-name", required=True)
    parser.add_argument("--predictor-host", required=True, help="TorchServe's inference address as host:port")
    parser.add_argument("--management-url", required=True)
    parser.add_argument("--front-port", type=int, required=True)
    parser.add_argument("--predictor-timeout", type=int, default=600, help="kserve.Model's default")
    parser.add_argument("--ready-timeout", type=float, default=300)
    args = parser.parse_args(argv)
    model = TorchServeFront(args.model_name, args.predictor_host, args.management_url, args.predictor_timeout,
                            args.ready_timeout)
    model.load()
    kserve.ModelServer(http_port=args.front_port, enable_grpc=False, workers=1).start([model])


if __name__ == "__main__":
    main()
