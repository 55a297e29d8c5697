"""The unlearning step's size, the other images' loss change, and the step-size sweep."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from t2i_common.attribution import regime as R
from t2i_common.attribution import unlearning as A
from t2i_common.attribution.baselines import rank_scores, retrieval_table


def test_paper_regime_constants():
    assert R.PAPER_N == 118_287
    assert R.PAPER_LR_OVER_N == pytest.approx(8.4540e-8, rel=1e-4)
    # the toy's own 160 images give a step 739x the paper's
    assert (0.01 / 160) / R.PAPER_LR_OVER_N == pytest.approx(739.3, rel=1e-3)


def test_step_size_closed_form():
    m = torch.nn.Linear(2, 2, bias=True)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))   # norm 5
        m.bias.copy_(torch.tensor([0.0, 0.0]))
    d = {"weight": torch.tensor([[0.3, 0.0], [0.0, -0.4]], dtype=torch.float64)}   # norm 0.5
    s = R.step_size(m, d)
    assert s["relative_norm"] == pytest.approx(0.1)
    assert s["max_tensor_relative_norm"] == pytest.approx(0.1)
    assert s["max_abs_change"] == pytest.approx(0.4)
    assert s["weight_rms"] == pytest.approx(2.5)     # sqrt(25 / 4)
    # two tensors: the joint ratio weighs by the weights' norms, the max is per tensor
    d2 = dict(d, bias=torch.tensor([1.0, 0.0], dtype=torch.float64))
    with torch.no_grad():
        m.bias.copy_(torch.tensor([0.0, 2.0]))
    s2 = R.step_size(m, d2)
    assert s2["relative_norm"] == pytest.approx(np.sqrt((0.25 + 1.0) / (25 + 4)))
    assert s2["max_tensor_relative_norm"] == pytest.approx(0.5)
    with pytest.raises(KeyError, match="no parameter"):
        R.step_size(m, {"nope": torch.zeros(1)})
    with pytest.raises(ValueError, match="empty"):
        R.step_size(m, {})


def test_others_loss_change_leaves_out_the_ground_truth():
    before = np.array([1.0, 1.0, 1.0, 1.0, 3.0, 3.0, 3.0, 3.0])   # 4 images, then their flips
    after = before + np.array([5.0, 0.1, 0.2, 0.3, 5.0, 0.3, 0.2, 0.1])
    c = R.others_loss_change(after, before, truth=[0])
    assert c["mean"] == pytest.approx(0.2) and c["min"] == pytest.approx(0.2)
    assert c["max"] == pytest.approx(0.2)
    assert c["relative_mean"] == pytest.approx(0.2 / 2.0)
    with pytest.raises(ValueError, match="equal"):
        R.others_loss_change(after[:6], before, [0])
    with pytest.raises(ValueError, match="ground truth"):
        R.others_loss_change(after, before, [0, 1, 2, 3])


@pytest.fixture(scope="module")
def tiny_setup(tiny_model, tiny_images):
    caps = [["a red circle"], ["a blue square"], ["a green triangle"], ["a purple diamond"]]
    data = A.TrainingSet.from_images(tiny_model, np.stack(tiny_images), caps)
    loss = A.training_loss(tiny_model, data, time_samples=4, progress=False)
    fisher = A.fisher_diagonal(tiny_model, data, "all", epochs=1, batch_size=4, seed=0,
                               progress=False)
    q = A.QuerySet(data.latents[[0, 2]], data.text_emb[[0, 2], 0])
    return SimpleNamespace(base=tiny_model, data=data, queries=q, fisher=fisher,
                           pretrain_loss=loss, truth=[np.array([0]), np.array([2])],
                           settings=dict(time_samples=4, seed=0))


def test_step_sweep_equals_attribution_by_unlearning(tiny_setup):
    s, N = tiny_setup, 1000
    lrs = [1e-4, 1e-3]
    sweep = R.step_sweep(s, lrs, n_batches=1, batch_size=4, k=2, progress=False)
    assert list(sweep.index) == lrs
    for x in lrs:
        res = A.attribute_by_unlearning(s.base, s.data, s.queries, s.fisher, s.pretrain_loss,
                                        lr=x * N, n_train=N, n_batches=1, batch_size=4,
                                        time_samples=4, seed=0, progress=False)
        ranks = rank_scores(np.stack([res[i]["influence"] for i in range(2)]))
        ref = retrieval_table({"u": ranks}, s.truth, k=2).loc["u"]
        assert sweep.loc[x, "found"] == ref["found"] and sweep.loc[x, "mAP"] == pytest.approx(ref["mAP"])
    # the step is linear in lr / N; the model is left untouched
    assert sweep.loc[1e-3, "relative_step"] == pytest.approx(10 * sweep.loc[1e-4, "relative_step"])
    np.testing.assert_array_equal(A.training_loss(s.base, s.data, time_samples=4, progress=False),
                                  s.pretrain_loss)
    with pytest.raises(ValueError, match="positive"):
        R.step_sweep(s, [0.0], progress=False)
