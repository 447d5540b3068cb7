"""MoCo (Fernando et al., ICLR 2023): differential tests against the authors' published
update (heshandevaka/MoCo) and LibMTL's variant, both re-derived here (torchjd 0.18 has no
MoCo)."""
from __future__ import annotations

import io

import pytest
import torch
from core_helpers import head_grads_plain, make, wrapped_step
from gradient_cases import CASES, PROPERTY, gradient_matrix, gradient_sequences, losses_for
from hypothesis import given
from hypothesis import strategies as st

import gradsurgery as gs

D = torch.float64
LIBMTL = dict(beta=0.5, normalize=True, scale_by_tasks=False, decay="step")


def reference_authors(grads_seq, losses_seq, epochs, beta=0.05, delta=0.1, sigma2=0.5, sigma3=0.5,
                      raw_loss=False):
    """The shared-parameter gradient after each step, re-derived from heshandevaka/MoCo
    ``CAGrad/utils.py``, ``multi_task_rg_trainer``: its ``tracking(grads, y, lambd, it, ...)``
    holds gradients as columns (``P x K``) and ``lambd`` as a ``K x 1`` column; with
    ``it`` the epoch index (``index`` of ``for index in range(total_epoch)``),
    ``y <- y - beta/(1+it)**sigma2 (y - grads)``,
    ``lambd <- softmax(lambd - delta/(1+it)**sigma3 y^T (y lambd), dim 0)``, ``g = y lambd``;
    with ``--smgdc_method raw_loss`` the columns are first ``grads / (||grads||_col + 1e-8) *
    task_loss``; then ``overwrite_grad`` writes ``newgrad = g * 2`` ("to match the sum loss":
    times the number of tasks; ``CAGrad/nyuv2/utils.py`` has ``* 3``). The defaults are
    ``CAGrad/run_moco.sh`` (``beta=0.05 delta=0.1``) over the argparse defaults of
    ``CAGrad/model_segnet_mt.py`` (``sigma2 = sigma3 = 0.5``, ``smgdc_method "None"``).
    ``y`` and ``lambd`` start at 0 and ``1/K`` once: the trainer's ``if index == 0:`` that
    re-initialises them at every step of the first epoch is not reproduced (a bug; see the card)."""
    k, p = grads_seq[0].shape
    y = torch.zeros(p, k, dtype=D)
    lambd = torch.ones(k, 1, dtype=D) / k
    out = []
    for it, g, losses in zip(epochs, grads_seq, losses_seq):
        cols = g.to(D).T.clone()
        if raw_loss:
            cols = cols / (torch.linalg.norm(cols, dim=0) + 1e-8) * losses.to(D)
        y = y - beta / (1 + it) ** sigma2 * (y - cols)
        lambd = torch.softmax(lambd - delta / (1 + it) ** sigma3 * y.T @ (y @ lambd), 0)
        out.append((y @ lambd).flatten() * k)
    return out


def reference_libmtl(grads_seq, losses_seq, beta=0.5, beta_sigma=0.5, gamma=0.1, gamma_sigma=0.5, rho=0.0):
    """``(direction, lambda)`` after each step, re-derived from LibMTL 1.1.5
    ``LibMTL/weighting/MoCo.py``, ``MoCo.backward`` (written from the authors' shared code):
    each task gradient is normalised and scaled by its loss, ``g_k / (||g_k|| + 1e-8) * L_k``;
    the tracking ``y <- y - beta_t (y - G)`` with ``beta_t = beta / t**beta_sigma``;
    ``lambda <- softmax(lambda - gamma_t (y y^T + rho I) lambda)`` with
    ``gamma_t = gamma / t**gamma_sigma`` (``t`` counts steps from 1); the shared gradient is
    ``y^T lambda``."""
    k, p = grads_seq[0].shape
    y = torch.zeros(k, p, dtype=D)
    lambd = torch.ones(k, dtype=D) / k
    out = []
    for t, (g, losses) in enumerate(zip(grads_seq, losses_seq), start=1):
        g = g.to(D).clone()
        for i in range(k):
            g[i] = g[i] / (g[i].norm() + 1e-8) * losses[i]
        y = y - (beta / t ** beta_sigma) * (y - g)
        lambd = torch.softmax(lambd - (gamma / t ** gamma_sigma) * (y @ y.T + rho * torch.eye(k, dtype=D)) @ lambd, -1)
        out.append((y.T @ lambd, lambd.clone()))
    return out


def steps(grads_seq, losses_seq, epochs=None, **opts):
    """Our update after each step; ``epochs[i]`` the epoch index of step ``i`` (``end_epoch``
    is called whenever it grows)."""
    k = grads_seq[0].shape[0]
    method = gs.methods.create("moco", **opts)
    method.bind(k, device=torch.device("cpu"), dtype=D, generator=torch.Generator().manual_seed(0))
    out = []
    for i, (g, l) in enumerate(zip(grads_seq, losses_seq)):
        for _ in range((epochs[i] - epochs[i - 1]) if epochs and i else 0):
            method.end_epoch()
        out.append(method.combine(g, l, None))
    return method, out


@pytest.mark.parametrize("k,kind,seed", CASES)
def test_equals_the_authors_published_run(k, kind, seed):
    """Six steps over three epochs (two steps each) with the defaults: the Cityscapes run."""
    seq = [gradient_matrix(k, kind, seed + 10 * t) for t in range(6)]
    losses = [losses_for(k, seed + t) for t in range(6)]
    epochs = [0, 0, 1, 1, 2, 2]
    expected = reference_authors(seq, losses, epochs)
    _, outs = steps(seq, losses, epochs)
    for out, d in zip(outs, expected):
        torch.testing.assert_close(out, d, rtol=1e-10, atol=1e-12 * float(d.abs().max().clamp_min(1)))


@pytest.mark.parametrize("opts,ref", [(dict(normalize=True, beta=0.99, beta_sigma=0.0, gamma_sigma=0.0),
                                       dict(raw_loss=True, beta=0.99, sigma2=0.0, sigma3=0.0)),
                                      (dict(beta=0.3, gamma=0.7, beta_sigma=1.0, gamma_sigma=0.25),
                                       dict(beta=0.3, delta=0.7, sigma2=1.0, sigma3=0.25))])
def test_equals_the_authors_update_with_options(opts, ref):
    """The NYUv2 script's options (``CAGrad/nyuv2/run_moco.sh``: ``beta 0.99``, ``sigma2 = sigma3
    = 0``, ``smgdc_method raw_loss``) and others, over epochs of uneven length."""
    seq = [gradient_matrix(3, "random", t) for t in range(7)]
    losses = [losses_for(3, t) for t in range(7)]
    epochs = [0, 0, 0, 1, 3, 3, 4]
    _, outs = steps(seq, losses, epochs, **opts)
    for out, d in zip(outs, reference_authors(seq, losses, epochs, **ref)):
        torch.testing.assert_close(out, d, rtol=1e-10, atol=1e-12)


def test_without_end_epoch_the_steps_stay_constant():
    """``decay="epoch"`` with no ``end_epoch`` call: every step is in epoch 0."""
    seq = [gradient_matrix(3, "random", t) for t in range(4)]
    losses = [losses_for(3, t) for t in range(4)]
    _, outs = steps(seq, losses)
    for out, d in zip(outs, reference_authors(seq, losses, [0] * 4)):
        torch.testing.assert_close(out, d, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("k,kind,seed", CASES)
def test_equals_libmtl_update(k, kind, seed):
    seq = [gradient_matrix(k, kind, seed + 10 * t) for t in range(4)]
    losses = [losses_for(k, seed + t) for t in range(4)]
    expected = reference_libmtl(seq, losses)
    method, outs = steps(seq, losses, **LIBMTL)
    for out, (d, _) in zip(outs, expected):
        torch.testing.assert_close(out, d, rtol=1e-10, atol=1e-12 * float(d.abs().max().clamp_min(1)))
    torch.testing.assert_close(method.state_dict()["lambd"], expected[-1][1], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("opts", [dict(beta=0.2, beta_sigma=0.0, gamma=0.7, gamma_sigma=0.0, rho=0.3),
                                  dict(beta=1.0, beta_sigma=1.0, gamma=2.0, gamma_sigma=0.25, rho=1.0)])
def test_equals_libmtl_update_with_options(opts):
    seq = [gradient_matrix(4, "random", t) for t in range(5)]
    losses = [losses_for(4, t) for t in range(5)]
    expected = reference_libmtl(seq, losses, **opts)
    _, outs = steps(seq, losses, **{**LIBMTL, **opts})
    for out, (d, _) in zip(outs, expected):
        torch.testing.assert_close(out, d, rtol=1e-10, atol=1e-12)


def test_defaults_are_the_authors_cityscapes_run():
    """``CAGrad/run_moco.sh`` (``beta=0.05 delta=0.1``) over ``CAGrad/model_segnet_mt.py``'s
    argparse (``sigma2 = sigma3 = 0.5``, ``smgdc_method "None"``), ``overwrite_grad``'s ``* K``,
    ``it`` the epoch index."""
    m = gs.methods.create("moco")
    assert (m.beta, m.beta_sigma, m.gamma, m.gamma_sigma, m.rho) == (0.05, 0.5, 0.1, 0.5, 0.0)
    assert (m.normalize, m.scale_by_tasks, m.decay) == (False, True, "epoch")


def test_representation_level_is_refused_with_the_fix():
    method = gs.methods.create("moco")
    method.bind(2, device=torch.device("cpu"), dtype=D, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="level='params'"):
        method.combine(torch.randn(2, 4, 3, dtype=D), torch.ones(2, dtype=D), torch.zeros(4, 3, dtype=D))
    assert method.state_dict()["step"] == 0


def test_zero_gradients_and_losses_are_finite():
    seq = [torch.zeros(3, 5, dtype=D), gradient_matrix(3, "zero", 0, n=5)]
    losses = [torch.zeros(3, dtype=D), torch.tensor([1.0, 0.0, 2.0], dtype=D)]
    for opts in ({}, LIBMTL):
        _, outs = steps(seq, losses, **opts)
        assert all(torch.isfinite(o).all() for o in outs)
        assert torch.equal(outs[0], torch.zeros(5, dtype=D))


def test_parameter_count_change_raises():
    method, _ = steps([torch.randn(2, 4, dtype=D)], [torch.ones(2, dtype=D)])
    with pytest.raises(ValueError, match="parameters"):
        method.combine(torch.randn(2, 5, dtype=D), torch.ones(2, dtype=D), None)


def test_resume_is_bit_exact():
    seq = [gradient_matrix(3, "random", t).float() for t in range(6)]
    losses = [losses_for(3, t).float() for t in range(6)]
    a = gs.methods.create("moco")
    a.bind(3, device=torch.device("cpu"), dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    for g, l in zip(seq[:3], losses[:3]):
        a.combine(g, l, None)
        a.end_epoch()
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = gs.methods.create("moco")
    b.bind(3, device=torch.device("cpu"), dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    b.load_state_dict(torch.load(buf))
    for g, l in zip(seq[3:], losses[3:]):
        assert torch.equal(a.combine(g, l, None), b.combine(g, l, None))


@pytest.mark.parametrize("opts,match", [({"beta": 0.0}, "beta"), ({"beta": 1.5}, "beta"),
                                        ({"beta_sigma": -1}, "beta_sigma"), ({"gamma": -0.1}, "gamma"),
                                        ({"gamma_sigma": float("nan")}, "gamma_sigma"), ({"rho": -1}, "rho"),
                                        ({"normalize": 1}, "normalize"), ({"scale_by_tasks": "yes"}, "scale_by_tasks"),
                                        ({"decay": "iteration"}, "decay")])
def test_bad_options_raise(opts, match):
    with pytest.raises(ValueError, match=match):
        gs.methods.create("moco", **opts)


def jacobian_rows(model, x, ys):
    """``K x P``: each task's loss gradient w.r.t. the backbone's parameters, by plain autograd."""
    params = list(model.backbone.parameters())
    z = model.rep(x)
    losses = model.losses([z] * len(model.heads), ys)
    return torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(l, params, retain_graph=True)])
                        for l in losses]), torch.stack([l.detach() for l in losses])


def test_end_to_end_at_the_parameter_level():
    """Through ``MultiTaskOptimizer(level="params")``, three backward calls over two epochs
    (``opt.end_epoch()`` after the first): the backbone's gradient is the authors' ``K y
    lambda``, each head gets its own unweighted loss gradient (the authors' trainer zeroes
    only the shared modules' gradients between the task backward calls)."""
    model, x, ys = make(3, seed=3, batch=5)
    batches = [(x, ys), (x.flip(0), 0.5 * ys.flip(1)), (x, -ys)]
    rows = [jacobian_rows(model, xb, yb) for xb, yb in batches]
    expected = reference_authors([g for g, _ in rows], [l for _, l in rows], epochs=[0, 1, 1])
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "moco", num_tasks=3, level="params")
    for i, (d, (xb, yb)) in enumerate(zip(expected, batches)):
        if i == 1:
            opt.end_epoch()
        wrapped_step(model, opt, xb, yb, step=False)
        got = torch.cat([p.grad.flatten() for p in model.backbone.parameters()])
        torch.testing.assert_close(got, d, rtol=1e-10, atol=1e-14)
        for g, want in zip([p.grad for p in model.heads.parameters()], head_grads_plain(model, xb, yb)):
            torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-14)


def test_runs_at_the_parameter_level_by_default_and_refuses_the_representation_level():
    model, x, ys = make(2, seed=3)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "moco", num_tasks=2)
    assert opt.level == "params"
    wrapped_step(model, opt, x, ys)
    with pytest.raises(ValueError, match="level='params'"):
        gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "moco", num_tasks=2, level="rep")


@PROPERTY
@given(seq=gradient_sequences((6,)), seed=st.integers(0, 1000))
def test_finite_permutation_equivariant_and_scale_free(seq, seed):
    """Finite, lambda on the simplex; permuting the tasks permutes lambda; the update does
    not depend on the gradients' scale (they are normalised to their losses), up to the
    ``1e-8`` LibMTL adds to the norms). LibMTL's options: the scale-freeness needs
    ``normalize=True``."""
    k = seq[0].shape[0]
    losses = [losses_for(k, t) for t in range(len(seq))]
    method, outs = steps(seq, losses, **LIBMTL)
    lambd = method.state_dict()["lambd"]
    assert all(torch.isfinite(o).all() for o in outs) and (lambd >= 0).all()
    assert abs(float(lambd.sum()) - 1) <= 1e-12
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    method_p, outs_p = steps([g[perm] for g in seq], [l[perm] for l in losses], **LIBMTL)
    torch.testing.assert_close(method_p.state_dict()["lambd"], lambd[perm], rtol=1e-9, atol=1e-12)
    size = 5.05 * k  # |update| <= max loss (< 5.05) per task
    torch.testing.assert_close(outs_p[-1], outs[-1], rtol=0, atol=1e-9 * size)
    norms = [float(row.norm()) for g in seq for row in g if row.any()]
    if norms and min(norms) > 1e-4:  # the 1e-8 moves the normalisation by < 1e-4 relative
        _, outs_s = steps([g * 1024 for g in seq], losses, **LIBMTL)
        torch.testing.assert_close(outs_s[-1], outs[-1], rtol=0, atol=1e-3 * size)


def test_optimizer_resume_is_bit_exact_at_the_parameter_level():
    """The registry-wide resume test runs at the representation level, which MoCo refuses;
    the same check at ``level="params"``: a run resumed from ``state_dict`` (through
    ``torch.save``/``torch.load``) continues bit for bit."""
    gen = torch.Generator().manual_seed(123)
    batches = [(torch.randn(5, 5, generator=gen).double(), 3 * torch.randn(3, 5, generator=gen).double())
               for _ in range(6)]

    def build():
        model, _, _ = make(3, seed=0, batch=5)
        opt = gs.MultiTaskOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), "moco", num_tasks=3,
                                    level="params")
        return model, opt

    model, opt = build()
    for x, ys in batches[:3]:
        wrapped_step(model, opt, x, ys)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    for x, ys in batches[3:]:
        wrapped_step(model, opt, x, ys)
    buf.seek(0)
    saved = torch.load(buf)
    model2, opt2 = build()
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    for x, ys in batches[3:]:
        wrapped_step(model2, opt2, x, ys)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
