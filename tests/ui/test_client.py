"""ui.client against a stub HTTP server: every outcome the page has to explain."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from tests.ui.conftest import KEY, STUB_CAPTIONS
from ui import client
from ui.client import CaptionOptions, Settings

pytestmark = pytest.mark.ui

SAMPLE = (Path(__file__).resolve().parents[2] / "ui" / "samples" / "chelsea.jpg").read_bytes()


def settings(url: str, **kw) -> Settings:
    return Settings(url=url, key=kw.pop("key", KEY), **kw)


def test_success_sends_json_with_key_and_options(stub):
    options = CaptionOptions(styles=("narrative", "concise"), num_captions=3, temperature=0.5, seed=7)
    result = client.caption(settings(stub.url), SAMPLE, options)

    assert result.ok, result.message
    assert result.status == 200
    assert result.captions == {"Concise": [STUB_CAPTIONS["concise"]] * 3,
                               "Narrative": [STUB_CAPTIONS["narrative"]] * 3}
    assert list(result.captions) == ["Concise", "Narrative"]  # the service's order
    assert result.latency_s is not None and 0 < result.latency_s < 10
    (request,) = stub.requests
    assert request["method"] == "POST" and request["path"] == "/predictions/captioner"
    assert request["headers"]["authorization"] == f"Bearer {KEY}"
    assert request["headers"]["content-type"] == "application/json"
    body = request["json"]
    assert base64.b64decode(body.pop("image")) == SAMPLE
    assert body == {"styles": ["concise", "narrative"], "num_captions": 3, "temperature": 0.5, "seed": 7}


def test_defaults_leave_options_to_the_server(stub):
    result = client.caption(settings(stub.url + "/"), SAMPLE)
    assert result.ok
    body = stub.requests[0]["json"]
    assert set(body) == {"image", "styles"} and body["styles"] == list(client.STYLES)


def test_key_is_read_from_key_file_at_each_request(stub, tmp_path):
    key_file = tmp_path / "key_file.json"
    key_file.write_text(json.dumps({"management": {"key": "m", "expiration time": "x"},
                                    "inference": {"key": "old", "expiration time": "x"}, "API": {"key": "a"}}))
    s = Settings(url=stub.url, key_file=str(key_file))
    assert client.caption(s, SAMPLE).kind == client.UNAUTHORIZED
    key_file.write_text(json.dumps({"inference": {"key": KEY}}))  # TorchServe regenerated the key
    assert client.caption(s, SAMPLE).ok
    assert [r["headers"]["authorization"] for r in stub.requests] == ["Bearer old", f"Bearer {KEY}"]


def test_400_shows_the_servers_error_text(stub):
    result = client.caption(settings(stub.url), b"this is not an image")
    assert result.kind == client.BAD_REQUEST and result.status == 400
    assert result.detail == "cannot decode the image: not a PNG or JPEG"
    assert "cannot decode the image: not a PNG or JPEG" in result.message


def test_400_from_torchserve_message_field(stub):
    stub.reply(400, {"code": 400, "type": "BadRequestException", "message": "Parameter model_name is required."})
    result = client.caption(settings(stub.url), SAMPLE)
    assert result.kind == client.BAD_REQUEST and "Parameter model_name is required." in result.message


def test_a_long_error_text_is_cut_to_its_limit(stub):
    stub.reply(400, {"error": "x" * 5000})
    result = client.caption(settings(stub.url), SAMPLE)
    assert len(result.detail) == client.DETAIL_LIMIT and result.detail == "x" * (client.DETAIL_LIMIT - 1) + "…"


def test_413_too_large(stub):
    stub.reply(413, {"code": 413, "type": "RequestEntityTooLargeException", "message": "request too large"})
    result = client.caption(settings(stub.url), SAMPLE)
    assert result.kind == client.BAD_REQUEST and result.status == 413
    assert "too large for the server" in result.message and "smaller file" in result.message


@pytest.mark.parametrize("status", [401, 403])
def test_wrong_key(stub, status):
    stub.reply(status, {"code": status, "type": "InvalidKeyException", "message": "Token Authorization failed."})
    result = client.caption(settings(stub.url, key="wrong"), SAMPLE)
    assert result.kind == client.UNAUTHORIZED and result.status == status
    assert "refused the inference key" in result.message and "key_file.json" in result.message


def test_torchserve_token_failure_400_is_a_key_problem(stub):
    """TorchServe 0.12 answers a wrong key with 400 "Token Authorization failed", not 401."""
    result = client.caption(settings(stub.url, key="wrong"), SAMPLE)
    assert result.kind == client.UNAUTHORIZED and result.status == 400
    assert "refused the inference key" in result.message and "Token Authorization failed" in result.detail


def test_missing_key_says_none_was_sent(stub):
    result = client.caption(Settings(url=stub.url), SAMPLE)
    assert result.kind == client.UNAUTHORIZED
    assert "none was sent" in result.message and "CAPTION_API_KEY" in result.message
    assert "authorization" not in stub.requests[0]["headers"]


def test_503_no_worker(stub):
    stub.reply(503, {"code": 503, "type": "ServiceUnavailableException",
                     "message": 'Model "captioner" has no worker to serve inference request.'})
    result = client.caption(settings(stub.url), SAMPLE)
    assert result.kind == client.UNAVAILABLE and result.status == 503
    assert "no worker to serve" in result.message and "Try again" in result.message


def test_507_out_of_memory(stub):
    stub.reply(507, {"error": "out of memory: the batch did not fit"})
    result = client.caption(settings(stub.url), SAMPLE)
    assert result.kind == client.OUT_OF_MEMORY and result.status == 507
    assert "out of memory" in result.message and result.detail == "out of memory: the batch did not fit"


def test_404_unknown_model(stub):
    result = client.caption(settings(stub.url, model="nope"), SAMPLE)
    assert result.kind == client.NOT_FOUND and "'nope'" in result.message and "Model not found: nope" in result.message


def test_500_other_failure(stub):
    stub.reply(500, {"error": "internal error while captioning"})
    result = client.caption(settings(stub.url), SAMPLE)
    assert result.kind == client.SERVER_ERROR and "internal error while captioning" in result.message


def test_connection_refused(closed_port):
    url = f"http://127.0.0.1:{closed_port}"
    result = client.caption(settings(url), SAMPLE)
    assert result.kind == client.CONNECTION and result.status is None
    assert "connection refused" in result.message and url in result.message


def test_timeout(stub):
    stub.reply(200, {"Concise": ["late"]}, delay=1.5)
    result = client.caption(settings(stub.url, timeout=0.3), SAMPLE)
    assert result.kind == client.TIMEOUT and "0.3 s" in result.message


def test_an_address_that_does_not_answer_fails_within_the_connect_timeout():
    """Connecting gets seconds; only the answer gets the whole (long) read timeout."""
    seen = {}

    class Session:
        def post(self, url, **kwargs):
            seen.update(kwargs)
            raise client.requests.ConnectTimeout("no answer")

    result = client.caption(settings("http://10.255.255.1:8080", timeout=120), SAMPLE, session=Session())
    assert seen["timeout"] == (client.CONNECT_TIMEOUT, 120) and client.CONNECT_TIMEOUT <= 10
    assert result.kind == client.CONNECTION and f"no answer within {client.CONNECT_TIMEOUT:g} s" in result.message
    client.caption(settings("http://10.255.255.1:8080", timeout=2), SAMPLE, session=Session())
    assert seen["timeout"] == (2, 2)  # a whole timeout shorter than the connect one bounds connecting too


@pytest.mark.parametrize("body, content_type", [
    ("<html><body>Welcome to nginx!</body></html>", "text/html"),
    ("not json at all", "text/plain"),
    ({"predictions": [1, 2]}, "application/json"),  # JSON, but not captions
    ({"Concise": "one string, not a list"}, "application/json"),
])
def test_200_that_is_not_captions(stub, body, content_type):
    stub.reply(200, body, content_type)
    result = client.caption(settings(stub.url), SAMPLE)
    assert result.kind == client.BAD_RESPONSE and result.status == 200
    assert "not with captions" in result.message


def test_non_json_error_body(stub):
    stub.reply(502, "<html>Bad Gateway</html>", "text/html")
    result = client.caption(settings(stub.url), SAMPLE)
    assert result.kind == client.UNAVAILABLE and "<html>Bad Gateway</html>" in result.message


def test_missing_style_in_answer_is_reported(stub):
    stub.reply(200, {"Concise": ["only this"]})
    result = client.caption(settings(stub.url), SAMPLE, CaptionOptions(styles=("concise", "narrative")))
    assert result.kind == client.BAD_RESPONSE and "Narrative" in result.message


@pytest.mark.parametrize("options, words", [
    (CaptionOptions(styles=()), "at least one style"),
    (CaptionOptions(styles=("poetic",)), "unknown style"),
    (CaptionOptions(num_captions=9), "between 1 and 8"),
    (CaptionOptions(temperature=-0.1), "temperature"),
    (CaptionOptions(max_new_tokens=129), "max new tokens"),
])
def test_invalid_options_send_nothing(stub, options, words):
    result = client.caption(settings(stub.url), SAMPLE, options)
    assert result.kind == client.CONFIG and words in result.message
    assert stub.requests == []


@pytest.mark.parametrize("url", ["127.0.0.1:8080", "ftp://host", ""])
def test_invalid_url(url):
    result = client.caption(Settings(url=url, key=KEY), SAMPLE)
    assert result.kind == client.CONFIG and "http://" in result.message


def test_unreadable_key_file(tmp_path, stub):
    bad = tmp_path / "key_file.json"
    bad.write_text('{"management": {"key": "m"}}')
    result = client.caption(Settings(url=stub.url, key_file=str(bad)), SAMPLE)
    assert result.kind == client.CONFIG and "inference.key" in result.message
    result = client.caption(Settings(url=stub.url, key_file=str(tmp_path / "missing.json")), SAMPLE)
    assert result.kind == client.CONFIG and "cannot read the key file" in result.message
    assert stub.requests == []


def test_settings_from_env(tmp_path):
    assert Settings.from_env({}) == Settings()
    env = {"CAPTION_API_URL": " http://h:9 ", "CAPTION_MODEL": "m", "CAPTION_API_KEY": "k",
           "CAPTION_KEY_FILE": "/x/key_file.json", "CAPTION_TIMEOUT": "5"}
    s = Settings.from_env(env)
    assert (s.url, s.model, s.key, s.key_file, s.timeout) == ("http://h:9", "m", "k", "/x/key_file.json", 5.0)
    assert s.endpoint() == "http://h:9/predictions/m"
    assert s.resolve_key() == "k"  # an explicit key wins over the file
    for bad in ("soon", "0.5", "1000", "inf", "nan"):
        with pytest.raises(client.ClientError, match="CAPTION_TIMEOUT must be a number of seconds from 1 to 600"):
            Settings.from_env({"CAPTION_TIMEOUT": bad})


@pytest.mark.parametrize("key", ["abc\r\nX-Injected: 1", "abc def", "\u2019quoted\u2019"])
def test_a_key_no_header_can_carry_is_refused_without_being_shown(key, tmp_path):
    result = client.caption(Settings(url="http://127.0.0.1:9", key=key), b"\x89PNG")
    assert result.kind == client.CONFIG and "characters an inference key cannot have" in result.message
    assert key.strip() not in result.message and "abc" not in result.message
    key_file = tmp_path / "key_file.json"
    key_file.write_text(json.dumps({"inference": {"key": key}}))
    result = client.ping(Settings(url="http://127.0.0.1:9", key_file=str(key_file)))
    assert result.kind == client.CONFIG and "characters an inference key cannot have" in result.message


@pytest.mark.parametrize("text, seed", [("", None), ("  ", None), ("42", 42), (" 1_000 ", 1000)])
def test_parse_seed(text, seed):
    assert client.parse_seed(text) == seed


@pytest.mark.parametrize("text", ["abc", "1.5", "-1", str(2**63)])
def test_parse_seed_rejects(text):
    with pytest.raises(client.ClientError):
        client.parse_seed(text)


def test_ping(stub, closed_port):
    assert client.ping(settings(stub.url)).ok
    assert client.ping(settings(stub.url, key="wrong")).kind == client.UNAUTHORIZED
    assert client.ping(settings(f"http://127.0.0.1:{closed_port}")).kind == client.CONNECTION
    stub.reply(503, {"status": "Unhealthy"})
    assert client.ping(settings(stub.url)).kind == client.UNAVAILABLE
