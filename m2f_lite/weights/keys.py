"""Key templates, and what a conversion found: shared by the detectron2 and HF converters.

A table is a list of ``(ours, theirs)`` templates. A template has an index ``{i}`` (or
``{i+1}``: the same index written one higher) and a tail ``{rest}``; a key converts by the first
row that matches, in either direction (``rename_key``).
"""

from __future__ import annotations

import dataclasses
import functools
import re

from torch import Tensor, nn


class ConversionError(ValueError):
    """Weights that do not fit the model: the message lists the keys."""


@dataclasses.dataclass
class ConversionReport:
    """What a conversion or a load found, key by key (``shape_mismatch``: key, model, weights)."""

    missing: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    shape_mismatch: list[tuple[str, tuple, tuple]] = dataclasses.field(default_factory=list)
    ignored: list[str] = dataclasses.field(default_factory=list)  # dropped on purpose
    backbone: str = ""

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatch)

    def __str__(self) -> str:
        lines = [
            f"{len(keys)} {name} key(s): {', '.join(keys[:20])}" + (" ..." * (len(keys) > 20))
            for name, keys in (("missing", self.missing), ("unexpected", self.unexpected))
            if keys
        ]
        lines += [
            f"shape mismatch at {k}: model {a}, weights {b}" for k, a, b in self.shape_mismatch[:20]
        ]
        lines += [f"ignored: {', '.join(self.ignored)}"] if self.ignored else []
        return "\n".join(lines) or "all keys match"


@functools.cache
def _compile(template: str) -> tuple[re.Pattern, int]:
    """Template → (regex with groups ``i`` and ``rest``, the index offset written in it)."""
    pattern = (
        re.escape(template).replace(r"\{i\+1\}", r"(?P<i>\d+)").replace(r"\{i\}", r"(?P<i>\d+)")
    )
    return re.compile(pattern.replace(r"\{rest\}", r"(?P<rest>.+)")), int("{i+1}" in template)


def rename_key(key: str, table: list[tuple[str, str]], reverse: bool = False) -> str | None:
    """Convert one key by the first matching row (ours → theirs, or theirs → ours); None if none."""
    for ours, theirs in table:
        src, dst = (theirs, ours) if reverse else (ours, theirs)
        regex, offset = _compile(src)
        m = regex.fullmatch(key)
        if m is not None:
            groups = m.groupdict()
            if "i" in groups:
                i = int(groups["i"]) - offset
                dst = dst.replace("{i+1}", str(i + 1)).replace("{i}", str(i))
            return dst.replace("{rest}", groups.get("rest") or "")
    return None


def check_state_dict(
    model: nn.Module, sd: dict[str, Tensor], report: ConversionReport | None = None
) -> ConversionReport:
    """Compare weights with a model's state dict: missing, unexpected and shape-mismatched keys."""
    report = report or ConversionReport()
    own = model.state_dict()
    report.missing += [k for k in own if k not in sd]
    report.unexpected += [k for k in sd if k not in own]
    report.shape_mismatch += [
        (k, tuple(own[k].shape), tuple(v.shape))
        for k, v in sd.items()
        if k in own and own[k].shape != v.shape
    ]
    return report
