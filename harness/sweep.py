"""Sweep files: read safely, validated with errors that name the bad key, expanded into a plan.

The plan is the cartesian product of TP sizes, the ``pass_config`` lists (a scalar is fixed, a list is swept) and
the ``variants`` (a list of field sets laid over each combination: an ablation such as "each fusion alone, then
all of them" without the 2^n configs of a product).
Combinations that cannot run are kept as ``Skipped`` with the reason (they become ``skipped`` rows), combinations
that would measure nothing new are dropped with the reason: a fusion with nothing to match in this model, or an
effective config equal to one already planned. The all-off baseline is always planned first for each TP size and,
unless ``measure.baseline_twice`` is off, once more last: the two give the noise floor the report compares
speedups with.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fusiontune.kernels import symm_mem
from fusiontune.passes.config import PassConfig, PassConfigError, resolve
from fusiontune.passes.fusions import FUSION_FLAGS, PASSES, PASSES_BY_FLAG
from fusiontune.passes.platform import Platform

from .hf_config import read_hf_config
from .model import DTYPES, QUANT_CHOICES, ModelConfig
from .presets import PRESETS, build_model_config
from .roles import Role


class SweepError(ValueError):
    """A sweep file that cannot be run as written; the message says where and how to fix it."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # no silent coercion ("2" for 2, 1 for true)


class ModelSpec(_Strict):
    preset: Optional[Literal[tuple(PRESETS)]] = None  # type: ignore[valid-type]
    quant: Literal[QUANT_CHOICES] = "none"  # type: ignore[valid-type]
    group_size: Literal[64, 128] = 128
    hidden_size: Optional[int] = Field(None, gt=0)
    num_layers: Optional[int] = Field(None, gt=0)
    num_heads: Optional[int] = Field(None, gt=0)
    num_kv_heads: Optional[int] = Field(None, gt=0)
    head_dim: Optional[int] = Field(None, gt=0)
    intermediate_size: Optional[int] = Field(None, gt=0)
    qk_norm: Optional[bool] = None
    rope_style: Optional[Literal["neox", "gptj"]] = None
    hidden_pad_multiple: Optional[int] = Field(None, ge=0)
    dtype: Optional[Literal[tuple(DTYPES)]] = None  # type: ignore[valid-type]
    max_position: Optional[int] = Field(None, gt=0)
    # > 0: each forward is a decode step of num_tokens sequences with this many tokens already cached
    decode_context: Optional[int] = Field(None, ge=0)
    # instead of a preset: a Hugging Face config.json (harness/hf_config.py), relative to where fusiontune runs
    hf_config: Optional[str] = None

    @model_validator(mode="after")
    def _one_source(self):
        if (self.preset is None) == (self.hf_config is None):
            raise ValueError("give the model as exactly one of preset: NAME or hf_config: path/to/config.json")
        return self

    def build(self) -> ModelConfig:
        """The model's shape: the preset's or the config.json's, the other keys laid over it."""
        fields = self.model_dump(exclude_none=True)
        path = fields.pop("hf_config", None)
        return read_hf_config(path).with_overrides(**fields) if path else build_model_config(**fields)


class MeasureSpec(_Strict):
    warmup: int = Field(3, ge=0)
    repeats: int = Field(20, ge=1)  # at least; then batches of this many until the median settles
    max_repeats: int = Field(200, ge=1)
    settle: float = Field(0.005, gt=0, lt=1)  # the median's 95% CI half-width, as a fraction of the median
    seed: int = 0
    profile: bool = True  # a torch.profiler trace and per-kernel times per (config, num_tokens)
    baseline_twice: bool = True  # measure all-off again after the rest: the noise floor
    runs: int = Field(1, ge=1)  # measure every config this many times (run k of all before run k + 1)
    compile_cache: bool = True  # reuse graphs Inductor compiled in earlier runs (match counts are kept too)
    # time the configs of a TP size in shared rounds with all-off, in one process per TP group (a batch of configs
    # each), the order shuffled every round and, on GPUs, each round on fresh CUDA-graph captures: drift (clocks,
    # heat, a neighbour's load) and where a capture's buffers land hit them all alike, and each round's all-off /
    # config ratio is one sample of the speedup (its interval: order statistics over rounds). false: each alone.
    paired: bool = True
    # paired: at most this many configs per batch (None: as many as fall to each TP group). A batch's rows are
    # written size by size as it finishes them, so a run cut short keeps its finished sizes whatever the batch size;
    # smaller batches spread over more TP groups' turns, and each times all-off beside its configs (more forwards)
    batch_size: Optional[int] = Field(None, ge=1)


class CollectivesSpec(_Strict):
    """Which collective implementations the TP ranks run on GPUs (kernels/symm_mem.py). The unfused all-reduce
    is the baseline every collective fusion is measured against: ``auto`` is the fastest correct one for each
    size (torch's symmetric-memory one-shot / two-shot, NCCL above their bounds), as a serving engine runs it;
    ``nccl`` everywhere gives NCCL's numbers, labelled by this column in every row."""

    allreduce: Literal[symm_mem.ALLREDUCE_CHOICES] = "auto"  # type: ignore[valid-type]
    # the fused all-reduce + add + RMSNorm (+ quant): fusiontune's one-kernel form (auto, fusiontune), or
    # NCCL's all-reduce then the norm kernel (nccl)
    allreduce_backend: Literal[symm_mem.ALLREDUCE_BACKEND_CHOICES] = "auto"  # type: ignore[valid-type]


class ClusterSpec(_Strict):
    address: Optional[str] = None  # None: a local Ray on this machine; "auto" or ray://host:port: a cluster
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: GPUs if the cluster has any, else CPU
    dashboard: bool = False
    # TP groups measuring at once. auto: as many as the GPUs hold (one on CPUs, where groups would share cores
    # and disturb each other's timings); a number: at most that many.
    groups: Union[Literal["auto"], int] = "auto"

    @field_validator("groups")
    @classmethod
    def _at_least_one(cls, value):
        if value != "auto" and value < 1:
            raise ValueError("groups is 'auto' or a number >= 1")
        return value


Scalar = Union[bool, int, float, None]


def _sorted_sizes(values: list[int]) -> list[int]:
    if any(v < 1 for v in values):
        raise ValueError("every num_tokens must be >= 1")
    return sorted(set(values))


def _known_pass_config(values: dict) -> dict:
    known = PassConfig.model_fields
    for name in values:
        if name not in known:
            close = [k for k in known if k.split("_")[-1] == name.split("_")[-1] or name[:6] == k[:6]]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(f"unknown PassConfig field {name!r}{hint}; allowed: {', '.join(known)}")
        if isinstance(values[name], list) and not values[name]:
            raise ValueError(f"{name}: an empty list sweeps nothing; give a value or a list of values")
        for value in values[name] if isinstance(values[name], list) else [values[name]]:
            check_pass_config_value(name, value)
    return values


def check_pass_config_value(name: str, value: Any) -> None:
    """Refuse, when the file is read, a value PassConfig would refuse in every config (a negative threshold, a
    fraction of a token): found later, it would skip the whole sweep with pydantic's multi-line report."""
    try:
        PassConfig.model_validate({name: value})
    except ValidationError as exc:
        raise ValueError(f"{name}: {value!r} is not allowed ({exc.errors()[0]['msg'][0].lower()}"
                         f"{exc.errors()[0]['msg'][1:]})") from None


# The measured sizes, and PassConfig fields by name: shared by sweep and tune files.
NumTokens = Annotated[list[int], Field(min_length=1), AfterValidator(_sorted_sizes)]
PassConfigFields = AfterValidator(_known_pass_config)


class SweepSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    model: ModelSpec
    tp: Union[int, list[int]] = Field(1, validate_default=True)  # a list always, once validated
    num_tokens: NumTokens
    optimization_level: Literal[0, 1, 2, 3] = 2
    pass_config: Annotated[dict[str, Union[Scalar, list[Scalar]]], PassConfigFields] = Field(default_factory=dict)
    # Field sets laid over every pass_config combination, one config each (an empty one: the combination as is).
    variants: Optional[list[Annotated[dict[str, Scalar], PassConfigFields]]] = Field(None, min_length=1)
    measure: MeasureSpec = Field(default_factory=MeasureSpec)
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)
    collectives: CollectivesSpec = Field(default_factory=CollectivesSpec)

    @field_validator("tp")
    @classmethod
    def _tp_list(cls, value):
        values = value if isinstance(value, list) else [value]
        if not values or any(v < 1 for v in values):
            raise ValueError("every TP size must be an integer >= 1")
        return sorted(set(values))



# pydantic names each alternative of a union as a last location part: one line per field instead
_UNION_BRANCHES = re.compile(r"^(bool|int|float|str|none|list\[.*\]|dict\[.*\]|literal\[.*\]|function-after\[.*\])$",
                             re.IGNORECASE)


def _format_validation_error(error: ValidationError, source: str, root: type[BaseModel], kind: str) -> str:
    lines = [f"{source}: invalid {kind} file"]
    unions: dict[str, tuple[object, list[str]]] = {}
    for item in error.errors():
        loc = [str(part) for part in item["loc"]]
        if len(loc) > 1 and _UNION_BRANCHES.match(loc[-1]):
            field = ".".join(loc[:-1])
            unions.setdefault(field, (item.get("input"), []))[1].append(loc[-1])
            continue
        where = ".".join(loc) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            parent = _model_at(root, item["loc"][:-1])
            allowed = ", ".join(parent.model_fields) if parent else ""
            message = f"unknown key; allowed keys here: {allowed}"
        elif item["type"] == "missing":
            message = "required key is missing"
        lines.append(f"  {where}: {message}")
    for field, (value, branches) in unions.items():
        lines.append(f"  {field}: {value!r} is not a valid value (allowed: {_readable(branches)})")
    return "\n".join(lines)


def _readable(branches: list[str]) -> str:
    """pydantic's union branch names as a reader says them: "int or a list" for ["int", "list[int]"]."""
    names = []
    for branch in branches:
        lower = branch.lower()
        if lower.startswith("literal["):
            names.append(branch[len("literal["):-1])
        elif lower.startswith("list["):
            names.append("a list of these")
        else:
            names.append(lower.split("[")[0])
    names = list(dict.fromkeys(names))
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _model_at(root: type[BaseModel], loc) -> type[BaseModel] | None:
    model = root
    for part in loc:
        field_info = model.model_fields.get(str(part))
        annotation = getattr(field_info, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


MAX_SPEC_BYTES = 1024 * 1024  # a sweep or tune file is a page of YAML; anything larger is the wrong file


def read_file(path: str | Path, kind: str) -> str:
    try:
        size = Path(path).stat().st_size
        if size > MAX_SPEC_BYTES:
            raise SweepError(f"{path}: {size} bytes; a {kind} file is at most {MAX_SPEC_BYTES} bytes of YAML (is this "
                             "the right file?)")
        return Path(path).read_text()
    except OSError as exc:
        raise SweepError(f"cannot read {kind} file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise SweepError(f"{path}: not a text file; a {kind} file is YAML") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml's safe loader, refusing a key given twice in one mapping (plain safe_load keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1})",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def safe_yaml(text: str) -> Any:
    """``text`` parsed as YAML safely (no tags that build Python objects), every key once per mapping."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def parse_spec(text: str, source: str, root: type[BaseModel], kind: str, keys: str) -> Any:
    """A YAML file read safely and validated as ``root``; errors name the key, and for an unknown key the keys
    allowed at that place (``kind``: "sweep", "tune"; ``keys``: the top-level keys, for a file that is no mapping)."""
    try:
        data = safe_yaml(text)
    except yaml.YAMLError as exc:
        raise SweepError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise SweepError(f"{source}: a {kind} file is a mapping ({keys})")
    try:
        return root(**data)
    except ValidationError as exc:
        raise SweepError(_format_validation_error(exc, source, root, kind)) from None


def load_sweep(path: str | Path) -> tuple[SweepSpec, str]:
    """Parse and validate a sweep file; returns the spec and the file's text (kept in the manifest)."""
    text = read_file(path, "sweep")
    return parse_sweep(text, str(path)), text


def parse_sweep(text: str, source: str = "<sweep>") -> SweepSpec:
    return parse_spec(text, source, SweepSpec, "sweep", "name:, model:, tp:, num_tokens:, ...")


# What makes two sweeps' rows comparable: a resume may add TP sizes, num_tokens and variants (a larger machine, more
# sizes), never change these.
IDENTITY_FIELDS = ("model", "optimization_level", "pass_config", "collectives")


def identity_differences(earlier: SweepSpec, later: SweepSpec) -> list[str]:
    """The identity fields in which two sweeps differ (empty: a resume of one with the other keeps rows apart)."""
    def value(spec, name):
        field_value = getattr(spec, name)
        return field_value.model_dump() if isinstance(field_value, BaseModel) else field_value

    return [name for name in IDENTITY_FIELDS if value(earlier, name) != value(later, name)]


def target_platform(model: ModelConfig, tp: int, platform: Platform | None = None) -> Platform:
    """The platform a TP group of ``tp`` ranks resolves PassConfig on: ``platform`` (default: this machine) with
    the group's size and the model's shape."""
    return (platform or Platform.detect()).with_(tp_size=tp, hidden_size=model.hidden_size,
                                                 dtype_bytes=model.torch_dtype.itemsize, quant=model.quant)


@dataclass
class PlannedConfig:
    config_id: str
    label: str  # the swept fields, readable: "fuse_norm_quant=on fuse_act_quant=off"
    tp: int
    pass_config: dict[str, Any]  # user-set fields (and level defaults with nothing to match, as off)
    resolved: dict[str, Any]
    role: Role = Role.CONFIG
    run: int = 1  # which of measure.runs this is
    num_tokens: tuple[int, ...] = ()  # the sizes left to measure, on a resume that had some (empty: the sweep's)

    @property
    def is_baseline(self) -> bool:
        return self.role.is_baseline

    @property
    def baseline_repeat(self) -> bool:
        return self.role is Role.BASELINE_AGAIN

    @property
    def reference_only(self) -> bool:
        return self.role is Role.REFERENCE

    @property
    def effective(self) -> str:
        """The resolved config as text, less the thresholds of passes that are off: two configs with the same
        text compile the same passes."""
        unused = {t.name for spec in PASSES for t in spec.thresholds} - {
            t.name for spec in PASSES if self.resolved.get(spec.flag) for t in spec.thresholds}
        return json.dumps({k: v for k, v in self.resolved.items() if k not in unused}, sort_keys=True, default=str)


@dataclass
class Skipped:
    label: str
    tp: int
    pass_config: dict[str, Any]
    reason: str


@dataclass
class Plan:
    spec: SweepSpec
    model: ModelConfig
    configs: list[PlannedConfig] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)  # become 'skipped' rows
    dropped: list[tuple[str, int, str]] = field(default_factory=list)  # (label, tp, why): no row
    platform: Platform | None = None  # the workers' hardware every config was resolved on (the TP size aside)

    def configs_for(self, tp: int) -> list[PlannedConfig]:
        return [c for c in self.configs if c.tp == tp]

    def without(self, done: set[tuple[str, int]],
                measured: dict[tuple[str, int], set[int]] | None = None) -> "Plan":
        """The plan less the (config_id, tp) pairs in ``done``; a config ``measured`` at some sizes measures the
        rest (its ``num_tokens``), but the baseline measures every size: the others are checked against its
        outputs at all of them. A TP size with anything left keeps its baseline: the correctness check compares
        against baseline outputs the workers hold in memory."""
        remaining = []
        for tp in self.spec.tp:
            left = [self._left(c, (measured or {}).get((c.config_id, c.tp), set()))
                    for c in self.configs_for(tp) if (c.config_id, c.tp) not in done]
            if left and not any(c.is_baseline for c in left):
                left = [replace(c, role=Role.REFERENCE) for c in self.configs_for(tp) if c.is_baseline] + left
            remaining += left
        return Plan(self.spec, self.model, remaining, self.skipped, self.dropped, self.platform)

    def _left(self, config: PlannedConfig, measured: set[int]) -> PlannedConfig:
        sizes = tuple(n for n in (config.num_tokens or self.spec.num_tokens) if n not in measured)
        if config.is_baseline or not measured or not sizes:
            return config
        return replace(config, num_tokens=sizes)


def _label(fields: dict[str, Any], swept: list[str]) -> str:
    if not swept:
        return "as configured"
    return " ".join(f"{k}={_show(fields.get(k))}" for k in swept)


def _show(value: Any) -> str:
    return {True: "on", False: "off", None: "unset"}.get(value, str(value)) if isinstance(value, (bool, type(None))) else str(value)


def config_id(tp: int, model: ModelConfig, level: int, resolved: dict[str, Any],
              collectives: CollectivesSpec | None = None) -> str:
    """A config's identity: what it compiles and, with TP > 1, which collective implementations it runs."""
    fields = {"tp": tp, "model": model.to_dict(), "level": level, **resolved}
    if tp > 1:
        fields["collectives"] = (collectives or CollectivesSpec()).model_dump()
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]


def built_model(spec: SweepSpec) -> ModelConfig:
    """The sweep's model shape, or SweepError naming ``model:``: all a valid sweep file can still be refused for
    on any machine, so the CLI asks this before it joins a cluster (and plans once, on the workers' platform)."""
    try:
        return spec.model.build()
    except (ValueError, TypeError) as exc:
        raise SweepError(f"model: {exc}") from None


def expand(spec: SweepSpec, platform: Platform | None = None) -> Plan:
    """The plan for this sweep. ``platform`` describes the workers (``launcher.workers_platform``; default: this
    machine): every config is resolved on it, and the workers compile what was resolved."""
    model = built_model(spec)
    platform = platform or Platform.detect()
    plan = Plan(spec, model, platform=platform)
    variants = spec.variants or [{}]
    grids = [v if isinstance(v, list) else [v] for v in spec.pass_config.values()]
    listed = [k for k, v in spec.pass_config.items() if isinstance(v, list)]
    # each combination with its label: the swept fields and the fields its variant sets
    combos = [({**dict(zip(spec.pass_config, values)), **variant}, list(dict.fromkeys([*listed, *variant])))
              for values in itertools.product(*grids) for variant in variants]
    baseline_fields = {**{k: v for k, v in spec.pass_config.items() if not isinstance(v, list)},
                       **{flag: False for flag in FUSION_FLAGS}}

    for tp in spec.tp:
        target = target_platform(model, tp, platform)
        seen: dict[str, str] = {}
        for index, (fields, shown) in enumerate([(baseline_fields, []), *combos]):
            is_baseline = index == 0
            label = "all fusions off (baseline)" if is_baseline else _label(fields, shown)
            planned = plan_config(fields, label, tp, model, spec.optimization_level, target, is_baseline,
                                  spec.collectives)
            if isinstance(planned, Skipped):
                plan.skipped.append(planned)
                continue
            if isinstance(planned, str):
                plan.dropped.append((label, tp, planned))
                continue
            if planned.effective in seen:
                plan.dropped.append((label, tp, f"same effective config as '{seen[planned.effective]}'"))
                continue
            seen[planned.effective] = label
            plan.configs.append(planned)
        first_runs = [c for c in plan.configs_for(tp) if not c.is_baseline]
        for run in range(2, spec.measure.runs + 1):
            plan.configs += [replace(c, config_id=f"{c.config_id}-run{run}", label=f"{c.label} (run {run})", run=run)
                             for c in first_runs]
        baseline = next((c for c in plan.configs_for(tp) if c.is_baseline), None)
        if baseline and spec.measure.baseline_twice:
            plan.configs.append(replace(baseline, config_id=f"{baseline.config_id}-again", role=Role.BASELINE_AGAIN,
                                        label=f"{baseline.label}, again"))
    return plan


def plan_config(fields: dict[str, Any], label: str, tp: int, model: ModelConfig, level: int, target: Platform,
                is_baseline: bool = False,
                collectives: CollectivesSpec | None = None) -> "PlannedConfig | Skipped | str":
    """One combination of user fields as a runnable config, or why not: ``Skipped`` (it cannot run: recorded), or
    the reason it is dropped (it would measure nothing: a no-op)."""
    user = {k: v for k, v in fields.items() if v is not None}
    problems = model.sharding_problems(tp)
    if problems:
        return Skipped(label, tp, user, "; ".join(problems))
    try:
        resolved = resolve(PassConfig(**user), level, target)
    except (PassConfigError, ValidationError) as exc:
        return Skipped(label, tp, user, f"invalid PassConfig: {exc}")
    inert = _inert_defaults(resolved.values, user, model, tp)
    values = {**resolved.values, **inert}
    reason = _why_not_runnable(values, model, tp)
    if reason:
        kind, why = reason
        return Skipped(label, tp, user, why) if kind == "skip" else why
    cid = config_id(tp, model, level, values, collectives)
    # the workers resolve these fields again: the inert defaults go with them as off, so they compile the plan
    return PlannedConfig(cid, label, tp, {**user, **inert}, values, Role.BASELINE if is_baseline else Role.CONFIG)


def _inert_defaults(values: dict[str, Any], user: dict[str, Any], model: ModelConfig, tp: int) -> dict[str, bool]:
    """Fusions the level switched on that have nothing to match in this model (norm + quant in a bf16 model, a
    collective fusion at TP=1), as off: they would compile the same graph, yet count as enabled passes that never
    fired. A fusion the user switched on stays, and makes the config a no-op (``_why_not_runnable``)."""
    return {flag: False for flag, on in values.items()
            if on and flag in PASSES_BY_FLAG and flag not in user
            and not PASSES_BY_FLAG[flag].applicability(model.quant, tp, model)[0]}


def _why_not_runnable(values: dict[str, Any], model: ModelConfig, tp: int) -> tuple[str, str] | None:
    for flag, on in values.items():
        spec = PASSES_BY_FLAG.get(flag)
        if spec is None or not on:
            continue
        applicable, why = spec.applicability(model.quant, tp, model)
        if not applicable:
            return "drop", f"no-op: {why}"
    return None
