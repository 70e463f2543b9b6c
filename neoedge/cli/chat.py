"""`neoedge chat`: an interactive terminal chat whose history stays in the KV cache.

Commands at the prompt: /reset, /undo (forget the last exchange), /save FILE, /load FILE, /help,
/quit. Ctrl-C while the assistant answers stops the answer (not the program); Ctrl-D quits.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import click

from ..cancel import CancelToken
from ..chat import ChatFormat, Conversation
from ..errors import NeoedgeError
from ..events import FinishReason
from ..options import MAX_STOP_STRINGS
from ..session import SessionSettings
from ..tokenizer import check_text
from .common import friendly_errors, session_options
from .generate import option_overrides, sampling_options

HELP = ("/reset  start over    /undo  forget the last exchange    /save FILE  /load FILE    "
        "/quit  (or Ctrl-D)    Ctrl-C stops an answer")


@click.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--system", default=None, help="Text placed before the first turn (instructions, a persona).")
@click.option("--user", "user_name", default=None, help="The user's name in the transcript [default: User].")
@click.option("--assistant", "assistant_name", default=None,
              help="The assistant's name in the transcript [default: Assistant].")
@click.option("--format", "format_file", type=click.Path(path_type=Path, dir_okay=False),
              help="JSON file with the transcript format (system, user, assistant, separator).")
@sampling_options
@session_options
@friendly_errors
def chat(package: Path, system: str | None, user_name: str | None, assistant_name: str | None,
         format_file: Path | None, settings: SessionSettings, stop: tuple[str, ...], ignore_eos: bool,
         **options: Any) -> None:
    """Chat with the model PACKAGE in the terminal. GPT-Neo is not chat-tuned: the chat is a
    plain "User:" / "Assistant:" transcript that the model continues, one reply at a time."""
    from ..model import Model

    chat_format = chat_format_from_options(format_file, system, user_name, assistant_name)
    model = Model(package, settings=settings)
    overrides = option_overrides(stop, ignore_eos, **options)
    if len(overrides["stop"] or ()) + len(chat_format.stop) > MAX_STOP_STRINGS:
        raise click.BadParameter(f"at most {MAX_STOP_STRINGS - len(chat_format.stop)} in a chat: the chat "
                                 f"stops at the next turn's marker ({chat_format.stop[0]!r}) too",
                                 param_hint="--stop")
    overrides["stop"] = tuple(overrides["stop"] or ()) + chat_format.stop
    model.options(**overrides)  # bad options fail now, not at the first message
    conversation = Conversation(model, chat_format)
    click.echo(f"chatting with {package} ({HELP})", err=True)
    while True:
        line = _read_line(f"{chat_format.user}> ")
        if line is None:
            return
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            conversation = _command(line, conversation, model, chat_format)
            if conversation is None:
                return
            continue
        try:
            check_text(line, "message")
        except NeoedgeError as exc:
            click.echo(f"error: {exc}", err=True)
            continue
        _reply(conversation, line, overrides, chat_format)


def chat_format_from_options(format_file: Path | None, system: str | None, user_name: str | None,
                             assistant_name: str | None) -> ChatFormat:
    """The transcript format of --format FILE, with --system/--user/--assistant on top (chat, serve)."""
    chat_format = ChatFormat.from_file(format_file) if format_file else ChatFormat()
    if system is not None:
        check_text(system, "system text")
    return ChatFormat(system=chat_format.system if system is None else system,
                      user=user_name or chat_format.user, assistant=assistant_name or chat_format.assistant,
                      separator=chat_format.separator)


def _read_line(prompt: str) -> str | None:
    """One line from stdin (the prompt on stderr: stdout carries only the model's text). None at
    end of input (Ctrl-D); Ctrl-C at the prompt discards the line being typed."""
    while True:
        click.echo(click.style(prompt, bold=True), nl=False, err=True)
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            click.echo(err=True)
            continue
        except UnicodeDecodeError:
            click.echo("error: that line is not valid text in this terminal's encoding", err=True)
            continue
        if not line:
            click.echo(err=True)
            return None
        return line


def _reply(conversation: Conversation, message: str, overrides: dict[str, Any], chat_format: ChatFormat) -> None:
    cancel = CancelToken()
    previous = signal.signal(signal.SIGINT, lambda *_: cancel.cancel())
    click.echo(click.style(f"{chat_format.assistant}:", bold=True), nl=False)
    try:
        stream = conversation.say(message, cancel=cancel, **overrides)
        for event in stream:
            click.echo(event.text, nl=False)
            sys.stdout.flush()
        click.echo()
        reason = stream.completion.finish_reason if stream.completion else None
        if reason == FinishReason.CANCELLED:
            click.echo("(stopped)", err=True)
        elif reason == FinishReason.LENGTH:
            click.echo("(cut at --max-new-tokens)", err=True)
    except NeoedgeError as exc:
        click.echo()
        click.echo(f"error: {exc}", err=True)
    finally:
        signal.signal(signal.SIGINT, previous)


def _command(line: str, conversation: Conversation, model: Any, chat_format: ChatFormat) -> Conversation | None:
    name, _, argument = line.partition(" ")
    argument = argument.strip()
    try:
        if name in ("/quit", "/exit"):
            return None
        if name == "/reset":
            conversation.reset()
            click.echo("(history cleared)", err=True)
        elif name == "/undo":
            click.echo("(last exchange forgotten)" if conversation.undo() else "(nothing to undo)", err=True)
        elif name == "/save":
            if not argument:
                click.echo("usage: /save FILE", err=True)
            else:
                conversation.save(argument)
                click.echo(f"(saved to {argument})", err=True)
        elif name == "/load":
            if not argument:
                click.echo("usage: /load FILE", err=True)
            else:
                conversation = Conversation.load(model, argument, chat_format)
                click.echo(f"(loaded {argument}: {conversation.turns} exchanges, "
                           f"{len(conversation.sequence)} tokens)", err=True)
        elif name == "/help":
            click.echo(HELP, err=True)
        else:
            click.echo(f"unknown command {name} ({HELP})", err=True)
    except (NeoedgeError, OSError, ValueError) as exc:
        click.echo(f"error: {exc}", err=True)
    return conversation
