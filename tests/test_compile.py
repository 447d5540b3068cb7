"""torch.compile: compiled backbone and heads work with the wrapper, and the built-in
methods' ``weights`` trace into one graph (no graph breaks) under TorchDynamo."""
from __future__ import annotations

import copy
import shutil

import pytest
import torch
import torch._dynamo as dynamo
from torch import nn

import gradsurgery as gs

K = 2
FEATURES = 8

#: built-ins whose weights break the graph by design (checked: the strict xfail fails if they stop breaking)
HOST_READ = {"nash_mtl": "reads its solver's residual on the host once per solve, to raise when the "
                         "bargaining problem has no solution (the design forbids silent reuse)",
             "fairgrad": "reads its solver's residual on the host once per solve, to raise when the "
                         "fairness condition has no solution (as Nash-MTL)"}


class Heads(nn.Module):
    """The task heads as one module, so that one compiled graph serves every task."""

    def __init__(self):
        super().__init__()
        self.heads = nn.ModuleList([nn.Linear(FEATURES, 1) for _ in range(K)])

    def forward(self, *views):
        return [h(v) for h, v in zip(self.heads, views)]


def _train(backbone, heads, method: str, steps: int = 3) -> list[torch.Tensor]:
    torch.manual_seed(0)
    base = torch.optim.SGD([*backbone.parameters(), *heads.parameters()], lr=0.1)
    opt = gs.MultiTaskOptimizer(base, method, num_tasks=K, rep_size=FEATURES)
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        x, y = torch.randn(16, 4, generator=g), torch.randn(K, 16, 1, generator=g)
        opt.zero_grad()
        preds = heads(*opt.fork(backbone(x)))
        opt.backward([(p - t).pow(2).mean() for p, t in zip(preds, y)])
        opt.step()
    return [p.detach().clone() for group in opt.param_groups for p in group["params"]]


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="TorchInductor's CPU backend needs a C compiler, and this platform has none")
def test_compiled_backbone_and_heads():
    """Inductor-compiled (default backend) backbone and heads take the eager steps, for a
    Gram method and a rotation method (whose forked views are rotated)."""
    dynamo.reset()
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(4, FEATURES), nn.Tanh(), nn.Linear(FEATURES, FEATURES))
    heads = Heads()
    init = copy.deepcopy((backbone.state_dict(), heads.state_dict()))
    compiled_backbone, compiled_heads = torch.compile(backbone), torch.compile(heads)
    for method in ("mgda", "rotograd"):
        backbone.load_state_dict(init[0]), heads.load_state_dict(init[1])
        eager = _train(backbone, heads, method)
        backbone.load_state_dict(init[0]), heads.load_state_dict(init[1])
        compiled = _train(compiled_backbone, compiled_heads, method)
        for a, b in zip(compiled, eager):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _gram_methods():
    for name in gs.methods.available():
        cls = gs.methods.get(name)
        if not issubclass(cls, gs.methods.GramWeighting):
            continue
        if name in HOST_READ:
            yield pytest.param(name, marks=pytest.mark.xfail(reason=HOST_READ[name], strict=True))
        else:
            yield name


@pytest.mark.parametrize("method", list(_gram_methods()))
def test_weights_trace_without_graph_breaks(method):
    """``torch._dynamo.explain`` on ``weights`` with a sample Gram: one graph, no break.
    ``prepare`` runs first, as the optimizer runs it (PCGrad draws its random orders there:
    Dynamo cannot trace a ``torch.Generator``)."""
    g = torch.Generator().manual_seed(0)
    grads = torch.randn(3, 20, generator=g)
    m = gs.methods.create(method)
    m.bind(3, device=torch.device("cpu"), dtype=torch.float32, generator=g)
    m.prepare()
    dynamo.reset()
    out = dynamo.explain(m.weights)(grads @ grads.T, torch.rand(3, generator=g) + 0.5)
    reasons = [str(r.reason).splitlines()[0] for r in out.break_reasons]
    assert (out.graph_count, out.graph_break_count, reasons) == (1, 0, [])


def test_pcgrad_prepare_draws_what_weights_would_draw():
    """Drawing PCGrad's orders in ``prepare`` (outside the traced ``weights``) changes no
    result: same coefficients and same generator state as drawing them in ``weights``."""
    grads = torch.randn(5, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    runs = []
    for use_prepare in (False, True):
        gen = torch.Generator().manual_seed(4)
        m = gs.methods.create("pcgrad")
        m.bind(5, device=torch.device("cpu"), dtype=torch.float64, generator=gen)
        out = []
        for _ in range(3):
            if use_prepare:
                m.prepare()
            out.append(m.weights(grads @ grads.T, torch.ones(5, dtype=torch.float64)))
            m.after_step()  # one draw per optimizer step
        runs.append((torch.stack(out), gen.get_state()))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][0][0], runs[0][0][1])  # the orders do change between steps


def test_expm_compiles_once_whatever_the_norm():
    """The exponential's plan (degree, squarings) follows ``||X||``; compiled, it is chosen
    by tensor operations, so generators from 1e-4 to 30 run one graph, no recompilation,
    and match ``torch.linalg.matrix_exp``."""
    from gradsurgery.numerics.expm import expm, skew

    dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = torch.compile(expm, backend="eager")
    a = skew(torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    for s in (1e-4, 0.1, 1.0, 3.0, 30.0):
        x = (s * a).requires_grad_()
        out = compiled(x)
        (grad,) = torch.autograd.grad(out.sum(), x)
        torch.testing.assert_close(out, torch.linalg.matrix_exp(s * a), rtol=1e-12, atol=1e-12 * s)
        assert torch.isfinite(grad).all()
    assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"]


def test_compiled_fork_with_rotations_does_not_recompile():
    """A compiled function containing ``opt.fork`` with ``rotograd``, the generators set to
    norms that need other plans at every step (as training grows them): the graphs of the
    first step serve every later one."""
    dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    torch.manual_seed(0)
    backbone, heads = nn.Linear(4, FEATURES), Heads()
    opt = gs.MultiTaskOptimizer(torch.optim.SGD([*backbone.parameters(), *heads.parameters()], lr=0.1),
                                "rotograd", num_tasks=K, rep_size=FEATURES, method_lr=2.0)

    @torch.compile(backend="eager")
    def losses(x, y):
        return [(p - t).pow(2).mean() for p, t in zip(heads(*opt.fork(backbone(x))), y)]

    g = torch.Generator().manual_seed(3)
    direction = torch.randn(K, FEATURES, FEATURES, generator=g)
    graphs = []
    for scale in (0.0, 0.1, 1.0, 3.0):
        with torch.no_grad():
            opt.rotations.skew_params.copy_(scale * direction)
        opt.zero_grad()
        opt.backward(losses(torch.randn(16, 4, generator=g), torch.randn(K, 16, 1, generator=g)))
        opt.step()
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1:] == graphs[:1] * 3 and not counters["recompiles"]
