"""A real browser for tests: open a local HTML page in headless Chromium and read back what its scripts wrote.

``open_page(page)`` returns the DOM as Chromium serialises it once the page has run for a (virtual) time
budget; ``page_result(page)`` reads the JSON a page's script put in ``<pre id="result">``; ``play_video(path)``
writes a page that loads and plays one local video file and returns what the ``<video>`` element reported.

Chromium is ``$ROLO_CHROMIUM`` or the first of ``CHROMIUM_NAMES`` on the PATH (``make test`` installs
Debian's ``chromium`` where it is missing); ``chromium_or_skip()`` skips a test, saying so, without one.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
RESULT_ID = "result"


def find_chromium() -> str | None:
    """The Chromium executable, or None: ``$ROLO_CHROMIUM`` if set, else the first of ``CHROMIUM_NAMES`` found."""
    override = os.environ.get("ROLO_CHROMIUM")
    if override:
        return override if shutil.which(override) else None
    return next((found for name in CHROMIUM_NAMES if (found := shutil.which(name))), None)


def chromium_or_skip() -> str:
    """The Chromium executable; skips the calling test when there is none."""
    found = find_chromium()
    if found is None:
        pytest.skip(f"no Chromium found (looked for $ROLO_CHROMIUM, {', '.join(CHROMIUM_NAMES)}); "
                    f"`make test` installs Debian's chromium with apt-get")
    return found


def open_page(page: Path, *, budget_ms: int = 3000, timeout_s: float = 60.0, chromium: str | None = None,
              extra_args: tuple[str, ...] = ()) -> str:
    """Open the local HTML file ``page`` in headless Chromium and return the DOM it has after ``budget_ms`` of
    virtual time (the clock runs faster than real time while the page is idle, so timers, media and
    animations of a few seconds finish in well under a second of wall time).

    Media autoplays without a user gesture; page scripts may read other local files
    (``--allow-file-access-from-files``). A fresh profile is used each time. ``RuntimeError`` (with
    Chromium's stderr) when Chromium fails or runs past ``timeout_s``.
    """
    chromium = chromium or chromium_or_skip()
    with tempfile.TemporaryDirectory(prefix="rolo-chromium-") as profile:
        command = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                   "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--mute-audio",
                   f"--user-data-dir={profile}", "--autoplay-policy=no-user-gesture-required",
                   "--allow-file-access-from-files", f"--virtual-time-budget={int(budget_ms)}", *extra_args,
                   "--dump-dom", Path(page).resolve().as_uri()]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"Chromium ran past {timeout_s} s on {page}: {(exc.stderr or '')[-2000:]}") from None
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(f"Chromium exited with {done.returncode} on {page} and printed no DOM: "
                           f"{done.stderr[-2000:]}")
    return done.stdout


def element_text(dom: str, element_id: str = RESULT_ID) -> str | None:
    """The text inside the element with ``id=element_id`` in a serialised DOM (entities decoded), or None."""
    match = re.search(rf'<(\w+)[^>]*\bid="{re.escape(element_id)}"[^>]*>(.*?)</\1>', dom, re.DOTALL)
    return html.unescape(match.group(2)) if match else None


def page_result(page: Path, element_id: str = RESULT_ID, **open_kwargs: Any) -> Any:
    """Open ``page`` (``open_page``) and return the JSON its script wrote into the element ``element_id``.

    ``AssertionError`` showing the start of the DOM when the element is missing or does not hold JSON.
    """
    dom = open_page(page, **open_kwargs)
    text = element_text(dom, element_id)
    try:
        return json.loads(text) if text is not None else None
    except json.JSONDecodeError:
        pass
    raise AssertionError(f"{page}: no JSON in element {element_id!r}; the DOM starts {dom[:1500]!r}")


# The state of one <video>, kept in the result element after every media event (a page that breaks leaves
# "pending" there, which page_result reports). Events are recorded once each, in order of first firing.
_VIDEO_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>video check</title></head>
<body><pre id="{result_id}">pending</pre>
<script>
const out = document.getElementById({result_id_js});
const video = document.createElement("video");
const state = {{events: [], maxTime: 0, canPlayType: {{}}, playError: null, firstFrameMeanRgb: null,
               firstFrameError: null}};
for (const type of {types_js}) state.canPlayType[type] = video.canPlayType(type);
function report() {{
  Object.assign(state, {{readyState: video.readyState, networkState: video.networkState,
    duration: Number.isFinite(video.duration) ? video.duration : null, videoWidth: video.videoWidth,
    videoHeight: video.videoHeight, currentTime: video.currentTime, ended: video.ended,
    error: video.error ? {{code: video.error.code, message: video.error.message}} : null}});
  state.maxTime = Math.max(state.maxTime, video.currentTime);
  out.textContent = JSON.stringify(state);
}}
// The first frame is read from a second element that is never played (it stays at time 0), and read again
// while the canvas still comes back black: under load Chromium can fire "loadeddata" before the decoded frame
// can be drawn (seen in CI), and a retry on the playing element would read a later frame.
const probe = document.createElement("video");
let probeTries = 0;
function grabFirstFrame() {{
  try {{
    probeTries += 1;
    const canvas = document.createElement("canvas");
    canvas.width = probe.videoWidth;
    canvas.height = probe.videoHeight;
    const context = canvas.getContext("2d");
    context.drawImage(probe, 0, 0);
    const pixels = context.getImageData(0, 0, canvas.width, canvas.height).data;
    const sum = [0, 0, 0];
    for (let i = 0; i < pixels.length; i += 4) for (let c = 0; c < 3; c++) sum[c] += pixels[i + c];
    state.firstFrameMeanRgb = sum.map(v => v / (pixels.length / 4));
    state.firstFrameTries = probeTries;
    if (sum[0] + sum[1] + sum[2] === 0 && probeTries < 60) setTimeout(grabFirstFrame, 50);
  }} catch (error) {{ state.firstFrameError = String(error); }}
  report();
}}
probe.muted = true;
probe.preload = "auto";
probe.addEventListener("loadeddata", grabFirstFrame, {{once: true}});
probe.src = {src_js};
for (const type of ["loadedmetadata", "loadeddata", "canplay", "playing", "timeupdate", "ended", "error"]) {{
  video.addEventListener(type, () => {{
    if (!state.events.includes(type)) state.events.push(type);
    report();
  }});
}}
video.muted = true;
video.preload = "auto";
video.src = {src_js};
document.body.appendChild(video);
video.play().catch(error => {{ state.playError = String(error); report(); }});
report();
</script></body></html>
"""

VIDEO_TYPES = ('video/webm; codecs="vp8"', 'video/webm; codecs="vp9"', 'video/mp4; codecs="avc1.42E01E"',
               'video/mp4; codecs="mp4v.20.8"', 'video/mp4; codecs="av01.0.05M.08"')


def play_video(video: Path, *, budget_ms: int = 5000, **open_kwargs: Any) -> dict[str, Any]:
    """Load and play the local ``video`` file muted in headless Chromium; return what its ``<video>`` element
    reported: ``readyState`` (4 = can play through), ``duration`` s (None when unknown), ``videoWidth``,
    ``videoHeight``, ``currentTime`` and ``maxTime`` s, ``ended``, ``events`` (media events in order of first
    firing), ``error`` (``{"code", "message"}``, code 4 = format not supported, 3 = decode error; or None),
    ``playError`` (why ``play()`` was refused), ``firstFrameMeanRgb`` (the mean R, G, B of the first frame
    Chromium decoded, drawn on a canvas; None if none was) and ``canPlayType`` (Chromium's answer for
    ``VIDEO_TYPES``). The page is written beside the video (its folder must be writable) and removed after."""
    video = Path(video).resolve()
    page = video.with_name(f"{video.name}.check.html")
    page.write_text(_VIDEO_PAGE.format(result_id=RESULT_ID, result_id_js=json.dumps(RESULT_ID),
                                       types_js=json.dumps(VIDEO_TYPES), src_js=json.dumps(video.name)),
                    encoding="utf-8")
    try:
        return page_result(page, budget_ms=budget_ms, **open_kwargs)
    finally:
        page.unlink(missing_ok=True)
