"""Load-test scenarios: who sends what, when, against which gateway.

A scenario is a plan, not a run. It fixes when each simulated user joins and
leaves and what its requests look like, so two runs of one scenario put the
same shape of traffic on a gateway and their reports can be compared. Shares
become whole user counts deterministically (no dice), and the classes are
interleaved along the ramp so that both priorities are present at every load
level, as they are in the federation's real traffic.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from yarl import URL

DEFAULT_URL = "http://127.0.0.1:8000"

_WORDS = """the a of and to in for on with by from as at gateway model server request token
    queue priority batch user answer question document summary federation research data
    cluster latency stream energy climate genome protein telescope archive survey thesis
    method result figure table section paragraph abstract evidence dataset corpus sample
    measure compare explain describe translate classify extract review analyse"""
_VOCABULARY = tuple(_WORDS.split())


class ScenarioError(ValueError):
    """A scenario that cannot be run as given; the message says what to fix."""


class RemoteTargetError(ScenarioError):
    """The target is not a loopback address and remote targets were not allowed."""


@dataclass(frozen=True)
class UserClass:
    """One kind of user: its key (hence its priority at the gateway) and its requests.

    `prompt_words` is the part unique to each request; `shared_prefix_words` is a
    system prompt identical for every request of the class, so prefix caching in
    the engines behind the gateway sees what it would see in production. A word
    is roughly 1.3 tokens. `think_time_s` is the pause between an answer and the
    next question (0: a closed loop at full speed, like a batch job).
    """

    name: str
    api_key: str
    share: float
    priority_label: str = ""
    max_tokens: int = 256
    prompt_words: int = 200
    shared_prefix_words: int = 0
    stream: bool = True
    think_time_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.name:
            raise ScenarioError("a user class needs a name")
        if not self.api_key:
            raise ScenarioError(f"class {self.name!r}: api_key is empty")
        if not 0.0 <= self.share <= 1.0:
            raise ScenarioError(f"class {self.name!r}: share must lie in [0, 1]")
        if self.max_tokens < 1:
            raise ScenarioError(f"class {self.name!r}: max_tokens must be at least 1")
        if self.prompt_words < 0 or self.shared_prefix_words < 0:
            raise ScenarioError(f"class {self.name!r}: prompt lengths cannot be negative")
        _non_negative(f"class {self.name!r}: think_time_s", self.think_time_s)

    def messages(self, user_id: int, seq: int, rng: random.Random) -> list[dict[str, str]]:
        """The chat messages of one request: the class's shared prefix, then a unique question.

        The `[user N request M]` tag makes every prompt distinct (no accidental
        full-prompt cache hits) and lets a fake server attribute requests to users.
        """
        messages = []
        if self.shared_prefix_words:
            prefix = _shared_prefix(self.name, self.shared_prefix_words)
            messages.append({"role": "system", "content": prefix})
        words = " ".join(rng.choice(_VOCABULARY) for _ in range(self.prompt_words))
        messages.append({"role": "user", "content": f"[user {user_id} request {seq}] {words}"})
        return messages


@dataclass(frozen=True)
class UserPlan:
    """When one user joins and when it leaves (it finishes its current request first)."""

    user_id: int
    user_class: UserClass
    start_s: float
    leave_s: float


@dataclass(frozen=True)
class Scenario:
    """The whole plan: `users` is the peak, reached at the end of the ramp-up.

    User i joins at `ramp_up_s * i / users`; during the ramp-down users leave
    in reverse order (last in, first out) at an even pace, the last one at the
    end of the ramp-down. `max_requests` bounds the count of requests whatever
    the durations say, so a run is always bounded in count and in time.
    """

    base_url: str
    model: str
    users: int
    ramp_up_s: float
    plateau_s: float
    ramp_down_s: float
    classes: tuple[UserClass, ...]
    request_timeout_s: float = 120.0
    max_requests: int = 20_000
    sample_interval_s: float = 1.0
    error_backoff_s: float = 1.0
    scrape_metrics: bool = True
    seed: int = 0
    name: str = "custom"

    def __post_init__(self) -> None:
        _http_url(self.base_url)
        if not self.model:
            raise ScenarioError("the scenario needs a model")
        if self.users < 1:
            raise ScenarioError("users must be at least 1")
        for label in ("ramp_up_s", "plateau_s", "ramp_down_s", "error_backoff_s"):
            _non_negative(label, getattr(self, label))
        if not (self.request_timeout_s > 0 and math.isfinite(self.request_timeout_s)):
            raise ScenarioError("request_timeout_s must be a positive number")
        if not (self.sample_interval_s > 0 and math.isfinite(self.sample_interval_s)):
            raise ScenarioError("sample_interval_s must be a positive number")
        if self.max_requests < 1:
            raise ScenarioError("max_requests must be at least 1")
        if not self.classes:
            raise ScenarioError("the scenario needs at least one user class")
        names = [c.name for c in self.classes]
        if len(set(names)) != len(names):
            raise ScenarioError(f"class names must be unique: {names}")
        total = sum(c.share for c in self.classes)
        if abs(total - 1.0) > 1e-6:
            raise ScenarioError(f"class shares must add up to 1, not {total:g}")

    @property
    def total_s(self) -> float:
        return self.ramp_up_s + self.plateau_s + self.ramp_down_s

    @property
    def chat_url(self) -> str:
        return str(_root(self.base_url) / "v1" / "chat" / "completions")

    @property
    def metrics_url(self) -> str:
        return str(_root(self.base_url) / "metrics")

    def scaled(self, factor: float) -> Scenario:
        """The same scenario with every duration multiplied by `factor` (for short runs).

        The request timeout is a limit, not a duration of the traffic, so it
        stays. The sampling period shrinks with short runs (never below 0.1 s)
        so their plots still have points, and never grows past what was asked.
        """
        if not (factor > 0 and math.isfinite(factor)):
            raise ScenarioError("the duration scale must be a positive number")
        return dataclasses.replace(
            self,
            ramp_up_s=self.ramp_up_s * factor,
            plateau_s=self.plateau_s * factor,
            ramp_down_s=self.ramp_down_s * factor,
            error_backoff_s=self.error_backoff_s * factor,
            sample_interval_s=max(
                0.1, min(self.sample_interval_s, self.sample_interval_s * factor)
            ),
            classes=tuple(
                dataclasses.replace(c, think_time_s=c.think_time_s * factor) for c in self.classes
            ),
        )

    def class_counts(self) -> dict[str, int]:
        """Users per class: shares of the peak rounded by largest remainder (sums to `users`)."""
        exact = [c.share * self.users for c in self.classes]
        counts = [math.floor(x) for x in exact]
        by_remainder = sorted(range(len(exact)), key=lambda k: (counts[k] - exact[k], k))
        for k in by_remainder[: self.users - sum(counts)]:
            counts[k] += 1
        return {c.name: n for c, n in zip(self.classes, counts, strict=True)}

    def plan(self) -> list[UserPlan]:
        """Every user's class, join time and leave time, in join order."""
        counts = self.class_counts()
        assigned = dict.fromkeys(counts, 0)
        n = self.users
        plateau_end = self.ramp_up_s + self.plateau_s
        plans = []
        for i in range(n):
            # The class furthest behind its share so far: shares hold all along the ramp.
            open_classes = [c for c in self.classes if assigned[c.name] < counts[c.name]]
            chosen = max(
                open_classes, key=lambda c: counts[c.name] * (i + 1) / n - assigned[c.name]
            )
            assigned[chosen.name] += 1
            start = self.ramp_up_s * i / n
            leave = plateau_end + self.ramp_down_s * (n - i) / n
            plans.append(UserPlan(i, chosen, start, leave))
        return plans

    def planned_active(self, t: float) -> int:
        """How many users the plan has in the system at `t` seconds."""
        return sum(1 for p in self.plan() if p.start_s <= t < p.leave_s)

    def phase(self, t: float) -> str:
        if t < self.ramp_up_s:
            return "ramp-up"
        if t < self.ramp_up_s + self.plateau_s:
            return "plateau"
        if t < self.total_s:
            return "ramp-down"
        return "drain"

    def redacted(self) -> dict[str, Any]:
        """The scenario as plain data for reports, with API keys reduced to a hint."""
        data = dataclasses.asdict(self)
        for entry in data["classes"]:
            entry["api_key"] = _key_hint(entry["api_key"])
        return data


def seeds_scenario(
    *,
    model: str,
    interactive_key: str,
    batch_key: str,
    base_url: str = DEFAULT_URL,
    users: int = 50,
    interactive_share: float = 0.2,
    ramp_up_s: float = 60.0,
    plateau_s: float = 180.0,
    ramp_down_s: float = 60.0,
    interactive_max_tokens: int = 256,
    batch_max_tokens: int = 512,
    request_timeout_s: float = 120.0,
    max_requests: int = 20_000,
) -> Scenario:
    """The federation's daily shape: a few people chatting amid many batch jobs.

    Interactive users carry a high-priority key, a long shared system prompt
    and a short question; batch users a low-priority key and a document to
    process. All stream, all run closed loops with no think time: the gateway
    is saturated on purpose, since that is where priorities matter.
    """
    interactive = UserClass(
        name="interactive",
        api_key=interactive_key,
        share=interactive_share,
        priority_label="high",
        max_tokens=interactive_max_tokens,
        prompt_words=120,
        shared_prefix_words=300,
    )
    batch = UserClass(
        name="batch",
        api_key=batch_key,
        share=round(1.0 - interactive_share, 12),
        priority_label="low",
        max_tokens=batch_max_tokens,
        prompt_words=800,
        shared_prefix_words=60,
    )
    return Scenario(
        base_url=base_url,
        model=model,
        users=users,
        ramp_up_s=ramp_up_s,
        plateau_s=plateau_s,
        ramp_down_s=ramp_down_s,
        classes=(interactive, batch),
        request_timeout_s=request_timeout_s,
        max_requests=max_requests,
        name="seeds",
    )


_SCENARIO_KEYS = {f.name for f in dataclasses.fields(Scenario)}
_CLASS_KEYS = {f.name for f in dataclasses.fields(UserClass)} | {"api_key_env"}


def load_scenario(path: Path) -> Scenario:
    """Read a scenario from YAML: the fields of `Scenario`, with `classes` a list.

    A class may give `api_key_env: NAME` instead of `api_key`, so files can be
    shared without secrets. Unknown keys are errors: a typo must not silently
    fall back to a default and change the traffic.
    """
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise ScenarioError(f"cannot read {path}: {error}") from None
    if not isinstance(data, Mapping):
        raise ScenarioError(f"{path}: expected a mapping at the top level")
    return scenario_from_dict(data, source=str(path))


def scenario_from_dict(data: Mapping[str, Any], source: str = "scenario") -> Scenario:
    unknown = set(data) - _SCENARIO_KEYS
    if unknown:
        raise ScenarioError(f"{source}: unknown keys {sorted(unknown)}")
    raw_classes = data.get("classes")
    if not isinstance(raw_classes, list) or not raw_classes:
        raise ScenarioError(f"{source}: 'classes' must be a non-empty list")
    fields = dict(data)
    fields["classes"] = tuple(_class_from_dict(c, source) for c in raw_classes)
    fields.setdefault("base_url", DEFAULT_URL)
    fields.setdefault("name", Path(source).stem)
    try:
        return Scenario(**fields)
    except TypeError as error:
        raise ScenarioError(f"{source}: {error}") from None


def _class_from_dict(data: Any, source: str) -> UserClass:
    if not isinstance(data, Mapping):
        raise ScenarioError(f"{source}: each class must be a mapping")
    unknown = set(data) - _CLASS_KEYS
    if unknown:
        raise ScenarioError(f"{source}: unknown class keys {sorted(unknown)}")
    fields = dict(data)
    env = fields.pop("api_key_env", None)
    if env is not None:
        if "api_key" in fields:
            raise ScenarioError(f"{source}: give api_key or api_key_env, not both")
        fields["api_key"] = os.environ.get(str(env), "")
        if not fields["api_key"]:
            raise ScenarioError(f"{source}: environment variable {env} is not set")
    try:
        return UserClass(**fields)
    except TypeError as error:
        raise ScenarioError(f"{source}: {error}") from None


def is_loopback_host(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1 (also as an IPv4-mapped address)."""
    host = host.lower().rstrip(".")
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def check_target(url: str, allow_remote: bool = False) -> None:
    """Refuse non-loopback targets unless allowed: tests and benchmarks stay local.

    The host is read with yarl, the parser aiohttp connects with, so what is
    checked is what would be contacted.
    """
    host = _http_url(url).host or ""
    if not allow_remote and not is_loopback_host(host):
        raise RemoteTargetError(
            f"refusing to send load to {url}: {host} is not a loopback address "
            "(127.0.0.0/8, localhost, ::1); pass --allow-remote if that is really meant"
        )


def _http_url(url: str) -> URL:
    try:
        parsed = URL(url)
    except (ValueError, TypeError) as error:
        raise ScenarioError(f"not a URL: {url!r} ({error})") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ScenarioError(f"not an http(s) URL: {url!r}")
    return parsed


def _root(base_url: str) -> URL:
    """The gateway's root, accepting OpenAI-style base URLs that end in /v1."""
    url = URL(base_url).with_query(None).with_fragment(None)
    path = url.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[: -len("/v1")]
    return url.with_path(path or "/")


def _non_negative(label: str, value: float) -> None:
    if not (value >= 0 and math.isfinite(value)):
        raise ScenarioError(f"{label} must be a non-negative number")


def _key_hint(key: str) -> str:
    return key[:8] + "…" if len(key) >= 24 else "***"


@lru_cache(maxsize=64)
def _shared_prefix(class_name: str, words: int) -> str:
    rng = random.Random(f"prefix:{class_name}")
    return "You are a research assistant. " + " ".join(
        rng.choice(_VOCABULARY) for _ in range(words)
    )


__all__ = [
    "DEFAULT_URL",
    "RemoteTargetError",
    "Scenario",
    "ScenarioError",
    "UserClass",
    "UserPlan",
    "check_target",
    "is_loopback_host",
    "load_scenario",
    "scenario_from_dict",
    "seeds_scenario",
]
