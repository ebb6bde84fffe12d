"""`dconnx.quantus_explain_func` as Quantus' explain_func: shapes and numbers against the Explainer,
then real Quantus metrics computed with it (a localisation metric on the fixture's ground-truth
masks, a randomisation metric and a faithfulness metric that queries a torch model)."""
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import dconnx
from dconnx.errors import OptionError
from dconnx.eval.synthetic import make_dataset
from dconnx.runtime import Explainer

quantus = pytest.importorskip("quantus", reason="quantus is in the test extra: pip install '.[test]'")
torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "models" / "fixture_cnn.onnx"
QUIET = {"disable_warnings": True, "display_progressbar": False}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quantus") / "fixture.dc.onnx"
    dconnx.convert(str(FIXTURE), str(out), methods="splitgrad,splitcam,splitlrp", layer=10)
    return out


@pytest.fixture(scope="module")
def data():
    ds = json.loads(FIXTURE.with_suffix(".json").read_text())["dataset"]
    x, y, masks = make_dataset(8, size=ds["size"], n_classes=ds["n_classes"], seed=ds["test_seed"],
                               clutter=ds["clutter"])
    return x, y, masks[:, None].astype(np.float32)


class FixtureNet(torch.nn.Module):
    """The original fixture model for Quantus' prediction calls (run by the tests' torch interpreter)."""

    def __init__(self):
        super().__init__()
        self.proto = onnx.load(str(FIXTURE))

    def forward(self, x):
        import onnx_torch
        return torch.from_numpy(onnx_torch.run(self.proto, {"input": x.detach().cpu().numpy()})["logits"])


def test_explain_func_matches_explainer(model, data):
    x, y, _ = data
    f = dconnx.quantus_explain_func(model, method="splitlrp", alpha=0.3)
    a = f(model=None, inputs=x, targets=y)
    assert a.shape == (8, 1, 64, 64) and a.dtype == np.float32
    ref = Explainer(model).maps(x, target=y, alpha=0.3)["splitlrp"]
    np.testing.assert_allclose(a[:, 0], ref, rtol=1e-6, atol=1e-7)
    # torch tensors in, kwargs Quantus adds (device) and per-call method override, small batches
    g = dconnx.quantus_explain_func(model, batch_size=3)
    b = g(model=None, inputs=torch.from_numpy(x), targets=torch.from_numpy(y), device="cpu", method="splitcam")
    np.testing.assert_allclose(b[:, 0], Explainer(model).maps(x, target=y)["splitcam"], rtol=1e-6, atol=1e-7)
    assert g.method == "splitgrad"
    with pytest.raises(OptionError, match="gradcam"):
        dconnx.quantus_explain_func(model, method="gradcam")


def test_localisation_metrics(model, data):
    x, y, s = data
    f = dconnx.quantus_explain_func(model, method="splitcam")
    rra = quantus.RelevanceRankAccuracy(**QUIET)(model=None, x_batch=x, y_batch=y, a_batch=None, s_batch=s,
                                                 explain_func=f)
    pointing = quantus.PointingGame(**QUIET)(model=None, x_batch=x, y_batch=y, a_batch=None, s_batch=s,
                                             explain_func=f)
    assert len(rra) == 8 and all(0.0 <= v <= 1.0 for v in rra)
    assert len(pointing) == 8
    # SplitCAM of the trained fixture ranks object pixels well above chance (the object's area share)
    assert np.mean(rra) > 2 * float(s.mean())


def test_metrics_with_a_torch_model(model, data):
    x, y, _ = data
    net = FixtureNet().eval()
    f = dconnx.quantus_explain_func(model, method="splitgrad")
    faith = quantus.FaithfulnessCorrelation(nr_runs=5, subset_size=64, perturb_baseline="black",
                                            return_aggregate=False, **QUIET)(
        model=net, x_batch=x, y_batch=y, a_batch=None, explain_func=f, device="cpu")
    rand = quantus.RandomLogit(num_classes=4, **QUIET)(model=net, x_batch=x, y_batch=y, a_batch=None,
                                                       explain_func=f, device="cpu")
    sens = quantus.MaxSensitivity(nr_samples=3, **QUIET)(model=net, x_batch=x, y_batch=y, a_batch=None,
                                                         explain_func=f, device="cpu")
    for scores in (faith, rand, sens):
        assert len(scores) == 8 and np.all(np.isfinite(scores))
