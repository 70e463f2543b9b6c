"""A desktop chat window: prompt box, streamed reply, Stop button.

    python -m neoedge.examples.tk_chat PACKAGE

The model runs in a worker thread (Tk is single-threaded): events cross to the window through a
queue that the Tk loop polls, and Stop cancels the reply from the UI thread.
"""

from __future__ import annotations

import queue
import sys
import threading
import tkinter as tk

from neoedge import CancelToken, Model, NeoedgeError
from neoedge.chat import Conversation


class ChatWindow:
    def __init__(self, root: tk.Tk, model: Model, max_new_tokens: int = 200) -> None:
        self.root, self.chat, self.max_new_tokens = root, Conversation(model), max_new_tokens
        self.events: queue.Queue = queue.Queue()
        self.cancel: CancelToken | None = None
        root.title("neoedge chat")
        self.transcript = tk.Text(root, width=80, height=24, wrap="word", state="disabled")
        self.transcript.pack(fill="both", expand=True)
        self.prompt = tk.Entry(root)
        self.prompt.pack(side="left", fill="x", expand=True)
        self.prompt.bind("<Return>", lambda _: self.send())
        self.send_button = tk.Button(root, text="Send", command=self.send)
        self.stop_button = tk.Button(root, text="Stop", command=self.stop, state="disabled")
        self.send_button.pack(side="left")
        self.stop_button.pack(side="left")

    def write(self, text: str) -> None:
        self.transcript.configure(state="normal")
        self.transcript.insert("end", text)
        self.transcript.configure(state="disabled")
        self.transcript.see("end")

    def send(self) -> None:
        message = self.prompt.get().strip()
        if not message or self.cancel is not None:
            return
        cancel = CancelToken()
        try:  # a message the model cannot take is refused here, before the window changes state
            stream = self.chat.say(message, cancel=cancel, max_new_tokens=self.max_new_tokens)
        except NeoedgeError as exc:
            self.write(f"[{exc}]\n")
            return
        self.prompt.delete(0, "end")
        self.write(f"You: {message}\nModel:")
        self.cancel = cancel
        self.send_button.configure(state="disabled")
        self.stop_button.configure(state="normal")
        threading.Thread(target=self._generate, args=(stream,), daemon=True).start()
        self.root.after(20, self.poll)

    def _generate(self, stream) -> None:  # the worker thread: events, or the error that ended them
        try:
            for event in stream:
                self.events.put(event)
        except NeoedgeError as exc:
            self.events.put(exc)

    def poll(self) -> None:
        while not self.events.empty():
            event = self.events.get()
            if isinstance(event, NeoedgeError):
                self.write(f"\n[{event}]\n")
                self._idle()
                return
            self.write(event.text)
            if event.finish_reason is not None:
                self.write(f"\n[{event.finish_reason}]\n" if event.finish_reason == "cancelled" else "\n")
                self._idle()
                return
        self.root.after(20, self.poll)

    def _idle(self) -> None:
        self.cancel = None
        self.send_button.configure(state="normal")
        self.stop_button.configure(state="disabled")

    def stop(self) -> None:
        if self.cancel is not None:
            self.cancel.cancel()


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python -m neoedge.examples.tk_chat PACKAGE")
    root = tk.Tk()
    ChatWindow(root, Model(sys.argv[1]))
    root.mainloop()


if __name__ == "__main__":
    main()
