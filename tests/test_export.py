"""ONNX export: onnxruntime == PyTorch within the round-off-scaled tolerance for presets,
sampled specs and a trained-like AA-ResNet-50, metadata, dynamic batch, run-directory export,
mismatch detection, bad checkpoint files and CLI exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from aanas import export
from aanas.cli import main
from aanas.export import ExportMismatchError, real_images, to_onnx
from aanas.models import create_model
from aanas.spec import encode


@pytest.fixture(autouse=True)
def _seeded() -> None:
    # Weights are drawn by create_model; without a seed they depend on which tests ran before,
    # and a random MnasNet-B1's output spread (the `spread > 1e-3` guard below) ranges
    # 0.9e-3..3e-3 across draws. Seeded, every test sees the same weights in any order.
    torch.manual_seed(0)


def _conditioned(model: nn.Module, size: int, seed: int = 0) -> nn.Module:
    """Random weights whose eval-mode outputs are O(1) and depend on the input.

    Default init in eval mode (BN stats 0/1) has a per-block gain > 1: at 50 layers the logits
    reach ~50 and PyTorch's own float32 round-off (vs float64) alone exceeds 1e-4, so a parity
    test would measure conditioning, not the exporter. Calibrated BN statistics and BN gammas
    of 0.8 keep every layer's signal at unit scale.
    """
    torch.manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, size, size))
        for bn in bns:
            bn.weight.mul_(0.8)
        for lin in model.modules():
            if isinstance(lin, nn.Linear):  # std 0.01 init: logits ~1e-3; make them O(1)
                nn.init.normal_(lin.weight, std=lin.in_features**-0.5)
    return model.eval()


def _check(model: nn.Module, size: int, path: Path) -> export.ExportReport:
    real, mean, std = real_images("digits", size)
    report = to_onnx(model, path, input_size=size, real_inputs=real, mean=mean, std=std)
    assert report.checked and set(report.diffs) == {"random[b=1]", "random[b=3]", "real[b=4]"}
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4, report.diffs
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param and not dim.HasField("dim_value")  # dynamic batch
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["spec"] == encode(model.spec) == report.spec
    assert meta["input_size"] == str(size)
    assert int(meta["macs"]) == report.macs > 0 and int(meta["params"]) == report.params > 0
    assert meta["mean"] and meta["std"]
    # The outputs must depend on the input, or a 1e-4 bound would test nothing.
    with torch.no_grad():
        spread = model(real).std(0).mean()
    assert spread > 1e-3, spread
    return report


@pytest.mark.parametrize(
    ("name", "size"),
    [("mnasnet_b1_100", 64), ("aa_mnasnet_a1_100", 32), ("aa_resnet50", 64)],
)
def test_preset_parity(name: str, size: int, tmp_path: Path) -> None:
    model = _conditioned(create_model(name, num_classes=10, input_size=size), size)
    _check(model, size, tmp_path / f"{name}.onnx")


def test_sampled_specs_parity(tmp_path: Path) -> None:
    from aanas.space import SearchSpace

    space = SearchSpace.from_yaml("tiny")
    specs = [space.sample(np.random.default_rng(i)) for i in range(3)]
    for i, spec in enumerate(specs):
        model = _conditioned(create_model(spec), spec.input_size, seed=i)
        _check(model, spec.input_size, tmp_path / f"tiny{i}.onnx")


def test_attention_below_built_size_and_too_large(tmp_path: Path) -> None:
    """Built for 32, exported at 24 (odd 3x3 attention maps); above 32 is refused."""
    model = _conditioned(create_model("test_aa_mnasnet", input_size=32), 32)
    report = to_onnx(model, tmp_path / "m24.onnx", input_size=24)
    assert report.input_size == 24 and report.max_abs_diff is not None
    assert report.max_abs_diff <= 1e-4
    with pytest.raises(ValueError, match="exceeds the spec's 32"):
        to_onnx(model, tmp_path / "m64.onnx", input_size=64)


def _export_only_bias(model: nn.Module) -> None:
    """Make the traced graph differ from eager PyTorch: +0.01 only while exporting."""

    def hook(_m: nn.Module, _inp: object, out: torch.Tensor) -> torch.Tensor:
        return out + 0.01 if torch.onnx.is_in_onnx_export() else out

    model.register_forward_hook(hook)


def test_mismatch_raises_and_writes_nothing(tmp_path: Path) -> None:
    model = _conditioned(create_model("test_aa_mnasnet"), 32)
    _export_only_bias(model)
    dest = tmp_path / "bad.onnx"
    with pytest.raises(ExportMismatchError, match=r"max abs diff 0\.01 > tolerance") as err:
        to_onnx(model, dest)
    report = err.value.report
    assert report.max_abs_diff == pytest.approx(0.01, rel=1e-3)
    # The principled tolerance is far below a real mismatch on an O(1)-logit net: the bias is
    # > 100 x the tolerance, and the float32 round-off it was scaled by was measured (finite).
    assert all(0 < t < 1e-4 for t in report.tolerances.values()), report.tolerances
    assert all(0 < r < 1e-5 for r in report.roundoff.values()), report.roundoff
    assert not dest.exists() and list(tmp_path.iterdir()) == []  # atomic: no partial files
    assert to_onnx(model, dest, check=False).max_abs_diff is None  # unchecked export works


def test_bad_arguments(tmp_path: Path) -> None:
    model = create_model("test_aa_mnasnet")
    with pytest.raises(ValueError, match="opset"):
        to_onnx(model, tmp_path / "m.onnx", opset=13)
    with pytest.raises(ValueError, match="real_inputs"):
        to_onnx(model, tmp_path / "m.onnx", real_inputs=torch.zeros(2, 3, 8, 8))


def _fake_run(tmp_path: Path) -> tuple[Path, nn.Module]:
    model = _conditioned(create_model("test_aa_mnasnet"), 32)
    run = tmp_path / "runs" / "demo"
    (run / "best").mkdir(parents=True)
    spec = encode(model.spec)
    (run / "best" / "spec.txt").write_text(spec + "\n")
    torch.save({"spec": spec, "state_dict": model.state_dict()}, run / "best" / "model.pt")
    return run, model


def test_cli_exports_run_directory(tmp_path: Path) -> None:
    run, model = _fake_run(tmp_path)
    assert main(["export", str(run)]) == 0
    proto = onnx.load(str(run / "best" / "model.onnx"))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["spec"] == encode(model.spec)
    assert meta["trained"] == "true" and meta["source"].startswith("run ")
    # The exported weights are the run's: compare with the model saved there.
    import onnxruntime as ort

    x = torch.randn(2, 3, 32, 32)
    sess = ort.InferenceSession(str(run / "best" / "model.onnx"))
    with torch.no_grad():
        np.testing.assert_allclose(sess.run(None, {"input": x.numpy()})[0], model(x), atol=1e-4)


def test_cli_checkpoint_formats_and_exit_codes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _conditioned(create_model("test_aa_mnasnet"), 32)
    bare = tmp_path / "bare.pt"
    torch.save(model.state_dict(), bare)
    out = tmp_path / "m.onnx"
    args = ["export", "--model", "test_aa_mnasnet", "--checkpoint", str(bare), "--out", str(out)]
    assert main(args) == 0 and out.exists()
    # Mismatch -> exit 1, message names the max diff, the previous file is left untouched.
    before = out.read_bytes()
    monkeypatch.setattr(
        export, "_onnx_outputs", lambda s, x: s.run(None, {"input": x.numpy()})[0] + 1e-3
    )
    assert main(args) == 1
    assert "max abs diff 0.001" in capsys.readouterr().err
    assert out.read_bytes() == before
    # User errors -> exit 2.
    assert main(["export"]) == 2
    assert main(["export", str(tmp_path / "missing_run")]) == 2
    assert main(["export", "--model", "resnet18", "--checkpoint", str(bare)]) == 2  # wrong arch


def test_cli_exports_trainer_checkpoint(tmp_path: Path) -> None:
    """`aanas train` checkpoints carry spec + recipe: the data set gives the normalization."""
    from aanas.config import load_recipe
    from aanas.data import build_data
    from aanas.train import fit

    recipe = load_recipe("digits_tiny", ["epochs=1", "max_train_batches=1", "batch_size=16"])
    data = build_data("digits", input_size=32, batch_size=16, val_fraction=0.1)
    model = create_model("test_aa_mnasnet", num_classes=data.num_classes, input_size=32)
    fit(model, data, recipe, out_dir=tmp_path / "train", progress=False, evaluate_test=False)
    out = tmp_path / "ckpt.onnx"
    ckpt = str(tmp_path / "train" / "last.pt")
    assert (
        main(["export", "--model", "test_aa_mnasnet", "--checkpoint", ckpt, "--out", str(out)]) == 0
    )
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["spec"] == encode(model.spec)
    assert meta["normalization"] == "digits (training data)"
    assert [round(v, 4) for v in json.loads(meta["mean"])] == [round(v, 4) for v in data.mean]


def test_parity_tolerance_terms() -> None:
    """Each term of max(atol, factor x round-off, rtol x max|logit|) can be the binding one."""
    ref32 = np.array([[2.0, -4.0]], dtype=np.float32)
    tol, r = export.parity_tolerance(ref32, ref32.astype(np.float64) + 1e-5)
    assert r == pytest.approx(1e-5) and tol == pytest.approx(8e-5)  # round-off term
    tol, _ = export.parity_tolerance(ref32, ref32.astype(np.float64) + 1e-9)
    assert tol == pytest.approx(1e-5 * 4.0)  # scale term: rtol x the largest |logit| (4)
    tol, _ = export.parity_tolerance(ref32 * 1e-3, None)  # no float64 reference: nan round-off
    assert tol == export.DEFAULT_ATOL
    tol, _ = export.parity_tolerance(ref32, None, atol=0.5, rtol=0.0, roundoff_factor=0.0)
    assert tol == 0.5


def _trained_like_bn(model: nn.Module, seed: int = 0) -> None:
    """BN statistics and affine parameters as far from the defaults as after training.

    With default BN (mean 0, var 1, gamma 1) in eval mode the logits are small; these give
    logits in the hundreds at 50 layers, the regime where a fixed 1e-4 refused the export.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                n = bn.num_features
                bn.running_mean.copy_(torch.randn(n, generator=gen) * 0.2)
                bn.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.25)
                bn.weight.copy_(torch.rand(n, generator=gen) * 0.8 + 0.6)
                bn.bias.copy_(torch.randn(n, generator=gen) * 0.1)


@pytest.mark.slow
def test_cli_exports_trained_aa_resnet50(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`aanas export --model aa_resnet50 --checkpoint <aanas train checkpoint>` succeeds.

    The checkpoint comes from `fit` (2 SGD steps on digits at 32 px) of a model whose BN
    statistics are far from their defaults. onnxruntime then differs from PyTorch by far more
    than the old fixed 1e-4, yet stays within a few times PyTorch's own float32 round-off, which
    is checked here independently against the same weights run in float64.
    """
    import copy

    import onnxruntime as ort

    from aanas.config import TrainRecipe
    from aanas.data import build_data
    from aanas.train import fit

    torch.manual_seed(0)
    model = create_model("aa_resnet50", num_classes=10, input_size=32)
    _trained_like_bn(model)
    # Keep those statistics through the 2 steps (BN momentum 0): at 32 px, stage 4 sees 1x1 maps,
    # so a batch of 4 would pull its running variances toward 4-sample estimates and leave a
    # chaotic net (seen: onnxruntime 15x PyTorch's own round-off on one input), not a trained one.
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.momentum = 0.0
    recipe = TrainRecipe(epochs=1, batch_size=4, lr=1e-4, momentum=0.0, max_train_batches=2)
    data = build_data("digits", input_size=32, batch_size=4, augment=False, val_fraction=0.0)
    fit(model, data, recipe, out_dir=tmp_path / "train", progress=False, evaluate_test=False)
    ckpt, out = tmp_path / "train" / "last.pt", tmp_path / "aa_resnet50.onnx"
    argv = ["export", "--model", "aa_resnet50", "--checkpoint", str(ckpt), "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    assert "parity  onnxruntime vs PyTorch: max abs diff" in capsys.readouterr().out
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["trained"] == "true" and "aanas train" in meta["source"]

    model.eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref32 = model(x).numpy().astype(np.float64)
        ref64 = copy.deepcopy(model).double()(x.double()).numpy()
    got = ort.InferenceSession(str(out)).run(None, {"input": x.numpy()})[0].astype(np.float64)
    own = np.abs(ref32 - ref64).max()  # PyTorch's own float32 round-off on this input
    assert np.abs(ref64).max() > 10.0  # large logits: the regime of the issue
    assert np.abs(got - ref32).max() > 1e-4  # what the old fixed bound refused ...
    assert np.abs(got - ref64).max() < 8 * own  # ... is float32 round-off, not a graph error


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"", "empty"), (b"not a checkpoint\n", "not a readable"), ("truncate", "not a readable")],
)
def test_cli_bad_checkpoint_file_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: object, reason: str
) -> None:
    """Empty, text and truncated --checkpoint files: exit 2, one line naming the file."""
    path = tmp_path / "bad.pt"
    if content == "truncate":
        torch.save(create_model("test_aa_mnasnet").state_dict(), path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        assert isinstance(content, bytes)
        path.write_bytes(content)
    out = tmp_path / "m.onnx"
    argv = ["export", "--model", "test_aa_mnasnet", "--checkpoint", str(path), "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("aanas: error: checkpoint ") and str(path) in err and reason in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_cli_export_out_paths_checked_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--out that is a folder, or under a file: exit 2 before anything is loaded or traced."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for out, message in ((tmp_path, "is a folder"), (blocker / "m.onnx", "is a file")):
        argv = ["export", "--model", "no_such_model_either", "--out", str(out)]
        assert main(argv) == 2  # the model name is never looked at: the path fails first
        err = capsys.readouterr().err
        assert "--out" in err and message in err and len(err.strip().splitlines()) == 1
