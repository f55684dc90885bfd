"""Stream from a deployed blitzgen Modal app (the seed's ``--lookup-existing``)."""

from __future__ import annotations

import sys
from typing import Iterator, TextIO

from ..errors import BlitzgenError

CLASS_NAME = "Model"


def lookup(app_name: str, class_name: str = CLASS_NAME, environment_name: str | None = None):
    """An instance of the deployed class (no container starts until a method is called)."""
    try:
        import modal
    except ImportError:
        raise BlitzgenError("--modal needs the deploy extras: pip install 'blitzgen[deploy]'") from None
    try:
        cls = modal.Cls.from_name(app_name, class_name, environment_name=environment_name)
        return cls()
    except modal.exception.NotFoundError:
        raise BlitzgenError(f"no deployed Modal app {app_name!r} with a class {class_name!r}: "
                            "run `modal deploy -m blitzgen.deploy.modal_app` first") from None
    except modal.exception.AuthError as e:
        raise BlitzgenError(f"Modal refused the credentials ({e}): run `modal setup`") from None


def stream_from_modal(app_name: str, prompt: str, *, max_tokens: int = 200, temperature: float = 0.8,
                      top_k: int = 200, top_p: float = 1.0, min_p: float = 0.0, seed: int | None = None,
                      stop: list[str] | None = None, raw: bool = False, system: str | None = None,
                      num_samples: int = 1, class_name: str = CLASS_NAME,
                      environment_name: str | None = None) -> Iterator[dict]:
    """The deployed ``generate``'s events: ``{"index", "text"}`` deltas, then per sample
    ``{"index", "finish_reason", "tokens"}``."""
    import modal

    model = lookup(app_name, class_name, environment_name)
    try:
        yield from model.generate.remote_gen(prompt, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                                             top_p=top_p, min_p=min_p, seed=seed, stop=list(stop or []), raw=raw,
                                             system=system, num_samples=num_samples)
    except modal.exception.Error as e:
        raise BlitzgenError(f"the Modal app {app_name!r} failed: {e}") from None


def print_stream(events, out: TextIO = sys.stdout, err: TextIO = sys.stderr, quiet: bool = False) -> list[int]:
    """Write the text of each sample (a newline after each); return the tokens of each sample."""
    tokens: list[int] = []
    for ev in events:
        if "text" in ev:
            if not quiet:
                out.write(ev["text"])
                out.flush()
        else:
            tokens.append(ev.get("tokens", 0))
            if not quiet:
                out.write("\n")
            print(f"Sample {ev['index'] + 1}: {ev.get('tokens', 0)} tokens ({ev.get('finish_reason')})",
                  file=err, flush=True)
    return tokens


def generate_modal(args, sampling) -> int:
    """``blitzgen generate --modal APP``: args as parsed by commands/generate.py."""
    events = stream_from_modal(args.modal, args.prompt, max_tokens=args.max_new_tokens,
                               temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                               min_p=sampling.min_p, seed=sampling.seed, stop=list(args.stop or []),
                               raw=getattr(args, "raw", False), system=getattr(args, "system", None),
                               num_samples=args.num_samples)
    print_stream(events, quiet=getattr(args, "quiet", False))
    return 0
