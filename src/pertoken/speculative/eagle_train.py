"""Train an EAGLE head for a target (``pertoken speculative train-draft --kind eagle``).

The target runs once over the training tokens (bfloat16 by default) and its features (the
output of its final norm, after the normalised outputs of ``feature_layers`` if any) and
top-``k`` logits are cached on disk (memory-mapped ``.npy``
files, resumable); the head then trains for as many epochs over that cache as
``train_tokens`` asks, so the expensive teacher pass is paid once. Loss, per position:
cross-entropy against the teacher's distribution renormalised over its top ``k`` tokens that
lie in the head's vocabulary, plus ``feature_weight`` times a smooth-L1 regression of the
predicted feature on the target's (EAGLE's two losses). The input features carry uniform
noise, and the head is also trained one step unrolled on its own
predicted features, the way deeper tree nodes use it (as HASS does). Measured on SmolLM2 with
448 self-chats and 300k corpus tokens: held-out top-1 agreement 0.45 after 6 epochs, against
0.36 for the distilled 2-layer draft; with 3072 self-chats and 5M tokens, 8 epochs at batch 32
(``--device cuda``: 7 minutes on one H200), 0.596.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from pertoken.atomic import atomic_path, write_json_atomic
from pertoken.errors import UserError
from pertoken.speculative.draft_train import (check_output, same_settings, start_output,
                                              training_tokens, validate_common)
from pertoken.speculative.eagle import (CONFIG_NAME, EagleHead, FeatureCapture,
                                        check_feature_layers, head_info, is_eagle, load_eagle,
                                        vocab_by_frequency)

log = logging.getLogger(__name__)


@dataclass
class EagleTrainConfig:
    vocab: int = 8192
    """draftable tokens (the most frequent in the training data, plus EOS)"""
    seq_len: int = 256
    batch_size: int = 16
    data_tokens: int = 400_000
    """tokens the teacher runs over (its outputs are cached)"""
    train_tokens: int = 2_400_000
    """tokens the head sees (epochs over the cached teacher outputs)"""
    lr: float = 1e-3
    warmup_steps: int = 20
    top_k: int = 16
    noise: float = 0.2
    """width of the uniform noise added to input features"""
    feature_weight: float = 0.1
    max_doc_tokens: int = 512
    checkpoint_every: int = 50
    seed: int = 0
    self_chat: int = 0
    self_chat_temperature: float = 0.8
    """the temperature of the target's answers in the self-chats (0: greedy)"""
    feature_layers: str = ""
    """decoder layers whose normalised outputs join the final feature, comma-separated (empty:
    the final feature alone)"""
    init: str = ""
    """an EAGLE head folder to start from (fine-tuning); its vocabulary is kept and its
    feature layers must be ``feature_layers``"""

    def validate(self) -> None:
        validate_common(self, ("vocab", "data_tokens"))
        self.layers  # noqa: B018 (parses, or raises UserError)

    @property
    def steps(self) -> int:
        return max(1, math.ceil(self.train_tokens / (self.seq_len * self.batch_size)))

    @property
    def layers(self) -> tuple[int, ...]:
        try:
            return tuple(int(i) for i in self.feature_layers.split(",") if i.strip())
        except ValueError:
            raise UserError("feature layers must be comma-separated integers, got "
                            f"{self.feature_layers!r}") from None


def init_settings(path: str | Path, target=None) -> dict:
    """The settings an EAGLE head folder fixes for fine-tuning it (``--init``):
    ``{"feature_layers": "I,J", "vocab": N}`` (the head checked against ``target`` if given)."""
    if not is_eagle(path):
        raise UserError(f"--init {path}: not an EAGLE head folder (no {CONFIG_NAME})")
    info = head_info(path, target)
    return {"feature_layers": ",".join(str(i) for i in info.get("feature_layers", ())),
            "vocab": int(info["draft_vocab_size"])}


def _check_init(cfg: EagleTrainConfig, target) -> None:
    """Before any work (the self-chats and the teacher pass take an hour on a CPU): the head to
    fine-tune is for ``target`` and has ``cfg``'s feature layers and vocabulary size."""
    fixed = init_settings(cfg.init, target)
    if cfg.layers != EagleTrainConfig(feature_layers=fixed["feature_layers"]).layers:
        raise UserError(f"--init {cfg.init} reads feature layers "
                        f"{fixed['feature_layers'] or '(none)'}, "
                        f"not {cfg.feature_layers or '(none)'}")
    if cfg.vocab != fixed["vocab"]:
        raise UserError(f"--init {cfg.init} drafts {fixed['vocab']} tokens, not {cfg.vocab}")


def _lr(step: int, cfg: EagleTrainConfig) -> float:
    warm = min(1.0, (step + 1) / cfg.warmup_steps)
    return cfg.lr * warm * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))


_TEACHER_FIELDS = {"features": np.float16, "top_values": np.float16, "top_ids": np.int32}


@torch.inference_mode()
def teacher_pass(target, sequences: torch.Tensor, top_k: int, folder: str | Path,
                 batch_size: int = 8, progress: bool = True,
                 flush_seconds: float = 60.0, feature_layers: tuple[int, ...] = ()) -> dict:
    """The target's features (float16; :class:`FeatureCapture`'s, with ``feature_layers``)
    and top-``top_k`` logits on every sequence, run on the
    target's device and written to ``.npy`` files in ``folder`` (memory-mapped: 5M tokens of
    SmolLM2 features are 6 GB). ``progress.json`` there records how many sequences are done;
    it is written after the arrays are flushed, at most every ``flush_seconds``, so an
    interrupted pass resumes from its last record (an hour of work on CPU). Returns the arrays
    as CPU tensors (copy-on-write maps of the files)."""
    from numpy.lib.format import open_memmap
    from tqdm.auto import tqdm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n, length = sequences.shape
    width = target.config.hidden_size * (len(feature_layers) + 1)
    shapes = {"features": (n, length, width),
              "top_values": (n, length, top_k), "top_ids": (n, length, top_k)}
    record = folder / "progress.json"
    done = json.loads(record.read_text())["sequences"] if record.exists() else 0
    if not all((folder / f"{name}.npy").exists() for name in _TEACHER_FIELDS):
        done = 0
    arrays = {}
    for name, dtype in _TEACHER_FIELDS.items():
        path = folder / f"{name}.npy"
        if done:
            arrays[name] = open_memmap(path, mode="r+")
            if arrays[name].shape != shapes[name] or arrays[name].dtype != dtype:
                raise UserError(f"{path} does not match the training data: delete {folder} "
                                "to run the teacher pass again")
        else:
            arrays[name] = open_memmap(path, mode="w+", dtype=dtype, shape=shapes[name])
    if done < n:
        if done:
            log.info("teacher pass: resuming after %d of %d sequences", done, n)
        capture = FeatureCapture(target, feature_layers)
        last = time.monotonic()
        try:
            bar = tqdm(total=n, initial=done, desc="teacher pass", disable=not progress,
                       unit="seq")
            for start in range(done, n, batch_size):
                stop = min(n, start + batch_size)
                logits = target(input_ids=sequences[start:stop].to(target.device)).logits
                # in the logits' own dtype: a float32 copy of 8 x 256 x 49152 bfloat16
                # logits cost more than the top-k (0.3-0.6 s a batch against 0.1)
                values, ids = torch.topk(logits, top_k, dim=-1)
                arrays["features"][start:stop] = capture.value.half().cpu().numpy()
                arrays["top_values"][start:stop] = values.half().cpu().numpy()
                arrays["top_ids"][start:stop] = ids.int().cpu().numpy()
                bar.update(stop - start)
                if stop == n or time.monotonic() - last > flush_seconds:
                    for array in arrays.values():
                        array.flush()
                    write_json_atomic(record, {"sequences": stop})
                    last = time.monotonic()
            bar.close()
        finally:
            capture.close()
    del arrays  # close the writable maps; training reads copy-on-write ones
    return {name: torch.from_numpy(np.load(folder / f"{name}.npy", mmap_mode="c"))
            for name in _TEACHER_FIELDS}


def _available_memory() -> int | None:
    """Bytes the kernel reports available (``MemAvailable`` in /proc/meminfo), or None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def warm_page_cache(paths: list[Path], progress: bool = True, chunk: int = 64 << 20) -> bool:
    """Read ``paths`` once, front to back, if together they take at most 80% of the memory
    the kernel reports available, so that training's random batches find the memory-mapped
    teacher outputs in the page cache. Returns whether it read them (not where the available
    memory is unknown, as off Linux). Measured on a 2-core VM with SmolLM2's 16 GB of
    three-layer features: batches gathered at random from the uncached file read at about
    12 MB/s (training steps of 8 s instead of 5.1), a sequential read at 90-290 MB/s."""
    from tqdm.auto import tqdm

    total = sum(p.stat().st_size for p in paths)
    available = _available_memory()
    if available is None or total > 0.8 * available:
        return False
    with tqdm(total=total, desc="reading teacher outputs", unit="B", unit_scale=True,
              disable=not progress) as bar:
        for path in paths:
            with open(path, "rb", buffering=0) as handle:
                while block := handle.read(chunk):
                    bar.update(len(block))
    return True


def eagle_losses(head: EagleHead, tokens: torch.Tensor, features: torch.Tensor,
                 top_values: torch.Tensor, top_ids: torch.Tensor, full_to_draft: torch.Tensor,
                 noise: float = 0.0, feature_weight: float = 0.1,
                 generator: torch.Generator | None = None):
    """``(loss, [top-1 agreement at depth 1, at depth 2])`` on a batch of sequences.

    Depth 1: position ``t + 1`` reads token ``t + 1`` and the target's feature at ``t``, and is
    scored on the teacher's distribution at ``t + 1``. Depth 2 reads the head's own depth-1
    features instead, one position later."""
    inputs, feats = tokens[:, 1:], features[:, :-1].float()
    if noise:
        feats = feats + ((torch.rand(feats.shape, generator=generator) - 0.5) * noise).to(feats.device)
    total, agreement, previous = 0.0, [], None
    for depth in (1, 2):
        if depth == 1:
            predicted, logits = head(inputs, feats)
        else:
            predicted, logits = head(inputs[:, 1:], previous[:, :-1])
        want = features[:, depth:].float()
        ids = full_to_draft[top_ids[:, depth:].long()]
        inside = ids >= 0
        weights = torch.softmax(top_values[:, depth:].float().masked_fill(~inside, -1e9), -1)
        weights = weights * inside
        logq = torch.log_softmax(logits.float(), -1)
        ce = -(weights * logq.gather(-1, ids.clamp(min=0))).sum(-1)
        ce = ce[inside.any(-1)].mean()
        reg = torch.nn.functional.smooth_l1_loss(predicted.float(), want)
        total = total + ce + feature_weight * reg
        # max's indices: argmax of bfloat16 rows ran 2.7x slower here (32 ms against 12 for
        # 8 x 255 x 8192); a tie may pick another index, which only this statistic sees
        top1 = logits.detach().max(-1).indices
        agreement.append((top1 == ids[..., 0]).float().mean().item())
        previous = predicted
    return total, agreement


def train_eagle(target, tokenizer, documents, out: str | Path, cfg: EagleTrainConfig,
                resume: bool = False, target_name: str = "", progress: bool = True) -> dict:
    """Train an EAGLE head for ``target`` into the folder ``out``; return its stats.

    ``target`` may be in bfloat16 for the teacher pass; it is converted to float32 and frozen
    (``requires_grad_(False)``) in place afterwards (the head trains against its embedding and
    LM head in float32). Everything runs on the target's device (CPU or CUDA); the cached
    teacher outputs stay in CPU memory and go to the device a batch at a time. Every stage
    resumes: the self-chats after each batch, the teacher pass from its last flush, training
    from its checkpoint (and usable head folder) written every ``cfg.checkpoint_every`` steps,
    to the same weights."""
    from tqdm.auto import tqdm

    cfg.validate()
    check_feature_layers(target, cfg.layers)
    if cfg.init:
        _check_init(cfg, target)
    out = Path(out)
    check_output(out, resume, cfg)
    state_dir = start_output(out, cfg)
    checkpoint = state_dir / "checkpoint.pt"
    tokens = training_tokens(target, tokenizer, documents, cfg, cfg.data_tokens,
                             state_dir / "tokens.npy", progress)
    length = cfg.seq_len + 1
    n_seq = tokens.size // length
    if n_seq < cfg.batch_size:
        raise UserError(f"the corpus gives {n_seq} sequences of {length} tokens, fewer "
                        f"than one batch of {cfg.batch_size}")
    sequences = torch.from_numpy(tokens[: n_seq * length].astype(np.int64)).view(n_seq, length)
    data = {"sequences": sequences,
            **teacher_pass(target, sequences, cfg.top_k, state_dir / "teacher", progress=progress,
                           batch_size=64 if target.device.type == "cuda" else 8,
                           feature_layers=cfg.layers)}
    warm_page_cache([state_dir / "teacher" / f"{name}.npy" for name in _TEACHER_FIELDS],
                    progress)
    n_seq = sequences.shape[0]
    eos = [t for t in {tokenizer.eos_token_id, target.config.eos_token_id}
           if isinstance(t, int) and t >= 0]
    device = target.device
    torch.manual_seed(cfg.seed)
    # frozen: the head reads the target's embedding, and a dense gradient of its 49152 x 576
    # rows, never used, took 13% of a training step
    target = target.float().requires_grad_(False)
    if cfg.init:
        head = load_eagle(cfg.init, target).float().to(device)
        vocab = head.vocab.cpu()
    else:
        vocab = vocab_by_frequency(sequences, target.config.vocab_size, cfg.vocab, eos)
        head = EagleHead(target, vocab, cfg.layers).to(device)
        width = target.config.hidden_size
        with torch.no_grad():  # start as "the final feature passes through", token part small
            head.fc.weight.zero_()
            head.fc.weight[:, -width:] = torch.eye(width, device=device)
            head.fc.weight[:, :width].normal_(0, 0.02)
    full_to_draft = torch.full((target.config.vocab_size,), -1, dtype=torch.long)
    full_to_draft[vocab] = torch.arange(vocab.numel())
    full_to_draft = full_to_draft.to(device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, betas=(0.9, 0.95),
                                  weight_decay=0.0)
    step, history = 0, []
    if resume and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False, map_location="cpu")
        if not same_settings(state["config"], cfg):
            raise UserError(f"{out} was trained with other settings; resume with the same flags")
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        step, history = state["step"], state["history"]
        log.info("resuming at step %d of %d", step, cfg.steps)
    held = min(64, max(1, n_seq // 32))  # the last sequences are held out for evaluation
    n_seq -= held
    orders = {}

    def batch_ids(s: int) -> torch.Tensor:
        epoch, within = divmod(s * cfg.batch_size, n_seq)
        if epoch not in orders:
            orders[epoch] = torch.randperm(n_seq, generator=torch.Generator().manual_seed(
                cfg.seed * 7919 + epoch))
        picks = [(within + i) % n_seq for i in range(cfg.batch_size)]
        return orders[epoch][picks]

    def batch(idx: torch.Tensor) -> list[torch.Tensor]:
        return [data[k][idx].to(device, non_blocking=True)
                for k in ("sequences", "features", "top_values", "top_ids")]

    @torch.no_grad()
    def evaluate() -> list[float]:
        head.eval()
        scores = []
        for first in range(n_seq, n_seq + held, cfg.batch_size):
            idx = torch.arange(first, min(first + cfg.batch_size, n_seq + held))
            with torch.autocast(device.type, dtype=torch.bfloat16):
                scores.append(eagle_losses(head, *batch(idx), full_to_draft)[1])
        head.train()
        return [float(x) for x in np.mean(scores, axis=0)]

    info = {"target": target_name, "config": asdict(cfg), "steps": cfg.steps,
            "sequences": n_seq, "heldout_sequences": held, "data_tokens": int(sequences.numel()),
            "vocab_coverage_heldout": float(
                (full_to_draft[data["top_ids"][n_seq:, :, 0].long()] >= 0).float().mean())}
    bar = tqdm(total=cfg.steps, initial=step, desc="train-draft (eagle)", disable=not progress,
               unit="step")
    window: list[tuple[float, float, float]] = []
    start = time.perf_counter()
    head.train()
    while step < cfg.steps:
        idx = batch_ids(step)
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, cfg)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss, agree = eagle_losses(head, *batch(idx), full_to_draft, cfg.noise,
                                       cfg.feature_weight,
                                       torch.Generator().manual_seed(cfg.seed * 1_000_003 + step))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        optimizer.step()
        step += 1
        window.append((loss.item(), *agree))
        recent = np.mean(window[-20:], axis=0)
        bar.update(1)
        bar.set_postfix(loss=f"{recent[0]:.3f}", top1=f"{recent[1]:.3f}", top1_d2=f"{recent[2]:.3f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            mean = np.mean(window, axis=0)
            heldout = evaluate()
            history.append({"step": step, "loss": float(mean[0]), "top1_agreement": float(mean[1]),
                            "top1_agreement_depth2": float(mean[2]),
                            "heldout_top1_agreement": heldout[0],
                            "heldout_top1_agreement_depth2": heldout[1],
                            "seconds": time.perf_counter() - start})
            log.info("step %d: held-out top-1 agreement %.3f (depth 2: %.3f)", step, *heldout)
            window = []
            with atomic_path(checkpoint) as tmp:
                torch.save({"head": head.state_dict(), "optimizer": optimizer.state_dict(),
                            "step": step, "history": history, "config": asdict(cfg)}, tmp)
            head.save(out, {**info, "step": step, "history": history})
    bar.close()
    info.update(step=step, history=history)
    head.eval()
    head.save(out, info)
    shutil.rmtree(state_dir, ignore_errors=True)
    return info
