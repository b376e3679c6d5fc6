"""``crackscan train-fractions``: the labelled-fraction experiment on a tiny pool, through the
command: each fraction's labelled images, the same labels for the supervised and the U2PL run,
the rest of the pool (never its validation ids) as U2PL's unlabelled images, active selection by
``crackscan select``'s ranking, a table that a second start keeps; bad input refused in one line."""

from __future__ import annotations

import json
from fractions import Fraction

import pytest
import yaml
from support import crackscan, write_crack_dataset

from training import data as ds
from training.fractions import (
    independent_pool,
    labelled_count,
    parse_fraction,
    photographs,
    score_pool,
)
from training.select import choose

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RECIPE = {"model": "mobilenet_aspp", "classes": ["crack"], "freeze_bn": True,
          "val_fraction": 0.25, "crop": 64, "batch_size": 2, "epochs": 5, "lr": 0.001,
          "loss": "bce_dice", "ema_decay": 0.9, "semi": "u2pl", "contrast": "light",
          "anchors": 8, "negatives": 16, "memory": 64, "num_threads": 1, "threshold": 0.5,
          "seed": 0}


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("fractions")
    write_crack_dataset(root / "pool", count=18, seed=5, test_count=2)  # 16 train ids
    write_crack_dataset(root / "other", count=4, seed=9, test_count=0)
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    args = ["train-fractions", "--config", recipe, "--data", root / "pool",
            "--init", tiny_model.model, "--steps", 2, "--fractions", "1/4,1",
            "--held-out", root / "other", "--out", root / "out"]
    done = crackscan(*args)
    return root, args, json.loads(done.stdout)


def test_each_run_gets_its_fraction_and_u2pl_the_rest_of_the_pool(experiment):
    root, _, printed = experiment
    table = json.loads((root / "out" / "fractions.json").read_text())
    pool_ids, val_ids = ds.train_val_split(root / "pool", 0.25, 0)
    assert (table["pool_images"], table["val_images"]) == (12, 4)
    rows = {(r["fraction"], r["strategy"], r["method"]): r for r in table["rows"]}
    # a quarter of 12: random and active, each trained both ways; all 12: supervised only
    assert set(rows) == {("1/4", s, m) for s in ("random", "active")
                         for m in ("supervised", "u2pl")} | {("1", "all", "supervised")}
    assert len(printed["rows"]) == 5
    for strategy in ("random", "active"):
        sup, semi = rows["1/4", strategy, "supervised"], rows["1/4", strategy, "u2pl"]
        assert sup["labelled"] == 3 and sup["chosen"] == semi["chosen"]
        assert set(sup["chosen"]) <= set(pool_ids)
        data = root / "out" / "data" / f"{strategy}-3"
        assert (data / "train.txt").read_text().split() == sup["chosen"]
        assert (data / "val.txt").read_text().split() == val_ids
        unlabelled = {p.stem for p in (root / "out" / "data" / f"{strategy}-3-unlabelled"
                                       / "images").iterdir()}
        assert unlabelled == set(pool_ids) - set(sup["chosen"])  # never the validation ids
        config = json.loads((root / "out" / "runs" / "recipe" / f"{strategy}-3-u2pl"
                             / "config.json").read_text())
        assert config["semi"] == "u2pl" and config["epochs"] == 1
        assert config["epoch_images"] == 4  # 2 steps of 2, however few the labels
        history = json.loads((root / "out" / "runs" / "recipe" / f"{strategy}-3-u2pl"
                              / "history.json").read_text())
        assert history[0]["loss_unsupervised"] > 0
        assert json.loads((root / "out" / "runs" / "recipe" / f"{strategy}-3-supervised"
                           / "config.json").read_text())["semi"] == "none"
    assert rows["1", "all", "supervised"]["chosen"] == pool_ids
    for row in table["rows"]:
        assert set(row["scores"]) == {"val", "other"}
        assert row["scores"]["val"]["images"] == 4 and row["scores"]["other"]["images"] == 4
        assert 0 <= row["scores"]["val"]["ods_strict"] <= row["scores"]["val"]["ods_2px"] <= 1
    assert "| 1/4 | 3 | active | u2pl |" in (root / "out" / "fractions.md").read_text()


def test_active_selection_is_select_s_ranking_of_the_starting_model(experiment, tiny_model):
    root, _, _ = experiment
    pool_ids, _ = ds.train_val_split(root / "pool", 0.25, 0)
    candidates, features = score_pool(tiny_model.model, root / "pool", pool_ids, 512)
    expected = sorted(pool_ids[i] for i in choose(candidates, features, 3, "active"))
    table = json.loads((root / "out" / "fractions.json").read_text())
    active = [r for r in table["rows"] if r["strategy"] == "active"]
    assert all(r["chosen"] == expected for r in active)
    assert len({c.uncertainty for c in candidates}) > 1  # the model's doubt differs per image


def test_a_second_start_keeps_the_rows_it_has(experiment):
    root, args, _ = experiment
    before = (root / "out" / "fractions.json").read_text()
    done = crackscan(*args)
    assert json.loads(done.stdout)["rows"][0]["train_minutes"] is not None
    assert (root / "out" / "fractions.json").read_text() == before  # nothing trained again


def test_labelled_counts_and_fractions():
    assert [labelled_count(f, 270) for f in (Fraction(1, 16), Fraction(1, 8), Fraction(1))] \
        == [17, 34, 270]
    assert labelled_count(Fraction(1, 16), 5) == 1
    assert parse_fraction("0.125") == Fraction(1, 8) and parse_fraction(" 1/2") == Fraction(1, 2)
    for bad in ("0", "3/2", "a", "1/0"):
        with pytest.raises(ValueError):
            parse_fraction(bad)


@pytest.mark.parametrize("flags, message", [
    (["--fractions", "1/0"], "train-fractions: a labelled fraction is written 1/8"),
    (["--strategies", "clever"], "strategy 'clever'"),
])
def test_bad_options_are_one_line(experiment, tmp_path, flags, message):
    root, args, _ = experiment
    args = [str(a) for a in args]
    args[args.index("--out") + 1] = str(tmp_path / "out")
    for flag, value in zip(flags[::2], flags[1::2], strict=True):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    done = crackscan(*args, check=False)
    assert done.returncode != 0 and message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "fractions.json").exists()


def test_views_of_a_validation_photograph_stay_out_of_the_pool():
    ids = ["train-11", "train-11-2", "train-11-3", "train-12", "train-13-1", "train-13-2",
           "001", "002-1", "x-7"]
    photo = photographs(ids)
    assert photo["train-11-3"] == photo["train-11-2"] == photo["train-11"] == "train-11"
    assert photo["train-13-1"] == photo["train-13-2"] == "train-13"  # the original not among them
    assert photo["train-12"] == "train-12" and photo["002-1"] == "002-1" and photo["x-7"] == "x-7"
    assert independent_pool(["train-11", "train-11-3", "train-12", "train-13-1", "001", "x-7"],
                            ["train-11-2", "train-13-2", "002-1"]) == ["train-12", "001", "x-7"]
