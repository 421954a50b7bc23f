"""Supervised training loop: :func:`fit` a model on a :class:`~aanas.data.DataBundle`.

Implements the optimisation settings used by Bello et al., *Attention Augmented Convolutional
Networks* (arXiv:1904.09925, appendix A) and the recipes it follows: SGD with (Nesterov)
momentum (ResNet, Wide-ResNet), TF-style RMSProp (MnasNet, Tan et al., arXiv:1807.11626), step /
cosine / exponential schedules with linear warm-up, label smoothing, weight decay optionally
excluding BatchNorm and bias parameters, gradient clipping, an EMA of the weights, and mixed
precision on CUDA.

Device-agnostic: everything takes a ``device``. Multi-GPU data parallelism runs under
``torchrun --nproc_per_node N -m aanas train ...``: :func:`setup_distributed` initialises the
process group from the torchrun environment (NCCL on CUDA, Gloo on CPU), :func:`fit` wraps the
model in ``DistributedDataParallel``, only rank 0 logs and writes files, and evaluation metrics
are all-reduced. ``recipe.batch_size`` is the global batch.

Checkpoints hold model, optimiser, scheduler, grad-scaler and EMA state, the epoch, the model's
spec string and all RNG states, written atomically; ``resume=`` continues bit-for-bit on CPU in
a single process (each epoch's shuffling depends only on ``(seed, epoch)``).
:func:`load_checkpoint` reads these and the other weight files aanas meets (a search's
``{"spec", "state_dict"}`` files, bare state_dicts), with one-line errors for bad files.
"""

from __future__ import annotations

import csv
import dataclasses
import gc
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

# Imported before any process group exists, on purpose: its functions take `group=group.WORLD`
# as a default argument, evaluated at import time. DistributedDataParallel imports it lazily
# (via torch.distributed._shard) while a group is alive, and those ten defaults then keep the
# default ProcessGroupGloo/NCCL, its TCPStore and their C++ threads alive past
# destroy_process_group(), to be torn down at interpreter exit racing the exit path ("terminate
# called without an active exception", SIGABRT, rank 0 which hosts the store). Bound now, the
# defaults are None. See teardown_distributed() and the DDP test, which checks the threads.
import torch.distributed.nn.functional  # noqa: F401
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from tqdm import tqdm

from aanas._io import atomic_open, load_torch_file
from aanas.config import TrainRecipe, recipe_to_dict
from aanas.data import DataBundle
from aanas.errors import CheckpointError
from aanas.models import zero_init_residual

__all__ = [
    "fit",
    "evaluate",
    "recalibrate_bn",
    "lr_factor",
    "NonFiniteLossError",
    "DistContext",
    "setup_distributed",
    "teardown_distributed",
    "seed_everything",
    "load_checkpoint",
    "Checkpoint",
    "CHECKPOINT_VERSION",
]

_LOG = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1  # bump when the checkpoint layout changes
_LAST = "last.pt"
_BEST = "best.pt"

EpochCallback = Callable[[int, dict[str, float]], None]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/inf; raised before the bad step touches the weights."""

    def __init__(self, epoch: int, step: int, value: float) -> None:
        super().__init__(
            f"non-finite training loss {value} at epoch {epoch}, step {step}; stopped before the "
            "optimiser step (no checkpoint written for this epoch). Lower lr, enable grad_clip "
            "or warm-up"
        )
        self.epoch, self.step, self.value = epoch, step, value


# --- distributed helpers ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DistContext:
    """Where this process sits in a (possibly trivial) data-parallel group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"  # the device this process should train on (cuda:LOCAL_RANK under DDP)

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, prints and writes files."""
        return self.rank == 0


def setup_distributed(device: str = "cpu") -> DistContext:
    """Initialise ``torch.distributed`` when launched by torchrun (``WORLD_SIZE`` > 1).

    Uses NCCL when ``device`` is CUDA (one GPU per process: ``cuda:LOCAL_RANK``), else Gloo.
    Without torchrun variables this is a no-op returning a single-process context.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(device=device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, str(dev))


def teardown_distributed(*, barrier: bool = True) -> None:
    """Leave the process group cleanly (a no-op without one).

    1. ``barrier``: every rank waits here until all ranks arrive, so no rank closes its sockets
       (or, on rank 0, the TCPStore every rank talks to) while a peer is still inside a
       collective. Pass False on an error path: a peer that died would make it wait forever.
    2. Garbage-collect first: a finished ``DistributedDataParallel`` wrapper (its C++ reducer
       holds the group) can sit in a reference cycle; freed now, it is not freed later, during
       interpreter shutdown.
    3. ``destroy_process_group``: with nothing else holding the group (see the import of
       ``torch.distributed.nn.functional`` above), this drops its last reference, so the
       backend's worker threads are joined and the store closed here, while Python is alive.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if barrier:
        dist.barrier()
    gc.collect()
    dist.destroy_process_group()
    gc.collect()


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum ``values`` over ranks (identity without a process group)."""
    if _rank_world()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


# --- seeding and RNG state --------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    """All global RNG states, as types ``torch.load(weights_only=True)`` accepts."""
    _, keys, pos, has_gauss, cached = np.random.get_state()  # legacy MT19937 tuple
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": random.getstate(),
        "cuda": [],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    nps = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            nps["keys"].numpy().astype(np.uint32),
            nps["pos"],
            nps["has_gauss"],
            nps["cached_gaussian"],
        )
    )
    random.setstate(state["python"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- atomic file output -----------------------------------------------------------------------


def _write_json(path: Path, obj: Any) -> None:
    with atomic_open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True)
        fh.write("\n")


def _append_metrics(out: Path, row: dict[str, Any], columns: list[str]) -> None:
    """Append one epoch to ``metrics.jsonl`` and ``metrics.csv`` (header ``columns``, written
    on first write: a row may lack validation values when ``val_every`` skipped them)."""
    with (out / "metrics.jsonl").open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(row, sort_keys=True) + "\n")
    csv_path = out / "metrics.csv"
    new = not csv_path.exists()
    with csv_path.open("a", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)


# --- checkpoints ------------------------------------------------------------------------------


def _spec_string(model: nn.Module) -> str:
    """Canonical spec string of ``model.spec`` if it has one (``spec.encode()``), else ''."""
    spec = getattr(model, "spec", None)
    if spec is None:
        return ""
    encode = getattr(spec, "encode", None)
    try:
        return str(encode()) if callable(encode) else str(spec)
    except Exception:  # noqa: BLE001 - a spec that cannot encode must not kill training
        _LOG.warning("could not encode model.spec; checkpoint stores no spec string")
        return ""


_TRAIN_KEYS = frozenset(
    {"epoch", "model", "optimizer", "scheduler", "scaler", "ema", "spec", "recipe", "rng"}
)  # what _save_checkpoint always writes (plus best_val_top1, best_epoch, last_metrics)
_RESUME_KEYS = _TRAIN_KEYS | {"best_val_top1", "best_epoch", "last_metrics"}


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A weights file read by :func:`load_checkpoint`, whichever format it is in.

    Formats (``format``):

    - ``"train"``: written by :func:`fit` (``last.pt``/``best.pt``): weights, optimiser,
      scheduler, scaler, EMA, RNG states, spec string and recipe; needed to resume.
    - ``"spec+state_dict"``: ``{"spec": str, "state_dict": ...}``, as a search writes
      ``best/model.pt`` and the per-candidate weights of its train evaluator.
    - ``"state_dict"``: a bare ``model.state_dict()`` (e.g. from another training script).
    """

    path: Path
    format: str
    state_dict: dict[str, torch.Tensor]  # weights for inference: the EMA's if trained with EMA
    spec: str  # canonical spec string, "" when the file names none
    recipe: dict[str, Any]  # the TrainRecipe as a dict ({} unless format == "train")
    ema: bool  # state_dict holds the EMA weights (what fit evaluated and selected on)
    raw: dict[str, Any]  # the whole file (resume reads the optimiser, RNG, ... from here)

    @property
    def description(self) -> str:
        """``"aanas train (EMA weights)"``, ``"spec + state_dict"`` or ``"bare state_dict"``."""
        if self.format == "train":
            return "aanas train (EMA weights)" if self.ema else "aanas train"
        return "spec + state_dict" if self.format == "spec+state_dict" else "bare state_dict"


def _is_state_dict(obj: Any) -> bool:
    """A non-empty ``{str: Tensor}`` mapping, as ``nn.Module.state_dict()`` returns."""
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _ema_weights(ema_state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Model weights of an ``AveragedModel`` state: ``module.`` prefix off, counter dropped."""
    prefix = "module."
    return {
        k[len(prefix) :] if k.startswith(prefix) else k: v
        for k, v in ema_state.items()
        if k != "n_averaged"
    }


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a weights file in any of the :class:`Checkpoint` formats (onto the CPU).

    Loads with ``torch.load(weights_only=True)`` (no code runs from the file) through
    :func:`aanas._io.load_torch_file`, so an empty, truncated, text or foreign file is one
    :class:`~aanas.errors.CheckpointError` naming the file, never a reader's traceback.

    Raises:
        CheckpointError: missing or unreadable file, an unknown layout, or an ``aanas train``
            checkpoint of another :data:`CHECKPOINT_VERSION`.
    """
    target = Path(path)
    obj = load_torch_file(target, "checkpoint")
    if isinstance(obj, dict) and "version" in obj and "model" in obj:
        version = obj.get("version")
        if version != CHECKPOINT_VERSION:
            raise CheckpointError(
                f"checkpoint {target}: version {version!r}, this aanas reads {CHECKPOINT_VERSION}"
            )
        missing = sorted(_TRAIN_KEYS - obj.keys())
        if missing or not _is_state_dict(obj["model"]):
            raise CheckpointError(
                f"checkpoint {target}: incomplete aanas train checkpoint "
                f"(missing {missing or ['a model state_dict']})"
            )
        recipe = obj["recipe"] if isinstance(obj["recipe"], dict) else {}
        use_ema = isinstance(obj["ema"], dict) and float(recipe.get("ema_decay") or 0.0) > 0
        return Checkpoint(
            path=target,
            format="train",
            state_dict=_ema_weights(obj["ema"]) if use_ema else dict(obj["model"]),
            spec=str(obj["spec"] or ""),
            recipe=dict(recipe),
            ema=use_ema,
            raw=obj,
        )
    if isinstance(obj, dict) and "state_dict" in obj and _is_state_dict(obj["state_dict"]):
        spec = obj.get("spec") or ""
        if not isinstance(spec, str):
            raise CheckpointError(f"checkpoint {target}: 'spec' must be a string, got {spec!r}")
        return Checkpoint(target, "spec+state_dict", dict(obj["state_dict"]), spec, {}, False, obj)
    if _is_state_dict(obj):
        return Checkpoint(target, "state_dict", dict(obj), "", {}, False, {"state_dict": obj})
    keys = sorted(map(str, obj))[:6] if isinstance(obj, dict) else type(obj).__name__
    raise CheckpointError(
        f"checkpoint {target}: not an aanas train checkpoint, a {{'spec', 'state_dict'}} dict "
        f"or a state_dict (found {keys})"
    )


# --- optimiser and schedule -------------------------------------------------------------------


def _param_groups(model: nn.Module, recipe: TrainRecipe) -> list[dict[str, Any]]:
    """One group, or two when BN/bias (every parameter with ndim <= 1) skips weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not recipe.wd_exclude_bn_bias:
        return [{"params": params, "weight_decay": recipe.weight_decay}]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return [
        {"params": decay, "weight_decay": recipe.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _make_optimizer(model: nn.Module, recipe: TrainRecipe) -> torch.optim.Optimizer:
    groups = _param_groups(model, recipe)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.nesterov
        )
    if recipe.optimizer == "adamw":
        # decoupled weight decay (Loshchilov & Hutter); momentum is Adam's beta1
        return torch.optim.AdamW(groups, lr=recipe.lr, betas=(recipe.momentum, 0.999))
    # TF RMSProp (MnasNet) adds eps inside the sqrt and starts the square average at 1;
    # torch adds it outside and starts at 0, so recipes set eps ~ sqrt(TF eps) and use warm-up.
    return torch.optim.RMSprop(
        groups,
        lr=recipe.lr,
        alpha=recipe.rmsprop_alpha,
        eps=recipe.rmsprop_eps,
        momentum=recipe.momentum,
    )


def _onecycle_factor(step: int, total: int, rise: float) -> float:
    """OneCycleLR's lr / max_lr at ``step`` (div_factor 25, final_div_factor 1e4, cos).

    Example: total 100, rise 30 (pct_start 0.3): step 0 -> 0.04, step 29 -> 1.0, step 99 -> 1.6e-6.
    """
    initial, final = 1.0 / 25.0, 1.0 / 25.0 / 1e4
    end_up = (rise if rise > 0 else 0.3 * total) - 1.0
    step = min(step, total - 1)
    if step <= end_up:
        start, end, pct = initial, 1.0, step / end_up if end_up > 0 else 1.0
    else:
        start, end, pct = 1.0, final, (step - end_up) / max(1e-9, total - 1 - end_up)
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1.0)


def lr_factor(recipe: TrainRecipe, step: int, steps_per_epoch: int) -> float:
    """Multiplier of ``recipe.lr`` before optimiser step ``step`` (0-based, global).

    Linear warm-up over ``warmup_epochs`` (``(step + 1) / warmup_steps``), then:

    - ``constant``: 1.
    - ``step``: ``gamma ** (number of milestones <= current epoch)`` (epochs 0-based; the
      ResNet recipe's "divide by 10 at epoch 30" means epochs 30.. run at lr / 10).
    - ``exponential``: ``decay_rate ** floor(epoch / decay_epochs)`` counted from step 0, as
      the TF MnasNet reference (staircase, warm-up simply overrides the first steps).
    - ``cosine``: half cosine from 1 to 0 over the steps after warm-up.

    - ``onecycle``: ``torch.optim.lr_scheduler.OneCycleLR`` (cosine annealing, without its
      momentum cycling): cosine rise from 1/25 to 1 over ``warmup_epochs`` (0: the first 30 %
      of the steps), then cosine fall to 1/25e4; no separate linear warm-up.

    Example: lr 0.1, cosine, 10 epochs x 100 steps, no warm-up: step 500 -> 0.5.
    """
    warm = recipe.warmup_epochs * steps_per_epoch
    if recipe.schedule == "onecycle":
        return _onecycle_factor(step, recipe.epochs * steps_per_epoch, warm)
    if step < warm:
        return (step + 1) / warm
    epoch = step / steps_per_epoch
    if recipe.schedule == "constant":
        return 1.0
    if recipe.schedule == "step":
        done = step // steps_per_epoch
        return float(recipe.gamma ** sum(1 for m in recipe.milestones if m <= done))
    if recipe.schedule == "exponential":
        return float(recipe.decay_rate ** math.floor(epoch / recipe.decay_epochs))
    total = recipe.epochs * steps_per_epoch
    progress = min(1.0, (step - warm) / max(1.0, total - warm))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


# --- evaluation -------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader[Any],
    device: str | torch.device,
    *,
    amp: bool = False,
) -> dict[str, float]:
    """Mean cross-entropy (no label smoothing) and top-1 accuracy of ``model`` on ``loader``.

    Under DDP each rank must hold a disjoint shard (``build_data(distributed=True)`` does);
    sums are all-reduced, so every rank returns the metrics of the whole set.
    """
    dev = torch.device(device)
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    correct = torch.zeros((), dtype=torch.int64, device=dev)
    count = 0
    use_amp = amp and dev.type == "cuda"
    for x, y in loader:
        x = x.to(dev, non_blocking=True)
        y = y.to(dev, non_blocking=True)
        with torch.autocast(dev.type, dtype=_amp_dtype(dev), enabled=use_amp):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(dim=1) == y).sum()
        count += int(y.shape[0])
    model.train(was_training)
    total_loss, total_correct, total = _all_reduce_sum(
        [float(loss_sum), float(correct), float(count)], dev
    )
    if total == 0:
        raise ValueError("evaluate: the loader yielded no samples")
    return {"loss": total_loss / total, "top1": total_correct / total, "count": total}


def _amp_dtype(dev: torch.device) -> torch.dtype:
    # fp16 + GradScaler on CUDA; the CPU branch is never enabled (autocast needs a valid dtype)
    return torch.float16 if dev.type == "cuda" else torch.bfloat16


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module, loader: DataLoader[Any], batches: int, device: str | torch.device
) -> None:
    """Re-estimate every BatchNorm's running stats from ``batches`` batches of ``loader``.

    Stats are reset and accumulated as an exact cumulative average (``momentum=None``) in
    train mode without gradients; the original momenta are restored afterwards. Under DDP
    each rank uses its own shard.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or batches <= 0:
        return
    dev = torch.device(device)
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the recalibration batches
    was_training = model.training
    model.train()
    for i, (x, _) in enumerate(loader):
        if i >= batches:
            break
        model(x.to(dev, non_blocking=True))
    for m, momentum in zip(bns, momenta, strict=True):
        m.momentum = momentum
    model.train(was_training)


# --- training ---------------------------------------------------------------------------------


@dataclasses.dataclass
class _State:
    """Mutable per-run objects, grouped so the epoch loop reads top to bottom."""

    net: nn.Module  # the module called in training (DDP wrapper or the model itself)
    model: nn.Module  # the plain model (state_dict, EMA source, checkpoints)
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    scaler: torch.amp.GradScaler
    ema: AveragedModel | None
    criterion: nn.Module
    amp: bool
    steps_per_epoch: int
    memory_format: torch.memory_format = torch.contiguous_format  # of the training inputs


def _validates_after(recipe: TrainRecipe, epoch: int) -> bool:
    """Whether validation runs after 0-based ``epoch``: every ``val_every`` and after the last."""
    if epoch + 1 == recipe.epochs:
        return True
    return recipe.val_every > 0 and (epoch + 1) % recipe.val_every == 0


def _check_finite(loss: torch.Tensor, epoch: int, step: int, dev: torch.device) -> None:
    """Raise :class:`NonFiniteLossError` on every rank if any rank's loss is NaN/inf."""
    ok = torch.isfinite(loss.detach()).to(torch.float32)
    if _rank_world()[1] > 1:
        ok = ok.to(dev)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if not bool(ok):
        raise NonFiniteLossError(epoch, step, float(loss.detach()))


def _train_one_epoch(
    st: _State,
    loader: DataLoader[Any],
    epoch: int,
    recipe: TrainRecipe,
    dev: torch.device,
    show: bool,
) -> dict[str, float]:
    st.net.train()
    sampler = loader.sampler
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)  # order = f(seed, epoch): needed for bit-exact resume
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    correct = torch.zeros((), dtype=torch.int64, device=dev)
    count = 0
    bar = tqdm(
        total=st.steps_per_epoch,
        desc=f"epoch {epoch + 1}/{recipe.epochs}",
        disable=not show,
        leave=False,
        file=sys.stderr,
    )
    for i, (x, y) in enumerate(loader):
        if i >= st.steps_per_epoch:
            break
        x = x.to(dev, non_blocking=True, memory_format=st.memory_format)
        y = y.to(dev, non_blocking=True)
        with torch.autocast(dev.type, dtype=_amp_dtype(dev), enabled=st.amp):
            logits = st.net(x)
            loss = st.criterion(logits, y)
        _check_finite(loss, epoch, i, dev)
        st.optimizer.zero_grad(set_to_none=True)
        st.scaler.scale(loss).backward()
        if recipe.grad_clip > 0:
            st.scaler.unscale_(st.optimizer)  # clip the true gradients, not the scaled ones
            nn.utils.clip_grad_norm_(st.model.parameters(), recipe.grad_clip)
        st.scaler.step(st.optimizer)
        st.scaler.update()
        st.scheduler.step()
        if st.ema is not None:
            st.ema.update_parameters(st.model)
        loss_sum += loss.detach().double() * y.shape[0]
        correct += (logits.detach().argmax(dim=1) == y).sum()
        count += int(y.shape[0])
        bar.update(1)
        if show:
            bar.set_postfix(loss=f"{float(loss):.4f}")
    bar.close()
    total_loss, total_correct, total = _all_reduce_sum(
        [float(loss_sum), float(correct), float(count)], dev
    )
    if total == 0:
        raise ValueError("training loader yielded no batches (data set smaller than a batch?)")
    return {"train_loss": total_loss / total, "train_top1": total_correct / total}


def _save_checkpoint(
    path: Path, st: _State, recipe: TrainRecipe, next_epoch: int, extra: dict[str, Any]
) -> None:
    ckpt = {
        "version": CHECKPOINT_VERSION,
        "epoch": next_epoch,  # number of completed epochs = index of the next epoch to run
        "model": st.model.state_dict(),
        "optimizer": st.optimizer.state_dict(),
        "scheduler": st.scheduler.state_dict(),
        "scaler": st.scaler.state_dict(),
        "ema": st.ema.state_dict() if st.ema is not None else None,
        "spec": _spec_string(st.model),
        "recipe": recipe_to_dict(recipe),
        "rng": _rng_state(),
        **extra,
    }
    with atomic_open(path, "wb") as fh:
        torch.save(ckpt, fh)


def fit(
    model: nn.Module,
    data: DataBundle,
    recipe: TrainRecipe,
    *,
    device: str | torch.device = "cpu",
    out_dir: str | Path | None = None,
    resume: str | Path | None = None,
    on_epoch: EpochCallback | None = None,
    progress: bool = True,
    evaluate_test: bool = True,
) -> dict[str, Any]:
    """Train ``model`` with ``recipe`` on ``data``; return the final metrics.

    Args:
        model: any classifier ``(B, 3, S, S) -> (B, num_classes)``; moved to ``device``.
        data: loaders from :func:`aanas.data.build_data` (``distributed=True`` under DDP).
        recipe: optimisation settings (``recipe.model``/``data`` fields are not used here).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ... (under DDP: this rank's device).
        out_dir: where rank 0 writes ``last.pt``, ``best.pt`` (best validation top-1),
            ``metrics.jsonl``, ``metrics.csv`` and ``metrics.json``; None writes nothing.
        resume: checkpoint to continue from (its epoch count, optimiser, schedule and RNG).
        on_epoch: ``on_epoch(epoch, metrics)`` after each epoch's validation (0-based epoch),
            on every rank; exceptions propagate (a search pruner can stop the trial).
        progress: tqdm bar on rank 0 when stderr is a terminal.
        evaluate_test: evaluate the test split once after training (searches pass False:
            they select on validation accuracy only).

    Returns:
        ``train_loss``, ``train_top1``, ``val_loss``/``val_top1`` (when a validation split
        exists), ``best_val_top1``, ``best_epoch``, ``test_loss``/``test_top1`` (when
        evaluated), ``lr``, ``epochs``, ``time_s`` and ``checkpoint`` (path or None).

    Raises:
        NonFiniteLossError: the loss became NaN/inf (nothing of that epoch is saved).
    """
    dev = torch.device(device)
    rank, world = _rank_world()
    is_main = rank == 0
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and is_main:
        out.mkdir(parents=True, exist_ok=True)

    if recipe.zero_init_residual and resume is None:
        zeroed = zero_init_residual(model)
        _LOG.info("zero_init_residual: %d residual branches start as the identity", zeroed)
    model.to(dev)
    if recipe.channels_last:
        model.to(memory_format=torch.channels_last)
    if recipe.bn_momentum > 0:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = recipe.bn_momentum
    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None
        )
    n_batches = len(data.train)
    steps = min(n_batches, recipe.max_train_batches) if recipe.max_train_batches else n_batches
    if steps == 0:
        raise ValueError(f"data {data.name!r}: no training batches of size {recipe.batch_size}")
    optimizer = _make_optimizer(model, recipe)
    st = _State(
        net=net,
        model=model,
        optimizer=optimizer,
        scheduler=LambdaLR(optimizer, lambda s: lr_factor(recipe, s, steps)),
        scaler=torch.amp.GradScaler(dev.type, enabled=recipe.amp and dev.type == "cuda"),
        ema=(
            AveragedModel(
                model,
                multi_avg_fn=get_ema_multi_avg_fn(recipe.ema_decay),  # type: ignore[no-untyped-call]
                use_buffers=True,
            )
            if recipe.ema_decay > 0
            else None
        ),
        criterion=nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing),
        amp=recipe.amp and dev.type == "cuda",
        steps_per_epoch=steps,
        memory_format=torch.channels_last if recipe.channels_last else torch.contiguous_format,
    )
    if recipe.amp and dev.type != "cuda":
        _LOG.info("amp requested but device is %s: training in fp32", dev)

    start_epoch = 0
    best: dict[str, Any] = {"best_val_top1": -1.0, "best_epoch": -1}
    last: dict[str, Any] = {}
    if resume is not None:
        # CPU first: RNG states must stay CPU tensors; load_state_dict moves the rest to `dev`
        loaded = load_checkpoint(resume)
        ckpt = loaded.raw
        missing = sorted(_RESUME_KEYS - ckpt.keys()) if loaded.format == "train" else ["all"]
        if missing:
            raise CheckpointError(
                f"--resume {resume}: not a complete aanas train checkpoint ({loaded.description}"
                f", missing {missing[:6]})"
            )
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as exc:
            first = " ".join(str(exc).split())[:300]
            raise CheckpointError(
                f"--resume {resume}: weights do not fit the model: {first}"
            ) from None
        optimizer.load_state_dict(ckpt["optimizer"])
        st.scheduler.load_state_dict(ckpt["scheduler"])
        st.scaler.load_state_dict(ckpt["scaler"])
        if st.ema is not None:
            if ckpt["ema"] is None:
                raise CheckpointError(f"--resume {resume}: no EMA state, but ema_decay > 0")
            st.ema.load_state_dict(ckpt["ema"])
        start_epoch = int(ckpt["epoch"])
        best = {"best_val_top1": ckpt["best_val_top1"], "best_epoch": ckpt["best_epoch"]}
        last = dict(ckpt["last_metrics"])
        changed = sorted(k for k, v in recipe_to_dict(recipe).items() if ckpt["recipe"].get(k) != v)
        if changed:
            _LOG.warning("resuming %s with changed recipe fields: %s", resume, changed)
        _set_rng_state(ckpt["rng"])  # last: nothing above may consume random numbers after it
        _LOG.info("resumed %s at epoch %d/%d", resume, start_epoch, recipe.epochs)
    elif out is not None and is_main:
        for name in ("metrics.jsonl", "metrics.csv"):
            (out / name).unlink(missing_ok=True)  # a fresh run starts fresh logs

    show = progress and is_main and sys.stderr.isatty()
    t0 = time.perf_counter()
    for epoch in range(start_epoch, recipe.epochs):
        t_epoch = time.perf_counter()
        metrics: dict[str, Any] = {"epoch": epoch}
        metrics.update(_train_one_epoch(st, data.train, epoch, recipe, dev, show))
        metrics["lr"] = st.scheduler.get_last_lr()[0]
        eval_model = st.ema.module if st.ema is not None else model
        validate = _validates_after(recipe, epoch)
        if recipe.bn_recalibrate_batches and validate:
            recalibrate_bn(eval_model, data.train, recipe.bn_recalibrate_batches, dev)
        if data.val is not None and validate:
            val = evaluate(eval_model, data.val, dev, amp=st.amp)
            metrics["val_loss"], metrics["val_top1"] = val["loss"], val["top1"]
            if val["top1"] > best["best_val_top1"]:
                best = {"best_val_top1": val["top1"], "best_epoch": epoch}
        metrics["time_s"] = time.perf_counter() - t_epoch
        last = metrics
        if is_main:
            _LOG.info(
                "epoch %d/%d %s",
                epoch + 1,
                recipe.epochs,
                " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "epoch"),
            )
            if out is not None:
                columns = list(metrics)
                if data.val is not None:
                    columns += [k for k in ("val_loss", "val_top1") if k not in metrics]
                _append_metrics(out, metrics, columns)
                extra = {**best, "last_metrics": metrics}
                _save_checkpoint(out / _LAST, st, recipe, epoch + 1, extra)
                if best["best_epoch"] == epoch:
                    _save_checkpoint(out / _BEST, st, recipe, epoch + 1, extra)
        if on_epoch is not None:
            on_epoch(epoch, dict(metrics))

    result: dict[str, Any] = {k: v for k, v in last.items() if k not in ("epoch", "time_s")}
    result.update(epochs=recipe.epochs, time_s=time.perf_counter() - t0)
    if data.val is not None:
        result.update(best)
    if evaluate_test:
        eval_model = st.ema.module if st.ema is not None else model
        test = evaluate(eval_model, data.test, dev, amp=st.amp)
        result["test_loss"], result["test_top1"] = test["loss"], test["top1"]
    result["checkpoint"] = str(out / _LAST) if out is not None else None
    if out is not None and is_main:
        _write_json(out / "metrics.json", result)
    return result
