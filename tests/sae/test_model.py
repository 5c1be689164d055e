import math

import pytest
import torch

from pertoken.errors import UserError
from pertoken.sae.model import (SAEConfig, SparseAutoencoder, aux_loss, fvu, underused,
                                zipf_fit)


def _sae(**kw):
    base = dict(d_in=6, width=16, k=3, aux_k=4)
    base.update(kw)
    return SparseAutoencoder(SAEConfig(**base), seed=1)


def test_tied_unit_norm_init_and_unit_norm_after_adam_steps():
    sae = _sae()
    assert torch.allclose(sae.W_enc, sae.W_dec.t())
    assert torch.allclose(sae.W_dec.norm(dim=0), torch.ones(16))
    opt = torch.optim.Adam(sae.parameters(), lr=0.05)
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(0)) * 3
    for _ in range(5):
        x_hat, _, _ = sae(x)
        loss = (x - x_hat).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        sae.remove_parallel_grad()
        assert (sae.W_dec.grad * sae.W_dec).sum(0).abs().max() < 1e-5  # along the sphere
        opt.step()
        sae.normalize_decoder()
        assert torch.allclose(sae.W_dec.norm(dim=0), torch.ones(16), atol=1e-6)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "feature-choice"])
def test_codes_follow_the_selection_then_relu(arch):
    sae = _sae(arch=arch)
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(2))
    _, a, z = sae(x)
    picked = a != 0
    assert torch.equal(a[picked], z[picked]) and (a >= 0).all()
    if arch == "topk":
        assert (picked.sum(1) <= 3).all()
    elif arch == "batchtopk":
        assert int(picked.sum()) <= 3 * 16
    else:
        assert (picked.sum(0) <= 3).all()  # B = F = 16: m = k


def test_threshold_mode_needs_thresholds_and_applies_them():
    sae = _sae(arch="batchtopk")
    x = torch.randn(4, 6)
    with pytest.raises(UserError, match="thresholds"):
        sae(x, mode="threshold")
    sae.threshold.fill_(0.2)
    _, a, z = sae(x, mode="threshold")
    assert torch.equal(a, z * (z > 0.2))


def test_fvu_is_centred():
    x = torch.randn(50, 4) + 10  # a large mean must not count as explained variance
    x_hat = x.mean(0).expand_as(x)
    assert abs(float(fvu(x, x_hat)) - 1.0) < 1e-5
    assert float(fvu(x, x)) == 0.0


def test_aux_loss_matches_a_per_token_reference_and_is_zero_without_dead():
    sae = _sae(aux_relu=False)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, 6, generator=g)
    x_hat, _, z = sae(x)
    dead = torch.zeros(16, dtype=torch.bool)
    assert float(aux_loss(sae, x, x_hat, z, dead)) == 0.0
    dead[[1, 4, 5, 9, 11, 15]] = True
    got = aux_loss(sae, x, x_hat, z, dead)
    e = (x - x_hat).detach()
    num = 0.0
    for t in range(10):
        cand = sorted(((float(z.detach()[t, j]), j) for j in range(16) if dead[j]), reverse=True)[:4]
        e_hat = sum(v * sae.W_dec.detach()[:, j] for v, j in cand)
        num += float((e[t] - e_hat).pow(2).sum())
    den = float((e - e.mean(0)).pow(2).sum())
    assert abs(got.item() - num / den) < 1e-4
    got.backward()  # it reaches the encoder and decoder, not the detached residual
    assert sae.W_enc.grad is not None and sae.W_enc.grad[dead].abs().sum() > 0
    assert sae.W_enc.grad[~dead].abs().sum() == 0


def test_zipf_fit_recovers_a_zipf_law_and_aux_zipf_reduces_to_aux_k():
    ranks = torch.arange(1, 201, dtype=torch.float64)
    p = 0.3 * (ranks + 1.0) ** -1.1
    perm = torch.randperm(200, generator=torch.Generator().manual_seed(4))
    c, alpha = zipf_fit(p[perm])
    assert abs(c - 0.3) < 1e-6 and abs(alpha - 1.1) < 1e-9
    dead = torch.zeros(200, dtype=torch.bool)
    dead[perm[:3]] = True  # dead features are candidates whatever their density says
    mask, _ = underused(p[perm].float(), dead, tau=4.0)
    assert torch.equal(mask, dead)  # on the law: only the dead
    q = p[perm].clone()
    q[7] = q[7] / 10  # far below its rank's fit
    mask, w = underused(q.float(), dead, tau=4.0, weighting=True)
    assert mask[7] and int(mask.sum()) == 4
    assert 0 < float(w[7]) <= 1 and torch.equal(w[dead], torch.ones(3))


@pytest.mark.parametrize("kw,needle", [({"k": 16}, "below the width"), ({"arch": "x"}, "architecture"),
                                       ({"aux": "y"}, "aux loss"), ({"zipf_tau": 1.0}, "tau")])
def test_bad_configs_are_user_errors(kw, needle):
    with pytest.raises(UserError, match=needle):
        _sae(**kw)
