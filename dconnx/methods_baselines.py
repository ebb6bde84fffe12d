"""The baseline attribution methods, each a rule set over the one reverse walk plus a head
(docs/baselines.md): Gradient, Gradient×Input, GradCAM, LayerCAM, Guided Backprop,
LRP-ε, LRP-γ, LRP-z⁺, DeepLIFT (Rescale), Integrated Gradients.

Loaded by dconnx/methods.py. Gradient, Gradient×Input, GradCAM and LayerCAM
share the "gradient" rule set, so asking for several of them costs one walk.
Further LRP composites (another γ, another first-layer rule) are registered
with `register_lrp`.
"""
from __future__ import annotations

from .errors import OptionError
from .method_registry import Method, register_method, register_ruleset
from .rulesets.gradient import GuidedBackprop, PlainGradient
from .rulesets.lrp_rules import Composite, LRPRules
from .rulesets.reference import DeepLiftCaptumHooks, DeepLiftRescale, IntegratedGradientsRules


# -- heads: (comp, layer tensor, rule set, cotangent) -> [B, C, ...] or [B, ...] --
def _gradient_head(comp, tensor, rs, ct):
    return ct[0]


def _gradxinput_head(comp, tensor, rs, ct):
    return comp.b.mul(ct[0], tensor, hint="dc/gradxinput")


def _spatial_axes(comp, tensor, method):
    rank = comp.view.rank(tensor)
    if rank is None or rank < 3:
        raise OptionError(f"{method} needs a layer with spatial axes (a convolutional layer); "
                          f"'{tensor}' has rank {rank}")
    return list(range(2, rank))


def _gradcam_head(comp, tensor, rs, ct):
    """ReLU(Σ_c mean_hw(∂f/∂A_c) · A_c)."""
    b = comp.b
    weights = b.reduce("ReduceMean", ct[0], _spatial_axes(comp, tensor, "gradcam"), keepdims=1,
                       hint="dc/gradcam_weights")
    return b.relu(b.reduce_sum(b.mul(weights, tensor), [1], keepdims=0), hint="dc/gradcam")


def _layercam_head(comp, tensor, rs, ct):
    """ReLU(Σ_c ReLU(∂f/∂A_c) ⊙ A_c)."""
    b = comp.b
    _spatial_axes(comp, tensor, "layercam")
    weighted = b.mul(b.relu(ct[0]), tensor)
    return b.relu(b.reduce_sum(weighted, [1], keepdims=0), hint="dc/layercam")


def _relevance_head(comp, tensor, rs, ct):
    return ct[0]


# -- rule sets and methods --------------------------------------------------
register_ruleset("gradient", PlainGradient)
register_ruleset("guided", GuidedBackprop)

_NO_PARAMS = {"layer": "any tensor (default: the input); no α, no shift"}
_CAM_PARAMS = {"layer": "a convolutional tensor (e.g. the last conv block); maps are upsampled "
                        "bilinearly (half-pixel) unless --no-upsample; not normalized unless --normalize"}

register_method(Method(
    "gradient", "Σ_c ∂f_k/∂x: the plain gradient of the explained logit", "gradient",
    _gradient_head, params=_NO_PARAMS,
    matches="torch autograd (Captum Saliency with abs=False, Zennit's Gradient attributor)"))
register_method(Method(
    "gradxinput", "Σ_c x ⊙ ∂f_k/∂x: gradient times input", "gradient", _gradxinput_head,
    params=_NO_PARAMS, matches="torch autograd; Captum InputXGradient"))
register_method(Method(
    "gradcam", "ReLU(Σ_c mean_hw(∂f_k/∂A_c) · A_c) at the layer", "gradient", _gradcam_head,
    reduce="none", params=_CAM_PARAMS, signed=False,
    matches="pytorch-grad-cam 1.5 GradCAM per-layer cam before its min-max scaling; "
            "Captum LayerGradCam(relu_attributions=True)"))
register_method(Method(
    "layercam", "ReLU(Σ_c ReLU(∂f_k/∂A_c) ⊙ A_c) at the layer", "gradient", _layercam_head,
    reduce="none", params=_CAM_PARAMS, signed=False,
    matches="pytorch-grad-cam 1.5 LayerCAM per-layer cam before its min-max scaling"))
register_method(Method(
    "guidedbp", "Σ_c guided backprop: Relu backward 1[x > 0] ⊙ relu(g)", "guided",
    _gradient_head, params=_NO_PARAMS, matches="Captum GuidedBackprop"))

_LRP_COMMON = {
    "lrp_epsilon": "ε of the Epsilon rule (option lrp_epsilon, default 1e-6 = Zennit's)",
    "stabilizer": "1e-6 for every other rule (Zennit's default)",
    "seed": "R = f_k at the explained logit (pass attr_output = logits ⊙ onehot to Zennit)",
}


def register_lrp(name: str, composite: Composite, summary: str, params: dict | None = None) -> Method:
    """Register an LRP method with its own rule set (one per composite)."""
    register_ruleset(name, lambda comp: LRPRules(comp, name, composite))
    return register_method(Method(
        name, summary, name, _relevance_head, params={**_LRP_COMMON, **(params or {})},
        matches=composite.zennit))


register_lrp("lrp_epsilon", Composite(
    conv="epsilon", dense="epsilon",
    zennit="Zennit 0.5 LayerMapComposite(layer_map_base() + [(Convolution, Epsilon(ε)), "
           "(Linear, Epsilon(ε))]); canonizers: SequentialMergeBatchNorm (VGG, plain stacks), "
           "ResNetCanonizer (ResNet)"),
    "LRP-ε: Epsilon on every Conv and Linear, Norm on pooling and residual sums, Pass on Relu/BN")
register_lrp("lrp_gamma", Composite(
    conv="gamma", dense="epsilon", first="zbox", gamma=0.25,
    zennit="Zennit 0.5 EpsilonGammaBox(low, high, epsilon=ε, gamma=0.25) with "
           "low = (0 − mean)/std, high = (1 − mean)/std; canonizers as for lrp_epsilon"),
    "LRP-γ: ZBox (zβ) on the first Conv, Gamma(0.25) on the other Convs, Epsilon on Linear",
    params={"gamma": "0.25 (Zennit's default; another γ: register_lrp with a Composite)",
            "mean, std": "input normalization (options mean/std); the ZBox bounds are "
                         "(0 − mean)/std and (1 − mean)/std; unset: [0, 1]"})
register_lrp("lrp_zplus", Composite(
    conv="zplus", dense="epsilon",
    zennit="Zennit 0.5 EpsilonPlus(epsilon=ε); canonizers as for lrp_epsilon"),
    "LRP-z⁺: ZPlus on every Conv, Epsilon on Linear")


# -- DeepLIFT and Integrated Gradients: a second forward in the graph (rulesets/reference.py) --
def _deeplift_head(comp, tensor, rs, ct):
    """(x − x₀) ⊙ m: the DeepLIFT contributions (Σ over the input = f_k(x) − f_k(x₀))."""
    return comp.b.mul(ct[0], rs._delta(tensor), hint="dc/deeplift")


def _ig_head(comp, tensor, rs, ct):
    return rs.attribution(ct)


register_ruleset("deeplift", DeepLiftRescale)
register_ruleset("deeplift_captum", DeepLiftCaptumHooks)
register_ruleset("ig", IntegratedGradientsRules)

_REFERENCE = {"layer": "the input only",
              "reference": "graph input `reference`, any shape that broadcasts to the input "
                           "(e.g. [1, C, H, W]); its default is the option reference (default 0.0) "
                           "everywhere"}
register_method(Method(
    "deeplift", "Σ_c (x − x₀) ⊙ m: DeepLIFT, Rescale rule at every Relu and MaxPool", "deeplift",
    _deeplift_head, params=_REFERENCE,
    matches="Captum 0.9 DeepLift's rules (ReLU `nonlinear`, `maxpool`, eps 1e-10) composed as "
            "defined: DeepLift(model).attribute(x, baselines=x₀, target=k) where a Clone separates "
            "each ReLU from its MaxPool and windows do not overlap; Σ = f_k(x) − f_k(x₀) for any x₀"))
register_method(Method(
    "deeplift_captum", "deeplift as Captum 0.9 runs on a module where a ReLU feeds a MaxPool: "
    "that ReLU rescales the max pool's plain gradient", "deeplift_captum", _deeplift_head,
    params=_REFERENCE,
    matches="Captum 0.9 DeepLift as it runs on torchvision VGG/ResNet (PyTorch's full backward "
            "hooks give a ReLU feeding a MaxPool the plain max-pool gradient); complete only "
            "where x₀'s pooled values do not depend on the position in the window (e.g. x₀ = 0)"))
register_method(Method(
    "ig", "Σ_c (x − x₀) ⊙ Σ_i w_i ∇f_k(x₀ + a_i(x − x₀)): Integrated Gradients, the steps "
          "batched in the graph", "ig", _ig_head,
    params={**_REFERENCE, "ig_steps": "number of points (default 50, Captum's n_steps)",
            "ig_method": "gausslegendre (default) | riemann_left | riemann_right | riemann_middle "
                         "| riemann_trapezoid (Captum's method)"},
    matches="Captum 0.9 IntegratedGradients(model).attribute(x, baselines=x₀, target=k, "
            "n_steps=ig_steps, method=ig_method)"))
