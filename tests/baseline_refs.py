"""The peers' side of the baseline cross-checks (tests/test_baselines.py): Zennit composites
and canonizers, pytorch-grad-cam's per-layer cams before its scaling, Captum.

Everything here is the reference libraries' own code, called the documented way;
where a raw value is read from inside a library (pytorch-grad-cam) the test also
checks that the library's finished output is that raw value after its own scaling.
"""
from __future__ import annotations

import copy

import numpy as np
import torch

import torchvision_ops  # noqa: F401  (before zennit, which imports torchvision)
from zennit.attribution import Gradient
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.composites import EpsilonGammaBox, EpsilonPlus, LayerMapComposite, layer_map_base
from zennit.rules import Epsilon
from zennit.torchvision import ResNetBasicBlockCanonizer, ResNetBottleneckCanonizer, ResNetCanonizer
from zennit.types import Convolution


class ExactMergeBatchNorm(SequentialMergeBatchNorm):
    """Zennit's SequentialMergeBatchNorm, with the BatchNorm it leaves behind made an exact identity.

    Zennit merges BN into the conv and resets the BN to mean 0, var 1, weight 1, bias 0,
    but keeps its eps, so the leftover BN computes x / sqrt(1 + eps) instead of x: every
    BN scales the forward by 1 − 5e-6. ε-LRP with ε = 1e-6 amplifies that perturbation
    where z ≈ 0. Setting the leftover eps to 0 makes the canonized model the folded one.
    """

    def register(self, linears, batch_norm):
        super().register(linears, batch_norm)
        self.saved_eps = batch_norm.eps
        batch_norm.eps = 0.0

    def remove(self):
        super().remove()
        self.batch_norm.eps = self.saved_eps


def canonizers(kind: str, exact: bool = True) -> list:
    """Zennit canonizers for a model family: "plain" (Sequential stacks, VGG) or "resnet"."""
    merge = ExactMergeBatchNorm() if exact else SequentialMergeBatchNorm()
    if kind == "resnet":
        if not exact:
            return [ResNetCanonizer()]
        return [merge, ResNetBottleneckCanonizer(), ResNetBasicBlockCanonizer()]
    return [merge]


def composite(method: str, cans: list, low=None, high=None, epsilon: float = 1e-6):
    """The Zennit composite each dconnx LRP method reproduces (docs/baselines.md)."""
    if method == "lrp_epsilon":
        return LayerMapComposite(layer_map_base() + [(Convolution, Epsilon(epsilon)),
                                                     (torch.nn.Linear, Epsilon(epsilon))], canonizers=cans)
    if method == "lrp_gamma":
        return EpsilonGammaBox(low=low, high=high, epsilon=epsilon, gamma=0.25, canonizers=cans)
    if method == "lrp_zplus":
        return EpsilonPlus(epsilon=epsilon, canonizers=cans)
    raise ValueError(method)


def zennit_lrp(model, x: np.ndarray, target, comp, capture=None):
    """Zennit relevance at the input for R = f_k at the explained logit, [B, C, ...];
    with `capture` (a module), also the relevance at that module's output."""
    dtype = next(model.parameters()).dtype
    xt = torch.tensor(x, dtype=dtype, requires_grad=True)
    eye = torch.eye(_n_classes(model, xt), dtype=dtype)[torch.as_tensor(target)]
    got = {}
    handle = None
    if capture is not None:
        def hook(module, inputs, output):
            output.register_hook(lambda g: got.__setitem__("layer", g.detach().numpy().copy()))
        handle = capture.register_forward_hook(hook)
    try:
        with Gradient(model=model, composite=comp) as attributor:
            _, relevance = attributor(xt, lambda out: out * eye)
    finally:
        if handle is not None:
            handle.remove()
    return relevance.detach().numpy(), got.get("layer")


def _n_classes(model, xt):
    with torch.no_grad():
        return model(xt[:1]).shape[1]


def bounds(mean, std, dtype=torch.float32):
    """ZBox bounds of inputs normalized from [0, 1]: (0 − mean)/std, (1 − mean)/std, [1, C, 1, 1]."""
    m = torch.tensor(mean, dtype=dtype).reshape(1, -1, 1, 1)
    s = torch.tensor(std, dtype=dtype).reshape(1, -1, 1, 1)
    return (0 - m) / s, (1 - m) / s


def without_inplace(model):
    """A copy with every ReLU out of place (Captum's and grad-cam's hooks need the tensors intact)."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, torch.nn.ReLU):
            m.inplace = False
    return model.eval()


def gradcam_pass(model, layer, x: np.ndarray, target) -> dict:
    """One forward/backward of pytorch-grad-cam's GradCAM at `layer`, read before its scaling.

    Returns the raw per-layer cams ("gradcam": ReLU(get_cam_image), exactly what
    compute_cam_per_layer scales; "layercam": LayerCAM's get_cam_image on the same
    activations and gradients, ReLU'd the same way), the library's finished output
    ("gradcam_final", min-max scaled and resized by cv2), and the input gradient of the
    same backward pass ("input_grad")."""
    from pytorch_grad_cam import GradCAM, LayerCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    dtype = next(model.parameters()).dtype
    xt = torch.tensor(x, dtype=dtype, requires_grad=True)
    targets = [ClassifierOutputTarget(int(t)) for t in np.atleast_1d(target)]
    cam = GradCAM(model=model, target_layers=[layer])
    try:
        final = cam(input_tensor=xt, targets=targets)
        acts = cam.activations_and_grads.activations[0].numpy()
        grads = cam.activations_and_grads.gradients[0].numpy()
        raw = np.maximum(cam.get_cam_image(xt, layer, targets, acts, grads, False), 0)
        layer_raw = np.maximum(LayerCAM.get_cam_image(cam, xt, layer, targets, acts, grads, False), 0)
    finally:
        cam.activations_and_grads.release()
    return {"gradcam": raw, "layercam": layer_raw, "gradcam_final": final,
            "input_grad": xt.grad.detach().numpy(), "target_size": cam.get_target_width_height(xt)}


def layercam_final(model, layer, x: np.ndarray, target) -> np.ndarray:
    """pytorch-grad-cam's LayerCAM, run end to end (min-max scaled, resized)."""
    from pytorch_grad_cam import LayerCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    dtype = next(model.parameters()).dtype
    cam = LayerCAM(model=model, target_layers=[layer])
    try:
        return cam(input_tensor=torch.tensor(x, dtype=dtype),
                   targets=[ClassifierOutputTarget(int(t)) for t in np.atleast_1d(target)])
    finally:
        cam.activations_and_grads.release()


def library_scaling(raw: np.ndarray, target_size) -> np.ndarray:
    """What pytorch-grad-cam does to one layer's raw cam: scale_cam_image (min-max, cv2 resize),
    then aggregate_multi_layers (mean over the one layer, scale_cam_image again)."""
    from pytorch_grad_cam.utils.image import scale_cam_image
    return scale_cam_image(np.maximum(scale_cam_image(raw, target_size), 0))


def cv2_resize(raw: np.ndarray, target_size) -> np.ndarray:
    """The resize inside pytorch-grad-cam's scale_cam_image, without its min-max scaling."""
    import cv2
    return np.stack([cv2.resize(np.float32(m), target_size) for m in raw])


def captum_guided(model, x: np.ndarray, target) -> np.ndarray:
    from captum.attr import GuidedBackprop
    dtype = next(model.parameters()).dtype
    out = GuidedBackprop(model).attribute(torch.tensor(x, dtype=dtype),
                                          target=torch.as_tensor(np.atleast_1d(target)))
    return out.detach().numpy()


def captum_layer_gradcam(model, layer, x: np.ndarray, target) -> np.ndarray:
    from captum.attr import LayerGradCam
    dtype = next(model.parameters()).dtype
    out = LayerGradCam(model, layer).attribute(torch.tensor(x, dtype=dtype),
                                               target=torch.as_tensor(np.atleast_1d(target)),
                                               relu_attributions=True)
    return out.detach().numpy()[:, 0]


# --------------------------------------------------------------------------
# DeepLIFT and Integrated Gradients: Captum
# --------------------------------------------------------------------------
class Clone(torch.nn.Module):
    """x.clone(): a new autograd node between two hooked modules."""

    def forward(self, x):
        return x.clone()


def _basic_block_forward(self, x):
    """torchvision's BasicBlock.forward with its second ReLU a module of its own."""
    identity = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    if self.downsample is not None:
        identity = self.downsample(x)
    return self.relu2(out + identity)


def _bottleneck_forward(self, x):
    """torchvision's Bottleneck.forward with a ReLU module per use."""
    identity = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu2(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    if self.downsample is not None:
        identity = self.downsample(x)
    return self.relu3(out + identity)


def captum_ready(model, separate_maxpool: bool = True):
    """A copy Captum's DeepLift can run: ReLUs out of place; each torchvision BasicBlock and
    Bottleneck with a ReLU module per use (Captum refuses a module used twice); with `separate_maxpool`, every
    MaxPool behind a Clone. Without the Clone, a ReLU feeding a MaxPool has its backward hook
    run on the plain max-pool gradient (PyTorch calls the ReLU's output hook before the
    MaxPool's input hook replaces that gradient): the composition of Captum's own rules then
    needs the Clone. The function computed is unchanged."""
    import types
    from torchvision.models.resnet import BasicBlock, Bottleneck
    model = without_inplace(model)
    for m in list(model.modules()):
        if isinstance(m, BasicBlock):
            m.relu2 = torch.nn.ReLU()
            m.forward = types.MethodType(_basic_block_forward, m)
        if isinstance(m, Bottleneck):
            m.relu2, m.relu3 = torch.nn.ReLU(), torch.nn.ReLU()
            m.forward = types.MethodType(_bottleneck_forward, m)
    if separate_maxpool:
        for name, m in list(model.named_modules()):
            for child_name, child in list(m.named_children()):
                if isinstance(child, torch.nn.MaxPool2d):
                    setattr(m, child_name, torch.nn.Sequential(Clone(), child))
    return model.eval()


def captum_deeplift(model, x: np.ndarray, target, reference: np.ndarray | float = 0.0) -> np.ndarray:
    from captum.attr import DeepLift
    dtype = next(model.parameters()).dtype
    xt = torch.tensor(x, dtype=dtype)
    base = torch.broadcast_to(torch.as_tensor(reference, dtype=dtype), xt.shape).clone()
    out = DeepLift(model).attribute(xt, baselines=base, target=torch.as_tensor(np.atleast_1d(target)))
    return out.detach().numpy()


def captum_ig(model, x: np.ndarray, target, n_steps: int, method: str,
              reference: np.ndarray | float = 0.0) -> np.ndarray:
    from captum.attr import IntegratedGradients
    dtype = next(model.parameters()).dtype
    xt = torch.tensor(x, dtype=dtype)
    base = torch.broadcast_to(torch.as_tensor(reference, dtype=dtype), xt.shape).clone()
    out = IntegratedGradients(model).attribute(xt, baselines=base, target=torch.as_tensor(np.atleast_1d(target)),
                                               n_steps=n_steps, method=method)
    return out.detach().numpy()
