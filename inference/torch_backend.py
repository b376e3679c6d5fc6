"""PyTorch backend: a training checkpoint behind the ``Segmenter`` interface.

Two uses. On a GPU it is the path that needs no TensorRT: CUDA, FP16 weights and activations,
channels-last memory and optionally CUDA graphs, so the GPU can be measured and used where
TensorRT is not installed. On the CPU it is the reference that the exported ONNX model (and
through it every other backend) is compared with: same weights, same pre-processing
(``preprocess``), same read-out (``crack_probability``), so the maps are directly comparable.

``info`` is what ``training.export`` would write into the ONNX model's metadata for the same
checkpoint (same keys, same threshold rule), except that ``sha256`` is the checkpoint file's.
Needs torch (the ``train`` extra), which the ONNX Runtime path does not.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np
import torch

from inference.segmenter import ModelError, ModelInfo, crack_probability, model_info, preprocess
from training.config import TrainConfig
from training.export import checkpoint_metadata
from training.models import build_model

log = logging.getLogger(__name__)

CUDA_GRAPH_WARMUP = 3  # eager runs on a side stream before capture (cuDNN picks its algorithms)


def load_checkpoint(checkpoint: Path) -> tuple[torch.nn.Module, ModelInfo]:
    """The model of a ``best.pt`` / ``last.pt`` training checkpoint (on the CPU, eval mode,
    rebuilt from the checkpoint's own config as ``training.export`` does) and its ModelInfo."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise ModelError(f"checkpoint {checkpoint} does not exist")
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as exc:  # not a torch.save file
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"{checkpoint} is not a crackscan training checkpoint ({reason})"
                         ) from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ModelError(f"{checkpoint} is not a crackscan training checkpoint")
    cfg = TrainConfig(**state["config"])
    model = build_model(cfg.model, num_classes=cfg.num_classes, **cfg.model_params)
    model.load_state_dict(state["model"])
    model.eval()
    return model, model_info(checkpoint, checkpoint_metadata(state, cfg))


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


class TorchSegmenter:
    """Segmenter running a training checkpoint with PyTorch.

    ``device``: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda[:N]``. ``fp16``
    (default: on with CUDA, off on the CPU, where it is refused: CPU half-precision convolutions
    are slow and not what any deployment runs) converts weights and inputs to float16; logits
    come back as float32. On CUDA, tensors are channels-last (what cuDNN's FP16 tensor-core
    kernels want).

    ``cuda_graphs`` (CUDA only; ignored on the CPU): the first batch of each input shape
    (batch size x padded height x width) is run a few times eagerly on a side stream, then
    captured as a CUDA graph with static input and output tensors; later batches of that shape
    copy into the static input and replay the graph, which removes the per-layer kernel-launch
    cost (large for small tiles). Each captured shape keeps its own activation memory, so this
    pays off where shapes repeat: fixed tiles or one camera resolution, batch sizes 1 to
    ``max_batch``.

    Same-shaped images of one call run as one batch of up to ``max_batch`` (after
    ``preprocess``). ``backend`` is ``torch-cuda`` or ``torch-cpu``.
    """

    def __init__(self, checkpoint: Path, device: str = "auto", fp16: bool | None = None,
                 cuda_graphs: bool = False, max_batch: int = 8) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch {max_batch} must be >= 1")
        self.device = choose_device(device)
        on_cuda = self.device.type == "cuda"
        self.fp16 = on_cuda if fp16 is None else fp16
        if self.fp16 and not on_cuda:
            raise ModelError("fp16 needs a CUDA device; the CPU runs float32")
        self.cuda_graphs = cuda_graphs and on_cuda
        if cuda_graphs and not on_cuda:
            log.info("CUDA graphs ignored on %s", self.device)
        self.max_batch = max_batch
        model, self.info = load_checkpoint(checkpoint)
        self.dtype = torch.float16 if self.fp16 else torch.float32
        self.memory_format = torch.channels_last if on_cuda else torch.contiguous_format
        self.model = model.to(self.device, dtype=self.dtype, memory_format=self.memory_format)
        self.backend = f"torch-{self.device.type}"
        self._graphs: dict[tuple[int, ...], tuple[torch.cuda.CUDAGraph, torch.Tensor,
                                                  torch.Tensor]] = {}
        log.info("backend %s (%s%s), model %s", self.backend, "fp16" if self.fp16 else "fp32",
                 ", CUDA graphs" if self.cuda_graphs else "", self.info.label)

    def segment(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Crack probability maps (HxW float32), one per BGR uint8 image, in input order."""
        prepared = [preprocess(image, self.info) for image in images]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (x, _) in enumerate(prepared):
            groups.setdefault(x.shape, []).append(i)
        maps: list[np.ndarray | None] = [None] * len(images)
        for members in groups.values():
            for start in range(0, len(members), self.max_batch):
                chunk = members[start:start + self.max_batch]
                logits = self.logits(np.concatenate([prepared[i][0] for i in chunk]))
                for i, item in zip(chunk, logits, strict=True):
                    top, left, h, w = prepared[i][1]
                    maps[i] = crack_probability(item[:, top:top + h, left:left + w],
                                                self.info.classes)
        return maps  # type: ignore[return-value]  # every slot filled above

    @torch.no_grad()
    def logits(self, batch: np.ndarray) -> np.ndarray:
        """N x C x H x W float32 logits of an N x 3 x H x W pre-processed float32 batch."""
        x = torch.from_numpy(batch).to(self.device, dtype=self.dtype)
        x = x.contiguous(memory_format=self.memory_format)
        out = self._replay(x) if self.cuda_graphs else self.model(x)
        return out.float().cpu().numpy()

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
                    self.model(static_in)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self.model(static_in)
            self._graphs[key] = (graph, static_in, static_out)
            log.info("captured a CUDA graph for input %s", "x".join(map(str, key)))
        graph, static_in, static_out = self._graphs[key]
        static_in.copy_(x)
        graph.replay()
        return static_out
