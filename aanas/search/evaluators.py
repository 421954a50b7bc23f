"""Accuracy estimators of search candidates, all on the VALIDATION split (never the test set).

- :class:`SuperNetEvaluator` (``--evaluator supernet``, default): one-shot weight sharing
  (Bender et al., ICML 2018; Guo et al., SPOS, arXiv:1904.00420). The candidate inherits its
  weights from a supernet trained once on the space (:func:`aanas.supernet.train_supernet`),
  re-estimates its BatchNorm statistics on a few training batches (inherited running statistics
  belong to the supernet's mixture of paths, not to this subnet) and is evaluated: seconds per
  candidate.
- :class:`TrainEvaluator` (``--evaluator train``): trains the candidate from scratch with a short
  recipe (:func:`aanas.train.fit`), reporting validation accuracy after every epoch so a pruner
  (Optuna Median/Hyperband, Ray ASHA) can stop it early.

:func:`build_evaluator` constructs either from a :class:`~aanas.config.SearchRecipe`, and
:func:`build_objective` wraps it in the shared objective: the one place that does so, for the
driver and for Ray workers (which load the supernet the driver saved).
"""

from __future__ import annotations

import dataclasses
import io
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aanas.config import SearchRecipe
from aanas.errors import RecipeError
from aanas.results import atomic_write_bytes
from aanas.search.objective import Evaluation, Evaluator, Objective, Reporter
from aanas.search.scoring import Budget, Scorer
from aanas.spec import ArchSpec

__all__ = [
    "SuperNetEvaluator",
    "FIT_LAST",
    "TrainEvaluator",
    "build_data_for",
    "build_evaluator",
    "build_objective",
    "latency_fns",
    "load_supernet",
    "prepare_supernet",
    "resolve_device",
    "save_weights",
    "train_recipe_for",
]

_LOG = logging.getLogger(__name__)


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; anything else is checked and kept."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be auto, cpu or cuda[:i], got {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return name


def build_data_for(recipe: SearchRecipe, input_size: int) -> Any:
    """The :class:`aanas.data.DataBundle` of a search (validation split carved from train)."""
    from aanas.data import build_data

    return build_data(
        recipe.data,
        root=recipe.data_root,
        input_size=input_size,
        batch_size=recipe.batch_size,
        val_fraction=recipe.val_fraction,
        seed=recipe.seed,
    )


# What aanas.train.fit(out_dir=...) writes after every epoch and resumes from (train._LAST).
FIT_LAST = "last.pt"


def _state_dict_cpu(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def save_weights(path: Path, spec: ArchSpec, state: dict[str, torch.Tensor]) -> None:
    """Write ``{"spec", "state_dict"}`` atomically: the ``<digest>.pt`` format that
    :meth:`TrainEvaluator.state_dict_for` reads (and that Ray trials ship in their checkpoint)."""
    buf = io.BytesIO()
    torch.save({"spec": spec.encode(), "state_dict": state}, buf)
    atomic_write_bytes(path, buf.getvalue())


class SuperNetEvaluator:
    """Weight-sharing evaluation: extract, recalibrate BN, evaluate on validation."""

    name = "supernet"

    def __init__(
        self, supernet: Any, data: Any, *, recal_batches: int, device: str, recal_seed: int = 0
    ) -> None:
        if data.val is None:
            raise ValueError("the supernet evaluator needs a validation split (val_fraction > 0)")
        self.supernet = supernet
        self.data = data
        self.recal_batches = recal_batches
        self.device = device
        self.recal_seed = recal_seed

    def model_for(self, spec: ArchSpec, *, seed: int) -> nn.Module:
        """The subnet of ``spec`` with inherited weights and recalibrated BN statistics.

        Recalibration uses one fixed seed (``recal_seed``), not the trial's: the batch order and
        the augmentation of the recalibration batches then depend on nothing but the spec, so
        the same spec scores the same in every trial, engine and resumed run.
        """
        from aanas.supernet import recalibrate_bn

        del seed  # deliberately unused, see above
        model = self.supernet.extract(spec).to(self.device)
        if self.recal_batches > 0:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.recal_seed)
                recalibrate_bn(
                    model, self.data.train, batches=self.recal_batches, device=self.device
                )
        return model

    def evaluate(self, spec: ArchSpec, *, seed: int, report: Reporter | None) -> Evaluation:
        """Validation accuracy of the inherited subnet (one "epoch" for reporters)."""
        from aanas.train import evaluate

        model = self.model_for(spec, seed=seed)
        metrics = evaluate(model, self.data.val, self.device)
        if report is not None:
            report(0, float(metrics["top1"]))
        return Evaluation(float(metrics["top1"]), {"val_loss": float(metrics["loss"])})

    def state_dict_for(self, spec: ArchSpec, *, seed: int) -> dict[str, torch.Tensor] | None:
        """Weights for ``best/model.pt``."""
        return _state_dict_cpu(self.model_for(spec, seed=seed))


class TrainEvaluator:
    """Train from scratch for a few epochs; report validation accuracy every epoch.

    Trained weights are kept under ``checkpoint_dir/<spec digest>.pt`` (when given), so the run
    directory's ``best/model.pt`` holds the best candidate's own weights without retraining.

    ``work_dir`` (a Ray trial's checkpoint folder) makes the run resumable: :func:`aanas.train.fit`
    writes ``last.pt`` there after every epoch (model, optimiser, schedule, RNG), the trial
    reports that folder as its ``tune.Checkpoint``, and a restored trial whose folder already
    holds ``last.pt`` continues from that epoch instead of starting over.
    """

    name = "train"

    def __init__(
        self,
        data: Any,
        recipe: Any,
        *,
        device: str,
        checkpoint_dir: Path | None = None,
        work_dir: Path | None = None,
    ) -> None:
        if data.val is None:
            raise ValueError("the train evaluator needs a validation split (val_fraction > 0)")
        self.data = data
        self.recipe = recipe  # aanas.config.TrainRecipe
        self.device = device
        self.checkpoint_dir = checkpoint_dir
        self.work_dir = work_dir

    def _checkpoint(self, spec: ArchSpec) -> Path | None:
        return None if self.checkpoint_dir is None else self.checkpoint_dir / f"{spec.digest()}.pt"

    def evaluate(self, spec: ArchSpec, *, seed: int, report: Reporter | None) -> Evaluation:
        """Short training run; accuracy is the last epoch's validation top-1."""
        from aanas.models import create_model
        from aanas.train import fit, seed_everything

        seed_everything(seed)
        model = create_model(spec)

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            if report is not None:
                report(epoch, float(metrics["val_top1"]))

        resume = None
        start_epoch = 0
        if self.work_dir is not None and (self.work_dir / FIT_LAST).is_file():
            from aanas.train import load_checkpoint

            resume = self.work_dir / FIT_LAST
            start_epoch = int(load_checkpoint(resume).raw["epoch"])
            _LOG.info("trial of %s resumes at epoch %d", spec.encode(), start_epoch)
        out = fit(
            model,
            self.data,
            dataclasses.replace(self.recipe, seed=seed),
            device=self.device,
            out_dir=self.work_dir,
            resume=resume,
            on_epoch=on_epoch,
            progress=False,
            evaluate_test=False,
        )
        path = self._checkpoint(spec)
        if path is not None:
            save_weights(path, spec, _state_dict_cpu(model))
        extras = {
            k: float(out[k])
            for k in ("val_loss", "train_loss", "train_top1", "best_val_top1")
            if isinstance(out.get(k), int | float)
        }
        extras["epochs"] = float(self.recipe.epochs)
        if start_epoch:
            extras["resumed_at_epoch"] = float(start_epoch)  # epochs restored, not retrained
        return Evaluation(float(out["val_top1"]), extras)

    def state_dict_for(self, spec: ArchSpec, *, seed: int) -> dict[str, torch.Tensor] | None:
        """The weights saved when ``spec`` was trained (None if this worker did not keep them)."""
        path = self._checkpoint(spec)
        if path is None or not path.is_file():
            return None
        data = torch.load(path, map_location="cpu", weights_only=True)
        state: dict[str, torch.Tensor] = data["state_dict"]
        return state


def train_recipe_for(recipe: SearchRecipe, input_size: int) -> Any:
    """The short :class:`aanas.config.TrainRecipe` of the ``train`` evaluator.

    Starts from ``recipe.train_recipe`` (a YAML path or shipped name) when given, else from the
    ``digits_tiny`` settings (SGD + Nesterov, cosine, label smoothing off); the search's epochs,
    lr, batch size, step cap and input size override it.
    """
    from aanas.config import TrainRecipe, load_recipe

    base = (
        load_recipe(recipe.train_recipe)
        if recipe.train_recipe
        else TrainRecipe(
            optimizer="sgd",
            nesterov=True,
            lr=recipe.train_lr,
            weight_decay=5e-4,
            grad_clip=5.0,
            wd_exclude_bn_bias=True,
            warmup_epochs=0.0,
        )
    )
    return dataclasses.replace(
        base,
        data=recipe.data,
        input_size=input_size,
        val_fraction=recipe.val_fraction,
        epochs=recipe.train_epochs,
        batch_size=recipe.batch_size,
        lr=recipe.train_lr if not recipe.train_recipe else base.lr,
        max_train_batches=recipe.max_train_batches,
        seed=recipe.seed,
        val_every=1,  # the pruner reads validation accuracy after every epoch
    )


def load_supernet(space: Any, path: Path, device: str) -> Any:
    """A :class:`aanas.supernet.SuperNet` of ``space`` with the weights saved at ``path``."""
    from aanas.supernet import SuperNet

    supernet = SuperNet(space)
    supernet.load(path)
    return supernet.to(device)


def prepare_supernet(
    recipe: SearchRecipe,
    space: Any,
    data: Any,
    *,
    path: Path,
    device: str,
    time_budget_s: float = 0.0,
) -> Any:
    """Train the space's supernet once, or load it: ``recipe.supernet``, else ``path`` if it
    exists (a resumed search), else train and save to ``path`` (atomically). ``time_budget_s``
    (> 0) bounds the training (:attr:`aanas.config.SupernetRecipe.time_budget_s`). Training
    keeps its state after each epoch in ``<path stem>.progress.pt``: a search killed while
    its supernet trains continues from the last finished epoch."""
    from aanas.supernet import progress_file, seeded_supernet, train_supernet

    source = Path(recipe.supernet) if recipe.supernet else path
    if source.is_file():
        _LOG.info("loading supernet %s", source)
        return load_supernet(space, source, device)
    if recipe.supernet:
        raise FileNotFoundError(f"supernet checkpoint not found: {recipe.supernet}")
    supernet = seeded_supernet(space, recipe.seed).to(device)
    _LOG.info("training supernet: %d epochs on %s", recipe.supernet_epochs, recipe.data)
    if recipe.supernet_epochs > 0:
        train_supernet(
            supernet,
            data,
            epochs=recipe.supernet_epochs,
            lr=recipe.supernet_lr,
            seed=recipe.seed,
            device=device,
            max_batches=recipe.max_train_batches or None,
            time_budget_s=time_budget_s,
            checkpoint=progress_file(path),
        )
    supernet.save(path)
    return supernet


def build_evaluator(
    recipe: SearchRecipe,
    space: Any,
    data: Any,
    *,
    device: str,
    supernet: Any = None,
    supernet_path: Path | None = None,
    checkpoint_dir: Path | None = None,
    work_dir: Path | None = None,
) -> SuperNetEvaluator | TrainEvaluator:
    """The evaluator ``recipe.evaluator`` names (``work_dir``: see :class:`TrainEvaluator`)."""
    if recipe.evaluator == "supernet":
        if supernet is None:
            if supernet_path is None:
                raise ValueError("the supernet evaluator needs a supernet or its checkpoint path")
            supernet = load_supernet(space, supernet_path, device)
        return SuperNetEvaluator(
            supernet,
            data,
            recal_batches=recipe.recal_batches,
            device=device,
            recal_seed=recipe.seed,
        )
    return TrainEvaluator(
        data,
        train_recipe_for(recipe, data.input_size),
        device=device,
        checkpoint_dir=checkpoint_dir,
        work_dir=work_dir,
    )


def latency_fns(
    recipe: SearchRecipe, table: Any = None
) -> tuple[Callable[[ArchSpec], float] | None, Callable[[ArchSpec], float] | None]:
    """(measure, predict) latency functions for ``recipe.latency_mode`` (None where off).

    ``table``: an already loaded :class:`aanas.cost.LatencyTable` (a Ray worker gets the
    driver's table through the object store; ``recipe.latency_table`` is a path on the driver).
    """
    mode = recipe.latency_mode
    if mode == "measure":
        from aanas.cost.latency import measure

        def measured(spec: ArchSpec) -> float:
            result = measure(
                spec, backend=recipe.latency_backend, threads=recipe.latency_threads, batch=1
            )
            return float(result.median_ms)

        return measured, None
    if mode == "predict":
        from aanas.cost.latency import LatencyTable

        if table is None:
            assert recipe.latency_table is not None  # SearchRecipe checks it
            loaded = LatencyTable.load(recipe.latency_table)
            if loaded is None:  # measured on another machine (LatencyTable.load logged which)
                raise RecipeError(
                    f"latency_table {recipe.latency_table!r} was measured on another machine: "
                    "rebuild it here (aanas profile --build-lut) or use --latency measure"
                )
            table = loaded
        lut: LatencyTable = table

        def predicted(spec: ArchSpec) -> float:
            return float(lut.predict(spec))

        return None, predicted
    return None, None


def build_objective(
    recipe: SearchRecipe,
    space: Any,
    scorer: Scorer,
    *,
    evaluator: Evaluator | None = None,
    data: Any = None,
    device: str = "cpu",
    supernet: Any = None,
    supernet_path: Path | None = None,
    checkpoint_dir: Path | None = None,
    work_dir: Path | None = None,
    latency_table: Any = None,
) -> Objective:
    """The shared :class:`Objective` of a search, in the driver or in a Ray worker.

    ``evaluator`` replaces the one the recipe names; otherwise it is built over ``data``
    (built here when None) with the given supernet (or its checkpoint path). ``work_dir`` and
    ``latency_table``: see :class:`TrainEvaluator` and :func:`latency_fns`.
    """
    if evaluator is None:
        if data is None:
            data = build_data_for(recipe, space.base.input_size)
        evaluator = build_evaluator(
            recipe,
            space,
            data,
            device=device,
            supernet=supernet,
            supernet_path=supernet_path,
            checkpoint_dir=checkpoint_dir,
            work_dir=work_dir,
        )
    measure_fn, predict_fn = latency_fns(recipe, latency_table)
    return Objective(
        space,
        evaluator,
        scorer=scorer,
        budget=Budget.from_recipe(recipe),
        seed=recipe.seed,
        measure_latency=measure_fn,
        predict_latency=predict_fn,
    )
