"""Serve any installed reward over HTTP on localhost, for rewards whose dependencies live
in another environment. ``dgpo-bench serve-reward NAME --port P`` or
``python -m dgpo_bench_rewards.server NAME --port P``; the ``remote`` reward is the client.

Endpoints: ``GET /info`` (name, range, direction, group-wise), ``GET /prompts?split=S``,
``POST /score`` (``wire.encode_batch`` body -> ``{"scores": [...]}``). Errors come back as
``{"error": sentence}`` with status 422 (the reward refused the batch) or 500.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from dgpo_bench.contracts import LoadContext, Reward
from dgpo_bench.errors import DgpoBenchError, SpecError

from .wire import decode_batch

MAX_BODY = 1 << 30


def reward_info(reward: Reward) -> dict[str, Any]:
    import dgpo_bench

    return {"name": reward.name, "higher_is_better": reward.higher_is_better,
            "score_range": list(reward.score_range) if reward.score_range else None,
            "groupwise": reward.groupwise, "world": reward.world,
            "options": reward.options.model_dump(mode="json"), "dgpo_bench": dgpo_bench.__version__}


class RewardServer(ThreadingHTTPServer):
    """An HTTP server around one loaded reward; batches are scored one at a time."""

    daemon_threads = True

    def __init__(self, reward: Reward, host: str = "127.0.0.1", port: int = 0):
        self.reward = reward
        self.lock = threading.Lock()
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  (quiet: one line per error only)
        pass

    def _reply(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        url = urlparse(self.path)
        reward = self.server.reward
        if url.path == "/info":
            return self._reply(200, reward_info(reward))
        if url.path == "/prompts":
            split = parse_qs(url.query).get("split", ["train"])[0]
            try:
                with self.server.lock:
                    prompts = reward.prompts(split)
            except (NotImplementedError, DgpoBenchError) as exc:
                return self._reply(404, {"error": str(exc)})
            return self._reply(200, {"prompts": [{"text": p.text, "metadata": p.metadata} for p in prompts]})
        self._reply(404, {"error": f"No endpoint {url.path}; use /info, /prompts or POST /score."})

    def do_POST(self) -> None:  # noqa: N802
        if urlparse(self.path).path != "/score":
            return self._reply(404, {"error": f"No endpoint {self.path}; POST to /score."})
        length = int(self.headers.get("Content-Length") or 0)
        if length <= 0 or length > MAX_BODY:
            return self._reply(413, {"error": f"A /score body must have 1 to {MAX_BODY} bytes, got {length}."})
        body = self.rfile.read(length)
        try:
            images, prompts = decode_batch(body)
        except (ValueError, TypeError, OSError) as exc:  # json/base64 errors are ValueErrors, PIL's OSErrors
            return self._reply(400, {"error": f"Malformed /score request: {exc}."})
        try:
            with self.server.lock:
                scores = self.server.reward.score(images, prompts)
        except DgpoBenchError as exc:
            return self._reply(422, {"error": str(exc)})
        except Exception as exc:  # reported to the client as a RewardError, never as a made-up score
            print(f"reward server: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            return self._reply(500, {"error": f"{type(exc).__name__}: {exc}"})
        self._reply(200, {"scores": [float(s) for s in scores]})


def build_reward(name: str, options: dict[str, Any], device: str | None = None) -> Reward:
    """Instantiate and load the installed reward ``name`` (plugins as the CLI finds them)."""
    import torch

    from dgpo_bench.plugins import get_plugin_manager, load_components

    dirs = [Path(p) for p in os.environ.get("DGPO_BENCH_PLUGINS_DIR", "").split(os.pathsep) if p]
    cls = load_components(get_plugin_manager(plugins_dirs=dirs)).rewards.get(name)
    reward = cls(options)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    reward.load(LoadContext(device=dev))
    return reward


def parse_options(items: list[str], name: str) -> dict[str, Any]:
    """``KEY=VALUE`` (or ``NAME.KEY=VALUE``) strings -> options; values parse as JSON when they can."""
    from dgpo_bench.spec import parse_value

    out: dict[str, Any] = {}
    for item in items:
        key, eq, raw = item.partition("=")
        key = key.removeprefix(f"{name}.")
        if not eq or not key or "." in key:
            raise SpecError(f"Option '{item}' is not of the form KEY=VALUE (e.g. -o workers=2).")
        out[key] = parse_value(raw)
    return out


def serve(name: str, options: dict[str, Any], host: str = "127.0.0.1", port: int = 8765,
          device: str | None = None) -> None:
    """Load the reward, print its URL, and serve until interrupted."""
    reward = build_reward(name, options, device)
    try:
        server = RewardServer(reward, host, port)
    except OSError as exc:
        reward.close()
        raise SpecError(f"Cannot listen on {host}:{port} ({exc.strerror}); pick another --port.") from None
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop)
    print(f"Serving reward '{name}' at {server.url}", flush=True)
    try:
        server.serve_forever()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        server.server_close()
        reward.close()


def _stop(signum: int, frame: Any) -> None:
    """SIGTERM ends ``serve_forever`` the way Ctrl-C does, so the reward's workers are closed."""
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dgpo_bench_rewards.server", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="reward to serve, e.g. ocr")
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port (printed)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--device", default=None, help="torch device for model-based rewards")
    parser.add_argument("-o", "--option", action="append", default=[], help="reward option KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        serve(args.name, parse_options(args.option, args.name), args.host, args.port, args.device)
    except DgpoBenchError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
