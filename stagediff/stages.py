"""The stage graph: which dictionary is trained on which (model, data), from which parent.

The method's picture, in code:

            base data            fine-tune data
 base model    S  ───────────────►  D
               │                    │
               ▼                    ▼
 ft model      M  ───────────────►  F   (F_via_D from D, F_via_M from M)

S is trained from scratch (or loaded from a pretrained SAELens dictionary); every
other stage is a fine-tune of its parent, so feature i is the same feature in all
of them. Any other graph — e.g. a chain ckpt0 → ckpt1 → ckpt2 with data switches —
is described with explicit `model`, `data` and `parent` keys under `stages:`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from stagediff.config import Config
from stagediff.errors import StagediffError
from stagediff.layout import store_name

# name: (model key, data key, parent)
STANDARD_GRAPH: dict[str, tuple[str, str, str | None]] = {
    "S": ("base", "base", None),
    "D": ("base", "finetune", "S"),
    "M": ("finetuned", "base", "S"),
    "F_via_D": ("finetuned", "finetune", "D"),
    "F_via_M": ("finetuned", "finetune", "M"),
}
CONTROL = "_ctl"  # control continuations are named <start stage>_ctl<j>, e.g. D_ctl0


@dataclass(frozen=True)
class Stage:
    """One dictionary of the run, fully resolved."""

    name: str
    model: str  # key into Config.model_paths()
    data: str  # key into Config.data_configs()
    parent: str | None
    tokens: int
    lr: float
    seed: int  # data order and initialisation: each stage its own (stage_seed), so no two share batches
    from_pretrained: str | None = None
    aux_k: bool = True  # whether the aux-k loss revives silent features while this stage trains
    control_of: tuple[str, str] | None = None  # a control continuation: the real edge (a, b) it repeats from a

    @property
    def store(self) -> str:
        """Name of the activation store this stage trains on: `<model>__<data>`."""
        return store_name(self.model, self.data)


def stage_seed(seed: int, name: str) -> int:
    """The seed of stage `name` in a run seeded `seed`: a hash of both, so every stage draws its own
    batch order (F_via_D and F_via_M on the same store would otherwise see identical batches, and
    the optimizer noise they share would pass the "rotated on both axes" test)."""
    return int(hashlib.sha256(f"{seed}/{name}".encode()).hexdigest()[:15], 16)


def is_control(name: str) -> bool:
    """Whether a stage name is a control continuation (D_ctl0, ...): trained for the diff's noise standing only."""
    return re.fullmatch(rf".+{CONTROL}\d+", name) is not None


def control_names(start: str, controls: int) -> list[str]:
    """Names of the control continuations of an axis's start stage: D -> [D_ctl0, D_ctl1, ...]."""
    return [f"{start}{CONTROL}{j}" for j in range(controls)]


def resolve_stages(cfg: Config) -> list[Stage]:
    """The run's stages in training order (parents first), with every default filled in."""
    raw = dict(cfg.stages)
    if "F" in raw:  # `F` configures both F stages at once
        f = raw.pop("F")
        for name in ("F_via_D", "F_via_M"):
            raw.setdefault(name, f)
    models, datasets = cfg.model_paths(), cfg.data_configs()
    stages: dict[str, Stage] = {}
    for name, sc in raw.items():
        model, data, parent = STANDARD_GRAPH.get(name, (None, None, None))
        model, data = sc.model or model, sc.data or data
        parent = sc.parent if sc.parent is not None else parent
        if model is None or data is None:
            raise StagediffError(
                f"stage {name!r} is not a standard stage (S, D, M, F, F_via_D, F_via_M): "
                f"give it `model`, `data` and (unless it is a root) `parent` under stages.{name}"
            )
        if model not in models:
            raise StagediffError(f"stages.{name}.model is {model!r}, which is not a model of the run: use one of {sorted(models)}")
        if data not in datasets:
            raise StagediffError(f"stages.{name}.data is {data!r}, which is not a dataset of the run: use one of {sorted(datasets)}")
        if parent is not None and parent not in raw:
            raise StagediffError(f"stages.{name}.parent is {parent!r}, which is not a stage of the run: use one of {sorted(raw)}")
        root = parent is None
        if sc.from_pretrained and not root:
            raise StagediffError(f"stages.{name}.from_pretrained is only allowed on a root stage (no parent)")
        if sc.steps < 0:
            raise StagediffError(f"stages.{name}.steps must be positive, or 0 to size the stage by tokens (it is {sc.steps})")
        tokens = sc.steps * cfg.sae.batch_size if sc.steps > 0 else sc.tokens
        if tokens <= 0 and not sc.from_pretrained:
            raise StagediffError(f"stages.{name}.tokens must be positive, or set stages.{name}.steps (tokens is {sc.tokens})")
        lr = sc.lr if sc.lr is not None else (cfg.sae.lr if root else cfg.sae.lr * cfg.sae.finetune_lr_scale)
        aux_k = sc.aux_k if sc.aux_k is not None else root
        stages[name] = Stage(name, model, data, parent, tokens, lr, stage_seed(cfg.seed, name), sc.from_pretrained, aux_k)
    _add_controls(cfg, stages)
    return _topological(stages)


def _add_controls(cfg: Config, stages: dict[str, Stage]) -> None:
    """For each axis (a, b) that is a real fine-tune edge (b's parent is a): `diff.controls` copies of
    b's training run with a's model and data instead of b's, i.e. a continued on its own store with
    b's budget, lr and aux-k and a seed of its own. Their rotations are what training alone does."""
    for a, b in (tuple(ax) for ax in cfg.diff.axes if len(ax) == 2):
        if a not in stages or b not in stages or stages[b].parent != a:
            continue
        real, start = stages[b], stages[a]
        for name in control_names(a, cfg.diff.controls):
            if name in stages:
                raise StagediffError(f"stage name {name!r} is reserved for a control continuation of {a}: rename the stage")
            stages[name] = Stage(name, start.model, start.data, a, real.tokens, real.lr, stage_seed(cfg.seed, name),
                                 None, real.aux_k, (a, b))


def stage_edges(stages: list[Stage]) -> list[tuple[str, str]]:
    """Default edges to diff: every parent→child edge, plus each root to every leaf two or more steps away."""
    by_name = {s.name: s for s in stages}
    stages = [s for s in stages if s.control_of is None]  # controls are compared in the diff, not as edges
    edges = [(s.parent, s.name) for s in stages if s.parent is not None]
    children = {s.parent for s in stages if s.parent is not None}
    for leaf in (s for s in stages if s.name not in children):
        root = leaf
        while root.parent is not None:
            root = by_name[root.parent]
        if (root.name, leaf.name) not in edges and root.name != leaf.name:
            edges.append((root.name, leaf.name))
    return edges


def required_stores(stages: list[Stage]) -> dict[str, tuple[str, str]]:
    """Activation stores the stages train on: name -> (model key, data key)."""
    return {s.store: (s.model, s.data) for s in stages if not s.from_pretrained}


def store_budgets(cfg: Config) -> dict[tuple[str, str], int]:
    """Tokens to harvest per (model, data): the largest budget of the stages reading it."""
    budgets: dict[tuple[str, str], int] = {}
    for s in resolve_stages(cfg):
        if not s.from_pretrained:
            budgets[(s.model, s.data)] = max(budgets.get((s.model, s.data), 0), s.tokens)
    return budgets


def _topological(stages: dict[str, Stage]) -> list[Stage]:
    ordered: list[Stage] = []
    state: dict[str, int] = {}  # 1 = visiting, 2 = done

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            raise StagediffError(f"the stage graph has a cycle: {' -> '.join(path + [name])}; make the parents form a tree")
        state[name] = 1
        parent = stages[name].parent
        if parent is not None:
            visit(parent, path + [name])
        state[name] = 2
        ordered.append(stages[name])

    for name in stages:
        visit(name, [])
    return ordered
