"""Sources of draft tokens for speculative decoding (see speculative.py for the verify path).

* ``NgramDraft``: prompt lookup. The continuation of the most recent earlier occurrence of the
  longest suffix n-gram (n from n_max down to n_min) of prompt + output so far. No model.
* ``DraftModel``: a smaller Transformer with the same tokenizer (``check_same_tokenizer``).
* ``SelfInt4Draft``: the target's own weights, quantized to int4, as a second model object that
  shares only the read-only embedding/norm tensors with the target (Linear layers are quantized
  one at a time from the target's float weights, so the peak is target + int4 copy).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .errors import BlitzgenError
from .model import Transformer


class DraftMismatchError(BlitzgenError):
    """The draft model cannot draft for the target (another tokenizer, another architecture)."""


class DraftSource:
    """What every draft source has. ``model`` is None for host-side drafts, which implement
    ``propose``; model drafts are run by the decoder's compiled one-token draft step.
    ``draft_cost``: a draft step's time over a target step's (0 for host-side drafts); the
    adaptive controller uses it until ``SpeculativeDecoder.calibrate`` measures it."""

    name = "draft"
    model: Transformer | None = None
    draft_cost = 0.0

    def estimate_cost(self, target: Transformer) -> float:
        return self.draft_cost

    def reset(self, prompt_ids: list[int]) -> None:
        """Called at the start of each request."""

    def extend(self, ids: list[int]) -> None:
        """Called with each token appended to the sequence (host-side drafts index them)."""

    def propose(self, k: int) -> list[int]:
        """Up to k draft tokens continuing the sequence (host-side drafts only)."""
        raise NotImplementedError

    def adapt(self, verify_cost: float) -> None:
        """Called at the start of each request with the verify cost the controller uses."""


# A one-token match drafts well enough only when a verify costs little more than a step: replaying
# SmolLM2's greedy outputs through the controller (5 prompts), matches of 2+ tokens gave
# 1.06-1.14x against 1.00-1.14x at a verify cost of 1.4, and 1.08-1.23x against 1.08-1.29x at 1.1.
ONE_TOKEN_MATCH_MAX_COST = 1.25


class NgramDraft(DraftSource):
    """Prompt lookup: an index from each n-gram (n_min..n_max) to the start of its most recent
    occurrence that has a following token, updated incrementally as tokens arrive. ``adapt`` sets
    the shortest match that proposes: 1 token when a verify is cheap, else 2 (``min_match`` fixes it)."""

    name = "ngram"

    def __init__(self, n_max: int = 3, n_min: int = 1, min_match: int | None = None):
        if not 1 <= n_min <= n_max:
            raise BlitzgenError(f"n-gram sizes must satisfy 1 <= n_min <= n_max, got {n_min}..{n_max}")
        self.n_max, self.n_min = n_max, n_min
        self.fixed_min = min_match
        self.min_match = max(n_min, min_match or n_min)
        self.seq: list[int] = []
        self._index: dict[tuple[int, ...], int] = {}

    def reset(self, prompt_ids: list[int]) -> None:
        self.seq, self._index = [], {}
        self.extend(list(prompt_ids))

    def extend(self, ids: list[int]) -> None:
        seq, index = self.seq, self._index
        for tok in ids:
            i = len(seq)  # tok lands at index i: every n-gram ending at i-1 now has a continuation
            for n in range(self.n_min, self.n_max + 1):
                if i >= n:
                    index[tuple(seq[i - n:i])] = i - n
            seq.append(tok)

    def adapt(self, verify_cost: float) -> None:
        if self.fixed_min is None:
            self.min_match = min(self.n_max, max(self.n_min, 1 if verify_cost < ONE_TOKEN_MATCH_MAX_COST else 2))

    def propose(self, k: int) -> list[int]:
        seq = self.seq
        for n in range(min(self.n_max, len(seq)), self.min_match - 1, -1):
            start = self._index.get(tuple(seq[len(seq) - n:]))
            if start is not None:
                return seq[start + n:start + n + k]
        return []


class DraftModel(DraftSource):
    """A smaller model with the target's tokenizer. Pass both tokenizers to have them checked."""

    name = "draft-model"

    def __init__(self, model: Transformer, tokenizer=None, target_tokenizer=None, *, draft_cost: float | None = None):
        if tokenizer is not None and target_tokenizer is not None:
            check_same_tokenizer(target_tokenizer, tokenizer)
        self.model = model
        self._cost = draft_cost

    def estimate_cost(self, target: Transformer) -> float:
        """Without a measurement: the ratio of weight bytes read per step, plus launch overhead."""
        if self._cost is not None:
            return self._cost
        def nbytes(m):
            return sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in m.state_dict().values()}.values())
        return min(1.0, nbytes(self.model) / max(1, nbytes(target)) + 0.05)


class SelfInt4Draft(DraftSource):
    """The target quantized to int4 as its own draft (``build_int4_copy``). draft_cost 0.55: int4
    vs bf16 decode time of the Llama-2-7B shape on an H200 (377 vs 219 tok/s, DESIGN.md)."""

    name = "self-int4"

    def __init__(self, target: Transformer, group_size: int = 32, *, draft_cost: float = 0.55):
        self.model = build_int4_copy(target, group_size)
        self.draft_cost = draft_cost


def check_same_tokenizer(target, draft) -> None:
    """Raise DraftMismatchError (one line) unless two blitzgen Tokenizers map the same strings to
    the same ids and agree on BOS, EOS and special tokens."""
    def vocab(t):
        return t._tok.get_vocab(with_added_tokens=True)

    def fail(what: str):
        raise DraftMismatchError(f"the draft model's tokenizer differs from the target's ({what}); "
                                 "speculative decoding needs the same tokenizer")

    if target.vocab_size != draft.vocab_size:
        fail(f"{draft.vocab_size} tokens vs {target.vocab_size}")
    vt, vd = vocab(target), vocab(draft)
    if vt != vd:
        diff = sorted(set(vt.items()) ^ set(vd.items()))
        fail(f"{len(diff)} token/id pairs differ, e.g. {diff[0][0]!r}")
    if target.bos_token_id != draft.bos_token_id:
        fail(f"BOS id {draft.bos_token_id} vs {target.bos_token_id}")
    if set(target.eos_token_ids) != set(draft.eos_token_ids):
        fail(f"EOS ids {draft.eos_token_ids} vs {target.eos_token_ids}")
    if target._special_ids != draft._special_ids:
        fail("special tokens differ")
    if target.add_bos != draft.add_bos:
        fail("one adds BOS, the other does not")


def check_draft_model(target: Transformer, draft: Transformer) -> None:
    """Refuse a draft that cannot run beside the target; give it the target's decode attention."""
    if draft.args.head_dim <= 0 or draft.args.max_seq_len < 2:
        raise DraftMismatchError("the draft model has no usable context")
    if draft.device != target.device:
        raise DraftMismatchError(f"the draft model is on {draft.device}, the target on {target.device}")
    follow_attention(target, draft)


def follow_attention(target: Transformer, draft: Transformer) -> None:
    """The draft uses the target's one-token attention (``--decode-attention`` reaches the target
    only; a draft loaded or built apart starts at "auto")."""
    op, mine = target.attention_op, draft.attention_op
    if (op.decode_impl, op.chunks) != (mine.decode_impl, mine.chunks):
        draft.set_decode_attention(op.decode_impl, op.chunks)


@torch.no_grad()
def build_int4_copy(target: Transformer, group_size: int = 32) -> Transformer:
    """A second Transformer whose Linear layers are int4 quantizations of the target's (float or
    int8) weights. Embedding and norm tensors are shared read-only; the copy has its own caches.
    A tensor-parallel rank's target (its slices, row-parallel layers wrapped) gives that rank's
    copy, wrapped alike."""
    from .quant.core import plan_quantization, quantize_weight, set_submodule, target_linears
    from .quant import Int4Config, Int4Linear, Int8Linear, dequantize_int8

    config = Int4Config(group_size=group_size)
    dtype = target.dtype
    with torch.device("meta"):
        draft = Transformer(target.args)
    handler, names = plan_quantization(draft, config, dtype)
    src = dict(target.named_modules())
    # everything but the quantized Linears: share the target's tensors (never written)
    for name, mod in draft.named_modules():
        if name in names:
            continue
        for pname, _ in list(mod.named_parameters(recurse=False)):
            setattr(mod, pname, getattr(src[name], pname))
    if target.args.tie_word_embeddings and "output" not in names:
        draft.output.weight = draft.tok_embeddings.weight
    all_reduce = None  # a tensor-parallel rank's target: wo/w2 sum over ranks (parallel.tp.RowParallel)
    for name, has_bias in names.items():
        lin = src.get(name)
        if lin is None and name == "output":  # tied head
            lin = target.tok_embeddings
        if hasattr(lin, "all_reduce") and hasattr(lin, "linear"):  # this rank's slice, then the sum
            all_reduce, lin = lin.all_reduce, lin.linear
        if isinstance(lin, Int4Linear):
            raise DraftMismatchError("the model is already int4; self-int4 speculation needs a float or int8 model")
        if isinstance(lin, Int8Linear):
            weight = dequantize_int8(lin.weight, lin.scales, dtype)
        elif isinstance(lin, (nn.Linear, nn.Embedding)):
            weight = lin.weight.detach()
        else:
            raise DraftMismatchError(f"cannot build an int4 copy of layer {name} ({type(lin).__name__})")
        bias = getattr(lin, "bias", None)
        set_submodule(draft, name, quantize_weight(handler, config, weight, bias, dtype))
        del weight
    assert not [n for n, _ in target_linears(draft)], "every target Linear is quantized"
    if all_reduce is not None:
        from .parallel.tp import wrap

        wrap(draft, all_reduce)  # the copy all-reduces where the target does
    if target.max_seq_len:
        with torch.inference_mode(False):
            draft.setup_caches(max(target.max_batch, 1), target.max_seq_len)
    return draft.eval()
