"""PyTorch backend: a training checkpoint behind ``inference``'s ``Segmenter`` interface.

It lives in ``training`` because it rebuilds the architectures; the application registers it with
``inference.backends.register_backend("torch", ...)`` (``crackscan.cli.register_backends``).

Two uses. On a GPU it is the path that needs no TensorRT: CUDA, FP16 weights and activations,
channels-last memory and optionally CUDA graphs, so the GPU can be measured and used where
TensorRT is not installed. On the CPU it is the reference that the exported ONNX model (and
through it every other backend) is compared with: same weights, same host half
(``BatchedSegmenter``: uint8 images mirror-padded), and the fused graph's arithmetic
(``inference.fused``: cast, colour order, normalisation, sigmoid or softmax at the crack
channel) done here in torch on the model's device, so the maps are directly comparable.
And training validates the model it trains through it (:meth:`TorchSegmenter.from_model`, in
fitted tiles as ``open_segmenter`` runs a checkpoint), so validation scores the maps the
pipeline will produce.

``info`` is what ``training.export`` would write into the ONNX model's metadata for the same
checkpoint (same keys, same threshold rule), except that ``sha256`` is the checkpoint file's.
Needs torch (the ``train`` extra), which the ONNX Runtime path does not.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from inference.segmenter import (
    BatchedSegmenter,
    ModelError,
    ModelInfo,
    check_batch,
    crack_channel,
    map_planes,
    model_info,
)
from training.checkpoint import checkpoint_metadata, load_model

log = logging.getLogger(__name__)

CUDA_GRAPH_WARMUP = 3  # eager runs on a side stream before capture (cuDNN picks its algorithms)


def load_checkpoint(checkpoint: Path) -> tuple[torch.nn.Module, ModelInfo]:
    """The model of a ``best.pt`` / ``last.pt`` training checkpoint (on the CPU, eval mode,
    rebuilt from the checkpoint's own config, ``training.checkpoint.load_model``) and its
    ModelInfo. A missing or unusable file is a ModelError (``CheckpointError``)."""
    model, cfg, state = load_model(checkpoint)
    return model, model_info(Path(checkpoint), checkpoint_metadata(state, cfg))


def in_memory_info(name: str, mean: tuple[float, ...], std: tuple[float, ...],
                   size_multiple: int, classes: tuple[str, ...], threshold: float = 0.5
                   ) -> ModelInfo:
    """The ModelInfo of a model that has no file (one being trained or validated): the
    pre-processing constants and classes an export would write, no path, no hash."""
    return ModelInfo(path=Path("<in memory>"), name=name, sha256="", mean=tuple(mean),
                     std=tuple(std), size_multiple=size_multiple, classes=tuple(classes),
                     threshold=threshold, input_color="RGB", metadata={})


def choose_device(device: str) -> torch.device:
    """``auto``: the first CUDA device when there is one, else the CPU; otherwise a torch
    device string (``cpu``, ``cuda``, ``cuda:1``), CUDA only where available."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise ModelError(f"unknown device {device!r}; expected auto, cpu or cuda[:N]") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {device!r}: this torch has no CUDA device (torch "
                         f"{torch.__version__})")
    if chosen.type not in ("cpu", "cuda"):
        raise ModelError(f"device {device!r}: only cpu and cuda are supported")
    return chosen


class TorchSegmenter(BatchedSegmenter):
    """Segmenter running a training checkpoint with PyTorch.

    ``device``: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda[:N]``. ``fp16``
    (default: on with CUDA, off on the CPU, where it is refused: CPU half-precision convolutions
    are slow and not what any deployment runs) converts weights and inputs to float16; logits
    come back as float32. On CUDA, tensors are channels-last (what cuDNN's FP16 tensor-core
    kernels want).

    Pre- and post-processing run on the model's device (:meth:`forward`): the uint8 batch is
    copied to the GPU as it is, normalised there in float32, and only the crack channel comes
    back.

    ``cuda_graphs`` (CUDA only; ignored on the CPU): the first batch of each input shape
    (batch size x padded height x width) is run a few times eagerly on a side stream, then
    captured as a CUDA graph with static input and output tensors; later batches of that shape
    copy into the static input and replay the graph, which removes the per-layer kernel-launch
    cost (large for small tiles). Each captured shape keeps its own activation memory, so this
    pays off where shapes repeat: fitted tiles or one camera resolution, batch sizes 1 to
    ``max_batch``.

    Same-shaped images of one call run as one batch of up to ``max_batch``
    (``BatchedSegmenter``). ``backend`` is ``torch-cuda`` or ``torch-cpu``.
    """

    def __init__(self, checkpoint: Path, device: str = "auto", fp16: bool | None = None,
                 cuda_graphs: bool = False, max_batch: int = 8) -> None:
        check_batch(max_batch)
        chosen = choose_device(device)
        on_cuda = chosen.type == "cuda"
        fp16 = on_cuda if fp16 is None else fp16
        if fp16 and not on_cuda:
            raise ModelError("fp16 needs a CUDA device; the CPU runs float32")
        if cuda_graphs and not on_cuda:
            log.info("CUDA graphs ignored on %s", chosen)
        model, info = load_checkpoint(checkpoint)
        dtype = torch.float16 if fp16 else torch.float32
        memory_format = torch.channels_last if on_cuda else torch.contiguous_format
        self._start(model.to(chosen, dtype=dtype, memory_format=memory_format), info, chosen,
                    dtype, memory_format, cuda_graphs and on_cuda, max_batch)
        log.info("backend %s (%s%s), model %s", self.backend, "fp16" if self.fp16 else "fp32",
                 ", CUDA graphs" if self.cuda_graphs else "", self.info.label)

    @classmethod
    def from_model(cls, model: torch.nn.Module, info: ModelInfo, max_batch: int = 8
                   ) -> TorchSegmenter:
        """A segmenter over a model in memory (training validates through it), with ``info``'s
        constants and classes. It runs eagerly in float32 where the model's weights are, and
        leaves the model as it is apart from switching it to eval mode."""
        check_batch(max_batch)
        segmenter = cls.__new__(cls)
        segmenter._start(model.eval(), info, next(model.parameters()).device, torch.float32,
                         torch.contiguous_format, False, max_batch)
        return segmenter

    def _start(self, model: torch.nn.Module, info: ModelInfo, device: torch.device,
               dtype: torch.dtype, memory_format: torch.memory_format, cuda_graphs: bool,
               max_batch: int) -> None:
        """Set up around ``model``, already on ``device`` in ``dtype`` and ``memory_format``."""
        self.model, self.info, self.device, self.dtype = model, info, device, dtype
        self.memory_format, self.cuda_graphs, self.max_batch = memory_format, cuda_graphs, max_batch
        self.fp16 = dtype == torch.float16
        self.backend = f"torch-{device.type}"
        shape = (1, 3, 1, 1)
        self._mean = torch.tensor(info.mean, dtype=torch.float32, device=device).reshape(shape)
        self._std = torch.tensor(info.std, dtype=torch.float32, device=device).reshape(shape)
        self._crack_channel = crack_channel(info.classes)
        self._planes = map_planes(info.classes)
        self._graphs: dict[tuple[int, ...], tuple[torch.cuda.CUDAGraph, torch.Tensor,
                                                  torch.Tensor]] = {}

    def run_batch(self, pixels: np.ndarray) -> np.ndarray:
        """N x H x W float32 crack probability of N x H x W x 3 uint8 padded BGR images."""
        x = torch.from_numpy(pixels).to(self.device)
        with torch.no_grad():
            prob = self._replay(x) if self.cuda_graphs else self.forward(x)
        return prob.cpu().numpy()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """The fused graph in torch (``inference.fused``, op for op): uint8 N x H x W x 3 BGR on
        the device -> float32 N x H x W crack probability (N x 2 x H x W with the argmax class
        plane, for a model with lining classes). Normalisation runs in float32; only the
        network runs in ``dtype``."""
        x = pixels.float().permute(0, 3, 1, 2)
        if self.info.input_color == "RGB":
            x = x.flip(1)  # BGR -> RGB; a kernel, no host index tensor (CUDA graph capture)
        x = (x / 255.0 - self._mean) / self._std
        logits = self.model(x.to(self.dtype).contiguous(memory_format=self.memory_format))
        logits = logits.float()
        if logits.shape[1] == 1:
            return torch.sigmoid(logits[:, 0])
        crack = torch.softmax(logits, dim=1)[:, self._crack_channel]
        if self._planes == 1:
            return crack
        return torch.stack([crack, logits.argmax(dim=1).float()], dim=1)

    def _replay(self, x: torch.Tensor) -> torch.Tensor:
        """The model's output for ``x`` through the CUDA graph of x's shape, captured first
        when new. The returned tensor is the graph's static output: read it before the next
        replay (``logits`` copies it to the host at once)."""
        key = tuple(x.shape)
        if key not in self._graphs:
            static_in = x.clone()
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(CUDA_GRAPH_WARMUP):
                    self.forward(static_in)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self.forward(static_in)
            self._graphs[key] = (graph, static_in, static_out)
            log.info("captured a CUDA graph for input %s", "x".join(map(str, key)))
        graph, static_in, static_out = self._graphs[key]
        static_in.copy_(x)
        graph.replay()
        return static_out
