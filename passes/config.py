"""PassConfig: vLLM's field names, fusiontune's resolution of them.

``PassConfig`` holds what the user wrote: every field starts unset (``None``). ``resolve`` turns it into a
``ResolvedPassConfig`` for one optimization level and platform: every flag and threshold concrete, each with the
reason it has that value. A field the user set always wins over the level default; a pass's requirement
(AsyncTP needs SP) is switched on with it unless the user switched it off, which is an error.

Field names are exactly vLLM's, so ``ResolvedPassConfig.vllm_pass_config()`` can be handed to vLLM unchanged.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Optional

from pydantic import ConfigDict, Field, create_model

from .fusions import LEVELS, PASSES, THRESHOLDS
from .platform import Platform


class PassConfigError(ValueError):
    """A combination of PassConfig values that cannot be honoured (the message names the fields)."""


def _pass_config_fields() -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for spec in PASSES:
        fields[spec.flag] = (Optional[bool], Field(None, description=f"{spec.title}: {spec.fuses}"))
        for threshold in spec.thresholds:
            fields[threshold.name] = (Optional[threshold.type], Field(None, description=threshold.description, gt=0))
    return fields


PassConfig = create_model(
    "PassConfig",
    __config__=ConfigDict(extra="forbid", frozen=True),
    __doc__="User-set PassConfig fields (vLLM's names); unset fields come from the optimization level.",
    **_pass_config_fields(),
)


@dataclass(frozen=True)
class ResolvedPassConfig:
    level: int
    platform: Platform
    values: dict[str, Any]  # every flag and threshold, concrete (a threshold may be None: "not available")
    reasons: dict[str, str]
    explicit: frozenset[str] = field(default_factory=frozenset)
    required: frozenset[str] = field(default_factory=frozenset)  # switched on because another pass needs them

    def __getattr__(self, name: str) -> Any:
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        raise AttributeError(name)

    @property
    def enabled_passes(self) -> tuple[str, ...]:
        return tuple(spec.flag for spec in PASSES if self.values[spec.flag])

    def switched_off(self, flags, why: str) -> "ResolvedPassConfig":
        """The same config with ``flags`` off (a num_tokens range outside theirs), each saying ``why``."""
        if not flags:
            return self
        values = {**self.values, **{f: False for f in flags}}
        reasons = {**self.reasons, **{f: why for f in flags}}
        return ResolvedPassConfig(self.level, self.platform, values, reasons, self.explicit, self.required)

    def key(self) -> str:
        """Stable hash of what changes the compiled graph: the values, not the reasons."""
        payload = json.dumps({"level": self.level, **self.values}, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def vllm_pass_config(self) -> dict[str, Any]:
        """The fields as vLLM's ``--compilation-config '{"pass_config": ...}'`` takes them (unset thresholds left out)."""
        return {k: v for k, v in self.values.items() if v is not None}

    def explain(self) -> list[tuple[str, Any, str, str]]:
        """(field, value, "user" | "requirement" | "O<n> default", reason) for every field, in declaration order."""
        rows = []
        for name in self.values:
            if name in self.explicit:
                source = "user"
            elif name in self.required:
                source = "requirement"
            else:
                source = f"O{self.level} default"
            rows.append((name, self.values[name], source, self.reasons[name]))
        return rows


def resolve(user: "PassConfig | dict | None", level: int, platform: Platform) -> ResolvedPassConfig:
    if level not in LEVELS:
        raise PassConfigError(f"optimization_level must be one of {list(LEVELS)}, got {level!r}")
    if user is None:
        user = PassConfig()
    elif isinstance(user, dict):
        user = PassConfig(**user)
    explicit = {name for name in user.model_fields_set if getattr(user, name) is not None}
    values: dict[str, Any] = {}
    reasons: dict[str, str] = {}
    required: set[str] = set()

    for spec in PASSES:
        if spec.flag in explicit:
            values[spec.flag], reasons[spec.flag] = getattr(user, spec.flag), "set by the user"
        else:
            values[spec.flag], reasons[spec.flag] = spec.default(level, platform)

    for spec in PASSES:  # requirements: AsyncTP needs SP
        if not values[spec.flag]:
            continue
        for needed in spec.requires:
            if values[needed]:
                continue
            if needed in explicit:
                raise PassConfigError(f"{spec.flag}=true requires {needed}=true, but {needed} was set to false")
            values[needed], reasons[needed] = True, f"switched on because {spec.flag} requires it"
            required.add(needed)

    for name, threshold in THRESHOLDS.items():
        if name in explicit:
            values[name], reasons[name] = getattr(user, name), "set by the user"
        else:
            values[name], reasons[name] = threshold.default(platform)

    for spec in PASSES:  # a pass whose threshold has no value on this platform cannot run
        for threshold in spec.thresholds:
            if values[spec.flag] and values[threshold.name] is None:
                if spec.flag in explicit:
                    raise PassConfigError(
                        f"{spec.flag}=true needs {threshold.name}, which has no default on "
                        f"{platform.describe()}: set {threshold.name} explicitly"
                    )
                values[spec.flag] = False
                reasons[spec.flag] = f"off: {threshold.name} has no default here ({reasons[threshold.name]})"

    return ResolvedPassConfig(level, platform, values, reasons, frozenset(explicit), frozenset(required))
