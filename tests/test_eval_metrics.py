"""dconnx.eval's metrics against Quantus 0.6 on small inputs (same numbers, same seeds),
SSIM against scikit-image, and the cosine-similarity convergence (CSC) against a
direct matrix computation on tiny 1×1-convolution networks whose limits are known."""
import numpy as np
import pytest
import torch

import quantus
from quantus.functions.similarity_func import ssim as quantus_ssim
from skimage.metrics import structural_similarity

from dconnx.eval import metrics as M
from dconnx.eval.randomize import cascade, parameter_layers
from dconnx.eval.runner import Attributor
from helpers import export

B, C, S, K = 6, 3, 16, 3          # batch, channels, image size, classes


def _net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(C, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(4, 6, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(6 * (S // 2) ** 2, K)).eval()


@pytest.fixture(scope="module")
def setup():
    net = _net()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, C, S, S)).astype(np.float32)
    model = export(net, torch.tensor(x))
    att = Attributor(model, threads=1)
    y = net(torch.tensor(x)).argmax(1).numpy()
    # object masks: a random rectangle per image
    s = np.zeros((B, S, S), bool)
    for i in range(B):
        r, c = rng.integers(0, S - 6, 2)
        s[i, r:r + 6, c:c + 5] = True
    a = att.maps(x, y, ["gradient"])["gradient"]
    return net, model, att, x, y, s, a


def _explain(att):
    """A Quantus explain_func that runs the dconnx-converted model (ONNX Runtime)."""
    def f(model, inputs, targets, **kw):
        return att.maps(np.asarray(inputs, np.float32), np.asarray(targets), ["gradient"])["gradient"][:, None]
    return f


def test_gradient_maps_match_torch(setup):
    net, _, _, x, y, _, a = setup
    xt = torch.tensor(x, requires_grad=True)
    net(xt).gather(1, torch.tensor(y)[:, None]).sum().backward()
    g = xt.grad.numpy().sum(1)
    assert np.max(np.abs(g - a)) <= 1e-5 * np.max(np.abs(g))


def test_pointing_game(setup):
    net, _, _, x, y, s, a = setup
    q = quantus.PointingGame(disable_warnings=True)(net, x, y, a_batch=a[:, None], s_batch=s[:, None].astype(int))
    ours = M.pointing_game(a, s)
    np.testing.assert_array_equal(ours, np.asarray(q, dtype=float))
    # abs=True, and a map whose maximum is tied (all equal): any tied location counts
    q_abs = quantus.PointingGame(abs=True, disable_warnings=True)(net, x, y, a_batch=a[:, None],
                                                                  s_batch=s[:, None].astype(int))
    np.testing.assert_array_equal(M.pointing_game(a, s, abs=True), np.asarray(q_abs, dtype=float))
    assert M.pointing_game(np.ones((1, S, S)), s[:1])[0] == 1.0


def test_attribution_localisation(setup):
    net, _, _, x, y, s, a = setup
    for kw in ({}, {"abs": False}, {"positive_attributions": True, "abs": False}):
        q = quantus.AttributionLocalisation(disable_warnings=True, **kw)(
            net, x, y, a_batch=a[:, None], s_batch=s[:, None].astype(int))
        np.testing.assert_allclose(M.attribution_localisation(a, s, **kw), np.asarray(q, dtype=float),
                                   rtol=1e-12, atol=1e-12, equal_nan=True)


@pytest.fixture
def trapz(monkeypatch):
    """Quantus' calculate_auc calls np.trapz, which numpy 2 removed; np.trapezoid is its new name."""
    if not hasattr(np, "trapz"):
        monkeypatch.setattr(np, "trapz", np.trapezoid, raising=False)


def test_pixel_flipping(setup, trapz):
    net, _, att, x, y, _, a = setup
    q = quantus.PixelFlipping(features_in_step=16, perturb_baseline="black", disable_warnings=True)(
        net, x, y, a_batch=a[:, None])
    q = np.asarray(q)
    ours = M.pixel_flipping(att.predict, x, y, a, features_in_step=16)
    assert ours.shape == q.shape == (B, C * S * S // 16)
    np.testing.assert_allclose(ours, q, atol=2e-6)
    # "@20": the first 20 steps are a prefix of the full curve; area as Quantus computes it
    short = M.pixel_flipping(att.predict, x, y, a, features_in_step=16, n_steps=20)
    np.testing.assert_allclose(short, ours[:, :20], atol=1e-12)
    np.testing.assert_allclose(M.auc(short, 20), quantus.helpers.utils.calculate_auc(q[:, :20], batched=True),
                               atol=1e-5)


@pytest.mark.parametrize("patch", [8, 6])      # 6: 16 is no multiple, the image is padded
def test_selectivity(setup, patch, trapz):
    net, _, att, x, y, _, a = setup
    metric = quantus.Selectivity(patch_size=patch, perturb_baseline="black", disable_warnings=True)
    q = np.asarray(metric(net, x, y, a_batch=a[:, None]))
    ours = M.selectivity(att.predict, x, y, a, patch_size=patch)
    np.testing.assert_allclose(ours, q, atol=2e-6)
    np.testing.assert_allclose(M.auc(ours).mean(), metric.get_auc_score, atol=1e-5)


def test_max_sensitivity(setup):
    net, _, att, x, y, _, a = setup
    np.random.seed(7)
    q = quantus.MaxSensitivity(nr_samples=4, disable_warnings=True)(
        net, x, y, a_batch=a[:, None], explain_func=_explain(att))
    ours = M.max_sensitivity(lambda xp, yp: att.maps(xp, yp, ["gradient"])["gradient"], x, y, a,
                             nr_samples=4, rng=7)
    np.testing.assert_allclose(ours, np.asarray(q), rtol=1e-6, atol=1e-7)
    assert np.all(ours > 0)
    # the dict form (several methods sharing the noise) gives the same numbers
    both = M.max_sensitivity(lambda xp, yp: {"g": att.maps(xp, yp, ["gradient"])["gradient"]}, x, y, {"g": a},
                             nr_samples=4, rng=7)
    np.testing.assert_array_equal(both["g"], ours)


def test_random_logit(setup):
    net, _, att, x, y, _, a = setup
    q = quantus.RandomLogit(num_classes=K, disable_warnings=True)(
        net, x, y, a_batch=a[:, None], explain_func=_explain(att))
    ours = M.random_logit(lambda xx, yy: att.maps(xx, yy, ["gradient"])["gradient"], x, y, a, num_classes=K)
    np.testing.assert_allclose(ours, np.asarray(q), atol=1e-6)
    off = M.random_other_class(y, K, 42)
    assert np.all(off != y) and np.all((off >= 0) & (off < K))


def test_mprt_cascading_randomization(setup):
    """Quantus' MPRT randomizes the torch modules with reset_parameters (seeded with seed + 1);
    ours edits the ONNX initializers. Given the same new values (drawn here by torch, passed
    as `init`), the per-layer SSIM scores agree."""
    net, model, att, x, y, _, _ = setup
    layers = parameter_layers(att.model)
    modules = [m for _, m in net.named_modules() if hasattr(m, "reset_parameters")]
    assert [l.op_type for l in layers] == ["Conv", "Conv", "Gemm"] and len(modules) == 3
    by_node = {l.node_name: m for l, m in zip(layers, modules)}

    def torch_init(node, arrays, rng):
        import copy
        mod = copy.deepcopy(by_node[node.name])
        torch.manual_seed(42 + 1)
        mod.reset_parameters()
        return {1: mod.weight.detach().numpy(), 2: mod.bias.detach().numpy()}

    def torch_saliency(model, inputs, targets, **kw):
        xt = torch.tensor(np.asarray(inputs), requires_grad=True)
        model(xt).gather(1, torch.as_tensor(targets).long()[:, None]).sum().backward()
        return xt.grad.numpy().sum(1, keepdims=True)

    # Quantus' batched ssim returns a list, which its MPRT cannot .tolist(): wrap it in an array
    q = quantus.MPRT(similarity_func=lambda a, b, **kw: np.asarray(quantus_ssim(a, b, **kw)),
                     disable_warnings=True)(
        net, x, y, explain_func=torch_saliency)
    stages = [(l.label, att.with_model(m).explain_fn("gradient")) for l, m in cascade(att.model, init=torch_init)]
    ours = M.model_parameter_randomisation(att.explain_fn("gradient"), stages, x, y)
    assert list(q) == ["original", "6", "3", "0"]
    assert list(ours)[1:] == [layers[2].label, layers[1].label, layers[0].label]
    for (qk, qv), (ok, ov) in zip(q.items(), ours.items()):
        np.testing.assert_allclose(ov, np.asarray(qv), atol=1e-4, err_msg=f"{qk} vs {ok}")
    # randomization changes the gradient: SSIM below the original's 1
    assert np.all(ours["original"] > 0.9999) and np.mean(list(ours.values())[-1]) < 0.9


def test_randomization_edits_only_the_chosen_layers(setup):
    _, _, att, x, _, _, _ = setup
    import onnx.numpy_helper as nh
    layers = parameter_layers(att.model)
    stages = list(cascade(att.model, seed=3))
    assert [l.index for l, _ in stages] == [2, 1, 0]

    def weights(m):
        inits = {t.name: nh.to_array(t) for t in m.graph.initializer}
        return [inits[n.input[1]] for n in m.graph.node if n.op_type in ("Conv", "Gemm")]

    orig = weights(att.model)
    for k, (_, m) in enumerate(stages):
        w = weights(m)
        changed = [not np.array_equal(a, b) for a, b in zip(orig, w)]
        assert changed == [i >= len(layers) - 1 - k for i in range(len(layers))]
        for a, b in zip(orig, w):
            if not np.array_equal(a, b):
                fan_in = np.prod(a.shape[1:])
                assert np.abs(b).max() <= 1 / np.sqrt(fan_in) + 1e-7
    # the converted randomized model explains the randomized network
    logits_r = att.with_model(stages[-1][1]).logits(x)
    assert not np.allclose(logits_r, att.logits(x))


@pytest.mark.parametrize("shape,win", [((20, 17), 7), ((16, 16), 5), ((64,), 7), ((9, 11, 8), 3)])
def test_ssim_matches_skimage(shape, win):
    rng = np.random.default_rng(1)
    a = rng.standard_normal(shape)
    b = a + 0.7 * rng.standard_normal(shape)
    for dr in (2.0, float(np.ptp(np.concatenate([a.ravel(), b.ravel()])))):
        ref = structural_similarity(a, b, win_size=win, data_range=dr)
        assert abs(M.ssim(a, b, win_size=win, data_range=dr) - ref) < 1e-10
    assert abs(M.ssim(a, a, win_size=win, data_range=2.0) - 1.0) < 1e-12


def test_ssim_quantus_and_sixt():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((3, 12, 12)).astype(np.float32)
    b = rng.standard_normal((3, 12, 12)).astype(np.float32)
    q = quantus_ssim(a.reshape(3, -1), b.reshape(3, -1), batched=True)
    np.testing.assert_allclose(M.ssim_quantus(a, b), q, atol=1e-6)
    # Sixt et al.: a sign flip does not lower the score; the score is SSIM of the normalized maps
    np.testing.assert_allclose(M.ssim_flipped(a, -a), 1.0, atol=1e-12)
    na, nb = M.sixt_normalize(a[0]), M.sixt_normalize(b[0])
    ref = max(structural_similarity(na, nb, win_size=5, data_range=2.0),
              structural_similarity(na, M.sixt_normalize(-b[0]), win_size=5, data_range=2.0))
    assert abs(M.ssim_flipped(a[:1], b[:1])[0] - ref) < 1e-10


def test_location_cosines_against_a_loop():
    rng = np.random.default_rng(3)
    v = rng.standard_normal((2, 3, 5, 4, 4))      # 2 images, 3 vectors, 5 channels, 4x4
    v[0, 1, :, 0, 0] = 0.0                         # a zero vector: NaN there
    got = M.location_cosines(v)
    want = []
    for i, j in ((0, 1), (0, 2), (1, 2)):
        for b in range(2):
            for r in range(4):
                for c in range(4):
                    p, q = v[b, i, :, r, c], v[b, j, :, r, c]
                    n = np.linalg.norm(p) * np.linalg.norm(q)
                    want.append(np.nan if n == 0 else abs(p @ q) / n)
    np.testing.assert_allclose(np.sort(got), np.sort(np.asarray(want)), equal_nan=True)
    assert np.isnan(got).sum() == 2


# --------------------------------------------------------------------------
# CSC against a direct matrix computation
# --------------------------------------------------------------------------

def _one_by_one_net(Ws, n_classes=2, seed=0):
    """(1×1 Conv with weight Ws[k], no bias, ReLU) for each k, global average pool, linear."""
    c = Ws[0].shape[0]
    layers = []
    for W in Ws:
        conv = torch.nn.Conv2d(c, c, 1, bias=False)
        conv.weight.data = torch.tensor(W[:, :, None, None], dtype=torch.float32)
        layers += [conv, torch.nn.ReLU()]
    torch.manual_seed(seed)
    layers += [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(c, n_classes)]
    return torch.nn.Sequential(*layers).eval()


def _direct(Ws, x, v, rule):
    """The collected vectors at every tensor entering a Conv, by explicit per-location
    matrices in float64: gradient  v_in = Wᵀ (m ⊙ v_out);  LRP-z⁺ (Relu: pass, Conv:
    R_in = x⁺ ⊙ W⁺ᵀ (R / (z + 1e-6)) with z = W⁺x⁺ + W⁻x⁻, here x ≥ 0 below the input)."""
    depth = len(Ws)
    acts = [x.astype(np.float64)]                        # tensors entering each Conv
    pre = []
    for W in Ws:
        z = np.einsum("oc,bchw->bohw", W, acts[-1])
        pre.append(z)
        acts.append(np.maximum(z, 0))
    out = {}
    r = v.astype(np.float64)                             # injected at the last Relu output
    for k in range(depth - 1, -1, -1):
        xin, W = acts[k], Ws[k]
        Wp, Wn = np.maximum(W, 0), np.minimum(W, 0)
        if rule == "gradient":
            r = np.einsum("oc,bohw->bchw", W, r * (pre[k] > 0))
        else:
            z = np.einsum("oc,bchw->bohw", Wp, np.maximum(xin, 0)) + \
                np.einsum("oc,bchw->bohw", Wn, np.minimum(xin, 0))
            s = r / (z + 1e-6 * np.where(z >= 0, 1, -1))
            r = np.maximum(xin, 0) * np.einsum("oc,bohw->bchw", Wp, s) + \
                np.minimum(xin, 0) * np.einsum("oc,bohw->bchw", Wn, s)
        out[str(2 * k)] = r
    return out


@pytest.mark.parametrize("signs", ["positive", "mixed"])
def test_csc_matches_direct_matrix_computation(signs):
    """Positive weights: the backward product is (Wᵀ)^d for the gradient and
    diag(x)(Wᵀ)^d diag(1/x) for LRP-z⁺, so both converge to the rank-1 limit given by the
    Perron vector of Wᵀ at rate |λ₂/λ₁|^d. Mixed signs (a different W per layer): z⁺
    multiplies nonnegative matrices and converges; the gradient does not."""
    c, depth, n_img, n_vec = 6, 7, 2, 3
    rng = np.random.default_rng(5)
    if signs == "positive":
        Ws = [rng.uniform(0.1, 1.0, (c, c))] * depth
        x = rng.uniform(0.5, 1.5, (n_img, c, 3, 3)).astype(np.float32)
    else:
        c, depth = 16, 4
        Ws = [rng.standard_normal((c, c)) / np.sqrt(c) + 0.05 for _ in range(depth)]
        x = rng.standard_normal((n_img, c, 3, 3)).astype(np.float32)
    net = _one_by_one_net(Ws)
    Ws = [net[2 * k].weight.detach().numpy()[:, :, 0, 0].astype(np.float64) for k in range(depth)]  # float32
    att = Attributor(export(net, torch.tensor(x)), threads=1)
    inject = str(2 * depth)                       # the tensor entering the global pooling
    collect = [str(2 * k) for k in range(depth)]
    x_t = np.repeat(x, n_vec, axis=0)
    v = rng.standard_normal((n_img * n_vec, c, 3, 3)).astype(np.float32)
    got = att.vectors(x_t, v, ["gradient", "lrp_zplus"], inject, collect)
    for rule, method in (("gradient", "gradient"), ("zplus", "lrp_zplus")):
        want = _direct(Ws, x_t, v, rule)
        for layer in collect:
            g, w = got[f"{method}@{layer}"], want[layer]
            assert np.max(np.abs(g - w)) <= 1e-4 * np.max(np.abs(w)), (method, layer)
            cg = M.location_cosines(g.reshape(n_img, n_vec, c, 3, 3))
            cw = M.location_cosines(w.reshape(n_img, n_vec, c, 3, 3))
            np.testing.assert_allclose(np.nanmedian(cg), np.nanmedian(cw), atol=1e-4)
    csc = {m: [M.csc_summary(M.location_cosines(got[f"{m}@{l}"].reshape(n_img, n_vec, c, 3, 3)))["median"]
               for l in collect] for m in ("gradient", "lrp_zplus")}      # index 0 = the input (deepest)
    assert csc["lrp_zplus"][0] > 0.99
    if signs == "positive":
        W = Ws[0]
        ev, vecs = np.linalg.eig(W.T)
        order = np.argsort(-np.abs(ev))
        gap = abs(ev[order[1]]) / abs(ev[order[0]])
        p = np.abs(np.real(vecs[:, order[0]]))              # the Perron vector of Wᵀ
        assert gap < 0.5
        acts = [x_t.astype(np.float64)]
        for _ in range(depth):
            acts.append(np.einsum("oc,bchw->bohw", W, acts[-1]))
        deviation = {}
        for k in range(depth):                               # layer 2k: depth − k products of Wᵀ
            # the gradient vectors align with p ...
            g = got[f"gradient@{2 * k}"].transpose(0, 2, 3, 1).reshape(-1, c).astype(np.float64)
            dev_g = 1 - np.abs(g @ p) / (np.linalg.norm(g, axis=1) * np.linalg.norm(p))
            # ... and z⁺'s with x ⊙ p (the telescoped product diag(x)(Wᵀ)^d diag(1/x))
            z = got[f"lrp_zplus@{2 * k}"].transpose(0, 2, 3, 1).reshape(-1, c).astype(np.float64)
            xp = acts[k].transpose(0, 2, 3, 1).reshape(-1, c) * p
            dev_z = 1 - np.abs((z * xp).sum(1)) / (np.linalg.norm(z, axis=1) * np.linalg.norm(xp, axis=1))
            deviation[depth - k] = (np.median(dev_g), np.median(dev_z), np.max(dev_g), np.max(dev_z))
        # geometric convergence at the rate of the spectral gap (down to float32 rounding)
        for d in range(2, depth + 1):
            for j in range(2):
                assert deviation[d][j] <= max(deviation[d - 1][j] * 4 * gap ** 2, 1e-6), (d, j, deviation)
        assert max(deviation[depth][2:]) < 1e-4
        assert csc["gradient"][0] > 0.999
    else:
        print(csc)
        assert csc["gradient"][0] < 0.9
        assert csc["lrp_zplus"][0] > csc["gradient"][0] + 0.1
