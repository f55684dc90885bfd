"""``blitzgen generate``: one prompt, streamed to the terminal, then gpt-fast's timing lines."""

from __future__ import annotations

import statistics
import sys


def register(sub) -> None:
    from .common import add_model_source_args, add_parallel_args, add_remote_args, add_runtime_args, add_sampling_args
    from .speculate import add_speculation_args

    p = sub.add_parser("generate", help="generate text for one prompt and report speed",
                       description="Stream a completion for --prompt, then print load time, compile "
                                   "time, tokens/s and the memory bandwidth achieved. Sampling is random "
                                   "by default: --seed N or --temperature 0 gives the same text every run.")
    p.add_argument("--prompt", "-p", required=True, help="the prompt (the chat template is applied unless --raw)")
    p.add_argument("--system", default=None, help="system message (chat models)")
    p.add_argument("--raw", action="store_true", help="plain completion: do not apply the chat template")
    p.add_argument("--num-samples", type=int, default=1, metavar="N", help="completions to generate, one after another")
    p.add_argument("--quiet", action="store_true", help="do not print the generated text")
    add_sampling_args(p)
    add_speculation_args(p)
    add_model_source_args(p)
    add_runtime_args(p)
    add_parallel_args(p)
    remote = add_remote_args(p)
    remote.add_argument("--modal", default=None, metavar="APP",
                        help="stream from a deployed blitzgen Modal app (`modal deploy -m blitzgen.deploy.modal_app`) "
                             "instead of loading a model here")
    p.set_defaults(func=run)


def build_prompt_ids(tokenizer, prompt: str, raw: bool, system: str | None = None) -> list[int]:
    if raw or not tokenizer.chat_template:
        return tokenizer.encode(prompt)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tokenizer.encode_chat(messages)


def run(args) -> int:
    from ..errors import InvalidRequestError

    if args.num_samples < 1:
        raise InvalidRequestError(f"--num-samples must be >= 1, got {args.num_samples}")
    if not args.prompt.strip():
        raise InvalidRequestError("the prompt is empty", param="prompt")
    if args.url and getattr(args, "modal", None):
        raise InvalidRequestError("--url and --modal both name where to generate; give one")
    if args.url:
        from .remote import generate_remote

        return generate_remote(args)
    from .common import COMPILE_PAYS_TOKENS, load_engine, sampling_params

    sampling = sampling_params(args)
    if getattr(args, "modal", None):
        from ..deploy.client import generate_modal

        return generate_modal(args, sampling)
    if getattr(args, "tp", None) is not None:  # rank 0 runs the rest; the other ranks follow it
        from ..parallel import run as run_tp
        from .common import tp_spec

        return run_tp(args.tp, tp_spec(args), lambda lm, gen: run_loaded(args, sampling, lm, gen))
    def warm_for(lm):  # a plain run long enough to pay for a compiled start (speculation decides its own)
        if getattr(args, "speculate", None) or args.max_new_tokens * args.num_samples < COMPILE_PAYS_TOKENS:
            return None
        n = len(build_prompt_ids(lm.tokenizer, args.prompt, args.raw, args.system))
        return n + args.max_new_tokens, [sampling.mode]

    lm, gen = load_engine(args, warm_for=warm_for)
    return run_loaded(args, sampling, lm, gen)


def run_loaded(args, sampling, lm, gen) -> int:
    """Warm up (plain or speculative), then the one print path: each sample's text streamed to
    stdout, its timing lines (and speculation statistics) on stderr, the totals and the
    ``startup:`` line (process start to the first token)."""
    import torch

    from ..generate import weight_bytes
    from ..sampling import choice_sampling
    from ..startup import REPORT

    ids = build_prompt_ids(lm.tokenizer, args.prompt, args.raw, args.system)
    gen.check_request(len(ids), args.max_new_tokens)
    if getattr(args, "speculate", None):
        from .speculate import SpeculativeRun

        run = SpeculativeRun(args, lm, gen, ids, sampling)
    else:
        run = PlainRun(lm, gen, ids, args.max_new_tokens, sampling)
    nbytes = weight_bytes(lm.model)
    rates = []
    out = sys.stdout
    report = None
    for i in range(args.num_samples):
        for d in run.stream(ids, args.max_new_tokens, choice_sampling(sampling, i), args.stop):
            if report is None:
                REPORT.mark("first token")
                report = REPORT.render("first token")
            if not args.quiet:
                out.write(d.text)
                out.flush()
        st = d.stats
        if not args.quiet:
            out.write("\n")
        rates.append(st.tokens_per_second)
        print_timing(i, st, nbytes)
        run.sample_done()
    print("==========", file=sys.stderr)
    print(f"Average tokens/sec: {statistics.mean(rates):.2f}", file=sys.stderr)
    run.all_done(args.num_samples)
    if lm.model.device.type == "cuda":
        print(f"Memory used: {torch.cuda.max_memory_reserved() / 1e9:.02f} GB", file=sys.stderr)
    print(report, file=sys.stderr, flush=True)
    return 0


class PlainRun:
    """Plain decoding for ``run_loaded``: warmed up for this sampler and prompt length when compiled."""

    def __init__(self, lm, gen, ids: list[int], max_new_tokens: int, sampling):
        from ..compile_cache import warm_up

        gen.ensure_capacity(len(ids) + max_new_tokens)
        if gen.compiled:  # this sampler mode, and this prompt's prefill bucket when prefill compiles
            secs = warm_up(lm, gen, [sampling], prompt_len=len(ids))
            print(f"Compilation time: {secs:.2f} seconds", file=sys.stderr, flush=True)
        self.stream = gen.stream

    def sample_done(self) -> None:
        pass

    def all_done(self, num_samples: int) -> None:
        pass


def print_timing(i: int, st, nbytes: int) -> None:
    """gpt-fast's per-sample lines: time, tokens/s and the bandwidth achieved."""
    print(f"Time for inference {i + 1}: {st.total_seconds:.2f} sec total, {st.generated_tokens} tokens, "
          f"{st.tokens_per_second:.2f} tokens/sec (first token {st.time_to_first_token * 1000:.0f} ms, "
          f"decode {st.decode_tokens_per_second:.2f} tokens/sec)", file=sys.stderr)
    print(f"Bandwidth achieved: {nbytes * st.tokens_per_second / 1e9:.2f} GB/s", file=sys.stderr, flush=True)
