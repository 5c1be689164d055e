import numpy as np
import pytest
import torch

from pertoken.errors import UserError
from pertoken.models import tiny_llama
from pertoken.sae import cache as cache_module
from pertoken.sae.cache import ActivationStore, CacheConfig, cache_activations, residual

DOCS = [f"doc {i}: " + "lorem ipsum dolor sit amet " * (1 + i % 5) for i in range(60)]


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(seed=7, num_hidden_layers=3, hidden_size=32, intermediate_size=64)


def test_the_hook_reads_hidden_states_l_plus_1_and_stops_there(tiny):
    model, _ = tiny
    ids = torch.randint(4, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = model(input_ids=ids, output_hidden_states=True).hidden_states
    ran = []
    handle = model.model.layers[2].register_forward_hook(lambda *a: ran.append(1))
    try:
        for layer in (0, 1):
            assert torch.allclose(residual(model, ids, layer), want[layer + 1], atol=1e-6)
        assert not ran  # the layers above the hooked one never run
    finally:
        handle.remove()


def _cfg(**kw):
    base = dict(layer=1, tokens=700, context=16, batch_size=4, shard_tokens=64, shuffle_shards=2)
    base.update(kw)
    return CacheConfig(**base)


def test_the_store_holds_exactly_the_activations_shuffled(tiny, tmp_path):
    model, tok = tiny
    meta = cache_activations(model, tok, DOCS, tmp_path / "acts", _cfg(), progress=False)
    store = ActivationStore(tmp_path / "acts")
    assert len(store) == meta["tokens"] == 700 and store.d_in == 32
    stored = store.rows(np.arange(700)).numpy()
    # the reference: the same packed sequences, position 0 dropped, in order
    seqs = list(cache_module._sequences(tok, DOCS, 16, 0))[: (700 + 14) // 15]
    direct = residual(model, torch.tensor(seqs), 1)[:, 1:].reshape(-1, 32)[:700]
    direct = direct.float().numpy().astype(np.float16).astype(np.float32)
    key = lambda a: a[np.lexsort(a.T[::-1])]
    assert np.array_equal(key(stored), key(direct))
    assert not np.array_equal(stored, direct)  # shuffled across documents
    assert abs(store.scale ** 2 * np.mean((stored.astype(np.float64) ** 2).sum(1)) - 32) < 0.1


def test_an_interrupted_cache_resumes_to_the_same_store(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    cache_activations(model, tok, DOCS, tmp_path / "full", _cfg(), progress=False)
    real = cache_module.write_json_atomic
    calls = []

    def crash_on_second(*args, **kwargs):
        real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(cache_module, "write_json_atomic", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        cache_activations(model, tok, DOCS, tmp_path / "cut", _cfg(), progress=False)
    monkeypatch.setattr(cache_module, "write_json_atomic", real)
    with pytest.raises(UserError, match="resume"):
        cache_activations(model, tok, DOCS, tmp_path / "cut", _cfg(), progress=False)
    with pytest.raises(UserError, match="other settings"):
        cache_activations(model, tok, DOCS, tmp_path / "cut", _cfg(seed=3), resume=True,
                          progress=False)
    cache_activations(model, tok, DOCS, tmp_path / "cut", _cfg(), resume=True, progress=False)
    a, b = ActivationStore(tmp_path / "full"), ActivationStore(tmp_path / "cut")
    assert torch.equal(a.rows(np.arange(700)), b.rows(np.arange(700)))


def test_bad_input_is_a_user_error(tiny, tmp_path):
    model, tok = tiny
    with pytest.raises(UserError, match="layer 3 does not exist"):
        cache_activations(model, tok, DOCS, tmp_path / "a", _cfg(layer=3), progress=False)
    with pytest.raises(UserError, match="no tokens"):
        cache_activations(model, tok, [], tmp_path / "b", _cfg(), progress=False)
    with pytest.raises(UserError, match="not an activation store"):
        ActivationStore(tmp_path)


def _run(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "pertoken", "sae", "cache", *args],
                          capture_output=True, text=True)


def test_cli_cache_writes_a_store_and_rejects_bad_input_in_one_line(tiny, tmp_path):
    model, tok = tiny
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(DOCS))
    done = _run("--model", str(tmp_path / "m"), "--layer", "1", "--corpus", str(corpus),
                "--split", "all", "--tokens", "300", "--context", "16", "-o", str(tmp_path / "a"))
    assert done.returncode == 0, done.stderr
    assert len(ActivationStore(tmp_path / "a")) == 300
    for bad, needle in ((["--layer", "5"], "does not exist"), (["--layer", "-1"], "does not exist"),
                        (["--layer", "1", "--tokens", "0"], "tokens")):
        done = _run("--model", str(tmp_path / "m"), "--corpus", str(corpus), "--split", "all",
                    "--tokens", "300", *bad, "-o", str(tmp_path / "b"))
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and needle in lines[-1], done.stderr


def test_attention_sink_outliers_are_dropped_and_counted(tiny, tmp_path):
    model, tok = tiny
    cfg = _cfg(outlier_ratio=1.0)  # a tiny model has no sinks: drop everything above the median
    meta = cache_activations(model, tok, DOCS, tmp_path / "acts", cfg, progress=False)
    store = ActivationStore(tmp_path / "acts")
    stored = store.rows(np.arange(len(store))).numpy()
    seqs = list(cache_module._sequences(tok, DOCS, 16, 0))[: meta["sequences"]]
    direct = []
    for first in range(0, len(seqs), cfg.batch_size):  # the rule is per forward batch
        rows = residual(model, torch.tensor(seqs[first:first + cfg.batch_size]), 1)[:, 1:]
        rows = rows.reshape(-1, 32)
        direct.append(rows[~cache_module.outlier_mask(rows, 1.0)])
    direct = torch.cat(direct)[:700].float().numpy().astype(np.float16).astype(np.float32)
    key = lambda a: a[np.lexsort(a.T[::-1])]
    assert len(store) == 700 and np.array_equal(key(stored), key(direct))
    assert meta["outliers_dropped"] > 0.3 * 700
    x = torch.randn(50, 4)
    x[7] *= 100
    assert cache_module.outlier_mask(x, 10.0).nonzero().flatten().tolist() == [7]
    assert not cache_module.outlier_mask(x, 0).any()


def test_the_cli_cache_defaults_are_the_configs():
    """The CLI spells its defaults as literals (building the parser must not import torch);
    they must stay CacheConfig's, and the CE splice's ratio the cache's."""
    import inspect

    from pertoken.cli import build_parser
    from pertoken.sae.metrics import ce_loss_recovered

    args = build_parser().parse_args(["sae", "cache", "--layer", "1", "--tokens", "10",
                                      "-o", "out"])
    cfg = CacheConfig(layer=1, tokens=10)
    for field in ("context", "batch_size", "shard_tokens", "outlier_ratio", "seed"):
        assert getattr(args, field) == getattr(cfg, field), field
    assert args.keep_first is not cfg.skip_first
    default = inspect.signature(ce_loss_recovered).parameters["outlier_ratio"].default
    assert default == cfg.outlier_ratio == cache_module.OUTLIER_RATIO
