import json

import pytest
import torch

from pertoken.errors import UserError
from pertoken.sae import load, save_sae
from pertoken.sae.model import SAEConfig, SparseAutoencoder

SCALE = 3.7
ARCHS = ["topk", "batchtopk", "mutual-choice", "feature-choice"]


def trained_like(arch: str, d: int = 8, width: int = 32, k: int = 4) -> SparseAutoencoder:
    """A random SAE with non-zero biases and, for batch-dependent rules, positive thresholds
    (one global value for Mutual Choice/BatchTopK, one per feature for Feature Choice)."""
    sae = SparseAutoencoder(SAEConfig(d_in=d, width=width, k=k, arch=arch), seed=3)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        sae.b_pre.copy_(torch.randn(d, generator=g))
        sae.b_enc.copy_(0.1 * torch.randn(width, generator=g))
        if arch == "feature-choice":
            sae.threshold.copy_(0.3 * torch.rand(width, generator=g))
        elif arch != "topk":
            sae.threshold.fill_(0.25)
    return sae


def raw_inputs(d: int = 8, n: int = 64) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(5)) * 2 + 1


@pytest.mark.parametrize("arch", ARCHS)
def test_the_saved_sae_on_raw_activations_equals_the_trained_one_on_scaled_ones(arch, tmp_path):
    sae = trained_like(arch)
    save_sae(sae, tmp_path / "sae", scale=SCALE, metadata={"hook_name": "model.layers.1"})
    back = load(tmp_path / "sae")
    assert back.cfg == sae.cfg
    assert torch.equal(back.threshold.isnan(), sae.threshold.isnan())
    assert torch.allclose(back.threshold.nan_to_num(), sae.threshold.nan_to_num())
    x = raw_inputs()
    with torch.no_grad():
        codes = back.encode(x)
        assert torch.allclose(codes, sae.encode(x * SCALE), atol=1e-5)
        assert torch.allclose(back.decode(codes), sae.decode(codes) / SCALE, atol=1e-5)
        # batch mode too: the pre-activations are the same, so is the selection
        x_hat, a, _ = back(x, "batch")
        want_hat, want_a, _ = sae(x * SCALE, "batch")
    assert torch.equal(a != 0, want_a != 0)
    assert torch.allclose(x_hat, want_hat / SCALE, atol=1e-5)


@pytest.mark.parametrize("arch,saelens_class", [("topk", "TopKSAE"),
                                                ("mutual-choice", "JumpReLUSAE"),
                                                ("feature-choice", "JumpReLUSAE")])
def test_saelens_loads_our_folder_and_encodes_and_decodes_like_ours(arch, saelens_class,
                                                                    tmp_path):
    import sae_lens  # a dev dependency: CI checks that SAELens loads our folders
    sae = trained_like(arch)
    save_sae(sae, tmp_path / "sae", scale=SCALE, metadata={"model_name": "tiny"})
    theirs = sae_lens.SAE.load_from_disk(tmp_path / "sae")
    ours = load(tmp_path / "sae")
    assert type(theirs).__name__ == saelens_class
    x = raw_inputs()
    with torch.no_grad():
        codes = ours.encode(x)
        assert torch.allclose(theirs.encode(x), codes, atol=1e-5)
        assert torch.allclose(theirs.decode(codes), ours.decode(codes), atol=1e-5)
        assert torch.allclose(theirs.decode(theirs.encode(x)),
                              sae.decode(sae.encode(x * SCALE)) / SCALE, atol=1e-5)
    assert theirs.cfg.metadata.model_name == "tiny"


def test_cfg_json_keeps_our_config_the_scale_and_the_metadata(tmp_path):
    sae = trained_like("mutual-choice")
    save_sae(sae, tmp_path / "sae", scale=SCALE,
             metadata={"model_name": "m", "hook_name": "model.layers.19", "note": "x"})
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["d_in"] == 8 and cfg["d_sae"] == 32
    assert cfg["metadata"]["hook_name"] == "model.layers.19" and cfg["metadata"]["note"] == "x"
    assert cfg["pertoken"]["scale"] == SCALE
    assert cfg["pertoken"]["config"] == sae.cfg.to_dict()
    # overwriting an SAE folder replaces its files and leaves no temporary behind
    save_sae(trained_like("topk"), tmp_path / "sae")
    assert load(tmp_path / "sae").cfg.arch == "topk"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == ["cfg.json",
                                                                    "sae_weights.safetensors"]
    # a folder holding only hidden working files (a trainer's checkpoint) takes an SAE and
    # keeps them
    (tmp_path / "run" / ".train").mkdir(parents=True)
    save_sae(trained_like("topk"), tmp_path / "run")
    assert load(tmp_path / "run").cfg.arch == "topk"
    assert (tmp_path / "run" / ".train").is_dir()


def test_bad_saves_and_loads_are_user_errors(tmp_path):
    sae = SparseAutoencoder(SAEConfig(d_in=8, width=32, k=4, arch="feature-choice"))
    with pytest.raises(UserError, match="32 of the 32 inference thresholds"):
        save_sae(sae, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="does not hold an SAE"):
        save_sae(trained_like("topk"), tmp_path / "other")
    with pytest.raises(UserError, match="no SAE folder"):
        load(tmp_path / "missing")
    with pytest.raises(UserError, match="no cfg.json"):
        load(tmp_path / "other")
    save_sae(trained_like("topk"), tmp_path / "b")
    cfg = json.loads((tmp_path / "b" / "cfg.json").read_text())
    del cfg["pertoken"]
    (tmp_path / "b" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="not written by pertoken"):
        load(tmp_path / "b")
