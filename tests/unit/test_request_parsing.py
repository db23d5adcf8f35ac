"""Tests of handler/request_parsing.py: every request form TorchServe can hand the handler, and every refusal.

The last group builds rows with TorchServe's own backend code (the wire decoder in
``ts/protocol/otf_message_handler.py`` and ``Service.retrieve_data_for_inference``) from
the parameters its frontend sends, so the row shapes are TorchServe's, not guesses.
"""

from __future__ import annotations

import base64
import importlib
import io
import json
import struct

import pytest

from handler.instances import instances_of
from handler.request_parsing import ParsedRequest, RequestError, error_body, parse_request
from model.styles import OptionError, make_plan

pytestmark = pytest.mark.unit

IMAGE = b"\x89PNG\r\n\x1a\n" + bytes(range(256))  # parsing never decodes the image
IMAGE_B64 = base64.b64encode(IMAGE).decode("ascii")


# --- raw body -------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [IMAGE, bytearray(IMAGE), memoryview(IMAGE)])
def test_raw_body(body):
    assert parse_request({"body": body}) == ParsedRequest(image=IMAGE, options={})


def test_raw_body_image_is_bytes():
    assert type(parse_request({"body": bytearray(IMAGE)}).image) is bytes


def test_query_parameters_become_options():
    row = {
        "body": bytearray(IMAGE),
        "styles": bytearray(b"concise,narrative"),
        "temperature": bytearray(b"0"),
        "top_p": bytearray(b"0.5"),
        "top_k": bytearray(b"3"),
        "repetition_penalty": "1.25",
        "no_repeat_ngram_size": b" 2 ",
        "num_captions": "1",
        "max_new_tokens": bytearray(b"20"),
        "seed": bytearray(b"42"),
    }
    request = parse_request(row)
    assert request.image == IMAGE
    assert request.options == {
        "styles": "concise,narrative",
        "temperature": 0,
        "top_p": 0.5,
        "top_k": 3,
        "repetition_penalty": 1.25,
        "no_repeat_ngram_size": 2,
        "num_captions": 1,
        "max_new_tokens": 20,
        "seed": 42,
    }
    assert isinstance(request.options["top_k"], int) and isinstance(request.options["top_p"], float)
    plan = make_plan(request.options)
    assert plan.styles == ("concise", "narrative")
    assert plan.sampling["concise"].top_k == 3 and plan.max_new_tokens == 20 and plan.seed == 42


def test_number_forms_from_text():
    options = parse_request({"body": IMAGE, "temperature": "1e-1", "top_p": "+.5", "seed": "-0", "top_k": "3.0"}).options
    assert options == {"temperature": 0.1, "top_p": 0.5, "seed": 0, "top_k": 3.0}
    assert make_plan(options).sampling["concise"].top_k == 3


def test_styles_text_is_left_for_make_plan_to_split():
    options = parse_request({"body": IMAGE, "styles": b"Descriptive, concise"}).options
    assert options == {"styles": "Descriptive, concise"}
    assert make_plan(options).styles == ("concise", "descriptive")
    # never read as a number, so the error names the style the client sent
    assert parse_request({"body": IMAGE, "styles": b"1"}).options == {"styles": "1"}
    with pytest.raises(OptionError, match="unknown style 'nan'"):
        make_plan(parse_request({"body": IMAGE, "styles": b"nan"}).options)


def test_empty_query_value_means_not_given():
    options = parse_request({"body": IMAGE, "temperature": bytearray(b""), "styles": " "}).options
    assert options == {"temperature": None, "styles": None}
    assert make_plan(options).styles == ("concise", "narrative", "descriptive")


def test_text_that_is_not_a_number_is_left_for_make_plan():
    options = parse_request({"body": IMAGE, "temperature": b"warm"}).options
    assert options == {"temperature": "warm"}
    with pytest.raises(OptionError, match="'temperature' must be a number"):
        make_plan(options)


def test_huge_integer_text_does_not_crash():
    options = parse_request({"body": IMAGE, "seed": "9" * 5000}).options
    with pytest.raises(OptionError):
        make_plan(options)


def test_non_finite_text_is_left_for_make_plan():
    options = parse_request({"body": IMAGE, "temperature": "nan"}).options
    with pytest.raises(OptionError, match="finite"):
        make_plan(options)


def test_option_that_is_not_utf8():
    with pytest.raises(RequestError, match="option 'styles' is not valid UTF-8"):
        parse_request({"body": IMAGE, "styles": bytearray(b"\xff\xfe")})


def test_routing_key_model_name_is_not_an_option():
    request = parse_request({"model_name": bytearray(b"captioner"), "body": IMAGE, "seed": b"1"})
    assert request.options == {"seed": 1}


def test_unknown_options_are_left_for_make_plan():
    options = parse_request({"body": IMAGE, "colour": b"red"}).options
    assert options == {"colour": "red"}
    with pytest.raises(OptionError, match="unknown option"):
        make_plan(options)


def test_empty_body():
    with pytest.raises(RequestError, match="empty request body"):
        parse_request({"body": bytearray()})


def test_text_body_is_passed_on_as_bytes():
    # A text/* body arrives as str; it is no image, which decode_image will say.
    parsed = parse_request({"body": "not an image"})
    assert parsed.image == b"not an image" and parsed.sent_as_text
    # A JSON string may hold a lone surrogate, which strict UTF-8 cannot encode.
    assert parse_request({"body": "\ud800abc"}).image == b"\xed\xa0\x80abc"
    assert not parse_request({"body": json.dumps({"image": IMAGE_B64})}).sent_as_text
    assert not parse_request({"body": bytearray(IMAGE)}).sent_as_text


def test_an_unrecognised_text_body_gets_a_hint_and_a_binary_one_does_not():
    from handler import preparation
    from model.image import ImageError
    from model.styles import Limits

    prepared = preparation.Preparation(Limits(), image_size=32, max_pixels=10**6, uint8=True)
    with pytest.raises(ImageError, match=r"not a recognised image \(5 bytes\); it arrived as text .*\"image\""):
        preparation.prepare_request({"body": "hello"}, prepared)  # a JSON string body, or text/plain
    with pytest.raises(ImageError, match=r"^not a recognised image \(5 bytes\)$"):
        preparation.prepare_request({"body": bytearray(b"hello")}, prepared)
    with pytest.raises(ImageError, match=r"^not a recognised image \(11 bytes\)$"):  # base64 of text
        preparation.prepare_request({"body": {"image": base64.b64encode(b"hello world").decode()}}, prepared)


# --- multipart form ---------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["data", "file"])
def test_multipart_image_field(field):
    row = {field: bytearray(IMAGE), "styles": bytearray(b"narrative"), "num_captions": bytearray(b"3")}
    assert parse_request(row) == ParsedRequest(image=IMAGE, options={"styles": "narrative", "num_captions": 3})


def test_multipart_text_part_is_turned_back_into_bytes():
    # A part uploaded as text/plain is decoded to str by TorchServe; UTF-8 round-trips exactly.
    assert parse_request({"file": "GIF89a\u00e9"}).image == "GIF89a\u00e9".encode("utf-8")


def test_multipart_two_image_fields():
    with pytest.raises(RequestError, match="one image per request; got fields data, file"):
        parse_request({"data": IMAGE, "file": IMAGE})


def test_multipart_empty_file():
    with pytest.raises(RequestError, match="empty request field 'file'"):
        parse_request({"file": bytearray()})


def test_multipart_form_field_that_is_json_typed_passes_through():
    # a part uploaded with Content-Type: application/json arrives already parsed
    options = parse_request({"data": IMAGE, "styles": ["concise"]}).options
    assert make_plan(options).styles == ("concise",)


# --- JSON -------------------------------------------------------------------------------------


def test_json_object_already_parsed_by_torchserve():
    body = {"image": IMAGE_B64, "styles": ["concise"], "temperature": 0.3, "seed": 7}
    request = parse_request({"body": body})
    assert request == ParsedRequest(image=IMAGE, options={"styles": ["concise"], "temperature": 0.3, "seed": 7})
    assert make_plan(request.options).seed == 7


def test_json_values_are_not_coerced():
    options = parse_request({"body": {"image": IMAGE_B64, "temperature": "0.3"}}).options
    assert options == {"temperature": "0.3"}
    with pytest.raises(OptionError):
        make_plan(options)


def test_json_body_does_not_change_the_callers_dict():
    body = {"image": IMAGE_B64, "seed": 1}
    parse_request({"body": body})
    assert body == {"image": IMAGE_B64, "seed": 1}


@pytest.mark.parametrize(
    "encoded",
    [
        f"data:image/png;base64,{IMAGE_B64}",
        f"DATA:image/png;BASE64,{IMAGE_B64}",
        f"data:;base64,{IMAGE_B64}",
        IMAGE_B64.rstrip("="),
        base64.urlsafe_b64encode(IMAGE).decode().rstrip("="),
        base64.encodebytes(IMAGE).decode(),  # MIME line breaks
        f"  {IMAGE_B64}\n",
    ],
    ids=["data-url", "data-url-upper", "data-url-no-type", "no-padding", "urlsafe", "line-breaks", "whitespace"],
)
def test_json_base64_variants(encoded):
    assert parse_request({"body": {"image": encoded}}).image == IMAGE


@pytest.mark.parametrize("extra", [1, 2], ids=["two-pad-chars-dropped", "one-pad-char-dropped"])
@pytest.mark.parametrize("encode", [base64.b64encode, base64.urlsafe_b64encode], ids=["standard", "urlsafe"])
def test_json_base64_without_its_padding(extra, encode):
    """IMAGE's 264 bytes need no padding; one or two bytes more leave 2 or 3 characters in the
    last group, whose '=' a client may drop."""
    image = IMAGE + b"\xff" * extra
    encoded = encode(image).decode()
    assert encoded.endswith("=" * (3 - extra))
    assert parse_request({"body": {"image": encoded.rstrip("=")}}).image == image


@pytest.mark.parametrize("body", [json.dumps({"image": IMAGE_B64, "seed": 3}).encode(), bytearray(b' \n{"image": "%s", "seed": 3}' % IMAGE_B64.encode())])
def test_json_bytes_not_decoded_by_torchserve(body):
    # TS_DECODE_INPUT_REQUEST=false, or JSON sent without its content type
    assert parse_request({"body": body}) == ParsedRequest(image=IMAGE, options={"seed": 3})


def test_json_bytes_with_byte_order_mark():
    body = b"\xef\xbb\xbf" + json.dumps({"image": IMAGE_B64}).encode()
    assert parse_request({"body": body}).image == IMAGE


def test_json_string_holding_an_object():
    assert parse_request({"body": json.dumps({"image": IMAGE_B64})}).image == IMAGE


@pytest.mark.parametrize("body", [b'{"image": ', bytearray(b"{'image': 'abc'}"), b"[1, 2", b"{" + b"\xff" * 8, b"[" * 100_000])
def test_malformed_json(body):
    with pytest.raises(RequestError, match="malformed JSON body"):
        parse_request({"body": body})


@pytest.mark.parametrize(
    "body, kind",
    [([{"image": IMAGE_B64}], "an array"), (None, "null"), (42, "a number"), (True, "a boolean"), (b"[1]", "an array")],
)
def test_json_body_that_is_not_an_object(body, kind):
    with pytest.raises(RequestError, match=f"must be an object.*got {kind}"):
        parse_request({"body": body})


def test_json_without_image():
    with pytest.raises(RequestError, match="needs an 'image' field"):
        parse_request({"body": {"styles": ["concise"]}})


@pytest.mark.parametrize("value, kind", [(123, "a number"), (None, "null"), ([IMAGE_B64], "an array"), ({"b64": IMAGE_B64}, "dict")])
def test_json_image_not_a_string(value, kind):
    with pytest.raises(RequestError, match=f"'image' must be a base64 string, got {kind}"):
        parse_request({"body": {"image": value}})


@pytest.mark.parametrize("encoded", ["not base64!", "abc$def", "A", "data:image/png;base64,@@@@"])
def test_json_bad_base64(encoded):
    with pytest.raises(RequestError, match="'image' is not valid base64"):
        parse_request({"body": {"image": encoded}})


@pytest.mark.parametrize("encoded", ["", "   ", "data:image/png;base64,", "===="])
def test_json_empty_image(encoded):
    with pytest.raises(RequestError, match="'image' is empty|not valid base64"):
        parse_request({"body": {"image": encoded}})


def test_json_data_url_must_be_base64():
    with pytest.raises(RequestError, match="data URL must be base64"):
        parse_request({"body": {"image": "data:image/png,%89PNG"}})


def test_json_and_query_options_together():
    request = parse_request({"body": {"image": IMAGE_B64, "seed": 1}, "styles": bytearray(b"concise")})
    assert request.options == {"styles": "concise", "seed": 1}


def test_option_given_in_query_and_json():
    with pytest.raises(RequestError, match="both in the URL or form and in the JSON body: seed"):
        parse_request({"body": {"image": IMAGE_B64, "seed": 1}, "seed": bytearray(b"2")})


# --- no image ---------------------------------------------------------------------------------


def test_empty_row():
    with pytest.raises(RequestError, match=r"^no image in the request; send the image"):
        parse_request({})


def test_only_options():
    with pytest.raises(RequestError, match=r"no image in the request \(received fields: 'styles', 'image'\)"):
        parse_request({"styles": b"concise", "image": b"..."})


def test_url_encoded_binary_mentions_the_content_type():
    # curl --data-binary without a Content-Type sends application/x-www-form-urlencoded;
    # the frontend then splits the image into form fields.
    mangled = {"\ufffdPNG\r\n\x1a\n" + "x" * 500: bytearray(b"")}
    with pytest.raises(RequestError, match="application/octet-stream") as caught:
        parse_request(mangled)
    assert len(str(caught.value)) < 400


def test_row_that_is_not_a_dict():
    with pytest.raises(RequestError, match="malformed request"):
        parse_request([IMAGE])


# --- errors -------------------------------------------------------------------------------------


def test_request_error_status_and_message():
    error = RequestError("bad thing")
    assert isinstance(error, ValueError)
    assert (error.status, error.message, str(error)) == (400, "bad thing", "bad thing")
    assert RequestError("too big", status=413).status == 413


def test_error_body_is_json():
    assert json.loads(error_body("no image")) == {"error": "no image"}
    assert json.loads(error_body('quote " and caf\u00e9')) == {"error": 'quote " and caf\u00e9'}


# --- rows built by TorchServe's own backend code ------------------------------------------------


def frame(text: bytes | str) -> bytes:
    data = text.encode("utf-8") if isinstance(text, str) else text
    return struct.pack("!i", len(data)) + data


def torchserve_row(parameters: list[tuple[str, str | None, bytes]], monkeypatch) -> dict:
    """Encode one predict request as the frontend does, decode it with TorchServe's backend.

    ``parameters``: (name, content type or None, value) in the frontend's order (query
    parameters first, then form fields or ``body``).
    """
    otf = importlib.import_module("ts.protocol.otf_message_handler")  # torchserve is a dependency: no skip
    service = importlib.import_module("ts.service")
    monkeypatch.delenv("TS_DECODE_INPUT_REQUEST", raising=False)
    message = frame("request-1") + frame("Content-Type") + frame("whatever") + struct.pack("!i", -1)
    for name, content_type, value in parameters:
        message += frame(name) + (frame(content_type) if content_type is not None else struct.pack("!i", 0)) + frame(value)
    message += struct.pack("!i", -1) + struct.pack("!i", -1)

    class Socket:
        def __init__(self, data: bytes):
            self.stream = io.BytesIO(data)

        def recv(self, size: int) -> bytes:
            return self.stream.read(size)

    batch = otf._retrieve_inference_msg(Socket(message))
    _, rows, _ = service.Service.retrieve_data_for_inference(batch)
    return rows[0]


def test_wire_raw_body_with_query_parameters(monkeypatch):
    # POST /models/captioner/invoke?styles=concise&temperature=0 with curl -T img.png
    row = torchserve_row([("styles", None, b"concise"), ("temperature", None, b"0"), ("body", None, IMAGE)], monkeypatch)
    assert isinstance(row["body"], bytearray) and isinstance(row["styles"], bytearray)
    assert parse_request(row) == ParsedRequest(IMAGE, {"styles": "concise", "temperature": 0})


def test_wire_invocations_model_name(monkeypatch):
    row = torchserve_row([("model_name", None, b"captioner"), ("body", "image/png", IMAGE)], monkeypatch)
    assert parse_request(row) == ParsedRequest(IMAGE, {})


def test_wire_multipart(monkeypatch):
    # curl -F file=@img.png -F styles=concise,narrative -F num_captions=1
    row = torchserve_row(
        [("file", "image/png", IMAGE), ("styles", None, b"concise,narrative"), ("num_captions", None, b"1")], monkeypatch
    )
    assert parse_request(row) == ParsedRequest(IMAGE, {"styles": "concise,narrative", "num_captions": 1})


def test_wire_json(monkeypatch):
    body = json.dumps({"image": f"data:image/png;base64,{IMAGE_B64}", "styles": ["narrative"], "top_k": 5}).encode()
    row = torchserve_row([("body", "application/json", body)], monkeypatch)
    assert isinstance(row["body"], dict)
    assert parse_request(row) == ParsedRequest(IMAGE, {"styles": ["narrative"], "top_k": 5})


def test_wire_malformed_json_is_forwarded_as_bytes_and_refused(monkeypatch):
    row = torchserve_row([("body", "application/json", b'{"image": "abc",}')], monkeypatch)
    assert isinstance(row["body"], bytearray)  # TorchServe logs a warning; the batch goes on
    with pytest.raises(RequestError, match="malformed JSON body"):
        parse_request(row)


def test_wire_json_not_decoded_when_disabled(monkeypatch):
    body = json.dumps({"image": IMAGE_B64}).encode()
    otf = importlib.import_module("ts.protocol.otf_message_handler")  # torchserve is a dependency: no skip
    monkeypatch.setenv("TS_DECODE_INPUT_REQUEST", "false")
    message = frame("r") + struct.pack("!i", -1) + frame("body") + frame("application/json") + frame(body)
    message += struct.pack("!i", -1) + struct.pack("!i", -1)

    class Socket:
        stream = io.BytesIO(message)

        def recv(self, size):
            return self.stream.read(size)

    row = {p["name"]: p["value"] for p in otf._retrieve_inference_msg(Socket())[0]["parameters"]}
    assert isinstance(row["body"], bytearray)
    assert parse_request(row).image == IMAGE


def test_wire_text_body(monkeypatch):
    row = torchserve_row([("body", "text/plain", b"hello")], monkeypatch)
    assert row["body"] == "hello"
    assert parse_request(row).image == b"hello"


def test_wire_json_string_body(monkeypatch):
    row = torchserve_row([("body", "application/json", b'"aGVsbG8="')], monkeypatch)
    assert row["body"] == "aGVsbG8="  # TorchServe decoded the JSON: a str, no longer quoted
    assert parse_request(row).sent_as_text


def test_wire_repeated_query_parameter_keeps_the_last(monkeypatch):
    row = torchserve_row([("styles", None, b"concise"), ("styles", None, b"narrative"), ("body", None, IMAGE)], monkeypatch)
    assert parse_request(row).options == {"styles": "narrative"}


@pytest.mark.parametrize("separator", [" ", "\t", "\r\n", "\x0b", "\x0c", "\x1c", "\x1f", "\u00a0", "\u2028"])
def test_base64_with_any_whitespace_str_split_removes(separator):
    """Whitespace is looked for before splitting (a fast scan); what is removed stays exactly
    what str.split() removes, ASCII or not."""
    middle = len(IMAGE_B64) // 2
    encoded = IMAGE_B64[:middle] + separator + IMAGE_B64[middle:]
    assert parse_request({"body": {"image": encoded}}).image == IMAGE


def test_a_memory_error_says_where_it_happened(monkeypatch):
    from handler import preparation
    from model.styles import Limits
    from tests.conftest import SEED_TINY

    photo = (SEED_TINY / "images" / "rocket.jpg").read_bytes()
    prepared = preparation.Preparation(Limits(), image_size=32, max_pixels=10**6, uint8=True)

    def exhausted(*_args):
        raise MemoryError()

    with monkeypatch.context() as patch:
        patch.setattr(preparation, "parse_request", exhausted)
        with pytest.raises(MemoryError, match="^while reading the request$"):
            preparation.prepare_request({"body": photo}, prepared)
    with monkeypatch.context() as patch:
        patch.setattr(preparation, "decode_image", exhausted)
        with pytest.raises(MemoryError, match="^while decoding the image$"):
            preparation.prepare_request({"body": photo}, prepared)
    plan, pixels = preparation.prepare_request({"body": photo}, prepared)
    assert pixels.shape == (3, 32, 32) and str(pixels.dtype) == "uint8" and plan.styles


def test_a_task_of_several_requests_returns_each_outcome_and_errors_as_values():
    """(A process sends them back pickled: the handler's tests with decode processes cover that.)"""
    from handler import preparation
    from model.styles import Limits
    from tests.conftest import SEED_TINY

    photo = (SEED_TINY / "images" / "rocket.jpg").read_bytes()
    prepared = preparation.Preparation(Limits(), image_size=32, max_pixels=10**6, uint8=True)
    outcomes = preparation.prepare_requests([{"body": photo}, {"body": b"not an image"}, {"body": photo}], prepared)
    assert outcomes[0][1].shape == (3, 32, 32)
    assert outcomes[1] == preparation.PreparationFailure(400, "not a recognised image (12 bytes)")
    assert (outcomes[2][1] == outcomes[0][1]).all()


@pytest.mark.parametrize("count, processes, sizes", [(5, 0, [1] * 5), (64, 15, [4] * 11 + [5] * 4), (3, 8, [1] * 3),
                                                     (4, 2, [2, 2]), (0, 4, [])])
def test_requests_are_split_into_one_task_each_for_threads_and_one_run_per_process(count, processes, sizes):
    from handler.preparation import split_into_tasks

    tasks = split_into_tasks(count, processes)
    assert sorted(len(task) for task in tasks) == sorted(sizes)
    assert [idx for task in tasks for idx in task] == list(range(count))


def test_a_v1_request_may_carry_exactly_max_instances():
    row = {"body": {"instances": [{"image": IMAGE_B64}] * 3}}
    assert len(instances_of(row, max_instances=3)) == 3
    with pytest.raises(RequestError, match="at most 2 instances per request, got 3"):
        instances_of(row, max_instances=2)
