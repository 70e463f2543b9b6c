"""Chat: the transcript format, a conversation that keeps its cache, and `neoedge chat` driven
through a real pseudo-terminal (Ctrl-C stops a reply, not the program)."""

from __future__ import annotations

import os
import pty
import select
import sys
import time

import pytest

from neoedge import FinishReason, Model
from neoedge.chat import ChatFormat, Conversation


def test_the_transcript_format():
    fmt = ChatFormat(system="Be brief.")
    assert fmt.turn("hi", first=True) == "Be brief.\nUser: hi\nAssistant:"
    assert fmt.turn("more", first=False) == "\nUser: more\nAssistant:"
    assert fmt.stop == ("\nUser:",)
    messages = [{"role": "system", "content": "Answer in English."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}]
    assert fmt.render(messages) == "Be brief.\nAnswer in English.\nUser: hi\nAssistant: hello\nUser: bye\nAssistant:"
    with pytest.raises(ValueError, match="unknown message role"):
        fmt.render([{"role": "tool", "content": "x"}])


@pytest.mark.parametrize("reply_tokens", ["short", "long"])
def test_undo_after_the_message_itself_shifted_the_context_starts_over(package, reply_tokens):
    """The message's own append can shift the context: undo then cannot restore the exchange's
    start, and starts over (before, it rewound to a stale length: an error, or a half-kept exchange)."""
    model = Model(package)
    context = model.info.context_length
    message = "open the file and read the lines of text " * 3
    length = len(model.encode("\nUser: " + message + "\nAssistant:"))
    chat = Conversation(model)
    chat.sequence.append(tokens=[5] * (context - length + 1))
    new_tokens = 2 if reply_tokens == "short" else context // 2 - length
    chat.reply(message, max_new_tokens=new_tokens, stop_at_eos=False, stop=())
    assert chat.sequence.shifts == 1
    assert chat.undo()
    assert chat.sequence.tokens == ()


def test_a_conversation_undoes_and_saves(package, tmp_path):
    model = Model(package)
    chat = Conversation(model)
    first = chat.reply("open a file", max_new_tokens=10, stop_at_eos=False)
    after_first = chat.sequence.tokens
    second = chat.reply("close it", max_new_tokens=10, stop_at_eos=False)
    assert first.finish_reason in (FinishReason.LENGTH, FinishReason.STOP)
    assert chat.sequence.text.startswith("User: open a file\nAssistant:" + first.text + "\nUser: close it")
    assert chat.undo() and chat.sequence.tokens == after_first
    again = chat.reply("close it", max_new_tokens=10, stop_at_eos=False)
    assert again.tokens == second.tokens  # the undone exchange, regenerated exactly
    chat.save(tmp_path / "c")
    loaded = Conversation.load(model, tmp_path / "c")
    assert loaded.turns == 2 and loaded.sequence.tokens == chat.sequence.tokens
    assert loaded.undo() and loaded.sequence.tokens == after_first


class Terminal:
    """A program on a pseudo-terminal of its own, as a person would run it."""

    def __init__(self, argv: list[str]) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the pty is its controlling terminal
            os.execv(argv[0], argv)
        self.screen = ""

    def read_until(self, text: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while text not in self.screen:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for {text!r}; screen:\n{self.screen[-2000:]}")
            ready, _, _ = select.select([self.fd], [], [], min(remaining, 0.5))
            if ready:
                try:
                    self.screen += os.read(self.fd, 65536).decode("utf-8", "replace")
                except OSError:  # the child closed the terminal
                    break
        found = self.screen
        self.screen = found[found.index(text) + len(text):] if text in found else ""
        return found

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def wait(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            try:
                self.read_until("\0", timeout=0.2)
            except AssertionError:
                pass
        os.kill(self.pid, 9)
        raise AssertionError("the program did not exit")


def test_neoedge_chat_in_a_terminal(package, tmp_path):
    saved = tmp_path / "chat.neoseq"
    term = Terminal([sys.executable, "-c", "import sys; from neoedge.cli import main; sys.argv[0] = 'neoedge'; main()",
                     "chat", str(package), "--max-new-tokens", "6", "--ignore-eos", "--threads", "1"])
    term.read_until("User> ")
    term.type("open a file\n")
    term.read_until("Assistant:")
    term.read_until("User> ")
    term.type("/save " + str(saved) + "\n")
    term.read_until("(saved to")
    term.read_until("User> ")
    term.type("/undo\n")
    term.read_until("(last exchange forgotten)")
    term.read_until("User> ")
    term.type("/load " + str(saved) + "\n")
    term.read_until("(loaded")
    term.read_until("User> ")
    term.type("/reset\n")
    term.read_until("(history cleared)")
    term.read_until("User> ")
    term.type("\x04")  # Ctrl-D
    assert term.wait() == 0


def test_ctrl_c_stops_a_reply_not_the_chat(package):
    term = Terminal([sys.executable, "-c", "import sys; from neoedge.cli import main; sys.argv[0] = 'neoedge'; main()",
                     "chat", str(package), "--max-new-tokens", "1000000", "--ignore-eos", "--threads", "1"])
    term.read_until("User> ")
    term.type("tell me everything\n")
    term.read_until("Assistant:")
    time.sleep(0.5)  # the reply is streaming now
    term.type("\x03")  # Ctrl-C
    term.read_until("(stopped)")
    term.read_until("User> ")
    term.type("/quit\n")
    assert term.wait() == 0
