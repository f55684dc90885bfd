"""Tensor parallelism on CPU with gloo: 2 and 4 ranks of tiny random GQA models give one rank's
logits (float32, int8, int4) and greedy tokens; the launcher's lockstep runner, sliced loading from
safetensors, clear errors for splits that do not work, and a bounded exit when a rank dies."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from blitzgen.config import ModelArgs
from blitzgen.parallel.tp import ShardError, TPPlan
from blitzgen.quant.core import make_config, quantize_model

from .conftest import tiny_model

# (overrides of the "tiny" shape, world): GQA split, KV replicated (4 ranks > 2 KV heads), uneven
# GQA groups per rank (12 q heads, 3 KV heads, 4 ranks: one KV copy per q head).
GQA = dict(dim=128, n_heads=8, n_kv_heads=2, head_dim=16, intermediate_size=256)
UNEVEN = dict(dim=64, n_heads=12, n_kv_heads=3, head_dim=16, intermediate_size=256)


def _init(rank, world, port):
    from blitzgen.parallel import init

    torch.set_num_threads(1)
    return init(rank, world, device="cpu", init_method=f"tcp://127.0.0.1:{port}", timeout_s=120)


def _check_logits(group, overrides, quant, seed=1):
    full = tiny_model(seed=seed, **overrides)
    if quant:
        quantize_model(full, make_config(quant, 32 if quant == "int4" else None))
    tp = TPPlan.make(full.args, group.rank, group.world, make_config(quant) if quant == "int4" else None) \
        .shard_model(copy.deepcopy(full), group.all_reduce())
    assert tp.layers[0].attention.n_heads == full.args.n_heads // group.world
    ids = torch.randint(0, full.args.vocab_size, (1, 7), generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        for pos, x in ((torch.arange(7), ids), (torch.tensor([7]), ids[:, :1]), (torch.tensor([8]), ids[:, 1:2])):
            ref, got = full(x, pos), tp(x, pos)
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4, msg=lambda m: f"{quant} {overrides}: {m}")
    return full, tp


def _worker(rank, world, port, cases):
    from blitzgen.generate import Generator

    group = _init(rank, world, port)
    try:
        for overrides, quant in cases:
            full, tp = _check_logits(group, overrides, quant)
            if quant is None:  # greedy generation: every rank, in lockstep, the same tokens as one rank
                prompt = [3, 14, 15, 92, 65]
                want = list(Generator(full).generate_ids(prompt, 12, stop_token_ids=()))
                got = list(Generator(tp).generate_ids(prompt, 12, stop_token_ids=()))
                assert got == want, (rank, got, want)
    finally:
        group.close()


def _spawn(world, cases):
    from blitzgen.parallel.group import free_port

    torch.multiprocessing.spawn(_worker, args=(world, free_port(), cases), nprocs=world, join=True)


def test_two_ranks_logits_and_greedy():
    _spawn(2, [(GQA, None), (GQA, "int8"), (GQA, "int4"), ({}, None)])


def test_four_ranks_logits_and_greedy():
    _spawn(4, [(GQA, None), (GQA, "int8"), (GQA, "int4"), (UNEVEN, None)])


# ---- the plan, without processes -------------------------------------------------------------------
def test_kv_heads_split_replicated_or_per_q_head():
    a = ModelArgs.from_name("tiny").replace(**GQA)  # 8 q heads, 2 KV heads
    assert [TPPlan.make(a, r, 2).kv_heads for r in range(2)] == [[0], [1]]
    assert [TPPlan.make(a, r, 4).kv_heads for r in range(4)] == [[0], [0], [1], [1]]
    assert TPPlan.make(a, 1, 4).rank_args().n_kv_heads == 1
    u = ModelArgs.from_name("tiny").replace(**UNEVEN)  # 12 q heads, 3 KV heads, 4 ranks: 3 q heads each
    assert TPPlan.make(u, 1, 4).kv_heads == [0, 1, 1]


def test_unsplittable_heads_give_a_clear_error():
    smol = ModelArgs(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, intermediate_size=1536)
    with pytest.raises(ShardError, match=r"--tp 2 does not divide the model's 9 attention heads \(possible --tp values: 1, 3, 9\)"):
        TPPlan.make(smol, 0, 2)
    a = ModelArgs.from_name("tiny").replace(**GQA)  # w2 has 256 inputs: 64 per rank of 4
    with pytest.raises(ShardError, match="int4 group size 128 does not fit a 4-way split"):
        TPPlan.make(a, 0, 4, make_config("int4", 128))


def test_quantized_modules_shard_themselves():
    from blitzgen.quant.int4 import Int4Linear
    from blitzgen.quant.int8 import Int8Linear

    lin = torch.nn.Linear(128, 48, bias=True)
    for m in (Int8Linear.from_linear(lin, torch.float32), Int4Linear.from_linear(lin, 32, torch.float32)):
        w = m.dequantize()
        rows = copy.deepcopy(m).shard(0, 1, 2, [(0, 8), (40, 48)])
        torch.testing.assert_close(rows.dequantize(), torch.cat([w[0:8], w[40:48]]))
        assert rows.out_features == 16 and rows.bias.shape == (16,)
        cols = copy.deepcopy(m).shard(1, 3, 4)
        torch.testing.assert_close(cols.dequantize(), w[:, 96:128])
        assert cols.in_features == 32 and cols.bias.shape == (48,)
    with pytest.raises(ShardError, match="cannot split the 128 inputs of this int4, group_size=32 layer 8 ways"):
        Int4Linear.from_linear(lin, 32, torch.float32).shard(1, 0, 8)


# ---- the launcher and the lockstep runner ------------------------------------------------------------
def _greedy(lm, gen):
    """Greedy tokens through every path a server uses: plain, a stream its reader leaves early (the
    ranks must stay in step), the logprobs token loop (prefill/model_logits hooks), prompt caching."""
    from blitzgen import constrained

    gen.ensure_capacity(300)
    gen.warmup(prompt_len=4)
    out = [list(gen.generate_ids([5, 6, 7, 8], 10, stop_token_ids=()))]
    left = gen.stream([9, 10, 11], 100, stop_token_ids=())
    next(left)
    left.close()
    gen.stream([9, 10], 100).close()  # closed before its first item
    out.append(gen.complete([5, 6, 7], 6).token_ids)
    steps = [(d.token_ids, [(r.token_id, round(r.logprob, 4)) for r in d.logprobs])
             for d in constrained.stream(gen, [5, 6, 7, 8, 9], 8, top_logprobs=2)]
    out.append(steps)
    out.append(list(gen.generate_ids([5, 6, 7, 8, 9, 1], 5, stop_token_ids=())))  # reuses the cached prefix
    gen.forget_prefix()
    out.append(list(gen.generate_ids([5, 6, 7, 8, 9, 1], 5, stop_token_ids=())))
    a, b = list(range(20, 60)), list(range(100, 140))  # saved prefixes: a, then b, then a restored
    out += [list(gen.generate_ids(p, 4, stop_token_ids=())) for p in (a, b)]
    out.append([d.token_ids for d in constrained.stream(gen, a + [1], 4, top_logprobs=1)])
    out.append(gen.prefixes.restores)
    return out


def test_runner_two_ranks_from_safetensors_equals_one_rank(tmp_path):
    """blitzgen's own launcher, each rank reading its slices of an HF checkpoint (get_slice), a
    TPGenerator on rank 0: the tokens (and logprobs) one rank gives, on every path (``_greedy``)."""
    from blitzgen.generate import Generator
    from blitzgen.loading import load
    from blitzgen.loading.synthetic import save_random_checkpoint
    from blitzgen.parallel import TPSpec, run

    save_random_checkpoint(ModelArgs.from_name("tiny").replace(**GQA), tmp_path, dtype=torch.float32)
    lm = load(tmp_path, device="cpu", dtype="float32", progress=False)
    gen = Generator(lm.model, lm.tokenizer)
    t0 = time.monotonic()
    got = run(2, TPSpec(model=str(tmp_path), dtype="float32"), _greedy, timeout_s=120)
    assert got == _greedy(lm, gen)
    print(f"2-rank run: {time.monotonic() - t0:.1f} s")


_DYING = textwrap.dedent("""
    import os, sys, time
    from blitzgen.parallel import launch

    def die(group, alive):
        os._exit(7)

    if __name__ == "__main__":
        launch(2, die, (), lambda group: time.sleep(60), device="cpu")
""")


def test_a_dying_rank_ends_the_launcher_quickly(tmp_path):
    script = tmp_path / "dying.py"
    script.write_text(_DYING)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=60)
    took = time.monotonic() - t0
    assert res.returncode == 1, res.stderr
    assert "blitzgen: tensor-parallel rank 1 exited (status 7); stopping all ranks" in res.stderr
    assert took < 30, took


def test_a_failing_rank_zero_stops_the_followers():
    from blitzgen.parallel import TPSpec, run

    def boom(lm, gen):
        raise RuntimeError("rank 0 failed")

    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 0 failed"):
        run(2, TPSpec(shape="tiny", dtype="float32"), boom, timeout_s=60)
    assert time.monotonic() - t0 < 60


def _compile_worker(rank, world, port):
    group = _init(rank, world, port)
    try:
        full = tiny_model(seed=2, **GQA)
        tp = TPPlan.make(full.args, rank, world).shard_model(copy.deepcopy(full), group.all_reduce())
        step = torch.compile(tp, fullgraph=True, backend="aot_eager")  # no graph break at the all-reduce
        ids = torch.tensor([[1, 2, 3]])
        with torch.inference_mode():
            torch.testing.assert_close(step(ids, torch.arange(3)), full(ids, torch.arange(3)), rtol=1e-4, atol=1e-4)
            x, pos = torch.tensor([[4]]), torch.tensor([3])
            torch.testing.assert_close(step(x, pos), full(x, pos), rtol=1e-4, atol=1e-4)
    finally:
        group.close()


@pytest.mark.slow
def test_compiled_two_ranks_trace_the_all_reduce_in_one_graph():
    from blitzgen.parallel.group import free_port

    torch.multiprocessing.spawn(_compile_worker, args=(2, free_port()), nprocs=2, join=True)


@pytest.mark.slow
def test_eight_ranks_logits_and_greedy():
    _spawn(8, [(GQA, None), (GQA, "int8")])


def test_each_rank_reads_only_its_slices(tmp_path, monkeypatch):
    """Loading with a shard hook gives exactly the plan's split of the whole model, from HF
    safetensors (float) and from a blitzgen int4 checkpoint, and reads split tensors only through
    get_slice (never whole)."""
    from blitzgen.loading import hf, load, save_quantized
    from blitzgen.loading.synthetic import save_random_checkpoint
    from blitzgen.parallel import Sharding

    args = ModelArgs.from_name("tiny").replace(**GQA)
    save_random_checkpoint(args, tmp_path / "hf", dtype=torch.float32)
    lmq = load(tmp_path / "hf", device="cpu", dtype="float32", quantize="int4", progress=False)
    save_quantized(lmq, tmp_path / "q", lmq.quant)
    whole_reads = []
    real_get = hf.SafetensorsSource.get
    monkeypatch.setattr(hf.SafetensorsSource, "get", lambda self, n: whole_reads.append(n) or real_get(self, n))
    for src in ("hf", "q"):
        ref = load(tmp_path / src, device="cpu", dtype="float32", progress=False).model
        for rank in range(4):
            whole_reads.clear()
            got = load(tmp_path / src, device="cpu", dtype="float32", progress=False, shard=Sharding(rank, 4)).model
            assert not [n for n in whole_reads if "proj" in n or "wqkv" in n or "w13" in n or "w2" in n or "wo" in n]
            want = TPPlan.make(args, rank, 4).shard_model(copy.deepcopy(ref)).state_dict()
            have = got.state_dict()
            assert have.keys() == want.keys()
            for k in want:
                assert torch.equal(have[k], want[k]), (src, rank, k)
            assert got.layers[0].attention.n_kv_heads == 1 and got.args.intermediate_size == 64


def test_rank_zero_runs_to_the_next_checkpoint_when_the_caller_stops(monkeypatch):
    """A caller that stops reading, or a Ctrl-C inside a step, lets rank 0 run silently to the next
    checkpoint (every 4 items here), where it tells the followers to stop; at each checkpoint passed
    it says go on. The Ctrl-C surfaces between items. One rank: closing just stops."""
    import signal
    from types import SimpleNamespace

    from blitzgen.parallel import runner

    said = []
    monkeypatch.setattr(runner, "_agree", lambda group, go: said.append(go) or go)
    two = SimpleNamespace(world=2, is_leader=True)
    ran = []

    def steps(n, interrupt_at=None):
        for i in range(n):
            if i == interrupt_at:
                os.kill(os.getpid(), signal.SIGINT)
            ran.append(i)
            yield i

    it = runner._lockstep(steps(20), two, 4)
    assert [next(it) for _ in range(6)] == list(range(6))
    it.close()
    assert ran == list(range(8)) and said == [True, False]
    ran.clear(), said.clear()
    it = runner._lockstep(steps(20), two, 4)
    it.close()  # closed before the first item: the followers are already running it
    assert ran == list(range(4)) and said == [False]
    ran.clear(), said.clear()
    assert list(runner._lockstep(steps(6), two, 3)) == list(range(6)) and said == [True, True]
    ran.clear(), said.clear()
    got = []
    with pytest.raises(KeyboardInterrupt):
        for x in runner._lockstep(steps(20, interrupt_at=2), two, 4):
            got.append(x)
    assert got == [0, 1] and ran == list(range(4)) and said == [False]
    ran.clear(), said.clear()
    it = runner._lockstep(steps(20), SimpleNamespace(world=1), 4)
    next(it)
    it.close()
    assert ran == [0] and said == []


@pytest.mark.slow
def test_default_model_refuses_two_ranks_before_loading(smol_path):
    from blitzgen.parallel import TPSpec
    from blitzgen.parallel.runner import check_split

    with pytest.raises(ShardError, match="--tp 2 does not divide the model's 9 attention heads"):
        check_split(TPSpec(model=str(smol_path), dtype="float32"), 2)
    check_split(TPSpec(model=str(smol_path), dtype="float32"), 3)  # 9 q heads, 3 KV heads: one each


def _smol_worker(rank, world, port, path):
    from blitzgen.loading import load
    from blitzgen.parallel import Sharding, wrap

    group = _init(rank, world, port)
    try:
        ref = load(path, device="cpu", dtype="float32", progress=False).model
        tp = load(path, device="cpu", dtype="float32", progress=False, shard=Sharding(rank, world)).model
        wrap(tp, group.all_reduce())
        ref.setup_caches(1, 64)
        tp.setup_caches(1, 64)
        ids = torch.tensor([[1, 9690, 28, 905, 314, 2]])
        with torch.inference_mode():
            torch.testing.assert_close(tp(ids, torch.arange(6)), ref(ids, torch.arange(6)), rtol=1e-4, atol=1e-3)
    finally:
        group.close()


@pytest.mark.slow
def test_default_model_three_ranks_logits(smol_path):
    from blitzgen.parallel.group import free_port

    torch.multiprocessing.spawn(_smol_worker, args=(3, free_port(), str(smol_path)), nprocs=3, join=True)


# ---- bench --tp -----------------------------------------------------------------------------------------
def _bench_json(argv, capsys):
    import json

    from blitzgen.cli import main

    assert main(["bench", "--device", "cpu", "--no-compile", "--no-roofline", "--runs", "1", "--warmup", "1",
                 "--json", "-", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_bench_tp1_runs_through_the_tensor_parallel_path(capsys):
    """--tp 1: a process group of one, the loader's shard hook and RowParallel wrappers, same timing."""
    r = _bench_json(["--shape", "tiny", "--tp", "1", "--new-tokens", "6"], capsys)
    assert r["tp"] == 1 and r["tp_backend"] == "gloo" and r["all_reduce"] == "functional"
    assert r["tok_s"] > 0 and r["shape"] == "tiny" and r["new_tokens"] == 6
    plain = _bench_json(["--shape", "tiny", "--new-tokens", "6"], capsys)
    assert plain["model_bytes"] == r["model_bytes"] and "tp" not in plain


@pytest.mark.slow
def test_bench_two_ranks_times_the_all_reduce(capsys):
    r = _bench_json(["--shape", "tiny", "--tp", "2", "--new-tokens", "4", "--quantize", "int8", "--time-all-reduce"],
                    capsys)
    assert r["tp"] == 2 and r["mode"] == "int8" and r["tok_s"] > 0
    assert set(r["all_reduce_us"]["functional"]) == {"128", "640"}  # tiny: dim 64 * 2 bytes; prompt 5 of them


def test_bench_two_ranks_with_ngram_speculation(capsys):
    r = _bench_json(["--shape", "tiny", "--tp", "2", "--new-tokens", "12", "--temperature", "0", "--speculate",
                     "ngram"], capsys)
    assert r["tp"] == 2 and r["speculate"] == "ngram" and r["tok_s"] > 0
    assert r["speculation"]["generated_tokens"] > 0


@pytest.mark.parametrize("argv, needle", [
    (["--tp", "0", "--shape", "tiny"], "--tp must be at least 1, got 0"),
    (["--shape", "tiny", "--all-reduce", "symm-one-shot"], "apply to --tp only"),
    (["--tp", "2", "--shape", "tiny", "--all-reduce", "symm-two-shot"], "needs CUDA GPUs"),
    (["--tp", "2", "--shape", "tiny", "--quantize", "int4"], "int4 group size 32 does not fit a 2-way split"),
])
def test_bench_tp_errors_are_one_line(argv, needle, capsys):
    from blitzgen.cli import main

    assert main(["bench", "--device", "cpu", "--no-roofline", *argv]) != 0
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_bench_tp_peer_runs_under_torchrun(tmp_path):
    """--peer gpt-fast with --tp: gpt-fast's harness under torchrun with --tp ranks (even 1, so that a
    one-GPU run checks the same launch); DIR must then hold gpt-fast's tp.py."""
    from blitzgen.bench import BenchOptions
    from blitzgen.bench_peers import check_peers, gptfast_command

    cmd = gptfast_command("DIR", "Llama-2-7b-chat-hf", "int4", None, 5, 200, 5, tp=2)
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert cmd[5].endswith("gptfast_generate.py") and cmd[cmd.index("--group-size") + 1] == "32"
    assert gptfast_command("DIR", "70B", "bf16", None, 5, 200, 5, tp=1)[4] == "--nproc_per_node=1"
    assert "torch.distributed.run" not in gptfast_command("DIR", "70B", "bf16", None, 5, 200, 5)
    for f in ("model.py", "generate.py", "quantize.py", "tokenizer.py"):
        (tmp_path / f).write_text("")
    opts = BenchOptions(shape="llama-2-7b", peers={"gpt-fast": str(tmp_path)}, tp=2)
    with pytest.raises(Exception, match="lacks tp.py"):
        check_peers(opts)
    check_peers(BenchOptions(shape="llama-2-7b", peers={"gpt-fast": str(tmp_path)}, tp=1))


def test_every_generator_method_is_mirrored_or_local():
    """A Generator method that runs the model or changes its cache must reach every rank: each
    public one is a model call of the TPGenerator or known to be local (a new one fails here)."""
    import inspect

    from blitzgen.generate import Generator
    from blitzgen.parallel import runner

    public = {n for n, v in inspect.getmembers(Generator) if not n.startswith("_") and callable(v)}
    unknown = public - set(runner._MODEL_CALLS) - set(runner.LOCAL_CALLS)
    assert not unknown, f"classify in parallel/runner.py: {sorted(unknown)}"
    assert all(callable(getattr(runner.TPGenerator, m, None)) for m in runner._MODEL_CALLS)


def test_the_request_channel_frees_what_it_read():
    """Requests arrive in order and leave nothing behind in the store (the grammar/logprobs loop
    sends one per token, for the life of a server)."""
    from datetime import timedelta

    import torch.distributed as dist

    from blitzgen.parallel.group import Channel

    store = dist.TCPStore("127.0.0.1", 0, 1, True, timedelta(seconds=10), wait_for_workers=False)
    before = store.num_keys()
    leader, follower = Channel(store, 0, 2), Channel(store, 1, 2)
    for i in range(5):
        leader.send(("model_logits", (i, 7 + i), {}, 16))
    assert [follower.recv()[1] for _ in range(5)] == [(i, 7 + i) for i in range(5)]
    assert store.num_keys() == before


def test_ngram_speculation_over_two_ranks_equals_one_rank_plain():
    """--tp 2 --speculate ngram: every rank builds the same decoder and follows rank 0's calls with
    its costs; greedy tokens equal one process's plain decoding, verifies did run, and a request the
    caller stops early leaves the ranks in step for the next one."""
    from blitzgen.generate import Generator
    from blitzgen.loading import load_random
    from blitzgen.parallel import TPSpec, run

    prompt = [5, 17, 42, 99, 3, 250, 5, 17, 42, 99, 7, 8, 5, 17, 42]
    ref = load_random("tiny", device="cpu", dtype="float32", seed=0, progress=False).model
    want = list(Generator(ref).generate_ids(prompt, 40, stop_token_ids=()))

    def lead(lm, gen):
        dec = gen.speculative("ngram", 4)
        dec.dec.verify_cost = 1.0  # rank 0's costs travel with each call: speculation stays on
        first = list(dec.generate_ids(prompt, 40))
        verifies = dec.last_result_stats.verify_steps
        it = dec.generate_ids(prompt, 40)
        head = [next(it) for _ in range(5)]
        it.close()  # the caller stops early: rank 0 runs to the next checkpoint, the followers stop there
        again = list(dec.generate_ids(prompt, 40))
        return first, verifies, head, again

    first, verifies, head, again = run(2, TPSpec(shape="tiny", dtype="float32"), lead, timeout_s=120)
    assert first == want and again == want and head == want[:5]
    assert verifies > 0


def test_generate_two_ranks_with_ngram_speculation_prints_the_plain_text(tmp_path, capsys):
    from blitzgen.cli import main
    from blitzgen.config import ModelArgs
    from blitzgen.loading.synthetic import save_random_checkpoint

    save_random_checkpoint(ModelArgs.from_name("tiny"), tmp_path, dtype=torch.float32, seed=4)
    base = ["generate", "--model", str(tmp_path), "--device", "cpu", "--dtype", "float32", "--raw", "--prompt",
            "t5_t17_t42_t99_t5_t17_t42_t99_t5_t17", "--max-new-tokens", "24", "--temperature", "0"]
    assert main(base) == 0
    want = capsys.readouterr().out
    assert main([*base, "--tp", "2", "--speculate", "ngram"]) == 0
    out = capsys.readouterr()
    assert out.out.splitlines()[0] == want.splitlines()[0] and "Speculation: ngram k<=4: acceptance" in out.err


def test_self_int4_speculation_over_two_ranks_equals_one_rank_plain(tmp_path):
    """--tp 2 --speculate self-int4: each rank drafts with an int4 copy of its own slices (all-reducing
    where the target does); greedy tokens equal one process's plain decoding."""
    from blitzgen.config import ModelArgs
    from blitzgen.generate import Generator
    from blitzgen.loading import load
    from blitzgen.loading.synthetic import save_random_checkpoint
    from blitzgen.parallel import TPSpec, run

    save_random_checkpoint(ModelArgs.from_name("tiny").replace(**GQA), tmp_path, dtype=torch.float32, seed=5)
    prompt = [5, 17, 42, 99, 3, 250, 5, 17, 42, 99, 7, 8]
    ref = load(str(tmp_path), device="cpu", dtype="float32", progress=False).model
    want = list(Generator(ref).generate_ids(prompt, 30, stop_token_ids=()))

    def lead(lm, gen):
        dec = gen.speculative("self-int4", 3)
        got = list(dec.generate_ids(prompt, 30))
        return got, dec.last_result_stats.verify_steps, dec.last_result_stats.draft_steps

    got, verifies, drafts = run(2, TPSpec(model=str(tmp_path), dtype="float32"), lead, timeout_s=120)
    assert got == want and verifies > 0 and drafts > 0


def test_draft_model_speculation_over_two_ranks_equals_one_rank_plain(tmp_path):
    """--tp 2 --draft-model D: each rank loads its slices of the draft too (all-reducing like the
    target); greedy tokens equal one process's plain decoding; a draft whose heads do not split is
    one clear error."""
    from blitzgen.config import ModelArgs
    from blitzgen.generate import Generator
    from blitzgen.loading import load
    from blitzgen.loading.synthetic import save_random_checkpoint
    from blitzgen.parallel import TPSpec, run

    target, draft, odd = tmp_path / "target", tmp_path / "draft", tmp_path / "odd"
    save_random_checkpoint(ModelArgs.from_name("tiny").replace(**GQA), target, dtype=torch.float32, seed=5)
    save_random_checkpoint(ModelArgs.from_name("tiny").replace(**{**GQA, "n_layers": 1}), draft, dtype=torch.float32,
                           seed=6)
    save_random_checkpoint(ModelArgs.from_name("tiny").replace(dim=48, n_heads=3, n_kv_heads=3, head_dim=16), odd,
                           dtype=torch.float32, seed=7)
    prompt = [5, 17, 42, 99, 3, 250, 5, 17, 42, 99, 7, 8]
    ref = load(str(target), device="cpu", dtype="float32", progress=False).model
    want = list(Generator(ref).generate_ids(prompt, 30, stop_token_ids=()))

    def lead(lm, gen):
        with pytest.raises(ShardError, match="does not divide"):
            gen.speculative("draft-model", 3, draft_model=str(odd))
        dec = gen.speculative("draft-model", 3, draft_model=str(draft))
        dec.dec.draft_cost = 0.3  # the ranks' controllers speculate on rank 0's costs
        got = list(dec.generate_ids(prompt, 30))
        return got, dec.last_result_stats.verify_steps, dec.last_result_stats.draft_steps

    got, verifies, drafts = run(2, TPSpec(model=str(target), dtype="float32"), lead, timeout_s=120)
    assert got == want and verifies > 0 and drafts > 0


def test_close_meeting_is_bounded_once():
    """TPGroup.close's store meetings share one deadline: a rank that never comes delays the exit
    by at most the wait, and one that came makes the meeting immediate."""
    import torch.distributed as dist

    from blitzgen.parallel.group import _meet

    store = dist.HashStore()
    t0 = time.monotonic()
    assert not _meet(store, "closing", 2, t0 + 0.3)
    assert 0.25 < time.monotonic() - t0 < 2.0
    assert _meet(store, "closing", 2, time.monotonic() + 5.0)  # the second rank: both came, no wait
    assert not _meet(store, "closed", 2, 0.0)  # a past deadline: count in and go
