"""``blitzgen chat``: an interactive multi-turn chat in the terminal, streamed token by token.

The conversation is rendered with the model's chat template, either here (a local model) or by a
running ``blitzgen serve`` (``--url``). Replies go to stdout, everything else to stderr, so piping
works: ``printf 'Hi\\n/reset\\nHello\\n' | blitzgen chat``. Commands: ``/reset`` starts over (the
system message stays), ``/exit`` quits, as do EOF and Ctrl-C at the prompt; Ctrl-C while a reply
streams stops that reply.
"""

from __future__ import annotations

import sys
from typing import Iterator

HELP = "Commands: /reset clears the conversation, /exit quits (or Ctrl-D); Ctrl-C stops a reply."


def register(sub) -> None:
    from .common import add_model_source_args, add_parallel_args, add_remote_args, add_runtime_args, add_sampling_args

    p = sub.add_parser("chat", help="chat with the model in the terminal (local, or --url a server)",
                       description="Multi-turn streamed chat using the model's chat template. " + HELP +
                                   " Sampling is random by default: --seed N or --temperature 0 repeats a reply.")
    p.add_argument("--system", default=None, help="system message")
    add_sampling_args(p, temperature={"default": 0.7}, max_new_tokens={"default": 512, "help": "most tokens per reply"})
    from .speculate import add_speculation_args

    add_speculation_args(p)
    add_model_source_args(p)
    add_runtime_args(p)
    add_parallel_args(p)
    add_remote_args(p)
    p.set_defaults(func=run)


class LocalChat:
    """Replies from a model loaded in this process."""

    def __init__(self, args, loaded=None):
        from ..errors import InvalidRequestError
        from .common import load_engine

        self.lm, self.gen = loaded or load_engine(args)
        if not self.lm.tokenizer.chat_template:
            raise InvalidRequestError("this model has no chat template: use `blitzgen generate --raw` instead")
        if self.gen.compiled:  # before the first turn, through the compile cache
            import sys

            from ..compile_cache import warm_up

            print(f"Compilation time: {warm_up(self.lm, self.gen):.2f} seconds", file=sys.stderr, flush=True)
        self.name = self.lm.name
        from .speculate import speculative_decoder

        self.speculative = speculative_decoder(args, self.lm, self.gen)  # None without --speculate

    def reply(self, messages: list[dict], sampling, max_tokens: int, stop: list[str]) -> Iterator[str]:
        ids = self.lm.tokenizer.encode_chat(messages)
        self.gen.check_request(len(ids), max_tokens)
        if self.speculative is not None:
            from ..speculative import stream_speculative

            deltas = stream_speculative(self.speculative, self.gen, ids, max_tokens, sampling, stop)
        else:
            deltas = self.gen.stream(ids, max_tokens, sampling, stop)
        for delta in deltas:
            if delta.stats is not None:
                self.last = delta.stats
            yield delta.text

    last = None  # the stats of the last finished reply

    def stats(self) -> tuple[int, float]:
        st = self.last
        return (st.generated_tokens, st.tokens_per_second) if st else (0, 0.0)


class RemoteChat:
    """Replies from a server; the template is applied there."""

    def __init__(self, args):
        from .remote import RemoteClient

        self.client = RemoteClient(args.url, args.api_key)
        self.model = args.model  # with --url, the served model's name (optional for blitzgen serve)
        served = self.client.model_name()  # also fails early, in one line, when the server is not there
        self.name = args.model or served

    def reply(self, messages: list[dict], sampling, max_tokens: int, stop: list[str]) -> Iterator[str]:
        from .remote import sampling_payload

        payload = {**sampling_payload(sampling, max_tokens, stop), "messages": messages}
        if self.model:
            payload["model"] = self.model
        return self.client.stream("chat", payload)

    def stats(self) -> tuple[int, float]:
        st = self.client.last
        return st.completion_tokens, st.tokens_per_second


def run(args) -> int:
    if args.url:
        backend, sampling = RemoteChat(args), args  # the flags carry SamplingParams' fields; no torch here
    else:
        from .common import sampling_params

        sampling = sampling_params(args)
        if getattr(args, "tp", None) is not None:  # rank 0 chats; the other ranks follow it
            from ..parallel import run as run_tp
            from .common import tp_spec

            return run_tp(args.tp, tp_spec(args), lambda lm, gen: converse(args, sampling, LocalChat(args, (lm, gen))))
        backend = LocalChat(args)
    return converse(args, sampling, backend)


def converse(args, sampling, backend) -> int:
    from ..errors import BlitzgenError

    interactive = sys.stdin.isatty()
    if interactive:
        print(f"Chatting with {backend.name}. {HELP}", file=sys.stderr)
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    out = sys.stdout
    while True:
        try:
            line = input("> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            if interactive:
                print(file=sys.stderr)
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            messages = list(start)
            print("(conversation cleared)", file=sys.stderr)
            continue
        if text == "/help":
            print(HELP, file=sys.stderr)
            continue
        messages.append({"role": "user", "content": text})
        parts: list[str] = []
        stream = backend.reply(messages, sampling, args.max_new_tokens, args.stop)
        try:
            for piece in stream:
                out.write(piece)
                out.flush()
                parts.append(piece)
            note = ""
        except KeyboardInterrupt:
            note = ", stopped"
        except BlitzgenError as e:
            out.write("\n" if parts else "")
            print(f"error: {e}" + (" (try /reset)" if "context length" in str(e) else ""), file=sys.stderr)
            messages.pop()
            continue
        finally:
            stream.close()
        out.write("\n")
        out.flush()
        messages.append({"role": "assistant", "content": "".join(parts)})
        tokens, rate = backend.stats()
        print(f"[{tokens} tokens, {rate:.2f} tokens/sec{note}]", file=sys.stderr, flush=True)
