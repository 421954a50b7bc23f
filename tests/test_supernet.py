"""Tests for aanas.supernet and aanas.ops.elastic: path == extracted static subnet, slicing."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from aanas.config import ELASTIC_DIMS, SupernetRecipe
from aanas.models import create_model
from aanas.ops.elastic import ElasticAttention, split_index
from aanas.space import SearchSpace
from aanas.spec import ArchSpec, resolve
from aanas.supernet import PathSampler, SuperNet, param_dimension, recalibrate_bn, train_supernet

# A ResNet-family space (basic + bottleneck blocks, width choice) small enough for CPU tests.
_RESNET_SPACE = {
    "name": "tiny_resnet",
    "base": "test_resnet",
    "width": [0.5, 1.0],
    "stages": {
        1: {
            "depth": [1, 2],
            "kernel": [3, 5],
            "aa": {
                "placement": ["none", "all"],
                "kappa": [0.25],
                "upsilon": [0.25, 0.5],
                "heads": [2, 4],
            },
        },
        2: {
            "expansion": [0.25, 0.5],
            "aa": {
                "placement": ["none", "last", "each"],
                "kappa": [0.25, 0.5],
                "upsilon": [0.25],
                "heads": [2],
                "relative": [True, False],
            },
        },
    },
}


@pytest.fixture(scope="module")
def tiny() -> SearchSpace:
    return SearchSpace.from_yaml("tiny")


def _randomize(net: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics/affine and biases, so mismatched slices cannot hide."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
        for name, p in net.named_parameters():
            if name.endswith("bias") and p.dim() >= 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def _check_paths(space: SearchSpace, n: int, size: int, seed: int) -> None:
    torch.manual_seed(seed)
    net = SuperNet(space)
    _randomize(net, seed)
    net.eval()
    rng = np.random.default_rng(seed)
    x = torch.randn(2, 3, size, size)
    specs = [space.largest(), space.smallest()] + [space.sample(rng) for _ in range(n)]
    for spec in specs:
        with torch.no_grad():
            path = net(x, spec)
            static = net.extract(spec).eval()
            assert type(static) is type(create_model(spec))
            assert static.spec == spec
            out = static(x)
        assert path.shape == out.shape == (2, spec.num_classes)
        torch.testing.assert_close(path, out, atol=1e-5, rtol=0)


def test_path_equals_extracted_tiny(tiny: SearchSpace) -> None:
    _check_paths(tiny, 14, 32, seed=0)


def test_path_equals_extracted_resnet() -> None:
    space = SearchSpace.from_dict(_RESNET_SPACE)
    _check_paths(space, 5, 32, seed=1)


def test_gradients_only_on_selected_slice(tiny: SearchSpace) -> None:
    torch.manual_seed(0)
    net = SuperNet(tiny).train()
    spec = tiny.smallest()
    # one AA block with 2 of the 4 possible heads, so head and dim slicing are exercised
    params = tiny.encode_params(spec)
    params.update({"stage3.aa.placement": "all", "stage3.aa.heads": 2})
    spec = tiny.decode(params)
    loss = net(torch.randn(2, 3, 32, 32), spec).square().mean()
    loss.backward()
    used = net.static_state(spec)  # what the path reads
    blocks = net.blocks
    # stage 1 runs one block: the second one gets no gradient at all
    assert all(p.grad is None for p in blocks[1][1].parameters())
    b = blocks[1][0]
    grad = b.expand.weight.grad
    mid = spec.stages[1][0].expansion * 16  # e3 on 16 input channels
    assert grad[: int(mid)].abs().sum() > 0 and grad[int(mid) :].abs().sum() == 0
    k = b.spatial.weight.grad  # kernel 3 of 5: the outer ring has zero gradient
    assert k[:, :, 1:4, 1:4].abs().sum() > 0
    assert k[:, :, 0].abs().sum() == 0 and k[:, :, :, 4].abs().sum() == 0
    attn = blocks[3][0].attn["spatial"]
    assert attn is not None
    rb = [
        r
        for r in __import__("aanas.spec", fromlist=["resolve"]).resolve(spec).blocks
        if r.name.startswith("stage3")
    ][0]
    dkh = rb.dk // rb.heads
    g = attn.q_weight.grad
    assert g[:2, :dkh, : rb.mid_channels].abs().sum() > 0
    assert g[2:].abs().sum() == 0 and g[:, dkh:].abs().sum() == 0
    assert g[:, :, rb.mid_channels :].abs().sum() == 0
    assert attn.key_rel_w.grad[:, dkh:].abs().sum() == 0
    # BN of the attention bank: the channels after dv get no gradient
    bank = blocks[3][0].s_max
    bn_grad = blocks[3][0].spatial_bn.weight.grad
    assert bn_grad[bank : bank + rb.dv].abs().sum() > 0
    assert bn_grad[bank + rb.dv :].abs().sum() == 0
    assert "blocks.3.0.conv_dw.qkv_conv.weight" in used


def test_bn_running_stats_update_only_slice(tiny: SearchSpace) -> None:
    net = SuperNet(tiny).train()
    spec = tiny.smallest()
    before = {n: b.clone() for n, b in net.named_buffers() if "running_mean" in n}
    with torch.no_grad():
        net(torch.randn(4, 3, 32, 32) + 1.0, spec)
    after = dict(net.named_buffers())
    assert torch.equal(
        after["blocks.1.1.expand_bn.running_mean"], before["blocks.1.1.expand_bn.running_mean"]
    )
    changed = (
        after["blocks.1.0.expand_bn.running_mean"] != before["blocks.1.0.expand_bn.running_mean"]
    )
    mid = int(spec.stages[1][0].expansion * 16)
    assert changed[:mid].all() and not changed[mid:].any()


def test_split_index_and_attention_layout() -> None:
    assert split_index(5, 0, 8, torch.device("cpu")) == slice(0, 5)
    assert split_index(5, 2, 8, torch.device("cpu")).tolist() == [0, 1, 2, 3, 4, 8, 9]
    attn = ElasticAttention(in_max=6, heads_max=4, dkh_max=3, dvh_max=2, dv_max=8, size_max=5)
    state = attn.static_state(slice(0, 4), dk=4, dv=4, heads=2, relative=True, size=3)
    qkv = state["qkv_conv.weight"][:, :, 0, 0]
    # row h*dkh + i of q is q_weight[h, i] (first 2 heads, first 2 dims each)
    torch.testing.assert_close(qkv[2], attn.q_weight[1, 0, :4])
    torch.testing.assert_close(qkv[4 + 3], attn.k_weight[1, 1, :4])
    torch.testing.assert_close(qkv[8 + 2], attn.v_weight[1, 0, :4])
    assert state["key_rel_w"].shape == (5, 2)
    torch.testing.assert_close(state["key_rel_w"], attn.key_rel_w[2:7, :2])


def test_train_recalibrate_save_load(tiny: SearchSpace, tmp_path: Path) -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    data = [
        (torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 10, (4,), generator=gen))
        for _ in range(3)
    ]
    for rule in ("sandwich", "uniform"):
        net = SuperNet(tiny)
        seen: list[int] = []
        out = train_supernet(
            net,
            data,
            epochs=2,
            lr=0.05,
            rule=rule,
            distill=rule == "sandwich",
            seed=0,
            max_batches=1,
            on_epoch=lambda e, m, seen=seen: seen.append(e),
        )
        assert seen == [0, 1] and len(out["epochs"]) == 2
        assert all(np.isfinite(m["train_loss"]) for m in out["epochs"])
    with pytest.raises(ValueError, match="rule"):
        train_supernet(net, data, epochs=1, lr=0.1, rule="greedy")
    spec = tiny.sample(np.random.default_rng(5))
    sub = recalibrate_bn(net.extract(spec), data, batches=3)
    assert not sub.training
    bn = next(m for m in sub.modules() if isinstance(m, nn.BatchNorm2d))
    assert int(bn.num_batches_tracked) == 3 and bn.momentum is not None
    path = tmp_path / "sn" / "supernet.pt"
    net.save(path)
    other = SuperNet(tiny)
    other.load(path)
    x = data[0][0]
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x, spec), other.eval()(x, spec))
    assert [p.name for p in path.parent.iterdir()] == ["supernet.pt"]  # no temp files left
    resnet = SuperNet(SearchSpace.from_dict(_RESNET_SPACE))
    with pytest.raises(ValueError, match="space"):
        resnet.load(path)


# --- BN recalibration of one path -----------------------------------------------------------------


def _aa_spec(space: SearchSpace) -> ArchSpec:
    """A path with skipped blocks (depth 1), a split attention bank and narrow expansions."""
    params = space.encode_params(space.smallest())
    params.update({"stage2.aa.placement": "last", "stage2.aa.kappa": 0.5})
    return space.decode(params)


def _naive_recalibrated(model: nn.Module, batches: list[torch.Tensor]) -> nn.Module:
    """Plain torch: reset every BN, cumulative average over the batches, train mode."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    return model.eval()


def test_recalibrate_path_changes_only_its_bn_rows(tiny: SearchSpace) -> None:
    torch.manual_seed(0)
    net = SuperNet(tiny)
    _randomize(net, 3)
    spec = _aa_spec(tiny)
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(4, 3, 32, 32, generator=gen) * 2 + 0.5 for _ in range(3)]
    reference = _naive_recalibrated(net.extract(spec), xs)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    path_before = net.static_state(spec)
    recalibrate_bn(net, [(x, torch.zeros(4)) for x in xs], batches=3, spec=spec)
    assert not net.training
    # the path's BN statistics are those of the standalone subnet recalibrated by plain torch
    after_path = net.static_state(spec)
    ref_state = reference.state_dict()
    stats = [k for k in after_path if k.endswith(("running_mean", "running_var"))]
    assert len(stats) > 10
    for k in stats:
        torch.testing.assert_close(after_path[k], ref_state[k], rtol=1e-4, atol=1e-5)
        assert not torch.equal(after_path[k], path_before[k]), k
    after = net.state_dict()
    # a block the path skips (stage 1 runs 1 of 2 blocks) keeps everything
    skipped = [k for k in before if k.startswith("blocks.1.1.") and "running" in k]
    assert skipped
    for k in skipped:
        assert torch.equal(after[k], before[k]), k
    assert torch.equal(
        after["blocks.1.1.expand_bn.num_batches_tracked"],
        before["blocks.1.1.expand_bn.num_batches_tracked"],
    )
    # rows of a used bank that the path does not normalise keep their statistics:
    # stage 1 block 0 expands 16 -> 48 of 96 rows; stage 2's attention bank uses dv of its rows
    mid = int(spec.stages[1][0].expansion * 16)
    for k in ("running_mean", "running_var"):
        key = f"blocks.1.0.expand_bn.{k}"
        assert torch.equal(after[key][mid:], before[key][mid:])
        assert not torch.equal(after[key][:mid], before[key][:mid])
    stage, j, rb = next((st, j, r) for st, j, r in resolve(spec).staged() if r.dv)
    bank = net.blocks[stage][j].s_max  # spatial-mode attention rows start here
    conv_rows = rb.mid_channels - rb.dv
    for k in ("running_mean", "running_var"):
        key = f"blocks.{stage}.{j}.spatial_bn.{k}"
        assert torch.equal(after[key][conv_rows:bank], before[key][conv_rows:bank])
        assert torch.equal(after[key][bank + rb.dv :], before[key][bank + rb.dv :])
        assert not torch.equal(after[key][bank : bank + rb.dv], before[key][bank : bank + rb.dv])


# --- path sampling, distillation, progressive shrinking -------------------------------------------


@pytest.mark.parametrize("name", ["tiny", "aa_mnasnet", "aa_resnet"])
def test_path_sampler_restricts_dimensions(name: str) -> None:
    space = SearchSpace.from_yaml(name)
    sampler = PathSampler(space)
    largest = space.encode_params(space.largest())
    all_dims = frozenset(ELASTIC_DIMS)
    # every dimension elastic: the very draws of space.sample
    a, b = np.random.default_rng(4), np.random.default_rng(4)
    for _ in range(10):
        assert sampler.sample(a, all_dims) == space.sample(b)
    assert sampler.smallest(all_dims) == space.smallest()
    rng = np.random.default_rng(0)
    assert sampler.sample(rng, frozenset()) == space.largest()
    assert sampler.smallest(frozenset()) == space.largest()
    for dim in ELASTIC_DIMS:
        seen = set()
        for _ in range(20):
            spec = sampler.sample(rng, frozenset({dim}))
            params = space.encode_params(spec)
            # parameters of the other dimensions keep the largest network's value (compared as
            # specs: placements 'last' and 'all' coincide on a one-block stage)
            fixed = {
                k: largest.get(k, v) if param_dimension(k) != dim else v for k, v in params.items()
            }
            assert space.decode(fixed) == spec, dim
            seen.add(spec)
        has_dim = any(param_dimension(p.name) == dim for p in space.parameters)
        assert (len(seen) > 1) == has_dim, dim


def test_supernet_recipe_schedule_and_errors() -> None:
    r = SupernetRecipe()
    assert r.elastic_at(0.0) == frozenset()
    assert r.elastic_at(0.2) == {"kernel"}
    assert r.elastic_at(0.5) == {"kernel", "depth"}
    assert r.elastic_at(0.99) == set(ELASTIC_DIMS)
    assert SupernetRecipe(shrink=False).elastic_at(0.0) == set(ELASTIC_DIMS)
    # a dimension not in shrink_order is elastic from the start
    part = SupernetRecipe(shrink_order=("attention",), shrink_at=(0.5,))
    assert part.elastic_at(0.1) == {"kernel", "depth", "width"}
    for bad, match in (
        ({"shrink_order": ("kernel", "colour"), "shrink_at": (0.1, 0.2)}, "shrink_order"),
        ({"shrink_at": (0.4, 0.2, 0.6, 0.8)}, "shrink_at"),
        ({"shrink_at": (0.2,)}, "shrink_at"),
        ({"rule": "uniform"}, "distill"),
        ({"rule": "greedy"}, "rule"),
        ({"n_random": -1}, "n_random"),
    ):
        with pytest.raises(ValueError, match=match):
            SupernetRecipe(**bad)  # type: ignore[arg-type]
    assert all(
        param_dimension(p.name) in ELASTIC_DIMS
        for n in ("tiny", "aa_mnasnet", "aa_resnet")
        for p in SearchSpace.from_yaml(n).parameters
    )
    with pytest.raises(ValueError, match="colour"):
        param_dimension("stage1.colour")


def _one_step_reference(
    net: SuperNet, x: torch.Tensor, y: torch.Tensor, specs: list[ArchSpec], distill: bool
) -> dict[str, torch.Tensor]:
    """One SGD step of the sandwich written out by hand: CE for the first path, KL to its
    detached softmax (T = 1) or CE for the others, gradients summed."""
    torch.manual_seed(0)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=0.0, nesterov=True)
    net.train()
    opt.zero_grad()
    teacher = net(x, specs[0])
    torch.nn.functional.cross_entropy(teacher, y).backward()
    soft = torch.softmax(teacher.detach(), 1)
    for spec in specs[1:]:
        logits = net(x, spec)
        if distill:
            log_p = torch.log_softmax(logits, 1)
            loss = (soft * (soft.log() - log_p)).sum(1).mean()  # KL(teacher || student)
        else:
            loss = torch.nn.functional.cross_entropy(logits, y)
        loss.backward()
    opt.step()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("distill", [True, False])
def test_sandwich_step_matches_hand_written(tiny: SearchSpace, distill: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 10, (4,), generator=gen)
    torch.manual_seed(0)
    net = SuperNet(tiny)
    ref_net = SuperNet(tiny)
    ref_net.load_state_dict(net.state_dict())
    recipe = SupernetRecipe(
        epochs=1, lr=0.1, weight_decay=0.0, n_random=0, distill=distill, shrink=False,
        warmup=0.0, grad_clip=0.0,  # the plain step (warm-up and clipping are tested apart)
    )  # fmt: skip
    train_supernet(net, [(x, y)], recipe, seed=0)
    ref = _one_step_reference(ref_net, x, y, [tiny.largest(), tiny.smallest()], distill)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, ref[k], rtol=1e-4, atol=1e-6, msg=k)


def test_progressive_shrinking_phases(tiny: SearchSpace) -> None:
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(2, 3, 32, 32, generator=gen), torch.randint(0, 10, (2,)))]
    net = SuperNet(tiny)
    calls: list[ArchSpec] = []
    forward = net.forward

    def spy(x: torch.Tensor, spec: ArchSpec) -> torch.Tensor:
        calls.append(spec)
        return forward(x, spec)

    net.forward = spy  # type: ignore[method-assign]
    recipe = SupernetRecipe(epochs=5, n_random=3)  # one step per epoch: phases 0, 0.2, .., 0.8
    per_step: list[list[ArchSpec]] = []
    out = train_supernet(
        net, data, recipe, on_epoch=lambda e, m: (per_step.append(list(calls)), calls.clear())
    )
    largest = tiny.encode_params(tiny.largest())
    assert per_step[0] == [tiny.largest()]  # phase 0: the largest network alone
    assert [m["elastic"] for m in out["epochs"]] == [
        [],
        ["kernel"],
        ["depth", "kernel"],
        ["depth", "kernel", "width"],
        ["attention", "depth", "kernel", "width"],
    ]
    for step, elastic in enumerate(out["epochs"]):
        assert per_step[step][0] == tiny.largest()
        for spec in per_step[step]:
            params = tiny.encode_params(spec)
            fixed = {
                k: largest.get(k, v) if param_dimension(k) not in elastic["elastic"] else v
                for k, v in params.items()
            }
            assert tiny.decode(fixed) == spec, step
    assert per_step[4][1] == tiny.smallest()
    assert len(set(per_step[4])) == len(per_step[4])  # duplicates are trained once


def test_each_epoch_gets_its_own_shuffle(tiny: SearchSpace) -> None:
    # aanas.data shuffles with a DistributedSampler: the order is f(seed, epoch) and stays the
    # same every epoch unless set_epoch is called
    n = 8
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 32, 32)
    dataset = torch.utils.data.TensorDataset(images, torch.zeros(n, dtype=torch.long))
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=1, rank=0, seed=3)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, sampler=sampler)
    net = SuperNet(tiny)
    seen: list[int] = []
    forward = net.forward

    def spy(x: torch.Tensor, spec: ArchSpec) -> torch.Tensor:
        if spec == tiny.largest():
            seen.extend(int(v) for v in x[:, 0, 0, 0])
        return forward(x, spec)

    net.forward = spy  # type: ignore[method-assign]
    train_supernet(net, loader, epochs=2, n_random=0, shrink=False)
    expected = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        expected += list(sampler)
    assert seen == expected and seen[:n] != seen[n:]


def test_lr_is_cosine_over_the_planned_steps_without_a_budget(tiny: SearchSpace) -> None:
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(2, 3, 32, 32, generator=gen), torch.randint(0, 10, (2,)))]
    recipe = SupernetRecipe(epochs=4, lr=0.1, n_random=0, warmup=0.0)
    out = train_supernet(SuperNet(tiny), data, recipe)
    # one step per epoch; the lr recorded is the one that epoch's step used
    expected = [0.1 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert [m["lr"] for m in out["epochs"]] == pytest.approx(expected)
    assert out["steps"] == out["planned_steps"] == 4
    # with a warm-up over half the schedule: 0, then half, then the cosine itself
    out = train_supernet(SuperNet(tiny), data, dataclasses.replace(recipe, warmup=0.5))
    ramp = [0.0, 0.5, 1.0, 1.0]
    warmed = [r * e for r, e in zip(ramp, expected, strict=True)]
    assert [m["lr"] for m in out["epochs"]] == pytest.approx(warmed)


def test_each_step_clips_the_summed_gradient(
    tiny: SearchSpace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sandwich step sums the paths' gradients; the sum is clipped to ``grad_clip``."""
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 10, (4,)))] * 3
    real = torch.nn.utils.clip_grad_norm_
    norms: list[tuple[float, float]] = []

    def spy(params: Any, max_norm: float, **kw: Any) -> torch.Tensor:
        params = [p for p in params if p.grad is not None]
        before = real(params, max_norm, **kw)
        after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        norms.append((float(before), float(after)))
        return before

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    train_supernet(SuperNet(tiny), data, SupernetRecipe(epochs=1, lr=0.1, grad_clip=0.01))
    assert len(norms) == 3 and all(b > 0.01 and a == pytest.approx(0.01) for b, a in norms)
    train_supernet(SuperNet(tiny), data, SupernetRecipe(epochs=1, lr=0.1, grad_clip=0.0))
    assert len(norms) == 3  # 0: no clipping
    for bad in ({"warmup": 1.0}, {"warmup": -0.1}, {"grad_clip": -1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SupernetRecipe(**bad)


def test_time_budget_compresses_the_schedule_to_fit(tiny: SearchSpace) -> None:
    """A budget far shorter than the planned steps: training stops when it is spent, having
    passed every shrinking phase with the lr annealed (not cut off in phase 1 at full lr)."""
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(2, 3, 32, 32, generator=gen), torch.randint(0, 10, (2,)))]
    budget = 8.0  # seconds: a loaded machine must still fit several steps per phase
    recipe = SupernetRecipe(epochs=100_000, lr=0.1, n_random=1, time_budget_s=budget, warmup=0)
    out = train_supernet(SuperNet(tiny), data, recipe)
    assert 0 < out["steps"] < out["planned_steps"] == 100_000
    assert budget <= out["seconds"] < budget + 60  # ran until the budget, one step past at most
    phases = [m["elastic"] for m in out["epochs"]]
    assert phases[0] == [] and phases[-1] == sorted(recipe.shrink_order)
    assert all(set(a) <= set(b) for a, b in zip(phases, phases[1:], strict=False))
    lrs = [m["lr"] for m in out["epochs"]]
    assert lrs[0] == pytest.approx(0.1, rel=0.1) and lrs[-1] < 0.05
    assert lrs == sorted(lrs, reverse=True)
    with pytest.raises(ValueError, match="time_budget_s"):
        SupernetRecipe(time_budget_s=-1.0)


def _kill_after(epoch: int):  # type: ignore[no-untyped-def]
    def on_epoch(e: int, metrics: dict[str, float]) -> None:
        if e == epoch:
            raise KeyboardInterrupt  # what a kill between two epochs leaves behind

    return on_epoch


def test_killed_training_resumes_where_it_stopped(tiny: SearchSpace, tmp_path: Path) -> None:
    """A run killed after epoch 1 and restarted with the same checkpoint ends with exactly
    the weights and history of a run that was never interrupted (sampler and torch RNG,
    optimiser momentum and the lr schedule all continue)."""
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(2, 3, 32, 32, generator=gen), torch.randint(0, 10, (2,))) for _ in "ab"]
    recipe = SupernetRecipe(epochs=4, lr=0.1, n_random=1)  # sandwich, distill, shrink

    def fresh() -> SuperNet:
        torch.manual_seed(1)
        return SuperNet(tiny)

    whole = fresh()
    ref = train_supernet(whole, data, recipe, seed=3)
    state = tmp_path / "progress.pt"
    with pytest.raises(KeyboardInterrupt):
        train_supernet(fresh(), data, recipe, seed=3, checkpoint=state, on_epoch=_kill_after(1))
    assert state.is_file()
    resumed = SuperNet(tiny)  # other initial weights: the saved ones replace them
    out = train_supernet(resumed, data, recipe, seed=3, checkpoint=state)
    assert not state.exists()  # done: the state is removed
    assert out["steps"] == ref["steps"] == 8
    assert [m["train_loss"] for m in out["epochs"]] == [m["train_loss"] for m in ref["epochs"]]
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_training_state_of_another_run_is_not_continued(
    tiny: SearchSpace, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(2, 3, 32, 32, generator=gen), torch.randint(0, 10, (2,)))]
    state = tmp_path / "progress.pt"
    recipe = SupernetRecipe(epochs=3, lr=0.1, n_random=0)
    with pytest.raises(KeyboardInterrupt):
        train_supernet(SuperNet(tiny), data, recipe, checkpoint=state, on_epoch=_kill_after(0))
    other = SupernetRecipe(epochs=3, lr=0.05, n_random=0)
    with caplog.at_level("WARNING", logger="aanas.supernet"):
        out = train_supernet(SuperNet(tiny), data, other, checkpoint=state)
    assert out["steps"] == 3 and "differs in recipe" in caplog.text
    state.write_bytes(b"not a checkpoint")
    out = train_supernet(SuperNet(tiny), data, other, checkpoint=state)
    assert out["steps"] == 3


def test_time_spent_before_a_kill_counts_against_the_budget(
    tiny: SearchSpace, tmp_path: Path
) -> None:
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(2, 3, 32, 32, generator=gen), torch.randint(0, 10, (2,)))]
    state = tmp_path / "progress.pt"
    recipe = SupernetRecipe(epochs=50, lr=0.1, n_random=0, time_budget_s=600.0)
    with pytest.raises(KeyboardInterrupt):
        train_supernet(SuperNet(tiny), data, recipe, checkpoint=state, on_epoch=_kill_after(1))
    payload = torch.load(state, weights_only=True)
    payload["seconds"] = 599.999  # as if the two epochs had taken (almost) the whole budget
    torch.save(payload, state)
    out = train_supernet(SuperNet(tiny), data, recipe, checkpoint=state)
    assert out["steps"] <= 3 and out["planned_steps"] == 50
