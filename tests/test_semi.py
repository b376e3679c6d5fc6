"""U2PL (training.semi): a tiny semi-supervised epoch of the deploy model, with the full
contrastive term and the light one; the unsupervised loss really comes from the unlabelled
images; the teacher is the student's moving average; reliable pseudo-labels by entropy."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from support import tiny_config, write_crack_dataset

from training import loop as train
from training import semi
from training.config import TrainConfig
from training.losses import get_loss
from training.models import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("semi")
    write_crack_dataset(root / "labelled", count=6)
    write_crack_dataset(root / "frames", count=6, seed=3)
    return root / "labelled", root / "frames"


def u2pl_config(folders, out, **fields) -> TrainConfig:
    base = tiny_config(folders[0], out, epochs=fields.pop("epochs", 1))
    return TrainConfig(**{**base.model_dump(), "semi": "u2pl", "ema_decay": 0.9,
                          "unlabeled": [folders[1]], "num_threads": 1, "anchors": 8,
                          "negatives": 16, "memory": 64, **fields})


@pytest.mark.parametrize("model, contrast", [
    ("mobilenet_aspp", "full"), ("mobilenet_aspp", "light"),
    ("deeplabv3plus_resnet", "full"),  # the study's architecture (ResNet-18 here: small)
])
def test_a_tiny_u2pl_epoch_learns_from_the_unlabelled_frames(folders, tmp_path, model,
                                                             contrast):
    params = {"depth": 18, "aspp_channels": 32, "skip_channels": 16} if model != \
        "mobilenet_aspp" else {}
    cfg = u2pl_config(folders, tmp_path / contrast, contrast=contrast, epochs=2, model=model,
                      model_params=params)
    result = train.main(cfg)
    assert result["epochs"] == 2 and result["ema"]
    history = json.loads((tmp_path / contrast / "history.json").read_text())
    for epoch in history:
        assert epoch["loss_unsupervised"] > 0 and epoch["loss_supervised"] > 0
        assert epoch["loss_contrast"] >= 0
    assert history[0]["unreliable_share"] > history[1]["unreliable_share"]  # alpha_t falls
    checkpoint = torch.load(tmp_path / contrast / "best.pt", map_location="cpu",
                            weights_only=False)
    build_model(cfg.model, num_classes=1, **cfg.model_params).load_state_dict(
        checkpoint["model"])  # the teacher's weights: a plain deploy model


def _student_and_teacher(cfg):
    torch.manual_seed(0)
    student = build_model(cfg.model, num_classes=1, **cfg.model_params)
    ema = train.build_ema(cfg, student)
    ema.update_parameters(student)
    return student, ema


def test_the_unsupervised_loss_comes_from_the_unlabelled_images(folders, tmp_path):
    cfg = u2pl_config(folders, tmp_path)
    student, ema = _student_and_teacher(cfg)
    u2pl = semi.U2PL(cfg, student, ema.module, torch.device("cpu"))
    loss_fn = get_loss(cfg.loss, 1)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 64, 64, generator=generator)
    masks = (torch.rand(2, 1, 64, 64, generator=generator) > 0.9).float()
    valid = torch.ones(2, 64, 64, dtype=torch.bool)
    frames_a = torch.randn(2, 3, 64, 64, generator=generator)
    frames_b = torch.randn(2, 3, 64, 64, generator=generator) * 2
    strong = frames_a.clone().requires_grad_()
    a = u2pl.losses(student, ema.module, images, masks, frames_a, strong, valid, loss_fn, 0.2)
    a["unsupervised"].backward()
    assert strong.grad is not None and strong.grad.abs().sum() > 0  # the student saw them
    b = u2pl.losses(student, ema.module, images, masks, frames_b, frames_b, valid, loss_fn, 0.2)
    assert a["unsupervised"].item() != pytest.approx(b["unsupervised"].item())
    # no pixel reliable (all cut out): nothing to learn from them
    none = u2pl.losses(student, ema.module, images, masks, frames_a, frames_a,
                       torch.zeros_like(valid), loss_fn, 0.2)
    assert none["unsupervised"].item() == 0


def test_the_teacher_is_the_moving_average_of_the_student(folders, tmp_path):
    cfg = u2pl_config(folders, tmp_path, contrast="light")
    student, ema = _student_and_teacher(cfg)
    u2pl = semi.U2PL(cfg, student, ema.module, torch.device("cpu"))
    before = [p.detach().clone() for p in ema.module.parameters()]
    labelled = [(torch.randn(2, 3, 64, 64), (torch.rand(2, 1, 64, 64) > 0.9).float())]
    unlabelled = [(torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64),
                   torch.ones(2, 64, 64, dtype=torch.bool))]
    optimizer = torch.optim.AdamW(student.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    semi.train_one_epoch_u2pl(student, labelled, unlabelled, optimizer, scheduler,
                              get_loss(cfg.loss, 1), 1, 0, 1, u2pl, ema,
                              device=torch.device("cpu"), progress=False)
    moved = 0
    for old, new, now in zip(before, ema.module.parameters(), student.parameters(), strict=True):
        assert torch.allclose(new, 0.9 * old + 0.1 * now, atol=1e-6)
        moved += int(not torch.equal(old, now))
    assert moved > 0  # the student did change


def test_a_supervised_warm_up_then_the_teacher_restarts_as_the_student(folders, tmp_path):
    """U2PL's start: the first half of the steps learn from the labels alone (no unlabelled
    batch is drawn); then the teacher becomes a copy of the student and averages on from it."""
    cfg = u2pl_config(folders, tmp_path, contrast="full", supervised_warmup=0.5)
    student, ema = _student_and_teacher(cfg)
    u2pl = semi.U2PL(cfg, student, ema.module, torch.device("cpu"))
    labelled = [(torch.randn(2, 3, 64, 64), (torch.rand(2, 1, 64, 64) > 0.9).float())
                for _ in range(2)]
    drawn = []

    class Unlabelled:
        def __iter__(self):
            while True:
                drawn.append(len(drawn))
                yield (torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64),
                       torch.ones(2, 64, 64, dtype=torch.bool))

    optimizer = torch.optim.AdamW(student.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    after_warm_up = {}
    restart = u2pl.restart_teacher

    def spy(s, t):
        after_warm_up.update({k: v.clone() for k, v in s.state_dict().items()})
        restart(s, t)

    u2pl.restart_teacher = spy
    first = semi.train_one_epoch_u2pl(student, labelled[:1], Unlabelled(), optimizer, scheduler,
                                      get_loss(cfg.loss, 1), 1, 0, 2, u2pl, ema,
                                      device=torch.device("cpu"), progress=False)
    assert first["loss_unsupervised"] == 0 and not drawn and not after_warm_up
    second = semi.train_one_epoch_u2pl(student, labelled[1:], Unlabelled(), optimizer,
                                       scheduler, get_loss(cfg.loss, 1), 2, 1, 2, u2pl, ema,
                                       device=torch.device("cpu"), progress=False)
    assert second["loss_unsupervised"] > 0 and len(drawn) == 1 and after_warm_up
    teacher = dict(ema.module.named_parameters())
    for name, now in student.named_parameters():  # one average step from the restart
        assert torch.allclose(teacher[name], 0.9 * after_warm_up[name] + 0.1 * now,
                              atol=1e-5), name


def test_reliable_pseudo_labels_leave_out_the_most_uncertain_share():
    rng = np.random.default_rng(0)
    crack = torch.from_numpy(rng.uniform(0, 1, (1, 1, 40, 50)).astype(np.float32))
    probs = torch.cat([1 - crack, crack], dim=1)
    valid = torch.ones(1, 40, 50, dtype=torch.bool)
    valid[:, :10] = False
    labels, reliable, entropy = semi.pseudo_labels(probs, valid, 0.2)
    assert torch.equal(labels, (crack[:, 0] > 0.5).long())
    assert not reliable[~valid].any()
    assert reliable.sum().item() == pytest.approx(0.8 * valid.sum().item(), abs=2)
    assert entropy[reliable].max() <= entropy[valid & ~reliable].min()
    assert semi.pseudo_labels(probs, valid, 0.0)[1].sum() == valid.sum()
    cfg = TrainConfig(unreliable_start=0.2)
    assert [semi.unreliable_share(cfg, t) for t in (0, 0.5, 1)] == pytest.approx([0.2, 0.1, 0])
    # two classes: the negative window is the second-ranked class
    window = semi.rank_window(probs, (2, 20))
    assert torch.equal(window[:, 1], crack[:, 0] <= 0.5)


def test_u2pl_needs_a_teacher_and_unlabelled_frames(folders, tmp_path):
    with pytest.raises(ValueError, match="ema_decay"):
        semi.check(u2pl_config(folders, tmp_path, ema_decay=None))
    with pytest.raises(Exception, match="--unlabeled"):
        semi.check(u2pl_config(folders, tmp_path, unlabeled=[]))
    with pytest.raises(Exception, match="no such folder"):
        semi.unlabeled_images([tmp_path / "nothing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception, match="no images"):
        semi.unlabeled_images([tmp_path / "empty"])
    # a dataset's images/, and a recording's camera folders
    recording = tmp_path / "recording"
    for camera in ("cam0", "cam1"):
        (recording / camera).mkdir(parents=True)
        for seq in range(2):
            (recording / camera / f"{seq:08d}.png").write_bytes(b"")
    (recording / "frames.csv").write_text("camera,seq\n")
    assert [p.parent.name for p in semi.unlabeled_images([recording, folders[1]])] == \
        ["cam0", "cam0", "cam1", "cam1"] + ["images"] * 6
    with pytest.raises(ValueError, match="negative_ranks"):
        TrainConfig(negative_ranks=(3, 2))
    assert copy.deepcopy(u2pl_config(folders, tmp_path)).semi == "u2pl"


@pytest.mark.slow
def test_u2pl_under_torchrun_on_cpu(folders, tmp_path):
    import os
    import subprocess
    import sys

    import yaml

    recipe = tmp_path / "u2pl.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": "mobilenet_aspp", "crop": 64, "batch_size": 2, "epochs": 1, "num_threads": 1,
        "val_fraction": 0.25, "device": "cpu", "semi": "u2pl", "ema_decay": 0.9,
        "anchors": 8, "negatives": 16, "memory": 64}))
    out = tmp_path / "ddp"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
         "--nproc_per_node=2", "-m", "crackscan", "train", "--config", str(recipe),
         "--data", str(folders[0]), "--unlabeled", str(folders[1]), "--out", str(out)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("U2PL: ") == 1 and done.stderr.count("epoch 1/1") == 1
    history = json.loads((out / "history.json").read_text())
    assert history[0]["loss_unsupervised"] > 0
    build_model("mobilenet_aspp").load_state_dict(
        torch.load(out / "best.pt", map_location="cpu", weights_only=False)["model"])
