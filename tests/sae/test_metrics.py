import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from pertoken.cli import main
from pertoken.errors import UserError
from pertoken.models import tiny_llama
from pertoken.sae.cache import ActivationStore
from pertoken.sae.metrics import ce_loss_recovered, evaluate
from pertoken.sae.io import load, save_sae
from pertoken.sae.model import SAEConfig, SparseAutoencoder

DOCS = [f"doc {i}: " + "lorem ipsum dolor sit amet " * (1 + i % 5) for i in range(40)]


def write_store(path, rows: np.ndarray, layer: int = 1, shard: int = 128) -> ActivationStore:
    """A finished activation store in the layout of ``cache_activations``."""
    path.mkdir(parents=True)
    rows = rows.astype(np.float16)
    shards = []
    for i, first in enumerate(range(0, len(rows), shard)):
        name = f"shard-{i:05d}.npy"
        np.save(path / name, rows[first:first + shard])
        shards.append({"file": name, "tokens": int(len(rows[first:first + shard]))})
    sq = float((rows.astype(np.float64) ** 2).sum())
    meta = {"settings": {"model": "tiny", "corpus": "c.txt/all", "layer": layer, "context": 16},
            "d_in": rows.shape[1], "layer": layer, "dtype": "float16", "shards": shards,
            "tokens": len(rows), "sequences": 0, "sum_sq_norm": sq, "complete": True,
            "mean_sq_norm": sq / len(rows)}
    (path / "meta.json").write_text(json.dumps(meta))
    return ActivationStore(path)


def random_rows(n: int = 300, d: int = 8, seed: int = 0) -> np.ndarray:
    g = np.random.default_rng(seed)
    return (g.normal(size=(n, d)) * 2 + np.arange(d)).astype(np.float16)  # non-zero mean


def sae_of(arch: str, d: int = 8, width: int = 32, k: int = 3, dead: int = 0):
    sae = SparseAutoencoder(SAEConfig(d_in=d, width=width, k=k, arch=arch), seed=2)
    with torch.no_grad():
        sae.b_pre.copy_(torch.arange(d, dtype=torch.float32))
        sae.b_enc.fill_(0.5)
        sae.b_enc[:dead] = -1e4  # these latents can never be picked with a positive value
        sae.threshold.fill_(0.8)
    return sae


def test_fvu_l0_and_dead_fraction_match_a_direct_computation(tmp_path):
    store = write_store(tmp_path / "s", random_rows())
    sae = sae_of("topk", dead=5)
    got = evaluate(sae, store, batch_size=64, progress=False)
    x = torch.from_numpy(random_rows()).float()
    with torch.no_grad():
        x_hat, a, _ = sae(x)
    want_fvu = float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    fired = (a != 0).sum(0)
    assert got["mode"] == "batch" and got["eval_tokens"] == 300  # TopK: every token
    assert got["fvu"] == pytest.approx(want_fvu, rel=1e-5)
    assert got["l0"] == pytest.approx(float((a != 0).sum(1).float().mean()))
    assert got["dead_features"] == int((fired == 0).sum()) >= 5
    assert got["dead_fraction"] == got["dead_features"] / 32
    assert got["feature_density"] == pytest.approx((fired / 300).tolist())
    assert sum(got["l0_histogram"]) == 300 and got["l0_max"] <= 3
    assert sum(got["density_histogram"]["counts"]) == 32 - got["dead_features"]
    first = evaluate(sae, store, tokens=100, batch_size=64, progress=False)
    with torch.no_grad():
        x_hat, _, _ = sae(x[:100])
    assert first["eval_tokens"] == 100
    assert first["fvu"] == pytest.approx(
        float((x[:100] - x_hat).pow(2).sum() / (x[:100] - x[:100].mean(0)).pow(2).sum()), rel=1e-5)


def test_batch_mode_selects_over_whole_batches_and_threshold_mode_encodes_each_token(tmp_path):
    store = write_store(tmp_path / "s", random_rows())
    sae = sae_of("mutual-choice")
    x = torch.from_numpy(random_rows()).float()
    threshold = evaluate(sae, store, progress=False)  # the default for a batch-dependent SAE
    batch = evaluate(sae, store, mode="batch", batch_size=64, progress=False)
    assert threshold["mode"] == "threshold" and threshold["eval_tokens"] == 300
    assert batch["mode"] == "batch" and batch["eval_tokens"] == 256  # 4 whole batches of 64
    with torch.no_grad():
        a_threshold = sae.encode(x)
        a_batch = torch.cat([sae(x[i:i + 64], "batch")[1] for i in range(0, 256, 64)])
    assert threshold["l0"] == pytest.approx(float((a_threshold != 0).sum(1).float().mean()))
    assert batch["l0"] == pytest.approx(float((a_batch != 0).sum(1).float().mean()))
    assert batch["l0"] <= 3  # the budget k per token on average
    assert threshold["l0"] != batch["l0"]
    with pytest.raises(UserError, match="at least one batch"):
        evaluate(sae, store, mode="batch", batch_size=512, progress=False)
    with pytest.raises(UserError, match="no inference thresholds"):
        evaluate(SparseAutoencoder(SAEConfig(d_in=8, width=32, k=3, arch="feature-choice")),
                 store, progress=False)
    with pytest.raises(UserError, match="16-dimensional"):
        evaluate(sae_of("topk", d=16), store, progress=False)


def test_a_saved_sae_on_raw_rows_scores_like_the_trained_one_on_scaled_rows(tmp_path):
    store = write_store(tmp_path / "s", random_rows())
    sae = sae_of("feature-choice")
    save_sae(sae, tmp_path / "sae", scale=store.scale)
    ours = evaluate(sae, store, scale=store.scale, progress=False)
    saved = evaluate(load(tmp_path / "sae"), store, progress=False)
    assert saved["fvu"] == pytest.approx(ours["fvu"], rel=1e-5)
    assert saved["l0_histogram"] == ours["l0_histogram"]


@pytest.fixture(scope="module")
def tiny():
    model, tok = tiny_llama(seed=3, num_hidden_layers=2, hidden_size=32, intermediate_size=64)
    with torch.no_grad():  # larger activations, so that ablating the residual stream matters
        model.model.embed_tokens.weight.mul_(10)
    return model, tok


def identity_sae(d: int = 32) -> SparseAutoencoder:
    """An exact reconstruction: codes [relu(x), relu(-x)] (top d of 2d), decoder [I, -I]."""
    sae = SparseAutoencoder(SAEConfig(d_in=d, width=2 * d, k=d))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 0))
        sae.W_dec.copy_(torch.cat([eye, -eye], 1))
        sae.b_enc.zero_()
        sae.b_pre.zero_()
    return sae


def test_exact_reconstruction_recovers_all_of_the_ce_loss_and_zeros_recover_none(tiny):
    model, tok = tiny
    exact = ce_loss_recovered(identity_sae(), model, tok, DOCS, layer=0, sequences=4,
                              context=24, progress=False)
    assert exact["ce_sae"] == pytest.approx(exact["ce_clean"], abs=1e-5)
    assert abs(exact["ce_zero"] - exact["ce_clean"]) > 0.1  # the ablation matters
    assert exact["ce_loss_recovered"] == pytest.approx(1, abs=1e-4)
    assert exact["kl"] == pytest.approx(0, abs=1e-6) and exact["kl_score"] == pytest.approx(1)
    assert exact["tokens"] == 4 * 22
    zero = identity_sae()
    with torch.no_grad():
        zero.W_dec.zero_()
    ablated = ce_loss_recovered(zero, model, tok, DOCS, layer=0, sequences=4, context=24,
                                progress=False)
    assert ablated["ce_clean"] == pytest.approx(exact["ce_clean"])
    assert ablated["ce_loss_recovered"] == pytest.approx(0, abs=1e-4)
    assert ablated["kl_score"] == pytest.approx(0, abs=1e-4)
    assert ablated["delta_ce"] == pytest.approx(ablated["ce_zero"] - ablated["ce_clean"])


def test_cli_sae_eval_writes_json_and_rejects_bad_input_in_one_line(tiny, tmp_path, capsys):
    model, tok = tiny
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "c.txt").write_text("\n\n".join(DOCS))
    write_store(tmp_path / "acts", np.random.default_rng(1).normal(size=(200, 32)), layer=0)
    save_sae(identity_sae(), tmp_path / "sae", metadata={"hook_name": "model.layers.0"})
    out = tmp_path / "r" / "eval.json"
    done = subprocess.run([sys.executable, "-m", "pertoken", "sae", "eval", "--sae",
                           str(tmp_path / "sae"), "--acts", str(tmp_path / "acts"), "--model",
                           str(tmp_path / "m"), "--corpus", str(tmp_path / "c.txt"), "--split",
                           "all", "--sequences", "2", "--json", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["fvu"] == pytest.approx(0, abs=1e-5) and result["eval_tokens"] == 200
    assert result["ce_loss_recovered"] == pytest.approx(1, abs=1e-4)
    assert result["mode"] == "batch" and result["dead_fraction"] == 0 and result["l0"] <= 32
    assert result["ce"]["context"] == 16 and result["layer"] == 0  # from the store and the SAE
    assert "FVU" in done.stdout

    write_store(tmp_path / "wide", np.zeros((10, 16)), layer=0)
    write_store(tmp_path / "l1", np.zeros((10, 32)), layer=1)
    save_sae(sae_of("mutual-choice", d=32), tmp_path / "mc")
    capsys.readouterr()
    for args, needle in (
        (["--acts", str(tmp_path / "wide")], "16-dimensional"),
        (["--acts", str(tmp_path / "nowhere")], "not an activation store"),
        (["--acts", str(tmp_path / "l1")], "layer 0"),
        (["--acts", str(tmp_path / "acts"), "--sae", str(tmp_path / "none")], "no SAE folder"),
        (["--acts", str(tmp_path / "acts"), "--sae", str(tmp_path / "mc"), "--mode", "batch"],
         "at least one batch"),
        (["--acts", str(tmp_path / "acts"), "--model", str(tmp_path / "nomodel")], "no model"),
    ):
        argv = ["sae", "eval", "--sae", str(tmp_path / "sae"), *args]
        assert main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], lines
