"""Interactive chat loop over any text stream (a terminal or a pipe)."""
from __future__ import annotations

import sys
from typing import TextIO

from .errors import clean_text, one_line
from .generate import Generation
from .state import State

HELP = "commands: /reset  /save FILE  /load FILE  /quit"


def chat_loop(model, tokenizer, sampler, max_tokens: int = 300, inp: TextIO = sys.stdin,
              out: TextIO = sys.stdout, interactive: bool | None = None) -> int:
    """Read user lines from `inp`, stream replies to `out`. Prompt format: "User: ...\\n\\nAssistant:".

    The model state carries the whole conversation; /save and /load snapshot it to a file.
    """
    if interactive is None:
        interactive = inp.isatty()
    gen = Generation(model, tokenizer, sampler)
    gen.feed([0])
    start = gen.state.copy(), gen.logits.copy()
    if interactive:
        out.write(f"rwkv-edge chat ({model.config.version}, {model.config.n_layer} layers). {HELP}\n")
    while True:
        if interactive:
            out.write("\nUser: ")
            out.flush()
        line = inp.readline()
        if not line:
            break
        # a line that was not valid UTF-8 (stdin decoded with surrogateescape): replace the bytes, say so
        msg = clean_text(line, "input line", note=lambda m: out.write(f"[{m}]\n")).strip()
        if not msg:
            continue
        if msg.startswith("/"):
            cmd, _, arg = msg.partition(" ")
            arg = arg.strip()
            if cmd == "/quit":
                break
            elif cmd == "/reset":
                gen.state, gen.logits = start[0].copy(), start[1].copy()
                sampler.reset()
                out.write("[state reset]\n")
            elif cmd in ("/save", "/load") and not arg:
                out.write(f"[usage: {cmd} FILE]\n")
            elif cmd == "/save":
                try:
                    gen.state.save(arg, fingerprint=model.fingerprint)
                    out.write(f"[state saved to {arg}]\n")
                except OSError as e:
                    out.write(f"[cannot save: {e}]\n")
            elif cmd == "/load":
                try:  # State.load validates everything before the session's state is replaced
                    new_state = State.load(arg, model.config, fingerprint=model.fingerprint)
                except (OSError, ValueError) as e:
                    out.write(f"[cannot load: {one_line(e)}; the conversation continues unchanged]\n")
                else:
                    gen.state, gen.logits = new_state, None
                    sampler.reset()
                    out.write(f"[state loaded from {arg}]\n")
            else:
                out.write(f"[unknown command {cmd}; {HELP}]\n")
            out.flush()
            continue
        gen.feed(tokenizer.encode(f"User: {msg}\n\nAssistant:"))
        out.write("Assistant:")
        out.flush()
        for piece in gen.stream(max_tokens, stop=("\n\n", "\nUser:")):
            out.write(piece)
            out.flush()
        if gen.stop_hit is None:  # cut by max_tokens: close the turn as the format expects
            gen.feed(tokenizer.encode("\n\n"))
        out.write("\n")
        out.flush()
    return 0

