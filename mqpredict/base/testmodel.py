"""A deterministic tiny GGUF (F32, working SentencePiece-style tokenizer) for tests and demos.

Same seed and shape → byte-identical file. The default shape (n_embd 256) is K-quant friendly; a
576-wide shape like SmolLM2's makes llama.cpp fall back on every tensor but ffn_down, which is how
the tests exercise fallbacks.

Dense shapes are ``llama`` models. With experts (``TinyShape.n_expert``) the model is a
mixture of experts that llama.cpp runs as such: ``qwen3moe`` (a softmax router ``ffn_gate_inp`` and 3-D
routed experts ``ffn_{gate,up,down}_exps``, ``n_ff`` wide each). With ``shared_expert`` an always-on
shared expert ``ffn_{gate,up,down}_shexp`` (``n_ff`` wide) is added to every layer: ungated as in
DeepSeek/GLM/Granite MoEs (``granitemoe``, whose llama.cpp graph adds it to the routed experts' output;
its logit scale is 1), or with ``shared_expert_gate`` behind a sigmoid gate ``ffn_gate_inp_shexp`` of its
own as in Qwen1.5/2-MoE (``qwen2moe``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mqpredict.errors import InputError
from mqpredict.quant.model import KEY_FAMILY, KEY_SYNTHETIC
from mqpredict.util.atomic import atomic_path

SPACE = "\u2581"  # SentencePiece's word boundary

# Common English pieces (merged by score order, highest first); the rest of the vocab is bytes
# and single characters, so any text tokenizes.
_PIECES = (
    "▁t ▁a he in ▁the er on ▁s ▁w ou ▁o at en ▁c it is ▁b nd ▁h es ▁f ing ▁p an or ▁m ▁and ▁to ▁of "
    "ll ▁d ed ar ▁in as ▁I ▁l ▁' ▁th ▁be ▁it ▁g ▁n ▁y ▁you ▁wh ic ow ▁she ▁her ▁said le ve ▁was "
    "id ▁that ▁re ly ▁on ▁Alice ▁e ▁ha ▁as ▁st om ay ent ▁at ▁so ▁not ▁for ▁all ▁with ▁had ▁me "
    "ad ut ▁li ▁but ▁very ▁they ▁do ▁this ▁little ▁out ▁up ▁one ▁his ▁what ▁went ▁know ▁like ▁there "
    "ght ▁could ▁would ▁thought ▁time ▁Queen ▁King ▁Turtle ▁Hatter ▁Rabbit ▁Mock ▁Gryphon ▁head ▁way"
).split()
_CHARS = [chr(c) for c in range(32, 127) if chr(c) != " "]


@dataclass(frozen=True)
class TinyShape:
    n_embd: int = 256
    n_ff: int = 768
    n_layers: int = 4
    n_vocab: int = 512
    n_head: int = 0  # 0: n_embd // 64
    tied: bool = False
    n_expert: int = 0  # routed experts per layer (0: a dense llama model); each is n_ff wide
    n_expert_used: int = 0  # experts each token is routed to
    shared_expert: bool = False  # plus one always-on shared expert (n_ff wide): granitemoe
    shared_expert_gate: bool = False  # the shared expert behind a sigmoid gate of its own: qwen2moe

    @property
    def arch(self) -> str:
        if not self.n_expert:
            return "llama"
        if self.shared_expert:
            return "qwen2moe" if self.shared_expert_gate else "granitemoe"
        return "qwen3moe"

    @property
    def kind(self) -> str:
        """``tiny-256x4`` or ``tinymoe-256x4-e4k2[-shexp|-gshexp]``: names the shape in model names and families."""
        if not self.n_expert:
            return f"tiny-{self.n_embd}x{self.n_layers}"
        sh = ("-gshexp" if self.shared_expert_gate else "-shexp") if self.shared_expert else ""
        return f"tinymoe-{self.n_embd}x{self.n_layers}-e{self.n_expert}k{self.n_expert_used}{sh}"

    @property
    def family(self) -> str:
        """One family per shape (folds keep seeds together)."""
        if not self.n_expert:
            return f"synthetic-tiny-{self.n_embd}"  # (layers not in it: kept as the shipped records have it)
        return f"synthetic-{self.kind}"

    @property
    def heads(self) -> tuple[int, int]:
        n_head = self.n_head or max(1, self.n_embd // 64)
        n_kv = n_head // 3 if n_head % 3 == 0 else max(1, n_head // 2)
        return n_head, n_kv


def _vocab(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    from gguf.constants import TokenType

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
    scores = [0.0, 0.0, 0.0] + [0.0] * 256
    pieces = [SPACE] + _CHARS + [p for p in _PIECES if p not in _CHARS]
    for i, p in enumerate(dict.fromkeys(pieces)):
        if len(tokens) >= n_vocab:
            break
        tokens.append(p)
        types.append(TokenType.NORMAL)
        scores.append(-float(i) if len(p) == 1 else 1000.0 - i)  # merges: longer/earlier first
    if len(tokens) < n_vocab:
        for i in range(n_vocab - len(tokens)):
            tokens.append(f"<extra_{i}>")
            types.append(TokenType.UNUSED)
            scores.append(-1e4)
    return tokens, scores, [int(t) for t in types]


def _check(shape: TinyShape) -> None:
    if shape.n_vocab < 259 + len(_CHARS) // 2:
        raise InputError(f"--n-vocab {shape.n_vocab} is too small", "use at least 320 (bytes + characters)")
    n_head, _ = shape.heads
    if shape.n_embd % n_head or (shape.n_embd // n_head) % 2:
        raise InputError(f"--n-embd {shape.n_embd} does not split into {n_head} heads of even size")
    if shape.n_embd % 32 or shape.n_ff % 32:
        raise InputError("--n-embd and --n-ff must be multiples of 32 (the smallest quant block)")
    if shape.n_expert or shape.n_expert_used or shape.shared_expert:
        if shape.n_expert < 2:
            raise InputError(f"--experts {shape.n_expert}: a mixture of experts needs at least 2", "e.g. --experts 4")
        if shape.shared_expert_gate and not shape.shared_expert:
            raise InputError("a shared-expert gate needs a shared expert", "add --shared-expert")
        if not 1 <= shape.n_expert_used <= shape.n_expert:
            raise InputError(f"--experts-used {shape.n_expert_used} must be between 1 and --experts {shape.n_expert}",
                             "e.g. --experts 4 --experts-used 2")  # fmt: skip


def write_test_model(path: str | os.PathLike, seed: int = 0, shape: TinyShape = TinyShape()) -> Path:
    """Write the tiny model to ``path`` (atomically) and return the path."""
    import gguf

    _check(shape)
    n_head, n_kv = shape.heads
    head_dim = shape.n_embd // n_head
    rng = np.random.default_rng(seed)
    path = Path(path)

    def w(*dims: int, std: float) -> np.ndarray:  # numpy order: the row length (ne[0]) last
        return (rng.standard_normal(dims) * std).astype(np.float32)

    ones = lambda n: np.ones(n, dtype=np.float32)  # noqa: E731
    d, f, e = shape.n_embd, shape.n_ff, shape.n_expert
    out_std = 3.0 * d**-0.5  # logits of unit-RMS hidden states get a standard deviation of about 3
    emb_std = out_std if shape.tied else 1.0  # a tied table is also the output projection
    tensors: list[tuple[str, np.ndarray]] = [("token_embd.weight", w(shape.n_vocab, d, std=emb_std))]
    for i in range(shape.n_layers):
        p = f"blk.{i}."
        tensors += [
            (p + "attn_norm.weight", ones(d)),
            (p + "attn_q.weight", w(d, d, std=d**-0.5)),
            (p + "attn_k.weight", w(n_kv * head_dim, d, std=d**-0.5)),
            (p + "attn_v.weight", w(n_kv * head_dim, d, std=d**-0.5)),
            (p + "attn_output.weight", w(d, d, std=d**-0.5)),
        ]
        if shape.arch == "qwen3moe":
            tensors += [(p + "attn_k_norm.weight", ones(head_dim)), (p + "attn_q_norm.weight", ones(head_dim))]
        tensors.append((p + "ffn_norm.weight", ones(d)))
        if not e:
            tensors += [
                (p + "ffn_gate.weight", w(f, d, std=d**-0.5)),
                (p + "ffn_up.weight", w(f, d, std=d**-0.5)),
                (p + "ffn_down.weight", w(d, f, std=f**-0.5)),
            ]
            continue
        # router logits of a unit-RMS hidden state get a standard deviation of about 2: tokens spread
        # over the experts instead of all taking the same ones
        tensors += [
            (p + "ffn_gate_inp.weight", w(e, d, std=2.0 * d**-0.5)),
            (p + "ffn_gate_exps.weight", w(e, f, d, std=d**-0.5)),
            (p + "ffn_down_exps.weight", w(e, d, f, std=f**-0.5)),
            (p + "ffn_up_exps.weight", w(e, f, d, std=d**-0.5)),
        ]
        if shape.shared_expert_gate:
            tensors.append((p + "ffn_gate_inp_shexp.weight", w(d, std=d**-0.5)))
        if shape.shared_expert:
            tensors += [
                (p + "ffn_gate_shexp.weight", w(f, d, std=d**-0.5)),
                (p + "ffn_down_shexp.weight", w(d, f, std=f**-0.5)),
                (p + "ffn_up_shexp.weight", w(f, d, std=d**-0.5)),
            ]
    tensors.append(("output_norm.weight", ones(d)))
    if not shape.tied:
        tensors.append(("output.weight", w(shape.n_vocab, d, std=out_std)))

    tokens, scores, types = _vocab(shape.n_vocab)
    with atomic_path(path) as tmp:
        wr = gguf.GGUFWriter(str(tmp), arch=shape.arch)
        wr.add_name(f"mqpredict-{shape.kind}-s{seed}")
        what = f"{shape.arch} mixture of experts" if e else "llama model"
        wr.add_description(f"deterministic tiny {what} generated by `mqpredict testmodel` (random weights)")
        wr.add_string(KEY_FAMILY, shape.family)
        wr.add_bool(KEY_SYNTHETIC, True)
        wr.add_context_length(4096)
        wr.add_embedding_length(d)
        wr.add_block_count(shape.n_layers)
        wr.add_feed_forward_length(f)  # MoE: each expert's (granitemoe reads its experts' width here)
        wr.add_head_count(n_head)
        wr.add_head_count_kv(n_kv)
        wr.add_rope_dimension_count(head_dim)
        wr.add_rope_freq_base(10000.0)
        wr.add_layer_norm_rms_eps(1e-5)
        if e:
            wr.add_expert_count(e)
            wr.add_expert_used_count(shape.n_expert_used)
            wr.add_expert_feed_forward_length(f)
            if shape.shared_expert:
                wr.add_expert_shared_feed_forward_length(f)
            if shape.arch == "granitemoe":
                wr.add_logit_scale(1.0)
        wr.add_vocab_size(shape.n_vocab)
        wr.add_file_type(int(gguf.LlamaFileType.ALL_F32))
        wr.add_tokenizer_model("llama")
        wr.add_token_list(tokens)
        wr.add_token_scores(scores)
        wr.add_token_types(types)
        wr.add_unk_token_id(0)
        wr.add_bos_token_id(1)
        wr.add_eos_token_id(2)
        wr.add_add_bos_token(True)
        wr.add_add_eos_token(False)
        for name, arr in tensors:
            wr.add_tensor(name, arr)
        wr.write_header_to_file()
        wr.write_kv_data_to_file()
        wr.write_tensors_to_file()
        wr.close()
    return path
