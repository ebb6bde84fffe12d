"""Self-checks of the float64 DC reference (tests/reference/dc_reference.py).

Every expected value is computed here, from the definitions in docs/method.md,
by code paths that do not go through the reference's own machinery: plain
autograd of the original model, explicit split networks written out layer by
layer (with the alpha-shift, recentering and Relu backward modes expressed as
detach tricks, and max pooling as an unfold-based brute force), forward hooks
on the original model, and closed-form matrices.
"""
from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from reference import dc_reference as ref

D = torch.float64
ALPHAS = (0.0, 0.35, 0.4, 0.5)
SHIFT_KINDS = {"linear", "relu", "maxpool", "add", "sub"}  # docs/method.md §1


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Intra-op threads spin badly when the 2 cores are shared; one thread is faster here."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------
# test networks
# ----------------------------------------------------------------------------


def randomize_bn(model, gen, zero_shift=False):
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            c = m.num_features
            with torch.no_grad():
                m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
                w = torch.randn(c, generator=gen) * 0.5 + 0.8
                w[0] = -abs(w[0])  # at least one sign flip through the fold
                m.weight.copy_(w)
                if zero_shift:
                    m.running_mean.zero_()
                    m.bias.zero_()
                else:
                    m.running_mean.copy_(torch.randn(c, generator=gen) * 0.3)
                    m.bias.copy_(torch.randn(c, generator=gen) * 0.3)


def _seeded(seed):
    def deco(fn):
        @functools.lru_cache(maxsize=None)
        def wrapper(*a):
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                gen = torch.Generator().manual_seed(seed)
                model, x = fn(gen, *a)
            return model.eval(), x

        return wrapper

    return deco


@_seeded(1)
def explicit_chain(gen):
    """A Sequential chain: BN (folded), overlapping and ceil-mode max pooling,
    dilated grouped and depthwise convs, average pooling, Linear+BN1d, Dropout."""
    m = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.MaxPool2d(3, 2, padding=1),  # 32 -> 16, overlapping windows
        nn.Conv2d(6, 8, 3, padding=2, dilation=2, groups=2), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, ceil_mode=True),  # 16 -> 8, overlapping + ceil mode
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),  # depthwise
        nn.AvgPool2d(2),  # 8 -> 4
        nn.Flatten(), nn.Dropout(0.3),
        nn.Linear(128, 16), nn.BatchNorm1d(16), nn.ReLU(),
        nn.Linear(16, 5),
    )
    randomize_bn(m, gen)
    return m, torch.randn(2, 3, 32, 32, generator=gen)


@_seeded(2)
def plain_chain(gen):
    """A chain without max pooling (for the (1 - 2 alpha)^K check)."""
    m = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Conv2d(8, 8, 1), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 16), nn.BatchNorm1d(16), nn.ReLU(),
        nn.Linear(16, 5),
    )
    randomize_bn(m, gen)
    return m, torch.randn(2, 3, 32, 32, generator=gen)


class BlockNet(nn.Module):
    """Residual block, concat, depthwise conv, ReLU6, data-data Sub, constant
    affine, slicing, an unfoldable BN, functional ops, view(size(0), -1)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.c1, self.b1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(3, 2, padding=1)
        self.pw = nn.Conv2d(8, 6, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.r6 = nn.ReLU6()
        self.down = nn.Conv2d(14, 12, 3, stride=2, padding=2, dilation=2)
        self.bnu = nn.BatchNorm2d(12)  # after a Sub: cannot be folded
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = self.act(self.bn(self.stem(x)))
        y = F.relu(self.b1(self.c1(x)), inplace=True)
        y = self.b2(self.c2(y))
        x = torch.relu(y + x)
        x = self.pool(x)  # 32 -> 16
        z = torch.cat([self.pw(x), self.dw(x)], dim=1)
        z = self.r6(z * 3.0)
        z = self.down(z) - 0.5 * z[:, :12, ::2, ::2]  # 16 -> 8
        z = F.relu(self.bnu(z))
        z = z.mean((2, 3), keepdim=True)
        z = z.view(z.size(0), -1)
        return self.fc(self.drop(z))


@_seeded(3)
def block_net(gen):
    m = BlockNet()
    randomize_bn(m, gen)
    return m, torch.randn(2, 3, 32, 32, generator=gen)


class LRPNet(nn.Module):
    """No biases anywhere (LRP conservation): residual, concat, Sub, overlapping max pooling."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(3, 2, padding=1)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.pw = nn.Conv2d(8, 6, 1, bias=False)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.c3 = nn.Conv2d(14, 8, 3, stride=2, padding=1, bias=False)
        self.c4 = nn.Conv2d(14, 8, 1, stride=2, bias=False)
        self.fc = nn.Linear(8 * 4 * 4, 5, bias=False)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = self.pool(x)  # 32 -> 16
        x = F.relu(self.c2(F.relu(self.c1(x))) + x)
        z = F.relu(torch.cat([self.pw(x), self.dw(x)], 1))
        z = F.relu(self.c3(z) - self.c4(z))  # 16 -> 8
        z = F.avg_pool2d(z, 2)  # 8 -> 4
        return self.fc(torch.flatten(z, 1))


@_seeded(4)
def lrp_net(gen):
    return LRPNet(), torch.randn(2, 3, 32, 32, generator=gen)


@_seeded(5)
def resnet18_net(gen, zero_bias=False):
    m = torchvision.models.resnet18(num_classes=10)
    randomize_bn(m, gen, zero_shift=zero_bias)
    if zero_bias:
        with torch.no_grad():
            m.fc.bias.zero_()
    return m, torch.randn(2, 3, 64, 64, generator=gen)


class MiscNet(nn.Module):
    """LeakyReLU, Hardtanh(-1, 1), clamp(min=0), constant division/negation, permute."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.lk = nn.LeakyReLU(0.1)
        self.c2 = nn.Conv2d(6, 6, 3, stride=2, padding=1)
        self.ht = nn.Hardtanh(-1.0, 1.0)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = self.lk(self.c1(x))
        x = self.ht(self.c2(x) / 2.0)
        x = torch.clamp(-x, min=0) + F.leaky_relu(x, 0.2)
        x = x.permute(0, 2, 3, 1).mean((1, 2))
        return self.fc(x)


@_seeded(6)
def misc_net(gen):
    return MiscNet(), torch.randn(2, 3, 16, 16, generator=gen)


NETS = {
    "misc": misc_net,
    "explicit_chain": explicit_chain,
    "plain_chain": plain_chain,
    "block": block_net,
    "lrp": lrp_net,
    "resnet18": resnet18_net,
    "resnet18_nobias": functools.partial(resnet18_net, True),
}
SMALL = ("explicit_chain", "plain_chain", "block", "misc")


@functools.lru_cache(maxsize=None)
def graph_of(name, fold_bn=True):
    model, x = NETS[name]()
    return ref.canonicalize(model, x, fold_bn=fold_bn)


@functools.lru_cache(maxsize=10)  # bounded: a resnet18 run with every tensor kept is ~100 MB
def _run_cached(name, items):
    opts = dict(items)
    model, x = NETS[name]()
    return ref.run(model, x, layers="all", graph=graph_of(name, opts.get("fold_bn", True)), **opts)


def run(name, **opts):
    return _run_cached(name, tuple(sorted(opts.items())))


def tname(res, tid):
    return res.graph.tensor_names[tid]


def close(a, b, scale=None, rtol=1e-10, atol_rel=1e-12, msg=""):
    """assert_close with an absolute tolerance relative to `scale` (default: |a| + |b|)."""
    if scale is None:
        scale = torch.maximum(a.detach().abs().max(), b.detach().abs().max())
    scale = float(scale) if torch.is_tensor(scale) else scale
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol_rel * max(scale, 1e-300), msg=msg or None)


def sens_scale(s):
    return max(float(t.abs().max()) for t in s)


# ----------------------------------------------------------------------------
# independent explicit split of a Sequential chain
# ----------------------------------------------------------------------------


def fused_chain(model):
    """Folded, float64 module list of a Sequential (BN fused by torch's own fusion, Dropout dropped)."""
    mods = list(copy.deepcopy(model).double().eval())
    out = []
    for i, m in enumerate(mods):
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            continue
        if isinstance(m, nn.Dropout):
            continue
        nxt = mods[i + 1] if i + 1 < len(mods) else None
        if isinstance(m, nn.Conv2d) and isinstance(nxt, nn.BatchNorm2d):
            m = fuse_conv_bn_eval(m, nxt)
        elif isinstance(m, nn.Linear) and isinstance(nxt, nn.BatchNorm1d):
            m = fuse_linear_bn_eval(m, nxt)
        out.append(m)
    return out


def _p2(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def bf_windows(t, mp: nn.MaxPool2d, fill):
    """[B, C, k*k, Ho, Wo]: every max-pool window, padded with `fill` (brute force)."""
    k, s = _p2(mp.kernel_size), _p2(mp.stride)
    pd, d = _p2(mp.padding), _p2(mp.dilation)
    B, C, H, W = t.shape
    sizes = []
    for L, kk, ss, pp, dd in zip((H, W), k, s, pd, d):
        span = dd * (kk - 1) + 1
        if mp.ceil_mode:
            o = math.ceil((L + 2 * pp - span) / ss) + 1
            if (o - 1) * ss >= L + pp:
                o -= 1
        else:
            o = (L + 2 * pp - span) // ss + 1
        sizes.append((o, max(0, (o - 1) * ss + span - (L + 2 * pp))))
    (Ho, eh), (Wo, ew) = sizes
    tp = F.pad(t, (pd[1], pd[1] + ew, pd[0], pd[0] + eh), value=fill)
    u = F.unfold(tp.reshape(B * C, 1, *tp.shape[2:]), k, dilation=d, stride=s)
    return u.view(B, C, k[0] * k[1], Ho, Wo)


def bf_maxpool(p, n, mp, mode):
    """Split max pooling, brute force: first argmax of p - n in each window."""
    a = bf_windows((p - n).detach(), mp, -math.inf).argmax(2, keepdim=True)  # first maximum
    gp = bf_windows(p, mp, 0.0).gather(2, a).squeeze(2)
    gn = bf_windows(n, mp, 0.0).gather(2, a).squeeze(2)
    if mode == "wta":
        return gp, gn
    sn = bf_windows(n, mp, 0.0).sum(2)
    return gp - gn + sn, sn


def explicit_split(mods, x, target, *, alpha=0.0, alphas=None, relu="autograd",
                   stabilize="none", maxpool="wta", ties="strict"):
    """Split forward of a module chain, written out; returns the (p, n) entering each module
    (and the output), g, h. Sensitivities come from plain autograd of this network:
    the alpha-shift, recentering and the Relu backward modes are detach tricks."""
    shift_ids = [i for i, m in enumerate(mods) if isinstance(m, (nn.Conv2d, nn.Linear, nn.ReLU, nn.MaxPool2d))]
    last = shift_ids[-1]  # the output layer: its shift is skipped
    p = F.relu(x).requires_grad_(True)
    n = F.relu(-x).requires_grad_(True)
    kept = [(p, n)]
    for i, m in enumerate(mods):
        if i in shift_ids and i != last:
            a = alphas[i] if alphas is not None else alpha
            s = a * (p + n)
            z = s.detach() - s  # exactly 0 in value; gradient -a on both streams
            # identity forward; backward (dp, dn) -> (dp - a(dp+dn), dn - a(dp+dn))
            p, n = p + z, n + z
        recenter = False
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if isinstance(m, nn.Conv2d):
                def f(z, w, m=m):
                    return F.conv2d(z, w, None, m.stride, m.padding, m.dilation, m.groups)
                bshape = (1, -1, 1, 1)
            else:
                def f(z, w):
                    return F.linear(z, w)
                bshape = (1, -1)
            w = m.weight.detach()
            b = m.bias.detach().view(bshape)
            wp, wn = w.clamp(min=0), (-w).clamp(min=0)
            p, n = (f(p, wp) + f(n, wn) + b.clamp(min=0),
                    f(p, wn) + f(n, wp) + (-b).clamp(min=0))
            recenter = True
        elif isinstance(m, nn.ReLU):
            P, N = p, n
            d = (P - N).detach()
            mk = ((d >= 0) if ties == "geq" else (d > 0)).to(D)
            if relu == "autograd":  # the true derivative of max(P, N) (no ties here)
                p, n = torch.maximum(P, N), N
            elif relu == "standard":
                p, n = mk * P + (1 - mk) * N, N
            # below, value.detach() + (t - t.detach()) has the exact value and t's gradient
            elif relu == "sum":
                p = torch.maximum(P, N).detach() + (mk * P - (mk * P).detach())
                n = N + ((1 - mk) * P - ((1 - mk) * P).detach())
            elif relu == "mask_diff":
                c = 2 * mk - 1
                p, n = torch.maximum(P, N).detach() + (c * P - (c * P).detach()), N
            else:
                raise AssertionError(relu)
            recenter = True
        elif isinstance(m, nn.MaxPool2d):
            p, n = bf_maxpool(p, n, m, maxpool)
        elif isinstance(m, (nn.AvgPool2d, nn.Flatten)):
            p, n = m(p), m(n)
        else:
            raise AssertionError(type(m))
        if recenter and stabilize == "recenter":
            c = torch.minimum(p, n).detach()
            p, n = p - c, n - c
        # fresh tensors: the sensitivity at a stream is the partial derivative wrt that
        # stream alone (Relu's n-stream is also an input of its p-stream, for example)
        p, n = p.clone(), n.clone()
        kept.append((p, n))
    g, h = kept[-1]
    flat = [z for pr in kept for z in pr]
    sel = torch.arange(x.shape[0])
    dg = torch.autograd.grad(0.5 * g[sel, target].sum(), flat, retain_graph=True,
                             allow_unused=True, materialize_grads=True)
    dh = torch.autograd.grad(0.5 * h[sel, target].sum(), flat, allow_unused=True,
                             materialize_grads=True)
    sens = [(dg[2 * j], dg[2 * j + 1], dh[2 * j], dh[2 * j + 1]) for j in range(len(kept))]
    return kept, sens, g.detach(), h.detach()


def check_against_explicit(res, name, **kw):
    model, x = NETS[name]()
    mods = fused_chain(model)
    G = res.graph
    assert len(G.chain) == len(mods) == len(G.ops)
    kept, sens, g, h = explicit_split(mods, x.double(), res.target, **kw)
    close(res.g, g, msg="g")
    close(res.h, h, msg="h")
    for i in range(len(mods) + 1):
        key = i if i < len(mods) else f"{i - 1}:out"
        tid = G.resolve(key)
        got = res.sens[tname(res, tid)]
        sc = sens_scale(sens[i])
        for a, b, lab in zip(got, sens[i], ("dpp", "dnp", "dpn", "dnn")):
            close(a, b, scale=sc, msg=f"{lab} at chain index {key}")
        close(res.streams[tname(res, tid)][0], kept[i][0].detach(), msg=f"p at {key}")
        close(res.streams[tname(res, tid)][1], kept[i][1].detach(), msg=f"n at {key}")


# ----------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", SMALL + ("lrp", "resnet18"))
def test_forward_matches_model_and_streams(name):
    model, x = NETS[name]()
    m = copy.deepcopy(model).double().eval()
    xd = x.double().requires_grad_(True)
    f = m(xd)
    combos = [("recenter", "wta"), ("none", "dc")]
    if name != "resnet18":
        combos += [("recenter", "dc"), ("none", "wta")]
    for stabilize, maxpool in combos:
        res = run(name, stabilize=stabilize, maxpool=maxpool)
        close(res.logits, f.detach(), msg="logits vs original model")
        close(res.g - res.h, res.logits, scale=(res.g.abs() + res.h.abs()).max(), atol_rel=1e-13,
              msg="g - h vs logits")
        for key, (p, n) in res.streams.items():
            assert (p >= 0).all() and (n >= 0).all(), key
            P, N = res.pre_streams[key]
            assert (P >= 0).all() and (N >= 0).all(), key
            close(p - n, res.acts[key], scale=(p + n).max(), atol_rel=1e-13, msg=f"p - n at {key}")
            if stabilize == "recenter":
                tid = res.keys[key]
                op = res.graph.ops[res.graph.producer[tid]] if tid else None
                if tid == 0 or op.recenter_point:
                    a = res.acts[key]
                    close(p, F.relu(a), scale=a.abs().max(), atol_rel=1e-13, msg=key)
                    close(n, F.relu(-a), scale=a.abs().max(), atol_rel=1e-13, msg=key)
        if stabilize == "recenter":
            assert res.graph.ops[res.graph.producer[res.graph.output]].recenter_point
            close(res.g, F.relu(res.logits), msg="g = relu(f)")
            close(res.h, F.relu(-res.logits), msg="h = relu(-f)")
    # plain gradient of the original model
    t = res.target
    (gx,) = torch.autograd.grad(f.gather(1, t[:, None]).sum(), xd)
    close(res.grad["input"], gx, msg="grad vs original model")


@pytest.mark.parametrize("name", SMALL + ("lrp",))
def test_four_product_equals_two_product(name):
    for stabilize in ("none", "recenter"):
        res = run(name, stabilize=stabilize)
        seen = 0
        for op in res.graph.ops:
            if op.kind not in ("linear", "affine"):
                continue
            p, n = res.streams[tname(res, op.inputs[0])]
            P, N = res.pre_streams[tname(res, op.out)]
            w = op.weight
            b = op.bias if op.bias is not None else torch.zeros((), dtype=D)
            S = op.lin(p + n, w.abs()) + b.abs()
            Dd = op.lin(p - n, w) + b
            sc = float(S.abs().max())
            close(P, ((S + Dd) / 2).clamp(min=0), scale=sc, atol_rel=1e-13, msg=op.name)
            close(N, ((S - Dd) / 2).clamp(min=0), scale=sc, atol_rel=1e-13, msg=op.name)
            close(Dd, res.acts[tname(res, op.out)], scale=sc, atol_rel=1e-13, msg=op.name)
            seen += 1
        assert seen >= 3


def test_relu6_and_bn_canonical_form():
    G = graph_of("block")
    kinds = {op.name: op.kind for op in G.ops}
    # ReLU6: Relu, constant affine x - 6, Relu, Sub
    r6 = [op for op in G.ops if op.origin == "r6"]
    assert [op.kind for op in r6] == ["relu", "affine", "relu", "sub"]
    assert float(r6[1].bias) == -6.0 and float(r6[1].weight) == 1.0
    assert r6[3].inputs == [r6[0].out, r6[2].out]
    # folded BNs vanish, the BN after the Sub stays as its own weight-linear op
    assert kinds["bnu"] == "linear" and "b1" not in kinds and "b2" not in kinds
    assert G.names["b1"] == G.names["c1"]
    # unfolded reading: every BN is its own op
    G2 = graph_of("block", False)
    assert sum(op.kind == "linear" for op in G2.ops) == sum(op.kind == "linear" for op in G.ops) + 3


# ----------------------------------------------------------------------------
# sensitivities
# ----------------------------------------------------------------------------


def _check_invariant(res, min_resolved=1):
    """dpp - dnp - dpn + dnn == grad at every kept tensor. The four sensitivities carry the
    absolute-path term sigma, which can exceed |grad| by many orders of magnitude (resnet18 at
    alpha = 0: ~1e20 at the input), so float64 resolves the identity only to ~1e-12 * max|delta|;
    `min_resolved` tensors must have max|delta| < 1e4 |grad| (identity checked to < 1e-8 rel.)."""
    resolved = 0
    for key, s in res.sens.items():
        dpp, dnp, dpn, dnn = s
        sc = sens_scale(s)
        close(dpp - dnp - dpn + dnn, res.grad[key], scale=sc, msg=f"invariant at {key}")
        resolved += sc < 1e4 * float(res.grad[key].abs().max())
    assert resolved >= min_resolved


@pytest.mark.parametrize("name", SMALL + ("lrp",))
@pytest.mark.parametrize("mode", ["standard", "sum"])
def test_gradient_invariant_small(name, mode):
    # "sum" with the exact DC max pooling does not keep the invariant: see the test below
    pools = ("wta", "dc") if mode == "standard" else ("wta",)
    for alpha in ALPHAS:
        for maxpool in pools:
            _check_invariant(run(name, alpha=alpha, relu_backward=mode, maxpool=maxpool),
                             min_resolved=len(graph_of(name).ops) // 2)
    _check_invariant(run(name, alpha=0.35, relu_backward=mode, stabilize="none"))
    _check_invariant(run(name, alpha=0.35, relu_backward=mode, alpha_mode="frobenius"))
    _check_invariant(run(name, alpha=0.35, relu_backward=mode, fold_bn=False))


def test_sum_mode_with_dc_maxpool_breaks_invariant():
    """Finding: the dc max-pool backward (delta_n gets sum(delta_P + delta_N) minus the argmax
    share) keeps dpp - dnp - dpn + dnn only when the pair sums of g and h agree, which holds
    in "standard" mode but not in "sum" mode. At alpha = 0.5 the pair sums vanish at the pool
    outputs (they enter shifted convs) and the invariant is back."""
    res = run("explicit_chain", alpha=0.0, relu_backward="sum", maxpool="dc")
    dpp, dnp, dpn, dnn = res.sens["input"]
    err = (dpp - dnp - dpn + dnn - res.grad["input"]).abs().max()
    assert err > 1e-2 * res.grad["input"].abs().max()
    _check_invariant(run("explicit_chain", alpha=0.5, relu_backward="sum", maxpool="dc"))


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("mode", ["standard", "sum"])
def test_gradient_invariant_resnet18(alpha, mode):
    res = run("resnet18", alpha=alpha, relu_backward=mode, lrp=False)
    _check_invariant(res, min_resolved=5 if alpha == 0 else 40)
    assert len(res.sens) > 40


@pytest.mark.parametrize("maxpool", ["wta", "dc"])
def test_independent_autograd_alpha0(maxpool):
    """alpha = 0, standard, no recentering: the sensitivities are half the plain autograd
    gradients of g_k and h_k wrt p and n of the split network (no custom functions)."""
    res = run("explicit_chain", alpha=0.0, stabilize="none", maxpool=maxpool)
    check_against_explicit(res, "explicit_chain", relu="autograd", maxpool=maxpool)


@pytest.mark.parametrize("mode", ["standard", "sum", "mask_diff"])
@pytest.mark.parametrize("maxpool", ["wta", "dc"])
@pytest.mark.parametrize("stabilize", ["recenter", "none"])
def test_explicit_split_network(mode, maxpool, stabilize):
    for alpha in (0.35, 0.5):
        res = run("explicit_chain", alpha=alpha, relu_backward=mode, maxpool=maxpool,
                  stabilize=stabilize)
        check_against_explicit(res, "explicit_chain", alpha=alpha, relu=mode, maxpool=maxpool,
                               stabilize=stabilize)


def test_explicit_split_frobenius_alpha():
    res = run("explicit_chain", alpha=0.3, alpha_mode="frobenius")
    mods = fused_chain(NETS["explicit_chain"]()[0])
    alphas = []
    for m in mods:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            alphas.append(max(0.0, (1 - 1 / float(m.weight.detach().norm())) / 2))
        else:
            alphas.append(0.3)
    check_against_explicit(res, "explicit_chain", alphas=alphas, relu="standard",
                           stabilize="recenter")


@functools.lru_cache(maxsize=None)
def _tie_net():
    """A chain with exact-zero pre-activations: zero conv biases and an all-zero input patch."""
    with torch.random.fork_rng():
        torch.manual_seed(7)
        m = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                          nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(6 * 16 * 16, 4), nn.ReLU(), nn.Linear(4, 3))
        with torch.no_grad():
            m[0].bias.zero_()
            m[3].bias.zero_()
        x = torch.randn(2, 3, 32, 32)
        x[:, :, 6:20, 8:22] = 0
    return m.eval(), x


NETS["tie"] = _tie_net


@pytest.mark.parametrize("mode", ["standard", "sum"])
def test_relu_ties(mode):
    model, x = _tie_net()
    out = {}
    for ties in ("strict", "geq"):
        res = ref.run(model, x, alpha=0.35, relu_backward=mode, ties=ties, layers="all")
        check_against_explicit(res, "tie", alpha=0.35, relu=mode, stabilize="recenter", ties=ties)
        out[ties] = res.sens["input"]
    if mode == "standard":  # the tie mask matters (the test is not vacuous)
        assert not torch.allclose(out["strict"][0], out["geq"][0])


@pytest.mark.parametrize("name", SMALL + ("resnet18",))
def test_pair_sums_and_differences(name):
    """standard: dpp + dnp == dpn + dnn everywhere; sum: dpp - dnp == grad/2 == dnn - dpn."""
    res = run(name, alpha=0.35, relu_backward="standard")
    for key, s in res.sens.items():
        dpp, dnp, dpn, dnn = s
        close(dpp + dnp, dpn + dnn, scale=sens_scale(s), msg=f"pair sums at {key}")
    res = run(name, alpha=0.35, relu_backward="sum")
    for key, s in res.sens.items():
        dpp, dnp, dpn, dnn = s
        close(dpp - dnp, 0.5 * res.grad[key], scale=sens_scale(s), msg=f"d_g at {key}")
        close(dnn - dpn, 0.5 * res.grad[key], scale=sens_scale(s), msg=f"d_h at {key}")


def _enters_shift_ops_only(G, tid):
    cons = G.consumers[tid]
    return bool(cons) and all(G.ops[i].shift for i in cons)


@pytest.mark.parametrize("name", SMALL + ("lrp", "resnet18"))
def test_alpha_half_gives_half_gradient(name):
    for mode in ("standard", "sum"):
        res = run(name, alpha=0.5, relu_backward=mode)
        G = res.graph
        n_checked = 0
        for key, (dpp, dnp, dpn, dnn) in res.sens.items():
            if not _enters_shift_ops_only(G, res.keys[key]):
                continue
            g = res.grad[key]
            sc = sens_scale((dpp, dnp, dpn, dnn))
            close(dpp + dnn, 0.5 * g, scale=sc, msg=f"{mode} at {key}")
            if g.dim() == 4:
                close(ref.splitgrad(res, key), 0.5 * g.sum(1), scale=sc * g.shape[1], msg=key)
            n_checked += 1
        assert n_checked >= 5


@pytest.mark.parametrize("fold_bn", [True, False])
def test_chain_scaling(fold_bn):
    """In a plain chain the pair sum at every tensor scales by (1 - 2 alpha)^K,
    K = shift points crossed on the way back (the output layer excluded)."""
    base = run("plain_chain", alpha=0.0, fold_bn=fold_bn)
    G = base.graph
    ops = G.ops
    assert len(G.chain) == len(ops)  # a chain
    shift_ops = [op.index for op in ops if op.kind in SHIFT_KINDS]
    output_layer = shift_ops[-1]  # the output Linear (no shift op after it)
    assert ops[output_layer].output_layer
    n_bn = sum(isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d) for m in NETS["plain_chain"]()[0])
    assert len(shift_ops) - 1 == (8 if fold_bn else 8 + n_bn)

    def K(i):  # shift points at or after chain position i, output layer excluded
        return sum(1 for j in shift_ops if j >= i and j != output_layer)

    for alpha in (0.2, 0.35, 0.5):
        res = run("plain_chain", alpha=alpha, fold_bn=fold_bn)
        for i in range(len(ops)):
            key = tname(res, ops[i].inputs[0])
            s0 = base.sens[key][0] + base.sens[key][1]
            s = res.sens[key][0] + res.sens[key][1]
            close(s, (1 - 2 * alpha) ** K(i) * s0, scale=s0.abs().max(), msg=f"sigma at {key}")
    # per-op alpha ("frobenius"): the factor is the product of the (1 - 2 alpha_op)
    res = run("plain_chain", alpha=0.3, alpha_mode="frobenius", fold_bn=fold_bn)
    fac = 1.0
    for j in shift_ops[:-1]:
        a = max(0.0, (1 - 1 / float(ops[j].weight.norm())) / 2) if ops[j].kind == "linear" else 0.3
        fac *= 1 - 2 * a
    s0 = base.sens["input"][0] + base.sens["input"][1]
    s = res.sens["input"][0] + res.sens["input"][1]
    close(s, fac * s0, scale=s0.abs().max())


@pytest.mark.parametrize("mode", ["standard", "sum"])
def test_fold_equals_unfold_at_alpha0(mode):
    """With alpha = 0 folding BN changes nothing in the sensitivities (per-channel scales
    commute with the four-product form); with alpha > 0 the unfolded BN adds shifts."""
    for name in ("explicit_chain", "block"):
        a = run(name, alpha=0.0, relu_backward=mode)
        b = run(name, alpha=0.0, relu_backward=mode, fold_bn=False)
        for x, y in zip(a.sens["input"], b.sens["input"]):
            close(x, y, scale=sens_scale(a.sens["input"]))
        close(a.g - a.h, b.g - b.h)


def test_maxpool_overlapping_windows_accumulate():
    """3x3/2 max pooling: sensitivities at the pool input equal an unfold-based brute force,
    where inputs chosen by several windows accumulate."""
    res = run("explicit_chain", alpha=0.35, maxpool="wta")
    G = res.graph
    mp = [op for op in G.ops if op.kind == "maxpool"]
    assert len(mp) == 2
    for op in mp:
        p, n = res.streams[tname(res, op.inputs[0])]
        _, idx = F.max_pool2d(p - n, return_indices=True, **op.pool)
        counts = torch.stack([torch.bincount(r, minlength=p[0, 0].numel()) for r in idx.flatten(2).flatten(0, 1)])
        assert counts.max() >= 2  # some element is the argmax of two windows
    check_against_explicit(res, "explicit_chain", alpha=0.35, relu="standard", stabilize="recenter")
    # and directly: a single pool, brute force vs reference on a random cotangent
    pool = nn.MaxPool2d(3, 2, padding=1)
    x = torch.randn(2, 3, 9, 9, dtype=D)
    p = F.relu(x).requires_grad_(True)
    n = F.relu(-x).requires_grad_(True)
    Pb, Nb = bf_maxpool(p, n, pool, "wta")
    cp, cn = torch.randn_like(Pb), torch.randn_like(Nb)
    gb = torch.autograd.grad((Pb, Nb), (p, n), (cp, cn))
    from reference.dc_reference import split_op_pure, _argmax_idx
    op = ref.Op(index=0, kind="maxpool", inputs=[0], out=1, name="mp", origin="mp",
                pool=dict(kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), dilation=(1, 1), ceil_mode=False))
    for mode in ("wta", "dc"):
        Pb, Nb = bf_maxpool(p, n, pool, mode)
        gb = torch.autograd.grad((Pb, Nb), (p, n), (cp, cn))
        Pr, Nr = split_op_pure(op, [(p, n)], mode, _argmax_idx(p, n, op.pool))
        gr = torch.autograd.grad((Pr, Nr), (p, n), (cp, cn))
        close(Pr, Pb)
        close(Nr, Nb)
        close(gr[0], gb[0])
        close(gr[1], gb[1])


# ----------------------------------------------------------------------------
# heads
# ----------------------------------------------------------------------------


def layercam_by_hooks(name, module, call, target):
    model, x = NETS[name]()
    m = copy.deepcopy(model).double().eval()
    store = []

    def hook(_mod, _inp, out):
        out.retain_grad()
        store.append(out)

    hd = m.get_submodule(module).register_forward_hook(hook)
    f = m(x.double())
    hd.remove()
    f.gather(1, target[:, None]).sum().backward()
    a = store[call].detach()
    ga = store[call].grad
    return F.relu((F.relu(ga) * a).sum(1)), a, ga


@pytest.mark.parametrize("name,module,call,key", [
    ("block", "act", 0, "act"),
    ("resnet18", "layer1.0.relu", 0, "layer1_0_relu"),
    ("resnet18", "layer2.1.relu", 1, "layer2_1_relu_1"),
])
def test_splitcam_is_half_layercam_at_alpha_half(name, module, call, key):
    res = run(name, alpha=0.5)
    lc, a, ga = layercam_by_hooks(name, module, call, res.target)
    close(res.acts[key], a)
    close(res.grad[key], ga)
    sc = float(lc.abs().max())
    assert sc > 0
    close(ref.splitcam(res, key), 0.5 * lc, scale=sc, msg="SplitCAM vs LayerCAM/2")
    res = run(name, alpha=0.5, relu_backward="sum")
    close(ref.splitcam(res, key), 0.5 * lc, scale=sc, msg="SplitCAM (sum) vs LayerCAM/2")


def test_splitcam_depends_on_alpha_in_standard_mode():
    """SplitCAM weights the streams by dpp + dnn = sigma + grad/2; sigma scales with alpha, so
    the maps differ between alpha = 0 and 0.5 (the per-stream f-sensitivities dpp - dpn and
    dnn - dnp would not: both equal grad/2 at every alpha in standard mode)."""
    keys = ["act", "pool", "r6", "bnu"]
    a, b = run("block", alpha=0.0), run("block", alpha=0.5)
    assert any(not torch.allclose(ref.splitcam(a, k), ref.splitcam(b, k)) for k in keys)
    for key in keys:
        dpp, dnp, dpn, dnn = a.sens[key]
        close(dpp - dpn, dnn - dnp, msg=key)


@pytest.mark.parametrize("name", ["lrp", "resnet18_nobias"])
@pytest.mark.parametrize("stabilize", ["recenter", "none"])
@pytest.mark.parametrize("maxpool", ["wta", "dc"])
def test_splitlrp_conservation(name, stabilize, maxpool):
    res = run(name, stabilize=stabilize, maxpool=maxpool, lrp_epsilon=1e-13)
    t = res.target
    sel = torch.arange(len(t))
    gk, hk = res.g[sel, t], res.h[sel, t]
    total = ref.splitlrp(res, "input").sum((1, 2))
    torch.testing.assert_close(total, gk - hk, rtol=1e-6, atol=1e-9 * float(gk.abs().max() + hk.abs().max()))
    close(gk - hk, res.logits[sel, t], scale=(gk + hk).max(), atol_rel=1e-12)
    G = res.graph
    # every tensor all paths go through (chain prefix) holds the whole relevance
    for tid in [0] + [G.ops[i].out for i in G.chain]:
        sg, sh = res.lrp_sums[tname(res, tid)]
        sc = 1e-9 * float(gk.abs().max() + hk.abs().max())
        torch.testing.assert_close(sg, gk, rtol=1e-6, atol=sc)
        torch.testing.assert_close(sh, hk, rtol=1e-6, atol=sc)
    for rel in res.relevance.values():
        assert all((r >= -1e-12 * float(gk.max() + hk.max() + 1e-300)).all() for r in rel)


@pytest.mark.parametrize("stabilize", ["recenter", "none"])
def test_splitlrp_closed_form_two_layer(stabilize):
    """x -> Linear -> ReLU -> Linear, with biases: the epsilon rule written out with matrices."""
    with torch.random.fork_rng():
        torch.manual_seed(11)
        model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
        x = torch.randn(4, 6)
    eps = 1e-6
    res = ref.run(model, x, stabilize=stabilize, lrp_epsilon=eps)
    W1, b1 = model[0].weight.double().detach(), model[0].bias.double().detach()
    W2, b2 = model[2].weight.double().detach(), model[2].bias.double().detach()
    pos, neg = (lambda t: t.clamp(min=0)), (lambda t: (-t).clamp(min=0))
    xd = x.double()
    p0, n0 = pos(xd), neg(xd)

    def rc(P, N):
        if stabilize == "none":
            return P, N
        m = torch.minimum(P, N)
        return P - m, N - m

    P1 = p0 @ pos(W1).T + n0 @ neg(W1).T + pos(b1)
    N1 = p0 @ neg(W1).T + n0 @ pos(W1).T + neg(b1)
    q1, r1 = rc(P1, N1)
    m1 = (q1 - r1 > 0).double()
    Yp, Yn = rc(torch.maximum(q1, r1), r1)
    P2 = Yp @ pos(W2).T + Yn @ neg(W2).T + pos(b2)
    N2 = Yp @ neg(W2).T + Yn @ pos(W2).T + neg(b2)
    g, h = rc(P2, N2)
    close(res.g, g)
    close(res.h, h)
    t = res.target
    onehot = F.one_hot(t, 3).double()
    total = torch.zeros_like(xd)
    for sign, (RP, RN) in ((1, (g * onehot, 0 * g)), (-1, (0 * h, h * onehot))):
        sP, sN = RP / (P2 + eps), RN / (N2 + eps)
        RYp = Yp * (sP @ pos(W2) + sN @ neg(W2))
        RYn = Yn * (sP @ neg(W2) + sN @ pos(W2))
        R1P, R1N = m1 * RYp, (1 - m1) * RYp + RYn
        sP, sN = R1P / (P1 + eps), R1N / (N1 + eps)
        Rp = p0 * (sP @ pos(W1) + sN @ neg(W1))
        Rn = n0 * (sP @ neg(W1) + sN @ pos(W1))
        got = res.relevance["input"][0:2] if sign == 1 else res.relevance["input"][2:4]
        close(got[0], Rp)
        close(got[1], Rn)
        total = total + sign * (Rp + Rn)
    close(ref.splitlrp(res, "input"), total)  # [B, F] maps stay [B, F]


def test_heads_shapes_targets_and_upsample():
    model, x = NETS["block"]()
    res = ref.run(model, x, target=3, layers=["pool", "act"])
    assert res.target.dtype == torch.long and res.target.tolist() == [3, 3]
    _check_invariant(res)
    res2 = ref.run(model, x, target=torch.tensor([1, 4]), layers=["pool"])
    assert res2.target.tolist() == [1, 4]
    _check_invariant(res2)
    for head in (ref.splitgrad, ref.splitcam, ref.splitlrp):
        mp = head(res, "pool")
        assert mp.shape == (2, 16, 16) and mp.dtype == D
        up = ref.upsample(mp, x.shape[-2:])
        assert up.shape == (2, 32, 32)
        close(up, F.interpolate(mp[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0])
        assert head(res, "input").shape == (2, 32, 32)
    const = torch.full((1, 4, 4), 2.5, dtype=D)
    close(ref.upsample(const, (9, 7)), torch.full((1, 9, 7), 2.5, dtype=D))


# ----------------------------------------------------------------------------
# layer keys
# ----------------------------------------------------------------------------


def test_layer_keys_vgg16():
    """Index N is the tensor entering torchvision vgg16.features[N]; N:out the one leaving it."""
    class SmallHeadVGG16(nn.Module):  # torchvision's vgg16 features, a small classifier
        def __init__(self):
            super().__init__()
            self.features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
            self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
            self.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 10))

        def forward(self, x):
            return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))

    with torch.random.fork_rng():
        torch.manual_seed(13)
        m = SmallHeadVGG16().eval()
        x = torch.randn(1, 3, 32, 32)
    assert [type(l).__name__ for l in m.features] == (
        ["Conv2d", "ReLU"] * 2 + ["MaxPool2d"] + ["Conv2d", "ReLU"] * 2 + ["MaxPool2d"]
        + (["Conv2d", "ReLU"] * 3 + ["MaxPool2d"]) * 3
    )
    ins, outs = {}, {}
    md = copy.deepcopy(m).double()
    for i, layer in enumerate(md.features):
        layer.register_forward_pre_hook(lambda mod, inp, i=i: ins.__setitem__(i, inp[0].detach().clone()))
        layer.register_forward_hook(lambda mod, inp, out, i=i: outs.__setitem__(i, out.detach().clone()))
    with torch.no_grad():
        md(x.double())
    keys = list(range(31)) + [f"{i}:out" for i in range(31)] + ["features.5", "features_12"]
    res = ref.run(m, x, alpha=0.5, layers=keys)
    for i in range(31):
        close(res.acts[i], ins[i], msg=f"entering features[{i}]")
        close(res.acts[f"{i}:out"], outs[i], msg=f"leaving features[{i}]")
    close(res.acts["features.5"], outs[5])
    close(res.acts["features_12"], outs[12])
    assert [res.graph.ops[i].kind for i in res.graph.chain[:5]] == ["linear", "relu", "linear", "relu", "maxpool"]
    _check_invariant(res)


def test_layer_keys_resnet18_chain_ends_at_branch():
    G = graph_of("resnet18")
    assert G.resolve(0) == 0 and G.resolve("input") == 0
    assert G.resolve(2) == G.names["relu"]
    assert G.resolve("2:out") == G.names["maxpool"]
    assert G.resolve("layer1.0.conv1") == G.names["layer1_0_conv1"] == G.names["layer1_0_bn1"]
    with pytest.raises(KeyError):
        G.resolve(3)
    with pytest.raises(KeyError):
        G.resolve("layer1.0.relu")  # called twice: ambiguous
    with pytest.raises(KeyError):
        G.resolve("no_such_layer")


def test_unsupported_models_raise():
    """Division by a data tensor and exp (unbounded slope) are refused; gates, products and a
    trailing sigmoid convert (g − h = f)."""
    class Div(nn.Module):
        def forward(self, x):
            return (x / x.abs().sum((2, 3), keepdim=True)).flatten(1)

    class Exp(nn.Module):
        def forward(self, x):
            return torch.exp(x).flatten(1)

    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            y = self.c(x)
            y = y * torch.sigmoid(y)
            return self.fc(y.mean((2, 3)))

    class Prod(nn.Module):
        def forward(self, x):
            return (x * x).flatten(1)

    x = torch.randn(1, 3, 8, 8)
    for model in (Div(), Exp()):
        with pytest.raises(ref.UnsupportedModelError):
            ref.run(model.eval(), x)
    for model in (Gate(), Prod(), nn.Sequential(nn.Flatten(), nn.Linear(192, 3), nn.Sigmoid())):
        res = ref.run(model.eval(), x)
        f = copy.deepcopy(model).double()(x.double())
        close(res.logits, f.detach())
        close(res.g - res.h, f.detach(), scale=(res.g + res.h).max(), atol_rel=1e-13)


# ----------------------------------------------------------------------------
# smooth activations (curvature split) and products of two data tensors
# ----------------------------------------------------------------------------

# (module, functional form) per activation; parameters float32-exact
SMOOTH_ACTS = {
    "sigmoid": (nn.Sigmoid(), torch.sigmoid),
    "tanh": (nn.Tanh(), lambda t: t.tanh()),
    "softplus": (nn.Softplus(), F.softplus),
    "elu": (nn.ELU(0.75), lambda t: F.elu(t, 0.75)),
    "elu_kinked": (nn.ELU(1.75), lambda t: F.elu(t, alpha=1.75)),
    "selu": (nn.SELU(), F.selu),
    "celu": (nn.CELU(0.5), lambda t: F.celu(t, 0.5)),
    "gelu": (nn.GELU(), F.gelu),
    "gelu_tanh": (nn.GELU(approximate="tanh"), lambda t: F.gelu(t, approximate="tanh")),
    "silu": (nn.SiLU(), F.silu),
    "mish": (nn.Mish(), F.mish),
    "hardswish": (nn.Hardswish(), F.hardswish),
    "hardsigmoid": (nn.Hardsigmoid(), F.hardsigmoid),
}


class ActNet(nn.Module):
    """conv → activation (module) → conv → activation (functional) → mean → linear."""

    def __init__(self, name):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 5, 3, padding=1)
        self.act, self.fn = SMOOTH_ACTS[name]
        self.fc = nn.Linear(5, 4)

    def forward(self, x):
        return self.fc(self.fn(self.c2(self.act(self.c1(x)))).mean((2, 3)))


class SE(nn.Module):
    """Squeeze-excitation: x · gate(W2 act(W1 mean(x)))."""

    def __init__(self, c, act, gate, bias=True):
        super().__init__()
        self.f1, self.f2 = nn.Conv2d(c, 4, 1, bias=bias), nn.Conv2d(4, c, 1, bias=bias)
        self.act, self.gate = act, gate

    def forward(self, x):
        s = self.gate(self.f2(self.act(self.f1(F.adaptive_avg_pool2d(x, 1)))))
        return s * x


class GatedNet(nn.Module):
    """SiLU, SE gates (ReLU/Sigmoid and Hardswish/Hardsigmoid), x · sigmoid(x) written out,
    a GLU-style split product, BN folded before an activation."""

    def __init__(self, bias=True):
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=bias), nn.BatchNorm2d(8)
        self.se1 = SE(8, nn.ReLU(), nn.Sigmoid(), bias)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=bias)
        self.se2 = SE(8, nn.Hardswish(), nn.Hardsigmoid(), bias)
        self.c3 = nn.Conv2d(8, 8, 1, bias=bias)
        self.fc = nn.Linear(4, 3, bias=bias)

    def forward(self, x):
        x = F.silu(self.bn(self.c1(x)))
        x = self.se1(x)
        x = self.c2(x)
        x = self.se2(x * torch.sigmoid(x))
        a, b = torch.chunk(self.c3(x), 2, dim=1)
        x = a * torch.tanh(b)                      # GLU-style
        return self.fc(x.mean((2, 3)))


@_seeded(21)
def gated_net(gen):
    m = GatedNet()
    randomize_bn(m, gen)
    return m, 2 * torch.randn(2, 3, 16, 16, generator=gen)


@_seeded(22)
def gated_nobias_net(gen):
    m = GatedNet(bias=False)
    with torch.no_grad():       # no shift anywhere: BN without mean and bias
        m.bn.running_mean.zero_()
        m.bn.bias.zero_()
    return m, 2 * torch.randn(2, 3, 16, 16, generator=gen)


def _act_net(name):
    @_seeded(30)
    def build(gen):
        m = ActNet(name)
        with torch.no_grad():
            for c in (m.c1, m.c2):
                c.bias.normal_(0, 0.5, generator=gen)
        return m, 2 * torch.randn(2, 3, 8, 8, generator=gen)
    return build


NETS["gated"] = gated_net
NETS["gated_nobias"] = gated_nobias_net
for _a in SMOOTH_ACTS:
    NETS[f"act_{_a}"] = _act_net(_a)
GATED = ("gated",) + tuple(f"act_{a}" for a in SMOOTH_ACTS)


def _sigma(s):
    return s[0] + s[1]


@pytest.mark.parametrize("name", GATED)
def test_smooth_and_product_forward_and_gradient(name):
    """g − h = f, nonnegative streams, p − n = the activation, recentering gives relu(±x) at
    every smooth op and product; the gradient invariant and the equal pair sums of g and h
    at every tensor and α; SplitGrad = ½ grad at α = 0.5 where all consumers shift."""
    model, x = NETS[name]()
    m = copy.deepcopy(model).double().eval()
    xd = x.double().requires_grad_(True)
    f = m(xd)
    kinds = {op.kind for op in graph_of(name).ops}
    assert "smooth" in kinds and ("product" in kinds) == (name == "gated")
    for stabilize in ("recenter", "none"):
        res = run(name, stabilize=stabilize, alpha=0.35)
        close(res.logits, f.detach(), msg="logits vs original model")
        close(res.g - res.h, res.logits, scale=(res.g.abs() + res.h.abs()).max(), atol_rel=1e-13)
        for key, (p, n) in res.streams.items():
            assert (p >= 0).all() and (n >= 0).all(), key
            P, N = res.pre_streams[key]
            assert (P >= -1e-13 * float(P.abs().max())).all() and (N >= 0).all(), key
            close(p - n, res.acts[key], scale=(p + n).max(), atol_rel=1e-13, msg=f"p - n at {key}")
            tid = res.keys[key]
            if stabilize == "recenter" and tid and res.graph.ops[res.graph.producer[tid]].kind in ("smooth", "product"):
                a = res.acts[key]
                close(p, F.relu(a), scale=a.abs().max(), atol_rel=1e-13, msg=key)
                close(n, F.relu(-a), scale=a.abs().max(), atol_rel=1e-13, msg=key)
    (gx,) = torch.autograd.grad(f.gather(1, res.target[:, None]).sum(), xd)
    # BN folded vs not: rounding of paths up to ~1e4 x |grad| (the gates' products) cancels;
    # torch's float64 hardsigmoid backward multiplies by the float32 constant 1/6f (3e-8 off)
    tol = 1e-7 if name in ("gated", "act_hardsigmoid") else 1e-9
    close(res.grad["input"], gx, rtol=tol, atol_rel=tol, msg="grad vs original model")
    for alpha in (0.0, 0.5):
        for stabilize in ("recenter", "none"):
            res = run(name, alpha=alpha, stabilize=stabilize)
            base = run(name, alpha=0.0, stabilize=stabilize)
            if name == "gated" and stabilize == "none":
                # the products' pair sums S·σ reach 1e11 without recentering; at α = 0.5 the shifts
                # cancel them, to rounding of the size they have at α = 0 (the scale used here)
                for key, s in res.sens.items():
                    close(s[0] - s[1] - s[2] + s[3], res.grad[key], scale=sens_scale(base.sens[key]),
                          msg=f"invariant at {key}")
            else:
                _check_invariant(res, min_resolved=1 if name == "gated" else len(res.sens) // 2)
            base = run(name, alpha=0.0, stabilize=stabilize)
            for key, s in res.sens.items():      # pair sums, to rounding of their size at α = 0
                close(s[0] + s[1], s[2] + s[3], scale=sens_scale(base.sens[key]), msg=f"pair sums at {key}")
    res = run(name, alpha=0.5)
    sc = sens_scale(res.sens["input"])
    close(ref.splitgrad(res, "input"), 0.5 * gx.sum(1), rtol=tol, atol_rel=tol, scale=sc * 3,
          msg="SplitGrad = grad/2")


def _closed_form_interval(name):
    """Convex interval of each activation from its closed-form second derivative (roots by
    scipy's brentq) or, for the kinked ones, from the definition."""
    from scipy.optimize import brentq
    sig = lambda u: 1 / (1 + math.exp(-u))  # noqa: E731
    if name in ("sigmoid", "tanh"):
        return -math.inf, 0.0
    if name in ("softplus", "elu", "celu"):
        return -math.inf, math.inf
    if name in ("elu_kinked", "selu"):
        return -math.inf, 0.0
    if name == "gelu":                       # φ'' = ϕ(u)(2 − u²)
        return -math.sqrt(2), math.sqrt(2)
    if name == "gelu_tanh":                  # φ''/(1 − T²) = v' − u·T·v'² + ½u·v''
        k, c = math.sqrt(2 / math.pi), 0.044715

        def cs(u):
            v1 = k * (1 + 3 * c * u * u)
            return v1 - u * math.tanh(k * (u + c * u ** 3)) * v1 * v1 + 0.5 * u * 6 * k * c * u
        r = brentq(cs, 0.5, 5, xtol=1e-15)
        return -r, r
    if name == "silu":                       # φ'' = σ'(u)(2 + u(1 − 2σ(u)))
        r = brentq(lambda u: 2 + u * (1 - 2 * sig(u)), 0.5, 10, xtol=1e-15)
        return -r, r
    if name == "mish":                       # sign of φ'': 2 − 2u·t·σ + u(1 − σ), t = tanh(softplus u)
        def cs(u):
            t = math.tanh(math.log1p(math.exp(u)))
            return 2 - 2 * u * t * sig(u) + u * (1 - sig(u))
        return brentq(cs, -10, 0, xtol=1e-15), brentq(cs, 0, 10, xtol=1e-15)
    if name == "hardswish":
        return -3.0, 3.0
    if name == "hardsigmoid":
        return -math.inf, 3.0
    raise AssertionError(name)


# pair gain c = Σ_q |m| + M − m of the two parts, in closed form from each function's slopes
PAIR_GAIN = {"sigmoid": 0.5, "tanh": 2.0, "softplus": 1.0, "elu": 1.0, "celu": 1.0, "elu_kinked": 2 * 1.75 - 1,
             "hardswish": 4.0, "hardsigmoid": 1 / 3}


@pytest.mark.parametrize("name", list(SMOOTH_ACTS))
def test_smooth_split_constants_and_stream_map(name):
    """The reference's convex interval against the closed-form inflection points; the stream
    map: P' − N' = φ(P − N), P', N' ≥ 0, convex and nondecreasing in (P, N) along random
    segments (while φ itself is not convex there); the pair gain c in closed form; and the
    Jacobian: both pair sums are multiplied by c (σ ← c·σ) and f's cotangent by φ'(x)."""
    G = graph_of(f"act_{name}")
    act = next(op.act for op in G.ops if op.kind == "smooth")
    lo, hi = _closed_form_interval(name)
    for got, want in ((act.lo, lo), (act.hi, hi)):
        assert got == want or abs(got - want) <= 1e-12 * max(1.0, abs(want)), (got, want)
    if name in PAIR_GAIN:
        assert act.pair_gain() == pytest.approx(PAIR_GAIN[name], rel=1e-12)
    gen = torch.Generator().manual_seed(3)
    # hardsigmoid by its definition: torch's float64 hardsigmoid backward uses 1/6 rounded to float32
    phi = (lambda t: F.relu6(t + 3) / 6) if name == "hardsigmoid" else SMOOTH_ACTS[name][1]
    ts = torch.linspace(0, 1, 41, dtype=D)[:, None]
    f_bends = False
    for _ in range(20):
        x0 = torch.randn(1, 64, generator=gen, dtype=D) * 3
        v = torch.randn(1, 64, generator=gen, dtype=D) * 3
        P0, N0 = F.relu(x0) + torch.rand(1, 64, generator=gen, dtype=D), F.relu(-x0)
        P1, N1 = F.relu(x0 + v), F.relu(-x0 - v) + torch.rand(1, 64, generator=gen, dtype=D)
        P, N = P0 + ts * (P1 - P0), N0 + ts * (N1 - N0)      # a segment of nonnegative streams
        Pp, Nn = act.split(P, N)
        sc = float(Pp.abs().max() + Nn.abs().max())
        close(Pp - Nn, phi(P - N), scale=sc, atol_rel=1e-14)
        assert Pp.min() >= -1e-14 * sc and Nn.min() >= -1e-14 * sc
        for y in (Pp, Nn):
            sec = y[:-2] - 2 * y[1:-1] + y[2:]
            assert sec.min() >= -1e-12 * sc
        fx = phi(x0 + ts * v)
        sec_f = fx[:-2] - 2 * fx[1:-1] + fx[2:]
        f_bends |= bool((sec_f < -1e-9).any()) and name not in ("softplus", "elu", "celu")
        # nondecreasing: a nonnegative step in either stream does not lower P' or N'
        up = act.split(P + 0.3 * torch.rand(P.shape, generator=gen, dtype=D),
                       N + 0.3 * torch.rand(N.shape, generator=gen, dtype=D))
        assert (up[0] - Pp).min() >= -1e-12 * sc and (up[1] - Nn).min() >= -1e-12 * sc
    assert f_bends or name in ("softplus", "elu", "celu")
    # Jacobian: σ ← c·σ, the pair difference of g − h ← φ'(x)·d
    P = (F.relu(torch.randn(3, 50, generator=gen, dtype=D) * 3) + 0.1).requires_grad_(True)
    N = (F.relu(torch.randn(3, 50, generator=gen, dtype=D) * 3) + 0.1).requires_grad_(True)
    Pp, Nn = act.split(P, N)
    a, b = torch.randn(Pp.shape, generator=gen, dtype=D), torch.randn(Pp.shape, generator=gen, dtype=D)
    gP, gN = torch.autograd.grad((Pp, Nn), (P, N), (a, b))         # a g-type cotangent (a, b)
    hP, hN = torch.autograd.grad(act.split(P, N), (P, N), (b, a))  # an h-type one with the same pair sum
    c = act.pair_gain()
    close(gP + gN, c * (a + b), msg="g pair sum")
    close(hP + hN, c * (a + b), msg="h pair sum")
    x = (P - N).detach().requires_grad_(True)
    (dphi,) = torch.autograd.grad(phi(x).sum(), x)
    close((gP - gN) - (hP - hN), dphi * ((a - b) - (b - a)), msg="f's cotangent times phi'")


def test_product_stream_map_and_jacobian():
    """P' = ½[(P+Q)² + (N+R)²], N' = ½[(P+R)² + (N+Q)²] at the SE and GLU products of the
    graph (broadcast gate), checked against the consumed streams; pair sums multiplied by
    S = P + N + Q + R summed over the broadcast axes (σ ← S·σ) at α = 0."""
    res = run("gated", alpha=0.0, stabilize="none")
    G = res.graph
    prods = [op for op in G.ops if op.kind == "product"]
    assert len(prods) == 3        # two SE gates, the GLU split (x · sigmoid(x) is one SiLU)
    assert [op.act.name for op in G.ops if op.kind == "smooth" and op.origin == "mul_1"] == ["silu"]
    assert any(res.streams[tname(res, op.inputs[0])][0].shape != res.streams[tname(res, op.inputs[1])][0].shape
               for op in prods)
    for op in prods:
        (p, n), (q, r) = (res.streams[tname(res, i)] for i in op.inputs)
        P, N = res.pre_streams[tname(res, op.out)]
        sc = float(P.max())
        close(P, 0.5 * ((p + q) ** 2 + (n + r) ** 2), scale=sc, atol_rel=1e-14)
        close(N, 0.5 * ((p + r) ** 2 + (n + q) ** 2), scale=sc, atol_rel=1e-14)
        close(P - N, res.acts[tname(res, op.inputs[0])] * res.acts[tname(res, op.inputs[1])], scale=sc)
        if op.inputs[0] == op.inputs[1] or len(G.consumers[op.out]) != 1:
            continue
        S = p + n + q + r
        so = _sigma(res.sens[tname(res, op.out)])
        for i, t in enumerate(op.inputs):
            if len(G.consumers[t]) != 1:
                continue
            si = _sigma(res.sens[tname(res, t)])
            close(si, (S * so).sum_to_size(si.shape), scale=sens_scale(res.sens[tname(res, t)]),
                  msg=f"sigma through {op.name} to input {i}")


@pytest.mark.parametrize("stabilize", ["recenter", "none"])
def test_splitlrp_through_smooth_and_products(stabilize):
    """Without biases SplitLRP conserves g_k and h_k through smooth activations (passed
    unchanged) and products (the ε-rule on four squares, each to its two summands); and one
    product written out: the relevance of each operand's streams in closed form."""
    res = run("gated_nobias", stabilize=stabilize, lrp_epsilon=1e-13)
    t = res.target
    sel = torch.arange(len(t))
    gk, hk = res.g[sel, t], res.h[sel, t]
    sg, sh = res.lrp_sums["input"]
    sc = 1e-9 * float(gk.abs().max() + hk.abs().max())
    torch.testing.assert_close(sg, gk, rtol=1e-6, atol=sc)
    torch.testing.assert_close(sh, hk, rtol=1e-6, atol=sc)
    for rel in res.relevance.values():
        assert all((r >= -1e-12 * float(gk.max() + hk.max())).all() for r in rel)

    class Gate(nn.Module):
        def forward(self, x):
            return (x * x[:, :1]).flatten(1)      # a broadcast product straight to the output
    x = torch.randn(3, 4, dtype=D, generator=torch.Generator().manual_seed(5))
    eps = 1e-6
    res = ref.run(Gate(), x, stabilize=stabilize, lrp_epsilon=eps, alpha=0.5)
    p, n = F.relu(x), F.relu(-x)
    q, r = p[:, :1], n[:, :1]
    P, N = 0.5 * ((p + q) ** 2 + (n + r) ** 2), 0.5 * ((p + r) ** 2 + (n + q) ** 2)
    g, h = (P, N) if stabilize == "none" else (P - torch.minimum(P, N), N - torch.minimum(P, N))
    close(res.g, g)
    close(res.h, h)
    onehot = F.one_hot(res.target, 4).double()
    for j, (RP, RN) in enumerate(((g * onehot, 0 * g), (0 * h, h * onehot))):
        sP, sN = RP / (P + eps), RN / (N + eps)
        Rp = p * 0.5 * ((p + q) * sP + (p + r) * sN)
        Rn = n * 0.5 * ((n + r) * sP + (n + q) * sN)
        Rq = (q * 0.5 * ((p + q) * sP + (n + q) * sN)).sum(1, keepdim=True)
        Rr = (r * 0.5 * ((n + r) * sP + (p + r) * sN)).sum(1, keepdim=True)
        Rp[:, :1] += Rq
        Rn[:, :1] += Rr
        got = res.relevance["input"][2 * j:2 * j + 2]
        close(got[0], Rp)
        close(got[1], Rn)
