"""HAM losses and box masks (spec ``specs/ham.md`` sections 4, 5, 11)."""

from __future__ import annotations

import math

import pytest
import torch

from custom_components.guidance import (
    HAM_LOSS_TERMS,
    HAMLoss,
    ham_abnormality_loss,
    ham_bound_loss,
    ham_box_loss,
    ham_classification_loss,
    ham_union_loss,
)

DEFAULT_WEIGHTS = {"loss_ano": 0.01, "loss_cls": 1.0, "loss_ex_cls": 0.5, "loss_bound": 0.001, "loss_union": 0.001}


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def random_batch(b=3, c=4, size=8, raw=4, seed=0, dtype=torch.float64):
    """Network-like outputs and targets; labels with a normal image, boxes on some images."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 1, 1]], dtype=dtype)[:b, :c]
    box_masks = (torch.rand(b, c, size, size, generator=g) > 0.6).to(dtype)
    box_tags = labels.clone()
    flags = torch.tensor([1.0, 0.0, 1.0], dtype=dtype)[:b]
    outputs = (
        torch.randn(b, 1, generator=g, dtype=dtype) * 2,  # o_a
        torch.randn(b, c, generator=g, dtype=dtype) * 2,  # o_c
        torch.rand(b, 1, size, size, generator=g, dtype=dtype),  # R_a
        torch.rand(b, c, size, size, generator=g, dtype=dtype),  # R_c
        torch.rand(b, 1, raw, raw, generator=g, dtype=dtype) * 2,  # M_a
        torch.rand(b, c, raw, raw, generator=g, dtype=dtype) * 2,  # M_c
    )
    return outputs, labels, box_masks, box_tags, flags


# --------------------------------------------------------------------------- ano / cls


def test_ano_and_cls_equal_torch_bce_and_the_closed_form():
    o_a = torch.tensor([[2.0], [-1.0], [0.5]], dtype=torch.float64)
    o_c = torch.tensor([[1.0, -2.0], [0.0, 3.0], [-0.5, 0.25]], dtype=torch.float64)
    labels = torch.tensor([[1, 0], [0, 0], [0, 1]])
    y_a = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    expected_ano = -(math.log(sigmoid(2.0)) + math.log(1 - sigmoid(-1.0)) + math.log(sigmoid(0.5))) / 3
    ano = ham_abnormality_loss(o_a, labels)
    assert ano.item() == pytest.approx(expected_ano, abs=1e-12)
    torch.testing.assert_close(ano, torch.nn.BCELoss()(torch.sigmoid(o_a[:, 0]), y_a))
    y = labels.double()
    p = torch.sigmoid(o_c)
    expected_cls = -(y * p.log() + (1 - y) * (1 - p).log()).mean()
    cls = ham_classification_loss(o_c, labels)
    torch.testing.assert_close(cls, expected_cls, atol=1e-12, rtol=0)
    torch.testing.assert_close(cls, torch.nn.BCELoss()(p, y))
    # (B,) logits are accepted as well as (B, 1)
    torch.testing.assert_close(ham_abnormality_loss(o_a[:, 0], labels), ano)


def test_logits_path_equals_probabilities_path_on_moderate_logits():
    g = torch.Generator().manual_seed(1)
    labels = (torch.rand(6, 5, generator=g) > 0.5).float()
    # float32 loses 1 - sigmoid(o) for o beyond ~8: scale 2 there, scale 4 (|o| up to ~15) in float64
    for dtype, scale, tol in ((torch.float32, 2.0, 1e-5), (torch.float64, 4.0, 1e-10)):
        o_c = torch.randn(6, 5, generator=g, dtype=dtype) * scale
        for fn, o in ((ham_classification_loss, o_c), (ham_abnormality_loss, o_c[:, :1])):
            torch.testing.assert_close(fn(o, labels), fn(o, labels, bce_on_probabilities=True), atol=tol, rtol=tol)


def test_probabilities_path_saturates_where_the_logits_path_does_not():
    # sigmoid(40) rounds to 1 in float32; the reference's BCE then clamps log(0) at -100
    o = torch.tensor([[40.0]])
    labels = torch.zeros(1, 1)
    assert ham_classification_loss(o, labels).item() == pytest.approx(40.0, rel=1e-6)
    assert ham_classification_loss(o, labels, bce_on_probabilities=True).item() == pytest.approx(100.0)
    o = torch.tensor([[40.0]], requires_grad=True)
    ham_classification_loss(o, labels, bce_on_probabilities=True).backward()
    assert o.grad.item() == 0.0  # the saturated reference loss gives no gradient at all


def test_probabilities_path_runs_under_cpu_autocast():
    o = torch.randn(2, 3)
    labels = torch.tensor([[1.0, 0, 0], [0, 1, 1]])
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = ham_classification_loss(o, labels, bce_on_probabilities=True)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ham_classification_loss(o, labels), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- ex_cls


def test_box_loss_closed_form_pools_over_images_then_averages_classes():
    # image 0, class 0: R = [[1, .5], [0, 0]], B = [[1, 1], [0, 0]] -> squared .25, mass 1.5 + 2
    # image 1, class 0: R = [[0, 0], [0, 1]], B = 0 -> squared 1, mass 1 (pooled: 1.25 / 4.5, not the mean of ratios)
    # class 1 supervised on image 1 only: R = B = [[1, 0], [0, 0]] -> 0
    # class 2 unsupervised (tag 0): garbage that must not count
    r = torch.zeros(2, 3, 2, 2, dtype=torch.float64)
    b = torch.zeros_like(r)
    r[0, 0] = torch.tensor([[1.0, 0.5], [0.0, 0.0]])
    b[0, 0] = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    r[1, 0, 1, 1] = 1.0
    r[1, 1, 0, 0] = b[1, 1, 0, 0] = 1.0
    r[:, 2] = 1.0
    tags = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    flags = torch.ones(2)
    expected = (1.25 / 4.5 + 0.0) / 2
    assert ham_box_loss(r, b, tags, flags).item() == pytest.approx(expected, abs=1e-12)
    assert ham_box_loss(r, b, tags, flags[:, None]).item() == pytest.approx(expected, abs=1e-12)
    # flag 0 removes image 1 from every class: class 0 is image 0 alone, class 1 has no sample left
    assert ham_box_loss(r, b, tags, torch.tensor([1.0, 0.0])).item() == pytest.approx(0.25 / 3.5, abs=1e-12)
    # the unsupervised class is ignored whatever its maps
    r2 = r.clone()
    r2[:, 2] = torch.rand(2, 2, 2, dtype=torch.float64)
    b2 = b.clone()
    b2[:, 2] = 1.0
    assert ham_box_loss(r2, b2, tags, flags).item() == pytest.approx(expected, abs=1e-12)


def test_box_loss_zero_when_maps_equal_boxes_and_at_most_one():
    g = torch.Generator().manual_seed(2)
    b = (torch.rand(4, 5, 6, 6, generator=g) > 0.5).double()
    tags = (torch.rand(4, 5, generator=g) > 0.3).double()
    flags = torch.tensor([1.0, 1.0, 0.0, 1.0])
    assert ham_box_loss(b.clone(), b, tags, flags).item() == 0.0
    for seed in range(20):
        g.manual_seed(seed)
        r = torch.rand(4, 5, 6, 6, generator=g, dtype=torch.float64) ** 0.3
        assert 0.0 <= ham_box_loss(r, b, tags, flags).item() <= 1.0
    # disjoint binary map and box: (R - B)^2 = R + B pointwise, the bound is attained
    disjoint = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    box = disjoint.clone()
    disjoint[..., :2, :] = 1.0
    box[..., 2:, :] = 1.0
    assert ham_box_loss(disjoint, box, torch.ones(1, 1), torch.ones(1)).item() == pytest.approx(1.0, abs=1e-12)


def test_box_loss_without_supervision_is_an_attached_zero():
    r = torch.rand(3, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    b = torch.ones(3, 2, 4, 4, dtype=torch.float64)
    for tags, flags in ((torch.zeros(3, 2), torch.ones(3)), (torch.ones(3, 2), torch.zeros(3))):
        out = ham_box_loss(r, b, tags, flags)
        assert out.item() == 0.0 and out.requires_grad
        (grad,) = torch.autograd.grad(out, r)
        assert torch.equal(grad, torch.zeros_like(grad))


# --------------------------------------------------------------------------- bound / union


def test_bound_loss_closed_forms():
    # one image, one positive class, 2 x 2 raw maps
    a = torch.full((1, 2, 2), 5.0, dtype=torch.float64)
    labels = torch.ones(1, 1)
    # C <= A with C in {0} or >> 0.75: 0
    c = torch.tensor([[[[2.0, 0.0], [3.0, 0.0]]]], dtype=torch.float64)
    assert ham_bound_loss(a, c, labels).item() == pytest.approx(0.0, abs=1e-12)
    # A = 0 on C's support: 1
    a_off = torch.tensor([[[0.0, 4.0], [0.0, 4.0]]], dtype=torch.float64)
    assert ham_bound_loss(a_off, c, labels).item() == pytest.approx(1.0, abs=1e-12)
    # C = (1, 1, .75, .75) under a large A: [3.5 - (2 sigmoid(25) + 2 * .75 * .5)] / 3.5
    c_soft = torch.tensor([[[[1.0, 1.0], [0.75, 0.75]]]], dtype=torch.float64)
    expected = (3.5 - (2 * sigmoid(25.0) + 2 * 0.75 * 0.5)) / 3.5
    assert ham_bound_loss(a, c_soft, labels).item() == pytest.approx(expected, abs=1e-12)
    # A caps C: C = (3, 3), A = (3, 1), S ~ 1 -> [6 - (3 + 1)] / 6
    a_cap = torch.tensor([[[3.0, 1.0], [0.0, 0.0]]], dtype=torch.float64)
    c_cap = torch.tensor([[[[3.0, 3.0], [0.0, 0.0]]]], dtype=torch.float64)
    assert ham_bound_loss(a_cap, c_cap, labels).item() == pytest.approx(2.0 / 6.0, abs=1e-12)
    # (B, 1, h, w) abnormality maps are accepted
    assert ham_bound_loss(a_cap[:, None], c_cap, labels).item() == pytest.approx(2.0 / 6.0, abs=1e-12)


def test_bound_loss_averages_over_positives_then_classes_and_ignores_negatives():
    # class 0 positive on images 0 (ratio 1) and 1 (ratio 0); class 1 positive on image 1 (ratio 1/3);
    # class 2 negative everywhere but with a large map (ignored)
    a = torch.zeros(3, 2, 2, dtype=torch.float64)
    c = torch.zeros(3, 3, 2, 2, dtype=torch.float64)
    a[1] = torch.tensor([[3.0, 1.0], [0.0, 0.0]])
    c[0, 0, 0, 0] = 2.0  # outside A (A = 0 on image 0)
    c[1, 0, 0, 0] = 2.0  # inside A
    c[1, 1] = torch.tensor([[3.0, 3.0], [0.0, 0.0]])  # ratio (6 - 4) / 6
    c[:, 2] = 9.0
    c[2, 0] = 7.0  # image 2 is normal for class 0: ignored
    labels = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 0]])
    expected = ((1.0 + 0.0) / 2 + 1.0 / 3.0) / 2
    assert ham_bound_loss(a, c, labels).item() == pytest.approx(expected, abs=1e-12)


def test_union_loss_closed_forms():
    labels = torch.tensor([[1, 1]])
    # A <= U = max_c C with A in {0} or >> 0.75: 0
    a = torch.tensor([[[2.0, 0.0], [3.0, 0.0]]], dtype=torch.float64)
    c = torch.tensor([[[[2.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [4.0, 1.0]]]], dtype=torch.float64)
    assert ham_union_loss(a, c, labels).item() == pytest.approx(0.0, abs=1e-12)
    # U = 0 on A's support: 1
    c_off = torch.tensor([[[[0.0, 5.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 5.0]]]], dtype=torch.float64)
    assert ham_union_loss(a, c_off, labels).item() == pytest.approx(1.0, abs=1e-12)
    # A = (1, .75, 0, 0), U large: [1.75 - (sigmoid(25) + .75 * .5)] / 1.75
    a_soft = torch.tensor([[[1.0, 0.75], [0.0, 0.0]]], dtype=torch.float64)
    expected = (1.75 - (sigmoid(25.0) + 0.75 * 0.5)) / 1.75
    assert ham_union_loss(a_soft, c + 10.0, labels).item() == pytest.approx(expected, abs=1e-12)
    # only the positive classes make up U: a negative class covering A does not help
    assert ham_union_loss(a, c + 10.0, torch.tensor([[0, 0]])).item() == 0.0  # normal image: no term
    c_neg = torch.zeros(1, 2, 2, 2, dtype=torch.float64)
    c_neg[:, 1] = 10.0
    assert ham_union_loss(a, c_neg, torch.tensor([[1, 0]])).item() == pytest.approx(1.0, abs=1e-12)


def test_union_loss_is_the_mean_over_abnormal_images():
    a = torch.tensor([[[2.0, 0.0]], [[2.0, 2.0]], [[5.0, 5.0]]], dtype=torch.float64)  # (3, 1, 2)
    c = torch.zeros(3, 1, 1, 2, dtype=torch.float64)
    c[0, 0, 0, 0] = 2.0  # covers image 0: 0
    c[1, 0, 0, 0] = 2.0  # half of image 1: 1/2
    labels = torch.tensor([[1], [1], [0]])  # image 2 normal: ignored
    assert ham_union_loss(a, c, labels).item() == pytest.approx(0.25, abs=1e-12)


# --------------------------------------------------------------------------- the module


def test_total_is_the_weighted_sum_of_terms():
    outputs, labels, masks, tags, flags = random_batch()
    out = HAMLoss()(*outputs, labels, masks, tags, flags)
    assert set(out) == {"loss", *HAM_LOSS_TERMS}
    torch.testing.assert_close(out["loss"], sum(DEFAULT_WEIGHTS[k] * out[k] for k in HAM_LOSS_TERMS), atol=1e-12, rtol=0)
    # the terms are the functions', and every term is non-trivial on this batch
    torch.testing.assert_close(out["loss_ex_cls"], ham_box_loss(outputs[3], masks, tags, flags))
    torch.testing.assert_close(out["loss_union"], ham_union_loss(outputs[4], outputs[5], labels))
    assert all(out[k].item() > 0 for k in HAM_LOSS_TERMS)
    weights = dict(weight_ano=2.0, weight_cls=0.0, weight_ex_cls=3.0, weight_bound=5.0, weight_union=7.0)
    custom = HAMLoss(**weights)(*outputs, labels, masks, tags, flags)
    expected = 2 * out["loss_ano"] + 3 * out["loss_ex_cls"] + 5 * out["loss_bound"] + 7 * out["loss_union"]
    torch.testing.assert_close(custom["loss"], expected, atol=1e-12, rtol=0)
    # R_a is not read: None or any other map gives the same losses
    again = HAMLoss()(outputs[0], outputs[1], None, *outputs[3:], labels, masks, tags, flags)
    for k in out:
        assert torch.equal(out[k], again[k])
    with pytest.raises(ValueError):
        HAMLoss(weight_cls=-1.0)


def test_module_probabilities_option_matches_on_moderate_logits():
    outputs, labels, masks, tags, flags = random_batch(dtype=torch.float32)
    a = HAMLoss()(*outputs, labels, masks, tags, flags)
    b = HAMLoss(bce_on_probabilities=True)(*outputs, labels, masks, tags, flags)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5)


def test_gradcheck_each_term_in_float64():
    outputs, labels, masks, tags, flags = random_batch(b=3, c=3, size=4, raw=3, seed=3)
    o_a, o_c, _, r_c, m_a, m_c = (t.detach().clone().requires_grad_(True) for t in outputs)
    # keep raw maps away from ties of min(C, A) and max_c, and near the soft-mask threshold 0.75
    with torch.no_grad():
        m_a.copy_(0.6 + 0.3 * torch.rand_like(m_a))
        m_c.copy_(0.6 + 0.3 * torch.rand_like(m_c))
        r_c.copy_(0.1 + 0.8 * r_c)
    for on_probabilities in (False, True):
        assert torch.autograd.gradcheck(ham_abnormality_loss, (o_a, labels, on_probabilities))
        assert torch.autograd.gradcheck(ham_classification_loss, (o_c, labels, on_probabilities))
    assert torch.autograd.gradcheck(lambda r: ham_box_loss(r, masks, tags, flags), (r_c,))
    assert torch.autograd.gradcheck(lambda a, c: ham_bound_loss(a, c, labels), (m_a, m_c))
    assert torch.autograd.gradcheck(lambda a, c: ham_union_loss(a, c, labels), (m_a, m_c))


@pytest.mark.parametrize("case", ["all_normal", "no_boxes", "empty_maps"])
def test_degenerate_batches_give_finite_values_and_gradients(case):
    outputs, labels, masks, tags, flags = random_batch(dtype=torch.float32)
    outputs = [t.detach().clone() for t in outputs]
    if case == "all_normal":
        labels = torch.zeros_like(labels)
        tags = labels.clone()
    elif case == "no_boxes":
        masks = torch.zeros_like(masks)
        flags = torch.zeros_like(flags)
    else:
        outputs[2:] = [torch.zeros_like(t) for t in outputs[2:]]
    leaves = [t.requires_grad_(True) for t in outputs]
    out = HAMLoss()(*leaves, labels, masks, tags, flags)
    assert all(torch.isfinite(v) for v in out.values())
    if case == "all_normal":
        for k in ("loss_ex_cls", "loss_bound", "loss_union"):
            assert out[k].item() == 0.0 and out[k].requires_grad
    if case == "no_boxes":
        assert out["loss_ex_cls"].item() == 0.0
    if case == "empty_maps":
        assert out["loss_bound"].item() == 0.0 and out["loss_union"].item() == 0.0
    out["loss"].backward()
    for t in leaves[:2] + leaves[3:]:
        assert t.grad is not None and torch.isfinite(t.grad).all()


def test_half_inputs_are_computed_in_float32():
    outputs, labels, masks, tags, flags = random_batch(dtype=torch.float32)
    half = [t.half() for t in outputs]
    out = HAMLoss()(*half, labels, masks, tags, flags)
    assert all(v.dtype == torch.float32 for v in out.values())
    ref = HAMLoss()(*[t.float() for t in half], labels, masks, tags, flags)
    for k in out:
        torch.testing.assert_close(out[k], ref[k])


def test_shape_errors():
    outputs, labels, masks, tags, flags = random_batch()
    with pytest.raises(ValueError, match="box_masks"):
        ham_box_loss(outputs[3], masks[:, :2], tags, flags)
    with pytest.raises(ValueError, match="labels"):
        ham_classification_loss(outputs[1], labels[:, :2])
    with pytest.raises(ValueError, match="raw_classes"):
        ham_bound_loss(outputs[4], outputs[5][..., :2], labels)
