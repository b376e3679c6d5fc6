"""Every architecture of the registry: logits of the input size for 1 and 5 classes, gradients
that reach every parameter, ONNX export checked against ONNX Runtime, the three learning-rate
groups, torchvision-compatible encoder names and sizes, and loading local encoder weights.

Inputs stay at 64 px or less and one torch thread, so the file runs in seconds on a busy CPU.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from training.decoders import SCSE, MaxUnpool2x2
from training.encoders import MobileNetV1Encoder, ResNetEncoder, VGG16BNEncoder
from training.models import MODELS, build_model, get_spec, load_encoder_weights, param_groups

OPSET = 17  # as training.export

# every registry entry with its defaults, plus the variants a parameter selects
CASES = [pytest.param(name, {}, id=name) for name in MODELS] + [
    pytest.param("mobilenet_aspp", {"encoder": "mobilenet_v1"}, id="mobilenet_aspp-v1"),
    pytest.param("unet", {"upsample": "bilinear", "batch_norm": False, "base_channels": 16},
                 id="unet-bilinear-nobn"),
    pytest.param("deeplabv3plus_resnet", {"depth": 18}, id="deeplabv3plus_resnet18"),
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make(name: str, params: dict, num_classes: int = 1) -> nn.Module:
    torch.manual_seed(0)
    return build_model(name, num_classes=num_classes, **params)


def pad_to(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """What a caller does with an image of any size: zero-pad bottom and right to the multiple."""
    height, width = x.shape[-2:]
    return F.pad(x, (0, -width % multiple, 0, -height % multiple))


# --- every architecture -----------------------------------------------------------------------

@pytest.mark.parametrize("num_classes", [1, 5])
@pytest.mark.parametrize("name,params", CASES)
def test_logits_have_the_input_size(name, params, num_classes):
    multiple = get_spec(name).size_multiple
    model = make(name, params, num_classes).eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 2 * multiple, 3 * multiple))
        assert logits.shape == (1, num_classes, 2 * multiple, 3 * multiple)
        padded = pad_to(torch.randn(1, 3, 37, 53), multiple)  # odd size, padded by the caller
        logits = model(padded)
    assert logits.shape == (1, num_classes, *padded.shape[-2:])
    assert logits[..., :37, :53].shape == (1, num_classes, 37, 53)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name,params", CASES)
def test_backward_reaches_every_parameter(name, params):
    model = make(name, params, num_classes=5).train()
    logits = model(torch.randn(2, 3, 64, 64))
    # random weights: a plain sum would give batch norm a constant gradient, which it cancels
    (logits * torch.randn_like(logits)).sum().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not dead, f"no gradient reaches {dead[:5]}"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # dynamo=False, as training.export
@pytest.mark.parametrize("name,params", CASES)
def test_onnx_export_matches_pytorch_on_another_size(name, params, tmp_path):
    multiple = get_spec(name).size_multiple
    model = make(name, params, num_classes=2).eval()
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(model, (torch.randn(1, 3, 2 * multiple, 2 * multiple),), str(path),
                      dynamo=False, opset_version=OPSET, input_names=["image"],
                      output_names=["logits"],
                      dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"},
                                    "logits": {0: "batch", 2: "height", 3: "width"}})
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 3 * multiple, multiple, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x).numpy()
    got = session.run(["logits"], {"image": x.numpy()})[0]
    assert got.shape == expected.shape == (2, 2, 3 * multiple, multiple)
    np.testing.assert_allclose(got, expected, atol=1e-3, rtol=0)


@pytest.mark.parametrize("name,params", CASES)
def test_param_groups_hold_every_parameter_exactly_once(name, params):
    model = make(name, params)
    groups = param_groups(model)
    assert len(groups) == 3 and all(groups)
    grouped = [id(p) for group in groups for p in group]
    assert len(grouped) == len(set(grouped))  # no parameter twice
    assert set(grouped) == {id(p) for p in model.parameters()}
    encoder = {id(p) for p in model.encoder.parameters()}
    assert {id(p) for p in groups[0] + groups[1]} == encoder  # decoder and head come last
    assert not {id(p) for p in groups[0]} & {id(p) for p in groups[1]}


def test_mobilenet_aspp_is_the_shipped_architecture():
    """The bundled model's checkpoint loads into this: same tensors, names and size as before."""
    state = build_model("mobilenet_aspp").state_dict()
    assert len(state) == 387
    assert sum(p.numel() for p in build_model("mobilenet_aspp").parameters()) == 2_154_417
    assert "encoder.features.17.conv.3.running_var" in state and "head.weight" in state


def test_unknown_mobilenet_encoder_lists_the_known_ones():
    with pytest.raises(ValueError, match="mobilenet_v1"):
        build_model("mobilenet_aspp", encoder="mobilenet_v3")


# --- encoders: torchvision names and sizes ----------------------------------------------------

RESNET_SHAPES = {
    18: {"conv1.weight": (64, 3, 7, 7), "bn1.running_mean": (64,),
         "layer1.0.conv1.weight": (64, 64, 3, 3), "layer2.0.downsample.0.weight": (128, 64, 1, 1),
         "layer2.0.downsample.1.weight": (128,), "layer4.1.conv2.weight": (512, 512, 3, 3)},
    34: {"conv1.weight": (64, 3, 7, 7), "layer1.2.conv2.weight": (64, 64, 3, 3),
         "layer3.5.bn2.weight": (256,), "layer4.0.downsample.0.weight": (512, 256, 1, 1)},
    50: {"conv1.weight": (64, 3, 7, 7), "layer1.0.conv1.weight": (64, 64, 1, 1),
         "layer1.0.downsample.0.weight": (256, 64, 1, 1), "layer2.0.conv2.weight": (128, 128, 3, 3),
         "layer4.2.conv3.weight": (2048, 512, 1, 1), "layer4.2.bn3.running_var": (2048,)},
}
# torchvision's totals minus fc: 11,689,512 - 513,000; 21,797,672 - 513,000;
# 25,557,032 - 2,049,000; 44,549,160 - 2,049,000
RESNET_PARAMS = {18: 11_176_512, 34: 21_284_672, 50: 23_508_032, 101: 42_500_160}


@pytest.mark.parametrize("depth", [18, 34, 50])
def test_resnet_encoder_is_named_and_shaped_as_torchvision(depth):
    state = ResNetEncoder(depth).state_dict()
    for name, shape in RESNET_SHAPES[depth].items():
        assert name in state, name
        assert tuple(state[name].shape) == shape, name
    assert not any(name.startswith("fc.") for name in state)


@pytest.mark.parametrize("depth", sorted(RESNET_PARAMS))
def test_resnet_encoder_has_torchvisions_parameter_count(depth):
    assert sum(p.numel() for p in ResNetEncoder(depth).parameters()) == RESNET_PARAMS[depth]


@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_resnet_output_stride_by_dilation_keeps_the_weights(output_stride):
    encoder = ResNetEncoder(50, output_stride=output_stride).eval()
    assert encoder.out_channels == [64, 256, 512, 1024, 2048]
    assert encoder.output_stride == output_stride
    with torch.no_grad():
        maps = encoder(torch.randn(1, 3, 64, 96))
    assert [m.shape[1] for m in maps] == encoder.out_channels
    strides = [2, 4, 8, min(16, output_stride), output_stride]
    assert [tuple(m.shape[-2:]) for m in maps] == [(64 // s, 96 // s) for s in strides]
    # dilation changes no tensor: ImageNet weights load at any output stride
    reference = {k: v.shape for k, v in ResNetEncoder(50).state_dict().items()}
    assert {k: v.shape for k, v in encoder.state_dict().items()} == reference


def test_resnet18_encoder_channels():
    assert ResNetEncoder(18).out_channels == [64, 64, 128, 256, 512]


def test_vgg16_bn_encoder_is_named_and_shaped_as_torchvision():
    encoder = VGG16BNEncoder()
    state = encoder.state_dict()
    assert tuple(state["features.0.weight"].shape) == (64, 3, 3, 3)
    assert isinstance(encoder.features[1], nn.BatchNorm2d)
    assert tuple(state["features.1.running_var"].shape) == (64,)
    assert tuple(state["features.7.weight"].shape) == (128, 64, 3, 3)  # after the first pool
    assert tuple(state["features.40.weight"].shape) == (512, 512, 3, 3)  # the last conv
    assert [i for i, m in enumerate(encoder.features) if isinstance(m, nn.MaxPool2d)] == [
        6, 13, 23, 33, 43]
    # torchvision's vgg16_bn: 138,365,992 parameters, of which the classifier has 123,642,856
    assert sum(p.numel() for p in encoder.parameters()) == 14_723_136


def test_mobilenet_v1_encoder_maps_and_size():
    encoder = MobileNetV1Encoder(output_stride=32).eval()
    assert encoder.out_channels == [64, 128, 256, 512, 1024]
    with torch.no_grad():
        maps = encoder(torch.randn(1, 3, 64, 64))
    assert [tuple(m.shape[1:]) for m in maps] == [
        (64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (1024, 2, 2)]
    # Howard et al.'s 4.2 M parameters (4,231,976) without the 1024 -> 1000 classifier
    assert sum(p.numel() for p in encoder.parameters()) == 3_206_976


# --- loading encoder weights ------------------------------------------------------------------

@pytest.mark.parametrize("wrap", [False, True], ids=["bare", "under-model-key"])
def test_load_encoder_weights_from_a_classification_checkpoint(tmp_path, wrap):
    source = make("resnet18_aspp", {})
    state = dict(source.encoder.state_dict())
    state |= {"fc.weight": torch.randn(1000, 512), "fc.bias": torch.randn(1000)}  # ignored
    path = tmp_path / "resnet18.pth"
    torch.save({"model": state, "epoch": 90} if wrap else state, path)

    torch.manual_seed(1)  # other initial weights
    target = build_model("resnet18_aspp")
    decoder_before = {k: v.clone() for k, v in target.decoder.state_dict().items()}
    assert not torch.equal(target.encoder.conv1.weight, source.encoder.conv1.weight)
    loaded = load_encoder_weights(target, path)

    assert loaded == len(source.encoder.state_dict())
    for key, value in source.encoder.state_dict().items():
        assert torch.equal(target.encoder.state_dict()[key], value), key
    for key, value in target.decoder.state_dict().items():  # the decoder is left alone
        assert torch.equal(value, decoder_before[key]), key


def test_load_encoder_weights_refuses_another_architecture(tmp_path):
    path = tmp_path / "vgg16_bn.pth"
    torch.save(VGG16BNEncoder().state_dict(), path)
    with pytest.raises(ValueError, match="another architecture"):
        load_encoder_weights(build_model("resnet18_aspp"), path)


def test_load_encoder_weights_refuses_another_depth(tmp_path):
    path = tmp_path / "resnet50.pth"
    torch.save(ResNetEncoder(50).state_dict(), path)  # names overlap ResNet-18's, shapes do not
    with pytest.raises(ValueError, match=r"layer1\.0\.conv1\.weight"):
        load_encoder_weights(build_model("resnet18_aspp"), path)


# --- building blocks --------------------------------------------------------------------------

def test_scse_with_zero_weights_is_the_identity_and_each_gate_halves():
    block = SCSE(8)
    x = torch.randn(2, 8, 5, 7)
    assert block(x).shape == x.shape
    for parameter in block.parameters():
        nn.init.zeros_(parameter)
    assert torch.allclose(block(x), x)  # both gates sigmoid(0) = 0.5
    with torch.no_grad():
        block.spatial_gate[0].bias.fill_(-100.0)  # spatial gate shut: the channel gate's half
    assert torch.allclose(block(x), 0.5 * x)
    with torch.no_grad():
        block.spatial_gate[0].bias.zero_()
        block.channel_gate[3].bias[:4] = -100.0  # channel gate shut for channels 0-3 only
    out = block(x)
    assert torch.allclose(out[:, :4], 0.5 * x[:, :4]) and torch.allclose(out[:, 4:], x[:, 4:])


def test_max_unpool_equals_torch_max_unpool_with_gradients():
    x = torch.randn(2, 3, 8, 12, requires_grad=True)
    pooled, indices = F.max_pool2d(x, 2, 2, return_indices=True)
    ours = MaxUnpool2x2()(pooled, indices)
    reference = nn.MaxUnpool2d(2, 2)(pooled, indices)
    assert torch.equal(ours, reference)
    weights = torch.randn_like(ours)
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), x, retain_graph=True)
    (grad_reference,) = torch.autograd.grad((reference * weights).sum(), x)
    assert torch.equal(grad_ours, grad_reference)

