import subprocess
import sys

import pytest
import torch

from pertoken.errors import UserError
from pertoken.models import load_model, tiny_llama
from pertoken.speculative import draft_train
from pertoken.speculative.draft_train import (DraftTrainConfig, decode_seconds, distill_loss,
                                              init_draft, train_draft)

DOCS = [f"Document {i}: the quick brown fox jumps over the lazy dog {i % 7} times. " * 3
        for i in range(40)]


def _cfg(**kw):
    base = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                intermediate_size=32, seq_len=32, batch_size=4, train_tokens=32 * 4 * 12,
                lr=1e-2, warmup_steps=2, top_k=8, checkpoint_every=4)
    base.update(kw)
    return DraftTrainConfig(**base)


@pytest.fixture(scope="module")
def teacher():
    model, tok = tiny_llama(seed=3, num_hidden_layers=2, hidden_size=64, intermediate_size=128)
    with torch.no_grad():
        model.lm_head.weight.mul_(4)
    return model, tok


def test_distill_loss_matches_a_slow_reference():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(3, 5, 20, generator=g), torch.randn(3, 5, 20, generator=g)
    loss, agree = distill_loss(student, teacher, 4)
    want, hits = 0.0, 0
    for i in range(3):
        for j in range(5):
            top = sorted(range(20), key=lambda v: -float(teacher[i, j, v]))[:4]
            weights = torch.softmax(teacher[i, j, top], -1)
            logq = torch.log_softmax(student[i, j], -1)
            want -= float(sum(w * logq[v] for w, v in zip(weights, top)))
            hits += int(student[i, j].argmax()) == top[0]
    assert float(loss) == pytest.approx(want / 15, rel=1e-5)
    assert float(agree) == pytest.approx(hits / 15)


def test_draft_shares_the_vocabulary_and_starts_from_the_target_embedding(teacher):
    target, _ = teacher
    draft = init_draft(target, _cfg())
    assert draft.config.vocab_size == target.config.vocab_size
    assert draft.config.eos_token_id == target.config.eos_token_id
    assert draft.lm_head.weight.data_ptr() == draft.get_input_embeddings().weight.data_ptr()
    # token similarities survive the projection better than chance
    t = torch.nn.functional.normalize(target.get_input_embeddings().weight.float(), dim=-1)
    d = torch.nn.functional.normalize(draft.get_input_embeddings().weight.float(), dim=-1)
    sims_t, sims_d = (t @ t.T).flatten(), (d @ d.T).flatten()
    assert torch.corrcoef(torch.stack([sims_t, sims_d]))[0, 1] > 0.5


def test_training_lowers_the_loss_and_writes_a_model_folder(teacher, tmp_path):
    target, tok = teacher
    info = train_draft(target, tok, DOCS, tmp_path / "d", _cfg(), progress=False)
    history = info["history"]
    assert len(history) == 3 and history[-1]["loss"] < history[0]["loss"]
    draft, draft_tok = load_model(str(tmp_path / "d"))
    assert draft.config.vocab_size == target.config.vocab_size
    assert draft_tok.eos_token_id == tok.eos_token_id
    assert not (tmp_path / "d" / ".train").exists()
    assert decode_seconds(draft, context=8, repeats=2) > 0


def test_an_interrupted_run_resumes_to_the_same_weights(teacher, tmp_path, monkeypatch):
    target, tok = teacher
    train_draft(target, tok, DOCS, tmp_path / "full", _cfg(), progress=False)
    saved = draft_train._save_draft
    calls = []

    def crash_after_first(*args, **kwargs):
        saved(*args, **kwargs)
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(draft_train, "_save_draft", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        train_draft(target, tok, DOCS, tmp_path / "cut", _cfg(), progress=False)
    monkeypatch.setattr(draft_train, "_save_draft", saved)
    with pytest.raises(UserError, match="resume"):
        train_draft(target, tok, DOCS, tmp_path / "cut", _cfg(), progress=False)
    with pytest.raises(UserError, match="other settings"):
        train_draft(target, tok, DOCS, tmp_path / "cut", _cfg(lr=0.5), resume=True, progress=False)
    train_draft(target, tok, DOCS, tmp_path / "cut", _cfg(), resume=True, progress=False)
    a, b = load_model(str(tmp_path / "full"))[0], load_model(str(tmp_path / "cut"))[0]
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(x, y, atol=1e-6), name


@pytest.mark.parametrize("bad,needle", [(["--hidden-size", "10", "--heads", "4"], "multiple"),
                                        (["--resume"], "nothing to resume"),
                                        (["--target", "/no/such/model"], "no model"),
                                        (["--init", "/no/such/draft"], "not a draft folder"),
                                        (["--self-chat", "-1"], "self-chat"),
                                        (["--device", "nonsense"], "unknown device"),
                                        (["--device", "meta"], "unsupported device")]
                         + ([] if torch.cuda.is_available()
                            else [(["--device", "cuda"], "no CUDA device")]))
def test_cli_train_draft_bad_input_is_one_line(tmp_path, bad, needle):
    done = subprocess.run([sys.executable, "-m", "pertoken", "speculative", "train-draft", "-o",
                           str(tmp_path / "x"), *bad], capture_output=True, text=True)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and needle in lines[0], done.stderr


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_self_chat_samples_whole_conversations_and_resumes(teacher, tmp_path, monkeypatch):
    target, _ = teacher
    _, tok = tiny_llama(seed=3)  # a fresh tokenizer, to give it a chat template
    tok.chat_template = CHATML
    path = tmp_path / "chats.jsonl"
    kw = dict(batch_size=2, question_tokens=5, answer_tokens=6, progress=False)
    chats = draft_train.self_chat(target, tok, 3, path, **kw)
    assert len(chats) == 3 and len(path.read_text().splitlines()) == 3
    for text in chats:
        assert text.startswith("<|im_start|>user\n") and "<|im_end|>\n<|im_start|>assistant\n" in text
    assert draft_train.self_chat(target, tok, 3, tmp_path / "again.jsonl", **kw) == chats
    monkeypatch.setattr(target, "generate", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    assert draft_train.self_chat(target, tok, 3, path, **kw) == chats  # resumed: nothing to do
    _, plain = tiny_llama(seed=3)
    with pytest.raises(UserError, match="chat template"):
        draft_train.self_chat(target, plain, 1, tmp_path / "x.jsonl", **kw)


def test_self_chat_with_greedy_answers_matches_plain_greedy_decoding(teacher, tmp_path):
    from pertoken.speculative.generate import generate

    target, _ = teacher
    _, tok = tiny_llama(seed=3)
    tok.chat_template = CHATML
    chats = draft_train.self_chat(target, tok, 3, tmp_path / "c.jsonl", batch_size=1,
                                  question_tokens=5, answer_tokens=6, answer_temperature=0,
                                  progress=False)
    header, sep = "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"
    for text in chats:
        question = text[len(header):text.index(sep)]
        prompt = list(tok.apply_chat_template([{"role": "user", "content": question}],
                                              add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"])
        answer = generate(target, None, prompt, method="ar", max_new_tokens=6,
                          eos_token_id=tok.eos_token_id).tokens
        answer = answer[:-1] if answer and answer[-1] == tok.eos_token_id else answer
        assert text == tok.decode(prompt + answer) + "<|im_end|>"


def test_self_chat_comes_first_and_the_corpus_fills_the_rest(teacher, tmp_path, monkeypatch):
    target, tok = teacher
    calls = []
    real = draft_train.tokenize_corpus

    def spy(tokenizer, documents, max_tokens, *args):
        documents = list(documents)
        calls.append((documents[:1], max_tokens))
        return real(tokenizer, documents, max_tokens, *args)

    monkeypatch.setattr(draft_train, "self_chat", lambda *a, **k: ["a chat " * 20] * 4)
    monkeypatch.setattr(draft_train, "tokenize_corpus", spy)
    cfg = _cfg(self_chat=4)
    train_draft(target, tok, DOCS, tmp_path / "d", cfg, progress=False)
    assert calls[0][0] == ["a chat " * 20] and calls[0][1] == cfg.train_tokens
    assert calls[1][0][0] in DOCS and calls[1][1] < cfg.train_tokens


def test_init_continues_from_an_existing_draft(teacher, tmp_path):
    target, tok = teacher
    train_draft(target, tok, DOCS, tmp_path / "a", _cfg(), progress=False)
    cfg = _cfg(hidden_size=32, lr=1e-12, init=str(tmp_path / "a"), train_tokens=32 * 4 * 2)
    train_draft(target, tok, DOCS, tmp_path / "b", cfg, progress=False)
    a, b = load_model(str(tmp_path / "a"))[0], load_model(str(tmp_path / "b"))[0]
    assert b.config.hidden_size == 16  # the architecture comes from the initial draft
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(x, y, atol=1e-6), name
    with pytest.raises(UserError, match="not a draft folder"):
        train_draft(target, tok, DOCS, tmp_path / "c", _cfg(init=str(tmp_path)), progress=False)


@pytest.mark.parametrize("kind", ["model", "eagle"])
def test_cli_trains_a_draft_of_either_kind_end_to_end(tmp_path, kind):
    """`pertoken speculative train-draft` on a tiny target folder and a packaged corpus writes a
    draft that loads beside the target, with its training and its measured cost recorded."""
    import json

    from pertoken.cli import main

    target, tokenizer = tiny_llama(seed=5)
    target.save_pretrained(tmp_path / "target")
    tokenizer.save_pretrained(tmp_path / "target")
    out = tmp_path / "draft"
    argv = ["speculative", "train-draft", "--target", str(tmp_path / "target"), "--kind", kind,
            "--corpus", "wiki-en", "--seq-len", "32", "--batch-size", "2",
            "--train-tokens", "256", "--teacher-dtype", "float32", "--device", "cpu",
            "-o", str(out)]
    if kind == "eagle":
        argv += ["--data-tokens", "512", "--vocab", "64"]
    else:
        argv += ["--hidden-size", "16", "--layers", "1", "--heads", "2", "--kv-heads", "1",
                 "--intermediate-size", "32"]
    assert main(argv) == 0
    info = json.loads((out / f"pertoken-{'eagle' if kind == 'eagle' else 'draft'}.json")
                      .read_text())
    assert info["cost"]["dtype"] == "float32" and info["cost"]["ratio"] > 0
    if kind == "eagle":
        from pertoken.speculative.eagle import load_eagle

        head = load_eagle(out, target.float())
        assert len(head.vocab) == 64
        assert info["cost"]["draft_parameters"] == sum(p.numel() for p in head.parameters())
    else:
        draft = load_model(str(out))[0]
        assert draft.config.hidden_size == 16
        assert info["cost"]["draft_parameters"] == sum(p.numel() for p in draft.parameters())
