"""Tests for aanas.config: typed recipes, YAML loading, --set overrides, shipped recipes."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from aanas.config import (
    TrainRecipe,
    apply_overrides,
    find_recipe,
    list_recipes,
    load_dataclass,
    load_recipe,
    recipe_from_dict,
    recipe_to_dict,
)
from aanas.errors import RecipeError

SHIPPED = {
    "imagenet_resnet50",
    "imagenet_aa_resnet50",
    "cifar100_wrn28_10",
    "cifar100_aa_wrn28_10",
    "imagenet_mnasnet_a1",
    "imagenet_aa_mnasnet_a1",
    "cifar10_subset_mnasnet_a1",
    "cifar10_subset_aa_mnasnet_a1",
    "digits_tiny",
}


def _write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_shipped_recipe_list() -> None:
    assert SHIPPED <= set(list_recipes())


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_shipped_recipe_loads(name: str) -> None:
    recipe = load_recipe(name)
    assert isinstance(recipe, TrainRecipe)
    # keys in the file mirror the dataclass fields exactly (no silent defaults for typos)
    assert recipe_from_dict(TrainRecipe, recipe_to_dict(recipe)) == recipe


def test_paired_recipes_differ_only_where_documented() -> None:
    def diff(a: str, b: str) -> set[str]:
        da, db = recipe_to_dict(load_recipe(a)), recipe_to_dict(load_recipe(b))
        return {k for k in da if da[k] != db[k]}

    assert diff("imagenet_resnet50", "imagenet_aa_resnet50") == {"model"}
    assert diff("cifar100_wrn28_10", "cifar100_aa_wrn28_10") == {"model"}
    # the AA model underfits in 12 epochs; comparisons train both with the 12-epoch recipe
    assert diff("cifar10_subset_mnasnet_a1", "cifar10_subset_aa_mnasnet_a1") == {"model", "epochs"}
    # Bello et al.: augmented MnasNets use lr / 2 and an adjusted decay
    assert diff("imagenet_mnasnet_a1", "imagenet_aa_mnasnet_a1") == {"model", "lr", "decay_rate"}


def test_paper_settings() -> None:
    r = load_recipe("imagenet_resnet50")
    assert (r.epochs, r.momentum, r.warmup_epochs) == (100, 0.9, 5.0)
    assert r.milestones == (30, 60, 80, 90) and r.gamma == 0.1
    assert r.lr == pytest.approx(0.128 * r.batch_size / 256)
    w = load_recipe("cifar100_wrn28_10")
    assert (w.epochs, w.batch_size, w.lr, w.nesterov, w.weight_decay) == (200, 128, 0.1, True, 5e-4)
    assert w.milestones == (60, 120, 160) and w.gamma == 0.2
    m = load_recipe("imagenet_mnasnet_a1")
    assert (m.optimizer, m.rmsprop_alpha, m.momentum, m.lr, m.batch_size) == (
        "rmsprop",
        0.9,
        0.9,
        0.256,
        4096,
    )
    assert (m.decay_rate, m.decay_epochs, m.weight_decay, m.epochs) == (0.97, 2.4, 1e-5, 350)


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_recipe(_write(tmp_path, "")) == TrainRecipe()


def test_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    path = _write(tmp_path, "lr: 0.1\nlearning_rate: 0.2\n")
    with pytest.raises(RecipeError, match="learning_rate") as info:
        load_recipe(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("epochs: ten\n", "epochs"),
        ("epochs: 2.5\n", "epochs"),
        ("amp: 1\n", "amp"),  # ints are not bools
        ("batch_size: true\n", "batch_size"),  # bools are not ints
        ("milestones: 30\n", "milestones"),
        ("milestones: [30, x]\n", "milestones"),
        ("model: 3\n", "model"),
    ],
)
def test_wrong_type_names_field_value_and_type(tmp_path: Path, text: str, field: str) -> None:
    with pytest.raises(RecipeError, match=field) as info:
        load_recipe(_write(tmp_path, text))
    assert "expected" in str(info.value)


def test_yaml_widening(tmp_path: Path) -> None:
    # int -> float, list -> tuple, and PyYAML's '5e-4' (read as a string) -> float
    r = load_recipe(
        _write(tmp_path, "lr: 1\nweight_decay: 5e-4\nmilestones: [3, 6]\nschedule: step")
    )
    assert r.lr == 1.0 and isinstance(r.lr, float)
    assert r.weight_decay == 5e-4
    assert r.milestones == (3, 6)


def test_value_checks(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="optimizer.*sgd.*adam"):
        load_recipe(_write(tmp_path, "optimizer: adam\n"))
    with pytest.raises(RecipeError, match="milestones"):
        TrainRecipe(schedule="step")
    with pytest.raises(RecipeError, match="val_fraction"):
        TrainRecipe(val_fraction=1.0)
    with pytest.raises(RecipeError, match="nesterov"):
        TrainRecipe(optimizer="rmsprop", nesterov=True)


def test_overrides_are_type_checked() -> None:
    base = TrainRecipe()
    r = apply_overrides(
        base,
        [
            "train.lr=0.05",
            "epochs=3",
            "nesterov=true",
            "schedule=step",
            "milestones=1,2",
            "data=imagefolder:/some/path",
            "data_root=none",
        ],
    )
    assert (r.lr, r.epochs, r.nesterov, r.schedule) == (0.05, 3, True, "step")
    assert r.milestones == (1, 2) and r.data == "imagefolder:/some/path" and r.data_root is None
    assert apply_overrides(r, ["milestones=[4, 5]"]).milestones == (4, 5)
    assert base == TrainRecipe()  # frozen: overrides return a copy
    with pytest.raises(RecipeError, match="epochs"):
        apply_overrides(base, ["epochs=abc"])
    with pytest.raises(RecipeError, match="epochs"):
        apply_overrides(base, ["epochs=1.5"])
    with pytest.raises(RecipeError, match="amp"):
        apply_overrides(base, ["amp=maybe"])
    with pytest.raises(RecipeError, match="unknown key 'lrate'"):
        apply_overrides(base, ["lrate=0.1"])
    with pytest.raises(RecipeError, match="key=value"):
        apply_overrides(base, ["lr"])
    with pytest.raises(RecipeError, match="epochs"):
        apply_overrides(base, ["epochs=0"])  # __post_init__ range check still applies


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("batch_size=10000000", r"batch_size must be >= 1 and <= 65536, got 10000000"),
        ("input_size=100000", r"input_size must be >= 1 and <= 4096"),
        ("epochs=99999999999999999999", r"epochs must be >= 1 and <= 100000"),
        ("workers=100000", r"workers must be >= 0 and <= 1024"),
        ("epochs=1e999", r"override epochs='1e999': expected int"),
        ("lr=nan", r"lr must be finite"),
        ("decay_epochs=inf", r"decay_epochs must be finite"),
        ("decay_epochs=nan", r"decay_epochs must be finite"),
    ],
)
def test_overrides_are_bounded(override: str, match: str) -> None:
    with pytest.raises(RecipeError, match=match) as info:
        apply_overrides(TrainRecipe(), [override])
    assert "\n" not in str(info.value)


def test_any_recipe_class_check_becomes_a_recipe_error(tmp_path: Path) -> None:
    # A recipe class whose own __post_init__ raises plain ValueError (as SearchRecipe's does):
    # overrides and files still report it as the one error type the CLI expects.
    @dataclasses.dataclass(frozen=True)
    class DemoRecipe:
        trials: int = 10

        def __post_init__(self) -> None:
            if self.trials < 1:
                raise ValueError(f"trials must be >= 1, got {self.trials}")

    with pytest.raises(RecipeError, match="trials must be >= 1, got 0"):
        apply_overrides(DemoRecipe(), ["trials=0"])
    with pytest.raises(RecipeError, match=r"r\.yaml: trials must be >= 1, got -1"):
        load_dataclass(DemoRecipe, _write(tmp_path, "trials: -1\n"))


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"model: caf\xe9\n", r"invalid YAML: .*utf-8"),  # latin-1, not UTF-8
        (b"model: 2020-13-45\n", r"invalid YAML: month"),  # PyYAML's own ValueError
        (b"[" * 50_000, r"invalid YAML"),  # deep nesting: RecursionError inside PyYAML
        (b"- 1\n- 2\n", r"expected a mapping"),
    ],
)
def test_unreadable_files_are_recipe_errors(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "r.yaml"
    path.write_bytes(content)
    with pytest.raises(RecipeError, match=match) as info:
        load_recipe(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_load_with_overrides(tmp_path: Path) -> None:
    r = load_recipe(_write(tmp_path, "lr: 0.1\n"), ["lr=0.2"])
    assert r.lr == 0.2


def test_generic_loader_reuses_for_other_dataclasses(tmp_path: Path) -> None:
    @dataclasses.dataclass(frozen=True)
    class DemoRecipe:
        trials: int = 10
        space: str = "default"
        ratios: tuple[float, ...] = (0.25,)

    path = _write(tmp_path, "trials: 4\nratios: [0.1, 0.2]\n")
    r = load_dataclass(DemoRecipe, path, ["demo.space=mine"])
    assert r == DemoRecipe(trials=4, space="mine", ratios=(0.1, 0.2))
    with pytest.raises(RecipeError, match="unknown key 'lr'"):
        load_dataclass(DemoRecipe, _write(tmp_path, "lr: 1\n", "bad.yaml"))


def test_find_recipe(tmp_path: Path) -> None:
    assert find_recipe("digits_tiny").name == "digits_tiny.yaml"
    assert find_recipe("digits_tiny.yaml").name == "digits_tiny.yaml"
    own = _write(tmp_path, "epochs: 1\n")
    assert find_recipe(own) == own
    with pytest.raises(FileNotFoundError, match="digits_tiny"):  # lists the shipped ones
        find_recipe("no_such_recipe")


def test_config_is_layer_zero() -> None:
    # L0: no torch and no aanas imports above it (checked statically: aanas/__init__ may
    # import torch through its re-exports, which is not config's doing)
    import aanas.config

    tree = ast.parse(Path(aanas.config.__file__).read_text(encoding="utf-8"))
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    # Other L0 modules are fine: the error types and the spec's limits table.
    layer0 = {"aanas.errors", "aanas.spec", "aanas._io"}
    heavy = {n for n in names if n.split(".")[0] in ("torch", "aanas", "numpy")}
    assert not heavy - layer0
