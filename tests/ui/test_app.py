"""The Streamlit page through Streamlit's headless test API (AppTest), against the stub server."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from tests.ui.conftest import KEY, STUB_CAPTIONS

pytestmark = pytest.mark.ui

APP = Path(__file__).resolve().parents[2] / "ui" / "app.py"
SAMPLES = Path(__file__).resolve().parents[2] / "ui" / "samples"


@pytest.fixture
def app(monkeypatch):
    from streamlit.testing.v1 import AppTest

    def make(url: str, key: str | None = KEY, key_file: str | None = None) -> AppTest:
        for name in ("CAPTION_API_URL", "CAPTION_MODEL", "CAPTION_API_KEY", "CAPTION_KEY_FILE", "CAPTION_TIMEOUT"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("CAPTION_API_URL", url)
        if key:
            monkeypatch.setenv("CAPTION_API_KEY", key)
        if key_file:
            monkeypatch.setenv("CAPTION_KEY_FILE", key_file)
        at = AppTest.from_file(str(APP), default_timeout=30)
        at.run()
        assert not at.exception, at.exception
        return at

    return make


def press(at):
    at.button(key="caption").click().run()
    assert not at.exception, at.exception
    return at


def test_first_view_offers_samples_and_settings_from_env(app, stub):
    at = app(stub.url)
    assert at.title[0].value == "Image captions in three styles"
    assert at.selectbox(key="sample").options == sorted(p.name for p in SAMPLES.iterdir())
    assert at.text_input(key="url").value == stub.url
    assert at.text_input(key="api_key").value == ""  # the key stays on the server side
    assert at.text_input(key="api_key").placeholder == "set by CAPTION_API_KEY"
    assert at.multiselect(key="styles").value == ["concise", "narrative", "descriptive"]
    assert not at.tabs and not at.error and stub.requests == []  # nothing sent before the click


def test_sample_to_captions_tabs_and_latency(app, stub):
    at = app(stub.url)
    at.selectbox(key="sample").set_value("rocket.jpg").run()
    at.slider(key="num_captions").set_value(3).run()
    at.text_input(key="seed").set_value("1234").run()
    press(at)

    assert [t.label for t in at.tabs] == ["Concise", "Narrative", "Descriptive"]
    codes = [c.value for c in at.code]
    assert codes == [STUB_CAPTIONS["concise"]] * 3 + [STUB_CAPTIONS["narrative"]] * 3 + [STUB_CAPTIONS["descriptive"]] * 3
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Latency"].endswith(" ms") and float(metrics["Latency"].split()[0]) >= 0
    assert metrics["Captions"] == "9"
    (request,) = stub.requests
    body = request["json"]
    assert base64.b64decode(body.pop("image")) == (SAMPLES / "rocket.jpg").read_bytes()
    assert body == {"styles": ["concise", "narrative", "descriptive"], "num_captions": 3, "seed": 1234}
    assert request["headers"]["authorization"] == f"Bearer {KEY}"


def test_deterministic_mode_sends_temperature_zero_one_caption(app, stub):
    at = app(stub.url)
    at.radio(key="creativity").set_value("Deterministic").run()
    at.multiselect(key="styles").set_value(["descriptive", "concise"]).run()
    press(at)
    assert [t.label for t in at.tabs] == ["Concise", "Descriptive"]
    body = stub.requests[0]["json"]
    assert body["temperature"] == 0.0 and body["num_captions"] == 1
    assert body["styles"] == ["concise", "descriptive"] and "seed" not in body


def test_custom_temperature(app, stub):
    at = app(stub.url)
    at.radio(key="creativity").set_value("Custom").run()
    at.slider(key="temperature").set_value(1.1).run()
    press(at)
    assert stub.requests[0]["json"]["temperature"] == pytest.approx(1.1)


def test_bad_seed_blocks_the_button(app, stub):
    at = app(stub.url)
    at.text_input(key="seed").set_value("soon").run()
    assert "seed must be a whole number" in at.error[0].value
    assert at.button(key="caption").disabled


def test_key_from_key_file(app, stub, tmp_path):
    key_file = tmp_path / "key_file.json"
    key_file.write_text(json.dumps({"inference": {"key": KEY}, "management": {"key": "m"}, "API": {"key": "a"}}))
    at = press(app(stub.url, key=None, key_file=str(key_file)))
    assert at.tabs and stub.requests[0]["headers"]["authorization"] == f"Bearer {KEY}"


def test_connection_refused_message(app, closed_port):
    at = press(app(f"http://127.0.0.1:{closed_port}"))
    assert not at.tabs
    assert "Server unreachable" in at.error[0].value and "connection refused" in at.error[0].value


def test_wrong_key_message(app, stub):
    at = press(app(stub.url, key="not-the-key"))
    assert "Key refused" in at.error[0].value and "refused the inference key (HTTP 400)" in at.error[0].value


def test_key_typed_in_sidebar_fixes_it(app, stub):
    at = press(app(stub.url, key="not-the-key"))
    assert at.error
    at.text_input(key="api_key").set_value(KEY).run()
    press(at)
    assert not at.error and at.tabs


def test_refused_image_shows_server_text(app, stub):
    stub.reply(400, {"error": "image too large: 50000x50000 pixels exceeds the 40000000-pixel limit"})
    at = press(app(stub.url))
    assert "Request refused" in at.error[0].value
    assert "50000x50000 pixels exceeds the 40000000-pixel limit" in at.error[0].value


@pytest.mark.parametrize("status, title, words", [
    (507, "Server out of memory", "ran out of memory"),
    (503, "Service busy or unavailable", "no worker"),
])
def test_overload_messages(app, stub, status, title, words):
    stub.reply(status, {"error": 'Model "captioner" has no worker'} if status == 503 else {"error": "CUDA out of memory"})
    at = press(app(stub.url))
    assert title in at.error[0].value and words in at.error[0].value


def test_non_json_answer(app, stub):
    stub.reply(200, "<html>hello</html>", "text/html")
    at = press(app(stub.url))
    assert "Unexpected answer" in at.error[0].value


def test_captions_are_forgotten_when_the_image_changes(app, stub):
    at = press(app(stub.url))
    assert at.tabs
    other = [o for o in at.selectbox(key="sample").options if o != at.selectbox(key="sample").value][0]
    at.selectbox(key="sample").set_value(other).run()
    assert not at.tabs and len(stub.requests) == 1


def test_check_server_button(app, stub, closed_port):
    at = app(stub.url)
    at.button(key="ping").click().run()
    assert "is healthy" in at.success[0].value
    at = app(stub.url, key="wrong")
    at.button(key="ping").click().run()
    assert "refused the inference key" in at.error[0].value
    at = app(f"http://127.0.0.1:{closed_port}")
    at.button(key="ping").click().run()
    assert "connection refused" in at.error[0].value


def test_configured_key_is_not_sent_to_another_address(app, stub, closed_port):
    at = app(f"http://127.0.0.1:{closed_port}")  # the key is configured for this (dead) server
    at.text_input(key="url").set_value(stub.url).run()
    assert any("sent only to" in c.value for c in at.sidebar.caption)
    press(at)
    assert "authorization" not in stub.requests[0]["headers"]
    assert "none was sent" in at.error[0].value
    at.text_input(key="api_key").set_value(KEY).run()  # a key typed for this server is used
    press(at)
    assert at.tabs and stub.requests[1]["headers"]["authorization"] == f"Bearer {KEY}"


def test_a_timeout_setting_out_of_range_is_shown_not_a_crash(monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("CAPTION_TIMEOUT", "1000")
    at = AppTest.from_file(str(APP), default_timeout=30)
    at.run()
    assert not at.exception, at.exception
    assert any("CAPTION_TIMEOUT must be a number of seconds from 1 to 600, got '1000'" in e.value for e in at.error)
