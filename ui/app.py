"""A page to try the caption service: pick or upload an image, choose styles and creativity,
get the captions in one tab per style.

    streamlit run ui/app.py            # or: make ui

The server and key come from CAPTION_API_URL, CAPTION_MODEL, CAPTION_API_KEY or
CAPTION_KEY_FILE (see ui/client.py) and can be changed in the sidebar. All HTTP work is done
by ui.client; this file is layout only.
"""

from __future__ import annotations

import hashlib
import io
import sys
from pathlib import Path

import streamlit as st

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `streamlit run ui/app.py` puts ui/, not the repository, on the path
    sys.path.insert(0, str(ROOT))

from ui import client  # noqa: E402

SAMPLES_DIR = Path(__file__).resolve().parent / "samples"
IMAGE_TYPES = ["png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff"]
STYLE_LABELS = {"concise": "Concise", "narrative": "Narrative", "descriptive": "Descriptive"}
CREATIVITY_TUNED = "Tuned per style"
CREATIVITY_GREEDY = "Deterministic"
CREATIVITY_CUSTOM = "Custom"
CREATIVITY_HELP = {
    CREATIVITY_TUNED: "each style's own setting (concise 0.2, descriptive 0.45, narrative 0.75)",
    CREATIVITY_GREEDY: "temperature 0: always the same single caption per style",
    CREATIVITY_CUSTOM: "one temperature for all styles",
}
ERROR_TITLES = {
    client.CONNECTION: "Server unreachable",
    client.UNAUTHORIZED: "Key refused",
    client.BAD_REQUEST: "Request refused",
    client.NOT_FOUND: "Model not found",
    client.OUT_OF_MEMORY: "Server out of memory",
    client.UNAVAILABLE: "Service busy or unavailable",
    client.SERVER_ERROR: "Server error",
    client.TIMEOUT: "Timed out",
    client.BAD_RESPONSE: "Unexpected answer",
    client.CONFIG: "Check the settings",
}


def samples() -> list[Path]:
    return sorted(p for p in SAMPLES_DIR.iterdir() if p.suffix.lower().lstrip(".") in IMAGE_TYPES)


def sidebar(defaults: client.Settings) -> client.Settings:
    with st.sidebar:
        st.header("Server")
        url = st.text_input("Server address", value=defaults.url, key="url",
                            help="TorchServe's inference address (CAPTION_API_URL)")
        model = st.text_input("Model", value=defaults.model, key="model", help="CAPTION_MODEL")
        # A key from the environment never goes into the widget: the browser would receive it.
        if defaults.key:
            hint = "set by CAPTION_API_KEY"
        elif defaults.key_file:
            hint = f"read from {Path(defaults.key_file).name}"
        else:
            hint = "'inference' key of key_file.json"
        key = st.text_input("Inference key", value="", type="password", key="api_key", placeholder=hint,
                            help="Leave empty to use CAPTION_API_KEY, or the 'inference' key of the key_file.json "
                                 "that CAPTION_KEY_FILE names (re-read for every request)")
        timeout = st.number_input("Timeout (s)", min_value=client.MIN_TIMEOUT_S, max_value=client.MAX_TIMEOUT_S,
                                  value=float(defaults.timeout),
                                  step=10.0, key="timeout")
        url = url.strip()
        if key.strip():
            settings = client.Settings(url=url, model=model.strip(), key=key.strip(), timeout=float(timeout))
        elif same_server(url, defaults.url):
            settings = client.Settings(url=url, model=model.strip(), key=defaults.key, key_file=defaults.key_file,
                                       timeout=float(timeout))
        else:  # the configured key is for the configured server only, never for an address typed here
            settings = client.Settings(url=url, model=model.strip(), timeout=float(timeout))
            if defaults.key or defaults.key_file:
                st.caption(f"The configured key is sent only to {defaults.url}; type a key for this server.")
        if st.button("Check server", key="ping"):
            health = client.ping(settings)
            (st.success if health.ok else st.error)(health.message)
        st.caption("The key goes to the server as `Authorization: Bearer …`; it is never shown on this page.")
    return settings


def same_server(a: str, b: str) -> bool:
    return a.strip().rstrip("/").lower() == b.strip().rstrip("/").lower()


def choose_image() -> tuple[str, bytes] | None:
    """(label, bytes) of the uploaded file, else of the chosen sample."""
    uploaded = st.file_uploader("Upload or drop an image", type=IMAGE_TYPES, key="upload")
    names = [p.name for p in samples()]
    sample = st.selectbox("…or try a sample", names, key="sample", disabled=uploaded is not None,
                          help="Used when no file is uploaded")
    if uploaded is not None:
        return uploaded.name, uploaded.getvalue()
    if sample:
        return sample, (SAMPLES_DIR / sample).read_bytes()
    return None


def show_image(label: str, data: bytes) -> None:
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:
            size = f"{image.width}×{image.height}"
        st.image(data, caption=f"{label} · {size} · {len(data) / 1024:.0f} KB")
    except Exception:  # not an image we can preview: let the server have its say
        st.warning(f"{label}: cannot preview this file ({len(data) / 1024:.0f} KB); the server will decide.")


def choose_options() -> client.CaptionOptions | None:
    styles = st.multiselect("Styles", list(STYLE_LABELS), default=list(STYLE_LABELS),
                            format_func=STYLE_LABELS.get, key="styles")
    mode = st.radio("Creativity", [CREATIVITY_TUNED, CREATIVITY_GREEDY, CREATIVITY_CUSTOM], key="creativity",
                    horizontal=True, help="; ".join(f"{k}: {v}" for k, v in CREATIVITY_HELP.items()))
    temperature = None
    if mode == CREATIVITY_CUSTOM:
        temperature = st.slider("Temperature", 0.0, 1.5, 0.7, 0.05, key="temperature",
                                help="0 is deterministic; higher is more varied (and more odd)")
    if mode == CREATIVITY_GREEDY:
        temperature = 0.0
        num = 1
        st.caption("One caption per style: deterministic decoding always gives the same one.")
        seed = None
    else:
        num = st.slider("Captions per style", 1, client.MAX_NUM_CAPTIONS, 2, key="num_captions")
        seed_text = st.text_input("Seed (optional)", key="seed", placeholder="random",
                                  help="The same seed, image and settings give the same captions")
        try:
            seed = client.parse_seed(seed_text)
        except client.ClientError as exc:
            st.error(str(exc))
            return None
    if not styles:
        st.warning("Choose at least one style.")
        return None
    return client.CaptionOptions(styles=tuple(styles), num_captions=num, temperature=temperature, seed=seed)


def show_result(result: client.CaptionResult, label: str) -> None:
    if not result.ok:
        st.error(f"**{ERROR_TITLES.get(result.kind, 'Error')}**: {result.message}")
        if result.latency_ms is not None:
            st.caption(f"Answered in {result.latency_ms:.0f} ms" + (f" · HTTP {result.status}" if result.status else ""))
        return
    total = sum(len(v) for v in result.captions.values())
    cols = st.columns(3)
    cols[0].metric("Latency", f"{result.latency_ms:.0f} ms")
    cols[1].metric("Styles", len(result.captions))
    cols[2].metric("Captions", total)
    tabs = st.tabs(list(result.captions))
    for tab, (style, captions) in zip(tabs, result.captions.items()):
        with tab:
            for text in captions:
                st.code(text, language=None, wrap_lines=True)
    with st.expander("Response JSON"):
        st.json(result.captions)
    st.caption(f"Captions for {label}. Use the copy icon on a caption to copy it.")


def main() -> None:
    st.set_page_config(page_title="Image captions", page_icon="🖼️", layout="wide")
    st.title("Image captions in three styles")
    st.caption("Concise, narrative and descriptive captions from the TorchServe caption service.")
    try:
        defaults = client.Settings.from_env()
    except client.ClientError as exc:  # a setting of the page's environment: nothing can be sent
        st.error(f"**Settings**: {exc}.")
        st.stop()
    settings = sidebar(defaults)

    left, right = st.columns([1, 1], gap="large")
    with left:
        picked = choose_image()
        if picked:
            show_image(*picked)
        else:
            st.info("Upload an image or pick a sample to start.")
    with right:
        options = choose_options()
        clicked = st.button("Caption it", type="primary", key="caption", disabled=picked is None or options is None)
        if picked is None:
            return
        label, data = picked
        digest = hashlib.sha256(data).hexdigest()
        if clicked and options is not None:
            with st.spinner(f"Captioning {label}…"):
                result = client.caption(settings, data, options)
            st.session_state["last"] = {"digest": digest, "label": label, "result": result}
        last = st.session_state.get("last")
        if last and last["digest"] == digest:  # forget the captions of an image no longer shown
            show_result(last["result"], last["label"])


main()
