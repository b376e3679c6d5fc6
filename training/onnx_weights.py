"""The weights of an exported crackscan ONNX model, back in its PyTorch model, so a deployed model
can be fine-tuned when its training checkpoint is gone (only the ``.onnx`` travelled).

Export folds every batch norm into the convolution before it (ONNX Runtime's and PyTorch's
eval-mode export do), so the ONNX file holds one weight and one bias per convolution and no
batch-norm statistics. Loading puts each folded convolution back and turns its batch norm into
the identity (mean 0, variance 1 - eps, scale 1, the folded bias as its shift): the PyTorch
model then computes exactly what the ONNX model computes. Those batch norms have no statistics
of their own to learn from, so a fine-tune from an ONNX model runs with batch norm frozen
(``freeze_bn``): its scale and shift still learn, its statistics stay put.

Convolutions are matched by the order they run in (the ONNX graph is the traced forward pass)
and checked by shape; the result is checked against ONNX Runtime on one input.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn


def onnx_convolutions(path: Path) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """(weight, bias or None) of every Conv node of the ONNX model at ``path``, in graph order."""
    graph = onnx.load(str(path)).graph
    tensors = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:  # weights exported as Constant nodes rather than initializers
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            tensors[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    convolutions = []
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        if node.input[1] not in tensors:
            raise ValueError(f"{path}: convolution {node.name} has a computed weight; only "
                             "models exported by crackscan can be loaded")
        bias = tensors[node.input[2]] if len(node.input) > 2 and node.input[2] else None
        convolutions.append((tensors[node.input[1]], bias))
    return convolutions


def forward_order(model: nn.Module, multiple: int) -> list[tuple[nn.Conv2d, nn.BatchNorm2d | None]]:
    """Each convolution of ``model`` in the order a forward pass runs them, paired with the batch
    norm that runs right after it on its output (None where none does)."""
    calls: list[nn.Module] = []
    hooks = [module.register_forward_hook(lambda module, _inputs, _output: calls.append(module))
             for module in model.modules() if isinstance(module, (nn.Conv2d, nn.BatchNorm2d))]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, 2 * multiple, 2 * multiple))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    pairs = []
    for index, module in enumerate(calls):
        if isinstance(module, nn.Conv2d):
            after = calls[index + 1] if index + 1 < len(calls) else None
            norm = (after if isinstance(after, nn.BatchNorm2d)
                    and after.num_features == module.out_channels else None)
            pairs.append((module, norm))
    return pairs


@torch.no_grad()
def load_onnx_weights(model: nn.Module, path: Path, multiple: int) -> int:
    """Load the ONNX model at ``path`` (exported by crackscan from this architecture) into
    ``model``; returns how many convolutions were loaded. Raises ValueError when the two do not
    have the same convolutions, or when the loaded model does not reproduce ONNX Runtime's
    logits."""
    from training.export import ExportError, verify  # export imports the models; keep it lazy

    stored = onnx_convolutions(path)
    own = forward_order(model, multiple)
    if len(stored) != len(own):
        raise ValueError(f"{path} has {len(stored)} convolutions, this "
                         f"{type(model).__name__} {len(own)}: is it another architecture or "
                         "width, or a model with (or without) mobilenet_aspp's stride-2 "
                         "refinement (fine_skip: true in model_params)?")
    for number, ((weight, _), (conv, _)) in enumerate(zip(stored, own, strict=True)):
        if tuple(weight.shape) != tuple(conv.weight.shape):
            raise ValueError(f"{path}: convolution {number} has shape {tuple(weight.shape)}, "
                             f"this model's {tuple(conv.weight.shape)}: is it another "
                             "architecture or width?")
    for (weight, bias), (conv, norm) in zip(stored, own, strict=True):
        conv.weight.copy_(torch.tensor(weight))
        shift = torch.tensor(bias) if bias is not None else torch.zeros(conv.out_channels)
        if norm is not None:  # folded: the batch norm becomes the identity plus the shift
            if conv.bias is not None:
                conv.bias.zero_()
            norm.running_mean.zero_()
            norm.running_var.fill_(1.0 - norm.eps)
            norm.weight.fill_(1.0)
            norm.bias.copy_(shift)
        elif conv.bias is not None:
            conv.bias.copy_(shift)
        elif shift.abs().max() > 0:
            raise ValueError(f"{path}: a convolution without bias or batch norm here has a "
                             "bias there: is it another architecture?")
    model.eval()
    try:
        verify(model, path, multiple)
    except ExportError as exc:
        raise ValueError(f"{path} loaded, but the model does not reproduce it: {exc}") from None
    return len(own)


def count_convolutions(module: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in module.modules())


def grow(model: nn.Module, base: nn.Module, new_prefix: str) -> int:
    """Copy every tensor of ``base`` into ``model``, which is ``base`` plus new modules under
    ``new_prefix`` (e.g. ``"refine."``); returns how many of ``model``'s tensors are new. Raises
    ValueError when anything else differs."""
    try:
        result = model.load_state_dict(base.state_dict(), strict=False)
    except RuntimeError as exc:  # a tensor of another shape
        raise ValueError(f"the model is not the loaded one plus {new_prefix}*: {exc}") from None
    other = [k for k in result.missing_keys if not k.startswith(new_prefix)]
    if other or result.unexpected_keys:
        raise ValueError(f"the model is not the loaded one plus {new_prefix}*: it lacks "
                         f"{result.unexpected_keys[:3]} and has {other[:3]} besides")
    return len(result.missing_keys)


# a new class's logit starts this far below background's, so a widened model starts out
# predicting what the binary one did (crack probability within ~2 % of its sigmoid)
NEW_CLASS_LOGIT = -6.0


@torch.no_grad()
def widen_classes(model: nn.Module, binary: nn.Module, crack_index: int) -> int:
    """Copy the binary model ``binary`` (one crack logit) into ``model``, the same architecture
    with C > 1 classes, so that its softmax starts out computing the binary model's sigmoid:
    crack gets the crack logit, background (index 0) a logit of zero, every other class
    ``NEW_CLASS_LOGIT``. Every class-wide convolution (the head, and a refiner's correction)
    is widened that way; returns how many were. Raises ValueError when anything else differs."""
    own, theirs = model.state_dict(), binary.state_dict()
    if own.keys() != theirs.keys():
        raise ValueError("the binary model is not the same architecture")
    widened = 0
    for name, tensor in theirs.items():
        target = own[name]
        if target.shape == tensor.shape:
            target.copy_(tensor)
            continue
        if tensor.shape[0] != 1 or target.shape[1:] != tensor.shape[1:]:
            raise ValueError(f"{name}: {tuple(tensor.shape)} cannot widen to "
                             f"{tuple(target.shape)}")
        target.zero_()
        target[crack_index] = tensor[0]
        if name.endswith("bias") and name.startswith("head."):
            others = [c for c in range(target.shape[0]) if c not in (0, crack_index)]
            target[others] = NEW_CLASS_LOGIT
        widened += name.endswith("weight")
    return widened


def freeze_batch_norm(model: nn.Module) -> None:
    """Put every batch norm of ``model`` in eval mode (statistics fixed, scale and shift still
    trained); call after each ``model.train()``."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
