"""The Tk desktop example, driven under a virtual X display (skipped where tkinter or Xvfb is missing)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

tk = pytest.importorskip("tkinter")
if shutil.which("Xvfb") is None:
    pytest.skip("Xvfb is not installed (apt-get install xvfb)", allow_module_level=True)


@pytest.fixture(scope="module")
def display():
    number = 97 + os.getpid() % 100
    server = subprocess.Popen(["Xvfb", f":{number}", "-screen", "0", "1024x768x24", "-nolisten", "tcp"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    old = os.environ.get("DISPLAY")
    os.environ["DISPLAY"] = f":{number}"
    for _ in range(100):
        if os.path.exists(f"/tmp/.X11-unix/X{number}"):
            break
        time.sleep(0.05)
    yield
    server.terminate()
    server.wait()
    if old is None:
        os.environ.pop("DISPLAY", None)
    else:
        os.environ["DISPLAY"] = old


def _pump(root, until, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            raise AssertionError("the window did not get there in time")
        root.update()
        time.sleep(0.005)


def test_the_window_streams_a_reply_and_stop_stops_it(display, package):
    from neoedge import Model
    from neoedge.examples.tk_chat import ChatWindow

    root = tk.Tk()
    try:
        model = Model(package)
        window = ChatWindow(root, model, max_new_tokens=12)
        root.update()
        window.prompt.focus_force()
        root.update()
        window.prompt.insert(0, "open a file")
        window.prompt.event_generate("<Return>", when="tail")
        _pump(root, lambda: window.cancel is None and "Model:" in window.transcript.get("1.0", "end"))
        text = window.transcript.get("1.0", "end")
        expected = model.generate("User: open a file\nAssistant:", max_new_tokens=12, stop=["\nUser:"]).text
        assert text.startswith("You: open a file\nModel:" + expected)
        # A reply that would go on for a long time; Stop ends it and the window is usable again.
        window.max_new_tokens = 100_000
        window.chat.sequence.policy = type(window.chat.sequence.policy)(on_full="shift")
        window.prompt.insert(0, "tell me everything")
        window.send_button.invoke()
        _pump(root, lambda: len(window.transcript.get("1.0", "end")) > len(text) + 40)
        window.stop_button.invoke()
        _pump(root, lambda: window.cancel is None)
        assert "[cancelled]" in window.transcript.get("1.0", "end")
        assert str(window.send_button["state"]) == "normal" and str(window.stop_button["state"]) == "disabled"
    finally:
        root.destroy()


def test_a_message_the_model_cannot_take_is_shown_and_the_window_stays_usable(display, package):
    """Before, the refusal escaped the click handler (a Tk traceback) with Send disabled for good."""
    from neoedge import Model
    from neoedge.examples.tk_chat import ChatWindow

    root = tk.Tk()
    try:
        window = ChatWindow(root, Model(package), max_new_tokens=4)
        window.prompt.insert(0, "x" * 5000)
        window.send_button.invoke()
        root.update()
        assert "more than" in window.transcript.get("1.0", "end")  # the PromptError's one line
        assert window.cancel is None and str(window.send_button["state"]) == "normal"
        window.prompt.delete(0, "end")
        window.prompt.insert(0, "open a file")
        window.send_button.invoke()
        _pump(root, lambda: window.cancel is None and "Model:" in window.transcript.get("1.0", "end"))
    finally:
        root.destroy()
