"""``policies/privacy.yaml``: which privacy detectors run, how they are tuned, and what they do.

Written by the RSSI, validated like the other policy files (any mistake is a ``PolicyError`` naming
file and line; the running proxy keeps its previous set), part of the policy version and of hot
reload. No file: every detector runs with its defaults, in alert mode only. The detectors and their
settings are described in :mod:`dpiguard.privacy.rules` and docs/privacy.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from dpiguard.policy.files import LineDict, PolicyError, load_yaml
from dpiguard.privacy.rules import ACTIONS, DECISION_TIME, DETECTORS, GENERAL, SETTINGS, Setting

PRIVACY_FILE = "privacy.yaml"


@dataclass(frozen=True)
class DetectorRule:
    name: str
    enabled: bool = True
    action: str = "alert"
    settings: Mapping[str, Any] = field(default_factory=dict)

    def get(self, key: str) -> Any:
        return self.settings[key]


def _defaults(name: str) -> DetectorRule:
    return DetectorRule(name, True, "alert", MappingProxyType({k: s.default for k, s in SETTINGS[name].items()}))


@dataclass(frozen=True)
class PrivacyPolicy:
    detectors: Mapping[str, DetectorRule] = field(
        default_factory=lambda: MappingProxyType({n: _defaults(n) for n in DETECTORS}))
    general: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({k: s.default for k, s in GENERAL.items()}))
    timezone: str = "Europe/Paris"

    def on(self, name: str) -> DetectorRule | None:
        """The rule of an enabled detector, or None."""
        rule = self.detectors.get(name)
        return rule if rule is not None and rule.enabled else None

    @property
    def decision_actions(self) -> Mapping[str, str]:
        """Enabled detectors acting at decision time (action other than alert): name → action."""
        return {n: r.action for n, r in self.detectors.items() if r.enabled and r.action != "alert"}

    @classmethod
    def from_text(cls, text: str, label: str) -> "PrivacyPolicy":
        data = load_yaml(text, label)
        known = set(GENERAL) | {"timezone", "detectors"}
        for key in data:
            if key not in known:
                raise PolicyError(label, data.line_of(key),
                                  f"unknown section {key!r} (known: {', '.join(sorted(known))})")
        general = {k: _value(label, data, k, s, f"'{k}'") for k, s in GENERAL.items()}
        if general["min_history_days"] > general["history_days"]:
            raise PolicyError(label, data.line_of("min_history_days"),
                              "'min_history_days' cannot be more than 'history_days'")
        tz = data.get("timezone", "Europe/Paris")
        try:
            if not isinstance(tz, str):
                raise ValueError
            ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError):
            raise PolicyError(label, data.line_of("timezone"), f"unknown time zone {tz!r} (e.g. Europe/Paris)") from None
        section = data.get("detectors")
        if section is None:
            section = LineDict()
        if not isinstance(section, LineDict):
            raise PolicyError(label, data.line_of("detectors"), "'detectors' must map detector names to settings")
        rules = {}
        for name in DETECTORS:
            rules[name] = _defaults(name)
        for name, value in section.items():
            line = section.line_of(name)
            if name not in SETTINGS:
                raise PolicyError(label, line, f"unknown detector {name!r} (known: {', '.join(DETECTORS)})")
            if value is None:
                value = LineDict()
            if not isinstance(value, LineDict):
                raise PolicyError(label, line, f"detector {name!r}: expected settings below it (enabled, action...)")
            allowed = {"enabled", "action"} | set(SETTINGS[name])
            for key in value:
                if key not in allowed:
                    raise PolicyError(label, value.line_of(key), f"detector {name!r}: unknown setting {key!r} "
                                                                 f"(allowed: {', '.join(sorted(allowed))})")
            enabled = value.get("enabled", True)
            if not isinstance(enabled, bool):
                raise PolicyError(label, value.line_of("enabled"), f"detector {name!r}: 'enabled' must be true or false")
            action = value.get("action", "alert")
            if action not in ACTIONS:
                raise PolicyError(label, value.line_of("action"),
                                  f"detector {name!r}: 'action' must be one of {', '.join(ACTIONS)}, not {action!r}")
            if action != "alert" and name not in DECISION_TIME:
                raise PolicyError(label, value.line_of("action"),
                                  f"detector {name!r} only sees its facts after the access; its action can only "
                                  f"be 'alert' (decision-time actions: {', '.join(DECISION_TIME)})")
            settings = {k: _value(label, value, k, s, f"detector {name!r}: '{k}'") for k, s in SETTINGS[name].items()}
            rules[name] = DetectorRule(name, enabled, action, MappingProxyType(settings))
        return cls(MappingProxyType(rules), MappingProxyType(general), tz)


def _value(label: str, data: LineDict, key: str, s: Setting, what: str) -> Any:
    if key not in data:
        return s.default
    value = data[key]
    line = data.line_of(key)
    if isinstance(s.default, tuple):
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            raise PolicyError(label, line, f"{what} must be a list of names, e.g. [reception] (or [] for none)")
        return tuple(v.strip() for v in value)
    if isinstance(s.default, bool):
        if not isinstance(value, bool):
            raise PolicyError(label, line, f"{what} must be true or false")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PolicyError(label, line, f"{what} must be a number")
    if isinstance(s.default, int) and not isinstance(value, int):
        raise PolicyError(label, line, f"{what} must be a whole number")
    if (s.low is not None and value < s.low) or (s.high is not None and value > s.high):
        raise PolicyError(label, line, f"{what} must be between {s.low:g} and {s.high:g}, not {value}")
    return value
