"""SSLIteration / SSLEvalIteration: one step of LVM-Med's objective in MONAI's trainer."""

from __future__ import annotations

import pytest
import torch
from monai.engines import SupervisedEvaluator, SupervisedTrainer

from custom_components.engines.ssl import SSL_STATS, SSLEvalIteration, SSLIteration
from custom_components.networks.lvmmed_backbone import LVMMedResNet
from custom_components.ssl.objective import GraphMatchingObjective


def _batch(n: int = 8, size: int = 32, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    views = torch.rand(n, 1, size, size, generator=g)
    geom = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0]).expand(n, 5).clone()
    return {"view_s": views, "view_t": (views + 0.05 * torch.randn(views.shape, generator=g)).clamp(0, 1),
            "geom_s": geom, "geom_t": geom.clone()}


def _parts(seed: int = 0):
    torch.manual_seed(seed)
    net = LVMMedResNet("resnet18", in_channels=1)
    obj = GraphMatchingObjective(net.out_channels, projector_dim=16, graph_size=4, k=2, gcn_width=16,
                                 num_matches=2, solver="hungarian", seed=seed)
    return net, obj


def test_one_iteration_updates_backbone_and_objective_and_reports_the_stats():
    torch.set_num_threads(1)
    net, obj = _parts()
    params = list(net.parameters()) + list(obj.parameters())
    opt = torch.optim.SGD(params, lr=0.5)
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=[_batch()], network=net,
                                optimizer=opt, loss_function=obj, iteration_update=SSLIteration(), decollate=False)
    before = {k: v.detach().clone() for k, v in [*net.named_parameters(), *(("obj." + k, v) for k, v in obj.named_parameters())]}
    trainer.run()
    out = trainer.state.output
    assert set(out) == {"loss", "lr", *SSL_STATS} and out["lr"] == 0.5
    assert 0.0 <= out["matching_accuracy"] <= 1.0
    # the Hamming loss of 2 graphs of 4 nodes: 2 x (mismatched rows), mean over graphs; accuracy = matched share
    assert out["loss"] == pytest.approx(2 * 4 * (1 - out["matching_accuracy"]))
    assert 0.0 <= out["solver_seconds"] <= out["graph_seconds"] <= out["step_seconds"]
    assert out["graph_share"] == pytest.approx(out["graph_seconds"] / out["step_seconds"])
    after = dict([*net.named_parameters(), *(("obj." + k, v) for k, v in obj.named_parameters())])
    changed = [k for k in before if not torch.equal(before[k], after[k].detach())]
    assert out["matching_accuracy"] < 1.0  # random weights: a wrong match, so a non-zero IMLE gradient
    assert any(k.startswith("layer4") for k in changed) and any(k.startswith("obj.projector") for k in changed)


def test_batch_not_a_multiple_of_the_graph_size_is_refused():
    net, obj = _parts()
    it = SSLIteration(objective=obj)
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=[_batch(n=6)], network=net,
                                optimizer=torch.optim.SGD(net.parameters(), lr=0.1), loss_function=None, iteration_update=it,
                                decollate=False)
    with pytest.raises(ValueError, match="multiple of graph_size"):
        trainer.run()


def test_eval_iteration_is_noiseless_and_changes_nothing():
    net, obj = _parts(1)
    obj.noise = "gumbel"
    state = {k: v.clone() for k, v in net.state_dict().items()}
    ev = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=[_batch(seed=2)], network=net,
                             iteration_update=SSLEvalIteration(objective=obj), decollate=False)
    ev.run()
    first = ev.state.output["matching_accuracy"]
    ev.run()
    assert ev.state.output["matching_accuracy"] == first  # no noise: the same solve twice
    assert obj.noise == "gumbel"
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())  # eval mode: BN statistics kept
