"""The digits feature network (shipped classifier), its training stage, and the Fréchet distance."""
import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from amedlab.data.digits import digits_split, load_digits_tensors
from amedlab.models.digits_features import SHIPPED_CLASSIFIER, digits_features, load_digits_classifier
from amedlab.evaluation.fid import feature_statistics, fid_from_features, frechet_distance
from amedlab.stages import train_features
from amedlab.training import features as features_stage



def test_shipped_classifier_accuracy_and_features():
    assert SHIPPED_CLASSIFIER.is_file() and SHIPPED_CLASSIFIER.stat().st_size < 1e6
    clf = load_digits_classifier()
    images, labels = load_digits_tensors()
    _, held_out = digits_split()
    with torch.no_grad():
        acc = (clf(images[held_out]).argmax(1) == labels[held_out]).float().mean().item()
    assert acc >= 0.97, acc  # measured: 0.9917 (357 / 360)
    feats = digits_features(images[held_out], clf)
    assert feats.shape == (360, 64) and feats.dtype == torch.float64
    assert (feats >= 0).all() and (feats.std(0) > 0).sum() > 32  # post-ReLU, most units active
    # 16x16 inputs are area-downsampled to 8x8 first: nearest-upsampled digits give identical features
    up = torch.nn.functional.interpolate(images[held_out], scale_factor=2, mode="nearest")
    torch.testing.assert_close(digits_features(up, clf), feats)


def test_frechet_distance_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=3), rng.normal(size=3)
    s1, s2 = np.diag([1.0, 2.0, 3.0]), np.diag([4.0, 1.0, 0.5])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(np.diag(s1)) - np.sqrt(np.diag(s2))) ** 2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    # a rotated pair: the distance is rotation invariant
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    assert frechet_distance(q @ mu1, q @ s1 @ q.T, q @ mu2, q @ s2 @ q.T) == pytest.approx(expected, rel=1e-6)


def test_fid_on_digits_features_separates_real_from_noise():
    clf = load_digits_classifier()
    images, _ = load_digits_tensors()
    feats = digits_features(images, clf)
    # zero up to round-off: 13 dead ReLU units make the covariance singular, and sqrt(1e-12) = 1e-6
    assert fid_from_features(feats, feats) == pytest.approx(0.0, abs=1e-4)
    perm = torch.randperm(1797, generator=torch.Generator().manual_seed(0))
    floor = fid_from_features(feats[perm[:898]], feats[perm[898:]])
    noise = digits_features(torch.rand(898, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1, clf)
    to_noise = fid_from_features(noise, feats[perm[898:]])
    assert 0 < floor < 0.05 * to_noise, (floor, to_noise)
    mu, cov = feature_statistics(feats)
    assert mu.shape == (64,) and cov.shape == (64, 64)


def test_random_shift_moves_the_digit():
    img = torch.full((1, 1, 8, 8), -1.0)
    img[0, 0, 3, 4] = 1.0
    torch.manual_seed(0)
    shifted = features_stage.random_shift(img.expand(64, 1, 8, 8), max_shift=1)
    positions = {tuple((s[0] == 1).nonzero()[0].tolist()) for s in shifted}
    assert positions <= {(r, c) for r in (2, 3, 4) for c in (3, 4, 5)} and len(positions) >= 5
    assert ((shifted == 1).sum((1, 2, 3)) == 1).all()  # nothing lost, background filled with -1
    assert torch.equal(features_stage.random_shift(img, 0), img)


def test_train_features_stage_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = OmegaConf.create({
        "seed": 0, "device": "cpu", "logger": {"name": "none"},
        "dataset": {"name": "digits", "image_size": 8, "upsample_mode": "bilinear", "held_out_fraction": 0.2,
                    "split_seed": 0},
        "train": {"features": {"steps": 50, "max_minutes": 2, "batch_size": 128, "lr": 1e-2,
                               "weight_decay": 1e-4, "max_shift": 1, "channels": 16, "feature_dim": 32,
                               "dropout": 0.1, "val_every_steps": 25, "num_threads": None}},
    })
    acc = train_features.run(cfg)
    out = tmp_path / "outputs" / "no_hydra"
    assert acc > 0.6  # measured: 0.78 after 50 steps (chance: 0.1)
    assert json.loads((out / "metrics.json").read_text())["held_out_accuracy"] == pytest.approx(acc)
    clf = load_digits_classifier(out / "digits_classifier.safetensors")
    assert clf.feature_dim == 32
    with pytest.raises(ValueError, match=r"train.features.steps=0"):
        train_features.run(OmegaConf.merge(cfg, {"train": {"features": {"steps": 0}}}))
