import copy
import math

import pytest
import torch

from pertoken.errors import UserError
from pertoken.sae.model import SAEConfig, SparseAutoencoder, aux_loss
from pertoken.sae.selection import batch_topk_mask, feature_choice_mask, zipf_capacities
from pertoken.sae.train import (Comm, TrainConfig, Trainer, geometric_median, global_batch_topk,
                                global_feature_choice, train_sae)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_global_selections_on_one_process_equal_the_reference_masks_with_ties():
    g = _gen(0)
    for trial in range(20):
        b, f, k = 12, 10, 1 + trial % 3
        # many ties, or none (the selections' paths through their candidates)
        z = torch.randint(-3, 4, (b, f), generator=g).float() if trial % 2 else torch.randn(
            b, f, generator=g)
        if trial % 4 == 0:
            z[trial % b] = 10.0 + torch.arange(f).float()  # one row needs more than 4k entries
        (rows, cols), kth = global_batch_topk(z, k, k * b, Comm())
        want = batch_topk_mask(z, k).nonzero(as_tuple=True)  # row-major order
        assert torch.equal(rows, want[0]) and torch.equal(cols, want[1])
        assert kth == torch.sort(z.reshape(-1), descending=True).values[k * b - 1]
        caps = torch.randint(0, b + 1 if trial % 3 else b // 2, (f,), generator=g)
        (rows, cols), kth = global_feature_choice(z, caps, Comm())
        want = feature_choice_mask(z, caps).nonzero(as_tuple=True)
        assert torch.equal(rows, want[0]) and torch.equal(cols, want[1])
        assert len(rows) == int(caps.sum())
        for j in range(f):
            if caps[j] > 0:
                assert kth[j] == torch.sort(z[:, j], descending=True).values[caps[j] - 1]
            else:
                assert math.isnan(kth[j])


def test_geometric_median_against_a_direct_minimisation():
    x = torch.randn(200, 3, generator=_gen(1)) * torch.tensor([1.0, 3.0, 0.5])
    x[:20] += 40  # outliers pull the mean, not the median
    m = geometric_median(x)
    cost = lambda c: (x - c).norm(dim=1).sum()
    for direction in torch.eye(3):
        for step in (1e-2, -1e-2):
            assert cost(m) <= cost(m + step * direction) + 1e-4
    assert cost(m) < cost(x.mean(0))


def _dense_reference(sae, trainer, x):
    """The plain dense loss of the same step (model forward + model.aux_loss)."""
    x_hat, _, z = sae(x, capacities=trainer.capacities)
    loss = (x - x_hat).pow(2).sum() / (x.shape[0] * trainer.variance)
    if sae.cfg.aux != "none":
        cand, weights = trainer._aux_candidates()
        loss = loss + sae.cfg.aux_coef * aux_loss(sae, x, x_hat, z, cand, weights)
    return loss


@pytest.mark.parametrize("arch,aux,relu", [("topk", "auxk", True), ("batchtopk", "auxk", False),
                                           ("feature-choice", "none", True),
                                           ("mutual-choice", "zipf", True)])
def test_sparse_step_gradients_equal_dense_autograd(arch, aux, relu):
    cfg = SAEConfig(d_in=8, width=24, k=3, arch=arch, aux=aux, aux_k=5, aux_relu=relu,
                    zipf_weighting=True)
    sae = SparseAutoencoder(cfg, seed=3)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3, generator=_gen(4))
        sae.b_pre.normal_(0, 0.3, generator=_gen(5))
    ref = copy.deepcopy(sae)
    x = torch.randn(16, 8, generator=_gen(6))
    trainer = Trainer(sae, TrainConfig(tokens=160, batch_size=16, dead_tokens=16))
    trainer.variance = 2.5
    trainer.since_fired[:7] = 100  # dead
    trainer.density = torch.rand(24, generator=_gen(7)).double() * 0.2
    trainer.density[:7] = 0
    loss, _ = trainer.loss(x)
    loss.backward()
    trainer_ref = copy.copy(trainer)
    dense = _dense_reference(ref, trainer_ref, x)
    dense.backward()
    assert torch.allclose(loss, dense, rtol=1e-5)
    for name, p in sae.named_parameters():
        q = dict(ref.named_parameters())[name]
        assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), name


def test_aux_zipf_with_only_dead_candidates_equals_aux_k():
    cfg = dict(d_in=8, width=24, k=3, aux_k=5)
    sae_k = SparseAutoencoder(SAEConfig(aux="auxk", **cfg), seed=2)
    sae_z = SparseAutoencoder(SAEConfig(aux="zipf", **cfg), seed=2)
    x = torch.randn(16, 8, generator=_gen(8))
    losses = []
    for sae in (sae_k, sae_z):
        t = Trainer(sae, TrainConfig(tokens=160, batch_size=16, dead_tokens=16))
        t.since_fired[:6] = 100
        t.density = torch.full((24,), 0.1, dtype=torch.float64)  # flat: no one under-used
        t.density[:6] = 0
        cand, _ = t._aux_candidates()
        assert torch.equal(cand, t.dead())
        losses.append(t.loss(x)[0])
    assert torch.allclose(losses[0], losses[1])


def _sparse_data(n, d=16, atoms=48, active=4, seed=0):
    """Tokens that are sums of ``active`` of ``atoms`` fixed unit directions (the same
    directions for every ``seed``), plus a little noise."""
    dictionary = torch.randn(atoms, d, generator=_gen(123))
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    g = _gen(seed)
    idx = torch.stack([torch.randperm(atoms, generator=g)[:active] for _ in range(n)])
    coef = torch.rand(n, active, generator=g) * 2 + 0.5
    return (coef[:, :, None] * dictionary[idx]).sum(1) + 0.01 * torch.randn(n, d, generator=g)


@pytest.mark.parametrize("arch", ["topk", "mutual-choice", "feature-choice"])
def test_training_learns_keeps_unit_norm_and_thresholds_give_about_k(arch):
    torch.manual_seed(0)
    data = _sparse_data(256 * 150)
    cfg = SAEConfig(d_in=16, width=64, k=4, arch=arch, aux="auxk")
    sae = SparseAutoencoder(cfg, seed=0)
    tc = TrainConfig(tokens=len(data), batch_size=256, lr=1e-2, warmup_steps=10,
                     dead_tokens=256 * 20, threshold_decay=0.9)
    trainer = Trainer(sae, tc)
    trainer.initialise(data[:2048])
    first = None
    for step in range(tc.steps):
        stats = trainer.step(data[step * 256:(step + 1) * 256])
        assert stats["aux_features"] == stats["dead"]  # aux_k trains the dead latents only
        first = first or stats["fvu"]
        assert torch.allclose(sae.W_dec.norm(dim=0), torch.ones(64), atol=1e-5)
    assert stats["fvu"] < 0.4 * first
    assert stats["fvu"] < 0.3
    held = _sparse_data(4096, seed=1)
    a = sae.encode(held)
    l0 = (a != 0).sum(1).float().mean()
    assert abs(l0 - 4) <= 0.4, l0  # within 10% of k token by token
    if arch != "topk":  # threshold codes do not depend on the rest of the batch
        assert torch.equal(sae.encode(held[:7]), a[:7])


def test_zipf_capacities_follow_demand_and_keep_the_budget():
    cfg = SAEConfig(d_in=8, width=32, k=4, arch="feature-choice", capacities="zipf")
    sae = SparseAutoencoder(cfg, seed=0)
    trainer = Trainer(sae, TrainConfig(tokens=640, batch_size=64))
    z = torch.randn(64, 32, generator=_gen(3)) + torch.linspace(2, -2, 32)  # early columns win
    trainer._update_capacities(z)
    caps = trainer.capacities
    assert int(caps.sum()) == 4 * 64 and int(caps.max()) <= 64
    assert caps[:4].float().mean() > caps[-4:].float().mean()
    assert trainer.capacity_alpha > 0
    ranks = torch.argsort(torch.argsort(trainer.demand, descending=True, stable=True))
    assert torch.equal(caps, zipf_capacities(ranks, 64, 4, trainer.capacity_alpha, 1.0))


def _cut_reference(sae, batches, b, capacities):
    """Mean over batches of the value each selection cuts at, by sorting (the slow way)."""
    cfg = sae.cfg
    cuts = []
    for x in batches:
        z = sae.pre_activations(x).detach()
        if cfg.arch == "feature-choice":
            ordered = z.sort(dim=0, descending=True).values
            cut = torch.full((cfg.width,), math.nan)
            for j, m in enumerate(capacities.tolist()):
                if m > 0:
                    cut[j] = ordered[m - 1, j].clamp(min=0)
        else:
            cut = z.flatten().sort(descending=True).values[cfg.k * b - 1].clamp(min=0)
            cut = cut.expand(cfg.width)
        cuts.append(cut)
    return torch.stack(cuts).double().mean(0)


@pytest.mark.parametrize("arch,caps", [("mutual-choice", None), ("batchtopk", None),
                                       ("feature-choice", None), ("feature-choice", "some")])
def test_calibrated_thresholds_are_the_mean_cut_of_the_batches(arch, caps):
    from pertoken.sae.selection import uniform_capacities
    from pertoken.sae.train import calibrate_thresholds

    b, f, k = 40, 24, 3
    sae = SparseAutoencoder(SAEConfig(d_in=8, width=f, k=k, arch=arch), seed=1)
    sae.threshold.fill_(-7.0)
    capacities = uniform_capacities(f, b, k)
    if caps:  # uneven capacities, some features without any
        capacities = torch.tensor([0, 0, 1, 9, 2] * 4 + [5, 0, 3, 2])
    batches = [torch.randn(b, 8, generator=_gen(s)) * (1 + s) for s in range(5)]
    used = calibrate_thresholds(sae, iter(batches), b, capacities)
    assert used == 5
    want = _cut_reference(sae, batches, b, capacities)
    unset = torch.isnan(want)
    assert torch.allclose(sae.threshold[~unset].double(), want[~unset], rtol=1e-6, atol=1e-7)
    assert (sae.threshold[unset] == -7.0).all()  # no capacity: left as it was
    with pytest.raises(UserError):
        calibrate_thresholds(SparseAutoencoder(SAEConfig(d_in=8, width=f, k=k)), batches, b)


def test_train_sae_saves_calibrated_thresholds_where_the_running_mean_lags(tmp_path):
    """A slowly decaying running mean remembers early training, whose cut values were far
    from the final ones: its L0 misses k, the calibrated thresholds' does not."""
    from pertoken.sae.cache import ActivationStore, write_store
    from pertoken.sae.io import load

    data = _sparse_data(128 * 30) * 3
    path = tmp_path / "store"
    write_store(data.numpy(), path, shard_tokens=1000, layer=1)
    store = ActivationStore(path)
    l0 = {}
    for n in (0, 8):
        cfg = SAEConfig(d_in=16, width=64, k=4, arch="mutual-choice", aux="auxk")
        tc = TrainConfig(tokens=len(data), batch_size=128, lr=1e-2, warmup_steps=5,
                         threshold_decay=0.98, calibration_batches=n, checkpoint_every=1000)
        train_sae(store, tmp_path / f"cal{n}", cfg, tc, progress=False)
        sae = load(tmp_path / f"cal{n}")
        last = store.rows(torch.arange(len(data) - 8 * 128, len(data)).numpy())
        l0[n] = float((sae.encode(last) != 0).sum(1).float().mean())
    assert abs(l0[8] - 4) < 0.1, l0  # the mean cut over those very batches: L0 about k
    assert abs(l0[0] - 4) > 0.4, l0  # the running mean lags by more than 10%
