"""Train a small draft model for a target by distillation (``pertoken speculative train-draft``).

The draft is a plain Llama (a normal transformers folder: ``config.json``, ``model.safetensors``
and the target's tokenizer), narrow and shallow so that its cost per token is about a tenth of
the target's or less. It shares the target's vocabulary, so it works with our decoding loop and
with transformers' own ``generate(assistant_model=...)``.

Choices, and why:

- **A standalone distilled model** (this module) or **an EAGLE head** (``eagle_train``,
  ``--kind eagle``). An EAGLE head with the full 49152 x 576 LM head would cost a fifth of
  SmolLM2-135M's per-token work, so ours drafts over the 8192 most frequent tokens; it then
  costs about as much per call as the 128-wide 2-layer draft here and agrees with the target
  more often (held-out top-1 0.45 against 0.36, same data), so the benchmark drafts with it.
  This module's draft remains the one transformers' ``generate(assistant_model=)`` can use,
  and a draft that needs no target features. A standalone model with a 128-wide tied
  embedding costs about 1/20 of the target's multiply-adds.
- **Embedding initialised from the target's.** The draft's tied embedding is the projection of
  the target's embedding on its top principal directions, so the draft starts with the target's
  token geometry and converges in few tokens.
- **Loss:** cross-entropy against the target's distribution renormalised over its top ``k``
  tokens (the teacher runs in bfloat16; the tail carries little mass), and we report top-1
  agreement, the quantity greedy acceptance depends on.

Long runs write a checkpoint (and a usable draft folder) every ``checkpoint_every`` steps;
``resume=True`` continues from it with the same data order.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from pertoken.atomic import atomic_path, write_json_atomic, write_text_atomic
from pertoken.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class DraftTrainConfig:
    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 384
    seq_len: int = 256
    batch_size: int = 8
    train_tokens: int = 3_000_000
    """tokens the draft sees in training (the corpus is cycled if it is shorter)"""
    lr: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    top_k: int = 64
    """the teacher's distribution is renormalised over its top ``top_k`` tokens"""
    max_doc_tokens: int = 2048
    """longer documents are cut (so long manuals do not crowd out short articles)"""
    checkpoint_every: int = 50
    seed: int = 0
    self_chat: int = 0
    """conversations sampled from the target itself (:func:`self_chat`) put before the corpus"""
    self_chat_temperature: float = 0.8
    """the temperature of the target's answers in those conversations (0: greedy)"""
    init: str = ""
    """a draft folder to start from (fine-tuning) instead of a fresh draft"""

    def validate(self) -> None:
        validate_common(self, ("hidden_size", "num_hidden_layers", "num_attention_heads"))
        if self.hidden_size % self.num_attention_heads:
            raise UserError(f"hidden size {self.hidden_size} is not a multiple of "
                            f"{self.num_attention_heads} heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError("attention heads must be a multiple of key-value heads")

    @property
    def steps(self) -> int:
        return max(1, math.ceil(self.train_tokens / (self.seq_len * self.batch_size)))


def validate_common(cfg, names: tuple[str, ...] = ()) -> None:
    """Checks shared by the draft and EAGLE training configs: ``names`` and the common sizes
    positive, a positive learning rate, ``self_chat >= 0``."""
    for name in names + ("seq_len", "batch_size", "train_tokens", "top_k", "checkpoint_every",
                         "max_doc_tokens"):
        if getattr(cfg, name) < 1:
            raise UserError(f"{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if not cfg.lr > 0:
        raise UserError(f"learning rate must be positive, got {cfg.lr}")
    if cfg.self_chat < 0:
        raise UserError(f"self-chat must be >= 0, got {cfg.self_chat}")
    if not cfg.self_chat_temperature >= 0:
        raise UserError(f"self-chat temperature must be >= 0, got {cfg.self_chat_temperature}")


def training_tokens(target, tokenizer, documents, cfg, total: int, path: Path,
                    progress: bool = True) -> np.ndarray:
    """``total`` training tokens: ``cfg.self_chat`` conversations sampled from the target first
    (kept beside ``path``), the corpus after them; saved to ``path`` (``.npy``) and reused."""
    if path.exists():
        return np.load(path)
    parts = []
    if cfg.self_chat:
        chats = self_chat(target, tokenizer, cfg.self_chat, path.parent / "self-chat.jsonl",
                          batch_size=256 if target.device.type == "cuda" else 32,
                          answer_temperature=cfg.self_chat_temperature, seed=cfg.seed,
                          progress=progress)
        parts.append(tokenize_corpus(tokenizer, chats, total, cfg.max_doc_tokens, cfg.seed))
    left = total - sum(p.size for p in parts)
    if left > 0:
        log.info("tokenizing the training corpus")
        parts.append(tokenize_corpus(tokenizer, documents, left, cfg.max_doc_tokens, cfg.seed))
    tokens = np.concatenate(parts)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, tokens)
    return tokens


def draft_config(target_config, cfg: DraftTrainConfig):
    """A Llama config for the draft: the target's vocabulary, special ids and RoPE."""
    from transformers import LlamaConfig

    rope = getattr(target_config, "rope_parameters", None) or {}
    return LlamaConfig(
        vocab_size=target_config.vocab_size, hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, intermediate_size=cfg.intermediate_size,
        max_position_embeddings=target_config.max_position_embeddings,
        rope_theta=rope.get("rope_theta", getattr(target_config, "rope_theta", 10000.0)),
        rms_norm_eps=getattr(target_config, "rms_norm_eps", 1e-5), tie_word_embeddings=True,
        bos_token_id=target_config.bos_token_id, eos_token_id=target_config.eos_token_id,
        pad_token_id=getattr(target_config, "pad_token_id", None))


def init_draft(target, cfg: DraftTrainConfig, seed: int = 0):
    """A random-init draft whose tied embedding is the target's, projected on its top
    ``hidden_size`` principal directions."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    draft = LlamaForCausalLM(draft_config(target.config, cfg))
    emb = target.get_input_embeddings().weight.detach().float().cpu()
    if cfg.hidden_size <= emb.shape[1]:
        _, _, vh = torch.linalg.svd(emb - emb.mean(0), full_matrices=False)
        projected = emb @ vh[: cfg.hidden_size].T
        # match the scale of a fresh embedding row so the first layers see familiar norms
        projected *= draft.get_input_embeddings().weight.std() / projected.std()
        with torch.no_grad():
            draft.get_input_embeddings().weight.copy_(projected)
    draft.tie_weights()
    return draft


def tokenize_corpus(tokenizer, documents, max_tokens: int, max_doc_tokens: int,
                    seed: int = 0) -> np.ndarray:
    """Shuffle the documents (seeded), tokenize them with an EOS before each, cut each at
    ``max_doc_tokens``, and stop after ``max_tokens`` tokens."""
    docs = list(documents)
    random.Random(seed).shuffle(docs)
    sep = tokenizer.eos_token_id
    out: list[np.ndarray] = []
    total = 0
    for start in range(0, len(docs), 512):
        batch = [d[: max_doc_tokens * 8] for d in docs[start:start + 512]]
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            if not ids:
                continue
            piece = np.asarray([sep] + ids[:max_doc_tokens], dtype=np.int32)
            out.append(piece)
            total += piece.size
        if total >= max_tokens:
            break
    if not out:
        raise UserError("the training corpus has no text")
    return np.concatenate(out)[:max_tokens]


def _chat_prefix(tokenizer) -> str:
    """The chat template's text up to where the first user message begins."""
    sentinel = "\x00USER\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": sentinel}], tokenize=False)
    if sentinel not in text:
        raise UserError("the target's chat template does not place the user's message verbatim")
    return text[: text.index(sentinel)]


@torch.inference_mode()
def self_chat(target, tokenizer, conversations: int, path: str | Path, batch_size: int = 32,
              question_tokens: int = 64, answer_tokens: int = 192, temperature: float = 0.8,
              answer_temperature: float | None = None, seed: int = 0,
              progress: bool = True) -> list[str]:
    """Sample ``conversations`` chats from the target itself: a user question (sampled after
    the template's user header, at ``temperature``), then the target's answer to it in the chat
    template (at ``answer_temperature``, by default ``temperature``; 0 is greedy). This is
    on-policy data for chat prompts without any dataset. After each batch the JSONL file
    ``path`` is rewritten atomically with every conversation so far, so an interrupted run
    resumes where it stopped. Sampling runs on the target's device (on a GPU, give a larger
    ``batch_size``). Returns the conversations as template text."""
    from tqdm.auto import tqdm

    if not tokenizer.chat_template:
        raise UserError("--self-chat needs a target with a chat template")
    path = Path(path)
    done = [json.loads(line)["text"] for line in path.read_text().splitlines()] if path.exists() else []
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    stop = [t for t in {end, tokenizer.eos_token_id} if isinstance(t, int) and t >= 0]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    header = tokenizer.encode(_chat_prefix(tokenizer), add_special_tokens=False)
    bar = tqdm(total=conversations, initial=len(done), desc="self-chat", disable=not progress,
               unit="chat")

    def sample(prompts: list[list[int]], new_tokens: int, batch_seed: int,
               t: float = temperature) -> list[list[int]]:
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=target.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts],
                            device=target.device)
        torch.manual_seed(batch_seed)
        sampling = dict(do_sample=True, temperature=t, top_k=50) if t > 0 else dict(
            do_sample=False, temperature=None, top_k=None, top_p=None)
        out = target.generate(input_ids=ids, attention_mask=mask, **sampling,
                              max_new_tokens=new_tokens, eos_token_id=stop, pad_token_id=pad)
        rows = []
        for row in out[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in stop), len(row))
            rows.append(row[:cut])
        return rows

    while len(done) < conversations:
        n = min(batch_size, conversations - len(done))
        batch_seed = seed * 1_000_003 + len(done)
        questions = [tokenizer.decode(q).strip() for q in sample([header] * n, question_tokens, batch_seed)]
        questions = [q or "Hello!" for q in questions]
        prompts = [list(tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                                      add_generation_prompt=True, tokenize=True,
                                                      return_dict=True)["input_ids"])
                   for q in questions]
        answers = sample(prompts, answer_tokens, batch_seed + 1,
                         temperature if answer_temperature is None else answer_temperature)
        texts = [tokenizer.decode(p + a) + "<|im_end|>" for p, a in zip(prompts, answers)]
        done.extend(texts)
        write_text_atomic(path, "".join(json.dumps({"text": t}) + "\n" for t in done))
        bar.update(n)
    bar.close()
    return done[:conversations]


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, top_k: int):
    """Cross-entropy of the student against the teacher renormalised over its top ``top_k``
    tokens, and the fraction of positions where their argmax agrees."""
    values, index = torch.topk(teacher_logits, top_k, dim=-1)
    target = torch.softmax(values.float(), dim=-1)
    logq = torch.log_softmax(student_logits.float(), dim=-1)
    loss = -(target * logq.gather(-1, index)).sum(-1).mean()
    agree = (student_logits.argmax(-1) == index[..., 0]).float().mean()
    return loss, agree


@torch.inference_mode()
def decode_seconds(model, context: int = 256, repeats: int = 7, generator_seed: int = 0) -> float:
    """Median seconds of one single-token forward over a ``context``-token cache."""
    from transformers import DynamicCache

    g = torch.Generator().manual_seed(generator_seed)
    ids = torch.randint(0, model.config.vocab_size, (1, context + 1), generator=g)
    times = []
    for _ in range(repeats + 1):
        cache = DynamicCache(config=model.config)
        model(input_ids=ids[:, :context], cache=cache, use_cache=True)
        start = time.perf_counter()
        model(input_ids=ids[:, context:], cache=cache, use_cache=True)
        times.append(time.perf_counter() - start)
    return float(np.median(times[1:]))


def _lr(step: int, cfg: DraftTrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def _save_draft(draft, tokenizer, out: Path, info: dict) -> None:
    """Write the draft's model files into ``out`` (each file replaced atomically)."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=out) as tmp:
        draft.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for item in Path(tmp).iterdir():
            os.replace(item, out / item.name)  # a rename within one folder is atomic
    write_json_atomic(out / "pertoken-draft.json", info)


def check_output(out: str | Path, resume: bool, cfg=None) -> None:
    """Refuse to start over an unfinished run, to resume nothing, or to resume a run made with
    other settings than the dataclass ``cfg`` (before any work). A run is unfinished from its
    first saved work on (sampled chats, the teacher pass, a checkpoint), not only from its first
    checkpoint: every stage resumes."""
    state = Path(out) / ".train"
    started = state.is_dir() and any(p.name != "config.json" for p in state.iterdir())
    if started and not resume:
        raise UserError(f"{out} holds an unfinished training run: pass --resume to continue it, "
                        "or choose another folder")
    if resume and not started:
        raise UserError(f"nothing to resume in {out}")
    record = state / "config.json"
    if resume and cfg is not None and record.is_file():
        if not same_settings(json.loads(record.read_text()), cfg):
            raise UserError(f"{out} was trained with other settings; resume with the same flags")


def same_settings(saved: dict, cfg) -> bool:
    """Whether the recorded settings ``saved`` are the dataclass ``cfg``'s; a setting added
    since the record was made counts as recorded at its default."""
    now = json.loads(json.dumps(asdict(cfg)))
    defaults = json.loads(json.dumps({f.name: f.default for f in fields(cfg)
                                      if f.default is not MISSING}))
    return {**{k: defaults.get(k) for k in now if k not in saved}, **saved} == now


def start_output(out: Path, cfg) -> Path:
    """Create ``out/.train`` and record ``cfg`` there (what :func:`check_output` compares a
    resumed run's settings with); return the folder."""
    state = out / ".train"
    state.mkdir(parents=True, exist_ok=True)
    write_json_atomic(state / "config.json", asdict(cfg))
    return state


def load_init(path: str, target, cfg: DraftTrainConfig):
    """The draft folder ``path`` to fine-tune, in float32; ``cfg``'s architecture fields are
    set from it."""
    from transformers import LlamaForCausalLM

    if not (Path(path) / "config.json").is_file():
        raise UserError(f"--init {path}: not a draft folder (no config.json)")
    draft = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    if draft.config.vocab_size != target.config.vocab_size:
        raise UserError(f"--init {path} has a vocabulary of {draft.config.vocab_size}, the "
                        f"target {target.config.vocab_size}")
    c = draft.config
    cfg.hidden_size, cfg.num_hidden_layers = c.hidden_size, c.num_hidden_layers
    cfg.num_attention_heads, cfg.num_key_value_heads = c.num_attention_heads, c.num_key_value_heads
    cfg.intermediate_size = c.intermediate_size
    return draft


def train_draft(target, tokenizer, documents, out: str | Path, cfg: DraftTrainConfig,
                resume: bool = False, target_name: str = "", progress: bool = True) -> dict:
    """Distil a draft for ``target`` on ``documents`` into the folder ``out``; return its stats.

    ``target`` should be in bfloat16 for speed (it only provides soft labels); the draft trains
    in float32 with bfloat16 autocast, on the target's device (CPU or CUDA). With
    ``cfg.self_chat``, that many conversations sampled from the target come first and the
    corpus fills the rest of ``cfg.train_tokens``; with ``cfg.init``, training starts from
    that draft.
    """
    from tqdm.auto import tqdm

    cfg.validate()
    out = Path(out)
    check_output(out, resume, cfg)
    state_dir = start_output(out, cfg)
    checkpoint = state_dir / "checkpoint.pt"

    tokens = training_tokens(target, tokenizer, documents, cfg, cfg.train_tokens,
                             state_dir / "tokens.npy", progress)
    n_seq = tokens.size // (cfg.seq_len + 1)
    if n_seq < cfg.batch_size:
        raise UserError(f"the corpus gives {n_seq} sequences of {cfg.seq_len + 1} tokens, "
                        f"fewer than one batch of {cfg.batch_size}")
    sequences = torch.from_numpy(tokens[: n_seq * (cfg.seq_len + 1)].astype(np.int64)).view(
        n_seq, cfg.seq_len + 1)

    device = target.device
    draft = load_init(cfg.init, target, cfg) if cfg.init else init_draft(target, cfg, cfg.seed)
    draft.to(device)
    decay = [p for n, p in draft.named_parameters() if p.ndim >= 2]
    rest = [p for n, p in draft.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=cfg.lr,
                                  betas=(0.9, 0.95))
    step = 0
    history: list[dict] = []
    if resume and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False, map_location="cpu")
        if not same_settings(state["config"], cfg):
            raise UserError(f"{out} was trained with other settings; resume with the same flags")
        draft.load_state_dict(state["draft"])
        optimizer.load_state_dict(state["optimizer"])
        step, history = state["step"], state["history"]
        log.info("resuming at step %d of %d", step, cfg.steps)

    order = torch.randperm(n_seq, generator=torch.Generator().manual_seed(cfg.seed))
    draft.train()
    target.eval()
    info = {"target": target_name, "config": asdict(cfg), "steps": cfg.steps,
            "sequences": n_seq, "train_tokens_available": int(tokens.size)}
    bar = tqdm(total=cfg.steps, initial=step, desc="train-draft", disable=not progress,
               unit="step")
    window: list[tuple[float, float]] = []
    start = time.perf_counter()
    while step < cfg.steps:
        picks = [(step * cfg.batch_size + i) % n_seq for i in range(cfg.batch_size)]
        batch = sequences[order[picks]].to(device)
        inputs = batch[:, :-1]
        with torch.inference_mode():
            teacher = target(input_ids=inputs).logits
        teacher = teacher.clone()
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, cfg)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            student = draft(input_ids=inputs).logits
        loss, agree = distill_loss(student, teacher, cfg.top_k)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        optimizer.step()
        step += 1
        window.append((loss.item(), agree.item()))
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean([w[0] for w in window[-20:]]):.3f}",
                        top1=f"{np.mean([w[1] for w in window[-20:]]):.3f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            history.append({"step": step, "loss": float(np.mean([w[0] for w in window])),
                            "top1_agreement": float(np.mean([w[1] for w in window])),
                            "seconds": time.perf_counter() - start})
            window = []
            with atomic_path(checkpoint) as tmp:
                torch.save({"draft": draft.state_dict(), "optimizer": optimizer.state_dict(),
                            "step": step, "history": history, "config": asdict(cfg)}, tmp)
            draft.eval()  # a usable draft folder at every checkpoint
            _save_draft(draft, tokenizer, out, {**info, "step": step, "history": history})
            draft.train()
    bar.close()
    draft.eval()
    info.update(step=step, history=history)
    _save_draft(draft, tokenizer, out, info)
    shutil.rmtree(state_dir, ignore_errors=True)  # done: the folder is a plain model folder
    return info
