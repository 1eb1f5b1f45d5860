"""``remote``: a reward scored by a reward server (``dgpo-bench serve-reward``) over HTTP."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any, Sequence

import numpy as np
from pydantic import Field, field_validator

from dgpo_bench.contracts import LoadContext, Options, Prompt, Reward
from dgpo_bench.errors import RewardError

from .scores import checked_images, checked_scores
from .wire import encode_batch, prompt_from_json


class RemoteOptions(Options):
    url: str = "http://127.0.0.1:8765"
    name: str | None = None
    """The reward the server must be serving (checked at load); None accepts any."""
    timeout: float = Field(300.0, gt=0)
    """Seconds to wait for one answer."""
    retries: int = Field(2, ge=0)
    """Extra attempts when the server cannot be reached or times out."""
    backoff: float = Field(1.0, ge=0)
    """Seconds before the first retry; doubled for each later one."""

    @field_validator("url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://, e.g. http://127.0.0.1:8765")
        return v


class RemoteReward(Reward):
    """Any reward served by 'dgpo-bench serve-reward' (its name, range and direction come from the server)."""

    name = "remote"
    Options = RemoteOptions
    declared_at_load = True

    def load(self, ctx: LoadContext) -> None:
        info = self._request("GET", "/info")
        want = self.options.name
        if want is not None and info.get("name") != want:
            raise RewardError(f"The reward server at {self.options.url} serves '{info.get('name')}', not "
                              f"'{want}'; start 'dgpo-bench serve-reward {want}' or fix remote.name.")
        self.remote_name: str = info["name"]
        self.higher_is_better = bool(info["higher_is_better"])
        self.score_range = tuple(info["score_range"]) if info.get("score_range") else None
        self.groupwise = bool(info.get("groupwise", False))
        self.world = info.get("world")

    def score(self, images: np.ndarray, prompts: Sequence[Prompt]) -> np.ndarray:
        images = checked_images(self.name, images, prompts)
        answer = self._request("POST", "/score", encode_batch(images, prompts))
        return checked_scores(self.name, answer.get("scores", []), len(images))

    def prompts(self, split: str) -> list[Prompt]:
        answer = self._request("GET", f"/prompts?split={split}")
        return [prompt_from_json(p) for p in answer["prompts"]]

    def _request(self, method: str, path: str, body: bytes | None = None) -> dict[str, Any]:
        """One JSON exchange; retried (with backoff) only while the server cannot be reached."""
        url = self.options.url.rstrip("/") + path
        attempts = self.options.retries + 1
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.options.backoff * 2 ** (attempt - 1))
            req = urllib.request.Request(url, data=body, method=method,
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=self.options.timeout) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                try:
                    detail = json.loads(exc.read()).get("error", exc.reason)
                except ValueError:
                    detail = exc.reason
                raise RewardError(f"The reward server at {self.options.url} failed on {path} "
                                  f"(HTTP {exc.code}): {detail}") from None
            except ValueError as exc:
                raise RewardError(f"The reward server at {self.options.url} sent a malformed answer to "
                                  f"{path} ({exc}); check that remote.url points at 'dgpo-bench serve-reward'.") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                reason = getattr(exc, "reason", exc)
        raise RewardError(f"No reward server answered at {self.options.url} after {attempts} attempts ({reason}); "
                          "start one with 'dgpo-bench serve-reward NAME --port PORT' and check remote.url.")
