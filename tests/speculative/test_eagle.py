"""The EAGLE head: the runner's cached, tree-batched draft probabilities equal a from-scratch
recomputation along each node's path; decoding with it stays exact; save and load."""

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from pertoken.errors import UserError
from pertoken.models import tiny_llama
from pertoken.speculative.draft_tree import threshold_tree
from pertoken.speculative.eagle import (EagleHead, EagleRunner, FeatureCapture, load_eagle,
                                        vocab_by_frequency)
from pertoken.speculative.generate import generate
from pertoken.speculative.verify import verify_greedy
from pertoken.speculative.tree import accepted_keep, compact_cache, tree_forward

from .heads import random_prompts, saved_pair
from .paths import node_path

TEMPERATURE = 0.7


@pytest.fixture(scope="module", params=[(), (0,)], ids=["final-feature", "layer-0-too"])
def pair(request):
    target, _ = tiny_llama(seed=31, num_hidden_layers=2, hidden_size=32, intermediate_size=64)
    with torch.no_grad():
        target.lm_head.weight.mul_(4)
    torch.manual_seed(32)
    head = EagleHead(target, torch.arange(3, target.config.vocab_size, 3), request.param).eval()
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # features and tokens both matter
    return target, head


def _target_features(target, tokens, layers=()):
    capture = FeatureCapture(target, layers)
    try:
        with torch.inference_mode():
            target(input_ids=torch.tensor([tokens]))
        return capture.value[0]
    finally:
        capture.close()


def _reference_probs(target, head, committed, path_tokens):
    """Draft probabilities after ``committed + path_tokens``, with no cache: the committed
    tokens read the target's features of the position before (zeros at 0), each path token
    the head's own output at the position before, recomputed from scratch."""
    true = _target_features(target, committed, head.feature_layers)
    feats = torch.cat([torch.zeros(1, true.shape[1]), true[:-1]])
    tokens = list(committed)
    with torch.inference_mode():
        for token in [None] + list(path_tokens):
            if token is not None:
                tokens.append(token)
                feats = torch.cat([feats, g[0, -1:]])
            g, logits = head(torch.tensor([tokens]), feats[None])
    sub = torch.softmax(logits[0, -1].float() / TEMPERATURE, -1)
    return torch.zeros(target.config.vocab_size).index_copy_(0, head.vocab, sub)


def _path(tree, node):  # its tokens
    return [tree.tokens[i] for i in node_path(tree.parents, node)]


@torch.inference_mode()
def test_runner_probabilities_match_a_from_scratch_recomputation(pair):
    target, head = pair
    rng = random.Random(0)
    for trial in range(3):
        prompt = [rng.randrange(4, 260) for _ in range(rng.randrange(2, 9))]
        committed = prompt[:-1]
        capture = FeatureCapture(target, head.feature_layers)
        try:
            cache = DynamicCache(config=target.config)
            target(input_ids=torch.tensor([committed]), cache=cache, use_cache=True)
            runner = EagleRunner(head, TEMPERATURE, every_node=False)
            runner.prefill(committed, capture.value[0])
            root = prompt[-1]
            for step in range(4):
                p = cache.get_seq_length()
                runner.start(p)
                tree = threshold_tree(root, runner, threshold=0.02, budget=6,
                                      generator=torch.Generator().manual_seed(step),
                                      deterministic=False)
                assert len(tree) > 2
                for node in range(len(tree)):
                    if node in runner.probs:
                        want = _reference_probs(target, head, committed + [root],
                                                _path(tree, node))
                        assert torch.allclose(runner.probs[node], want, atol=1e-5), (trial, step, node)
                logits = tree_forward(target, cache, tree.tokens, tree.parents)
                accepted, token = verify_greedy(tree, logits)
                if step == 1 and not accepted:  # make sure some step accepts drafted nodes
                    accepted = [1]
                    token = rng.randrange(4, 260)
                compact_cache(cache, accepted_keep(p, [0] + accepted))
                runner.commit(tree, [0] + accepted, capture.value[0, [0] + accepted])
                committed = committed + [root] + [tree.tokens[i] for i in accepted]
                root = token
        finally:
            capture.close()


@pytest.mark.parametrize("method", ["dyspec", "dyspec-heap", "chain", "tree"])
def test_greedy_with_the_head_is_token_identical_to_plain_greedy(pair, method):
    target, head = pair
    rng = random.Random(1)
    for trial in range(4):
        prompt = [rng.randrange(4, 260) for _ in range(rng.randrange(1, 10))]
        n = rng.choice([1, 9, 20])
        plain = generate(target, None, prompt, method="ar", max_new_tokens=n).tokens
        for budget in (1, 4, 16):
            out = generate(target, head, prompt, method=method, budget=budget, max_new_tokens=n,
                           seed=trial)
            assert out.tokens == plain, (prompt, budget)


def test_greedy_with_the_head_stays_exact_in_the_cli_layout(tmp_path):
    """The CLI loads a head beside a target laid out for tree passes (packed fp32 weights,
    grouped-query SDPA for the target and the head's own layer)."""
    from pertoken.speculative.cli import _load_pair
    from pertoken.speculative.tree import GQA_SDPA

    target, _ = saved_pair(tmp_path, head_seed=33)
    laid, _, loaded = _load_pair(str(tmp_path / "target"), str(tmp_path / "head"), "float32")
    assert laid.config._attn_implementation == GQA_SDPA == loaded.config._attn_implementation
    for trial, prompt in enumerate(random_prompts(2)):
        plain = generate(target, None, prompt, method="ar", max_new_tokens=16).tokens
        for method in ("dyspec", "tree"):
            out = generate(laid, loaded, prompt, method=method, budget=8, max_new_tokens=16,
                           seed=trial)
            assert out.tokens == plain, (prompt, method)


def test_save_and_load_round_trip(tmp_path, pair):
    target, head = pair
    head.save(tmp_path / "head", {"target": "tiny"})
    loaded = load_eagle(tmp_path / "head", target)
    assert torch.equal(loaded.vocab, head.vocab)
    assert loaded.feature_layers == head.feature_layers
    ids, feats = torch.tensor([[5, 6, 7]]), torch.randn(1, 3, head.feature_size)
    with torch.inference_mode():
        assert torch.allclose(loaded(ids, feats)[1], head(ids, feats)[1], atol=1e-6)
    other, _ = tiny_llama(seed=1, hidden_size=64, intermediate_size=64)
    with pytest.raises(UserError, match="another target"):
        load_eagle(tmp_path / "head", other)
    with pytest.raises(UserError, match="not an EAGLE head"):
        load_eagle(tmp_path, target)


def test_feature_capture_with_layers_matches_the_hidden_states():
    target, _ = tiny_llama(seed=8, num_hidden_layers=3, hidden_size=32, intermediate_size=64)
    ids = torch.randint(0, 260, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        out = target(input_ids=ids, output_hidden_states=True)
        capture = FeatureCapture(target, (0, 1))
        try:
            target(input_ids=ids)
        finally:
            capture.close()
    eps = target.config.rms_norm_eps
    # reference: hidden_states[i + 1] is decoder layer i's output, the last one after the norm
    want = [h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps) for h in out.hidden_states[1:3]]
    want = torch.cat(want + [out.hidden_states[-1]], dim=-1)
    assert capture.value.shape == (2, 7, 96)
    assert torch.allclose(capture.value, want, atol=1e-5)
    with pytest.raises(UserError, match="feature layers"):
        EagleHead(target, torch.arange(10), (2,))
    with pytest.raises(UserError, match="feature layers"):
        EagleHead(target, torch.arange(10), (1, 0))


def test_eagle_training_with_feature_layers_learns_and_stays_exact(tmp_path):
    from pertoken.speculative.eagle_train import train_eagle

    target, tok = tiny_llama(seed=3, num_hidden_layers=2, hidden_size=32, intermediate_size=64)
    info = train_eagle(target, tok, DOCS, tmp_path / "head", _eagle_cfg(feature_layers="0"),
                       progress=False)
    history = info["history"]
    assert history[-1]["loss"] < history[0]["loss"]
    head = load_eagle(tmp_path / "head", target)
    assert head.feature_layers == (0,) and head.feature_size == 64
    prompt = tok.encode("Document 5: the quick")
    plain = generate(target, None, prompt, method="ar", max_new_tokens=12).tokens
    for method in ("dyspec", "chain"):
        assert generate(target, head, prompt, method=method, budget=6,
                        max_new_tokens=12).tokens == plain
    with pytest.raises(UserError, match="feature layers"):
        train_eagle(target, tok, DOCS, tmp_path / "bad", _eagle_cfg(feature_layers="1"),
                    progress=False)
    with pytest.raises(UserError, match="integers"):
        _eagle_cfg(feature_layers="a").validate()


def test_a_setting_added_later_resumes_at_its_default():
    from pertoken.speculative.draft_train import same_settings

    saved = json.loads(json.dumps(dataclasses.asdict(_eagle_cfg())))
    del saved["feature_layers"]  # a run recorded before the setting existed
    assert same_settings(saved, _eagle_cfg())
    assert not same_settings(saved, _eagle_cfg(feature_layers="0"))
    assert not same_settings({**saved, "lr": 1.0}, _eagle_cfg())


def test_vocab_by_frequency_keeps_specials_and_the_most_frequent_tokens():
    tokens = torch.tensor([7] * 5 + [9] * 3 + [11] * 2 + [4])
    vocab = vocab_by_frequency(tokens, vocab_size=20, size=3, always=[2])
    assert vocab.tolist() == [2, 7, 9]


DOCS = [f"Document {i}: the quick brown fox jumps over the lazy dog {i % 7} times. " * 3
        for i in range(40)]


def _eagle_cfg(**kw):
    from pertoken.speculative.eagle_train import EagleTrainConfig

    base = dict(vocab=40, seq_len=24, batch_size=4, data_tokens=25 * 30, train_tokens=24 * 4 * 8,
                lr=3e-3, warmup_steps=2, top_k=4, checkpoint_every=4)
    base.update(kw)
    return EagleTrainConfig(**base)


def test_eagle_training_learns_and_resumes_to_the_same_weights(tmp_path, monkeypatch):
    from pertoken.speculative import eagle_train
    from pertoken.speculative.eagle_train import train_eagle

    target, tok = tiny_llama(seed=3, num_hidden_layers=2, hidden_size=32, intermediate_size=64)
    info = train_eagle(target, tok, DOCS, tmp_path / "full", _eagle_cfg(), progress=False)
    history = info["history"]
    assert len(history) == 2 and history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["heldout_top1_agreement"] > history[0]["heldout_top1_agreement"] - 1e-9
    assert not (tmp_path / "full" / ".train").exists()
    head = load_eagle(tmp_path / "full", target)
    assert head.vocab.numel() == 40 and tok.eos_token_id in head.vocab.tolist()
    prompt = tok.encode("Document 3: the quick")
    plain = generate(target, None, prompt, method="ar", max_new_tokens=12).tokens
    assert generate(target, head, prompt, budget=6, max_new_tokens=12).tokens == plain

    saved = eagle_train.EagleHead.save

    def crash_after_first(self, *args, **kwargs):
        saved(self, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(eagle_train.EagleHead, "save", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        train_eagle(target, tok, DOCS, tmp_path / "cut", _eagle_cfg(), progress=False)
    monkeypatch.setattr(eagle_train.EagleHead, "save", saved)
    with pytest.raises(UserError, match="resume"):
        train_eagle(target, tok, DOCS, tmp_path / "cut", _eagle_cfg(), progress=False)
    with pytest.raises(UserError, match="other settings"):
        train_eagle(target, tok, DOCS, tmp_path / "cut", _eagle_cfg(lr=0.5), resume=True,
                    progress=False)
    train_eagle(target, tok, DOCS, tmp_path / "cut", _eagle_cfg(), resume=True, progress=False)
    a, b = load_eagle(tmp_path / "full", target), load_eagle(tmp_path / "cut", target)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(x, y, atol=1e-6), name


def test_init_fine_tunes_an_existing_head_and_keeps_its_vocabulary(tmp_path):
    from pertoken.speculative.eagle_train import init_settings, train_eagle

    target, tok = tiny_llama(seed=3, num_hidden_layers=2, hidden_size=32, intermediate_size=64)
    train_eagle(target, tok, DOCS, tmp_path / "a", _eagle_cfg(feature_layers="0"), progress=False)
    assert init_settings(tmp_path / "a") == {"feature_layers": "0", "vocab": 40}
    other = [d.replace("quick brown fox", "slow red hen") for d in DOCS]  # another vocabulary
    cfg = _eagle_cfg(feature_layers="0", lr=1e-12, init=str(tmp_path / "a"))
    train_eagle(target, tok, other, tmp_path / "b", cfg, progress=False)
    a, b = load_eagle(tmp_path / "a", target), load_eagle(tmp_path / "b", target)
    fresh = train_eagle(target, tok, other, tmp_path / "c", _eagle_cfg(feature_layers="0"),
                        progress=False)
    assert fresh and load_eagle(tmp_path / "c", target).vocab.tolist() != a.vocab.tolist()
    assert b.vocab.tolist() == a.vocab.tolist() and b.feature_layers == (0,)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(x, y, atol=1e-6), name  # a negligible learning rate: unchanged
    with pytest.raises(UserError, match="feature layers 0, not"):
        train_eagle(target, tok, DOCS, tmp_path / "d", _eagle_cfg(init=str(tmp_path / "a")),
                    progress=False)
    with pytest.raises(UserError, match="drafts 40 tokens"):
        train_eagle(target, tok, DOCS, tmp_path / "e",
                    _eagle_cfg(vocab=50, feature_layers="0", init=str(tmp_path / "a")),
                    progress=False)
    with pytest.raises(UserError, match="not an EAGLE head"):
        train_eagle(target, tok, DOCS, tmp_path / "f", _eagle_cfg(init=str(tmp_path)),
                    progress=False)
    other, _ = tiny_llama(seed=3, num_hidden_layers=2, hidden_size=48, intermediate_size=64)
    with pytest.raises(UserError, match="another target"):  # refused before any work
        train_eagle(other, tok, DOCS, tmp_path / "g",
                    _eagle_cfg(feature_layers="0", init=str(tmp_path / "a")), progress=False)
    assert not (tmp_path / "g").exists()


def test_eagle_losses_match_a_slow_reference():
    from pertoken.speculative.eagle_train import eagle_losses

    target, _ = tiny_llama(seed=4, num_hidden_layers=1, hidden_size=32, intermediate_size=64)
    vocab = torch.arange(0, target.config.vocab_size, 2)
    head = EagleHead(target, vocab)
    full_to_draft = torch.full((target.config.vocab_size,), -1)
    full_to_draft[vocab] = torch.arange(vocab.numel())
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 260, (2, 7), generator=g)
    feats = torch.randn(2, 7, 32, generator=g)
    values, ids = torch.randn(2, 7, 3, generator=g).sort(-1, descending=True).values, \
        torch.randint(0, 260, (2, 7, 3), generator=g)
    loss, agree = eagle_losses(head, tokens, feats, values, ids, full_to_draft, feature_weight=0.5)
    # reference: one position at a time, no batching
    total = 0.0
    for depth in (1, 2):
        ces, regs, hits = [], [], []
        for b in range(2):
            for t in range(depth, 7):
                if depth == 1:
                    f_in = feats[b, :t].clone()
                    g_out, logits = head(tokens[b:b + 1, 1:t + 1], f_in[None])
                else:
                    g1, _ = head(tokens[b:b + 1, 1:t], feats[b:b + 1, :t - 1])
                    g_out, logits = head(tokens[b:b + 1, 2:t + 1], g1)
                row = logits[0, -1].float().log_softmax(-1)
                inside = [(v, full_to_draft[i]) for v, i in zip(values[b, t], ids[b, t])
                          if full_to_draft[i] >= 0]
                regs.append(torch.nn.functional.smooth_l1_loss(g_out[0, -1], feats[b, t],
                                                               reduction="sum") / 32)
                if inside:
                    w = torch.softmax(torch.stack([v for v, _ in inside]), 0)
                    ces.append(-sum(wi * row[j] for wi, (_, j) in zip(w, inside)))
                hits.append(float(full_to_draft[ids[b, t, 0]] == int(row.argmax())))
        total = total + torch.stack(ces).mean() + 0.5 * torch.stack(regs).mean()
        assert abs(agree[depth - 1] - sum(hits) / len(hits)) < 1e-6
    assert torch.allclose(loss, total, atol=1e-5)


@pytest.mark.parametrize("bad,needle", [(["--kind", "eagle", "--init", "x"], "--init"),
                                        (["--kind", "eagle", "--vocab", "0"], "vocab"),
                                        (["--kind", "eagle", "--lr", "0"], "learning rate")])
def test_cli_train_eagle_bad_input_is_one_line(tmp_path, bad, needle):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "pertoken", "speculative", "train-draft", "-o",
                           str(tmp_path / "x"), *bad], capture_output=True, text=True)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and needle in lines[0], done.stderr


def test_teacher_pass_matches_the_target_and_resumes_after_an_interruption(tmp_path):
    import json

    from pertoken.speculative.eagle_train import teacher_pass

    target, _ = tiny_llama(seed=5, num_hidden_layers=2, hidden_size=32, intermediate_size=64)
    seqs = torch.randint(0, target.config.vocab_size, (10, 9),
                         generator=torch.Generator().manual_seed(0))
    full = teacher_pass(target, seqs, 4, tmp_path / "full", batch_size=3, progress=False)
    with torch.inference_mode():  # reference: one forward over everything
        out = target(input_ids=seqs, output_hidden_states=True)
    assert torch.allclose(full["features"].float(), out.hidden_states[-1], atol=2e-3)
    values, ids = torch.topk(out.logits, 4, dim=-1)
    assert torch.equal(full["top_ids"].long(), ids)
    layered = teacher_pass(target, seqs, 4, tmp_path / "layered", batch_size=4, progress=False,
                           feature_layers=(0,))
    want = torch.stack([_target_features(target, row.tolist(), (0,)) for row in seqs])
    assert layered["features"].shape == (10, 9, 64)
    assert torch.allclose(layered["features"].float(), want, atol=5e-3)
    assert torch.equal(layered["top_ids"], full["top_ids"])
    assert torch.allclose(full["top_values"].float(), values, atol=2e-3)

    calls = []

    def fail_third(module, args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("interrupted")

    handle = target.register_forward_pre_hook(fail_third)
    with pytest.raises(RuntimeError, match="interrupted"):
        teacher_pass(target, seqs, 4, tmp_path / "cut", batch_size=3, progress=False,
                     flush_seconds=0)
    assert json.loads((tmp_path / "cut" / "progress.json").read_text()) == {"sequences": 6}
    calls.clear()
    cut = teacher_pass(target, seqs, 4, tmp_path / "cut", batch_size=3, progress=False)
    handle.remove()
    assert len(calls) == 2  # sequences 6-8 and 9 only
    for name in full:
        assert torch.equal(full[name], cut[name]), name
    (tmp_path / "cut" / "top_ids.npy").unlink()  # a lost file: the pass starts over
    calls.clear()
    handle = target.register_forward_pre_hook(lambda module, args: calls.append(1))
    again = teacher_pass(target, seqs, 4, tmp_path / "cut", batch_size=3, progress=False)
    handle.remove()
    assert len(calls) == 4 and all(torch.equal(full[n], again[n]) for n in full)


def test_an_interrupted_data_stage_needs_resume_with_the_same_settings(tmp_path):
    from pertoken.speculative.draft_train import check_output, start_output

    out = tmp_path / "run"
    check_output(out, False, _eagle_cfg())
    with pytest.raises(UserError, match="nothing to resume"):
        check_output(out, True, _eagle_cfg())
    state = start_output(out, _eagle_cfg())
    check_output(out, False, _eagle_cfg())  # only the settings: nothing done yet
    (state / "self-chat.jsonl").write_text('{"text": "hi"}\n')
    with pytest.raises(UserError, match="--resume"):
        check_output(out, False, _eagle_cfg())
    check_output(out, True, _eagle_cfg())
    with pytest.raises(UserError, match="other settings"):
        check_output(out, True, _eagle_cfg(top_k=8))


def test_warm_page_cache_reads_files_that_fit_and_skips_the_rest(tmp_path, monkeypatch):
    from pertoken.speculative import eagle_train

    files = [tmp_path / "a.npy", tmp_path / "b.npy"]
    for i, f in enumerate(files):
        f.write_bytes(bytes([i]) * (3000 + i))
    read = []
    real_open = open

    def spy(path, *args, **kwargs):
        read.append(Path(path).name)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", spy)
    monkeypatch.setattr(eagle_train, "_available_memory", lambda: 10_000)
    assert eagle_train.warm_page_cache(files, progress=False, chunk=1000)
    assert read == ["a.npy", "b.npy"]
    read.clear()
    monkeypatch.setattr(eagle_train, "_available_memory", lambda: 7_000)  # 6001 > 80%
    assert not eagle_train.warm_page_cache(files, progress=False)
    monkeypatch.setattr(eagle_train, "_available_memory", lambda: None)
    assert not eagle_train.warm_page_cache(files, progress=False)
    assert read == []
