"""A minimal client for a running ComfyUI server (stdlib only): submit, wait, read the log."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass


@dataclass
class RunResult:
    status: str                      # "success" or "error"
    outputs: dict
    messages: list
    log: str                         # server log lines written while the prompt ran


class ComfyServer:
    def __init__(self, url: str, log_path: str | None) -> None:
        self.url = url.rstrip("/")
        self.log_path = log_path

    def _call(self, method: str, path: str, body: object | None = None, timeout: float = 30) -> object:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
        return json.loads(raw) if raw else None

    def alive(self) -> bool:
        try:
            self._call("GET", "/system_stats", timeout=5)
            return True
        except (urllib.error.URLError, OSError):
            return False

    def object_info(self, node: str) -> dict:
        return self._call("GET", f"/object_info/{node}")  # type: ignore[return-value]

    def run(self, workflow: dict, timeout: float = 900) -> RunResult:
        start = os.path.getsize(self.log_path) if self.log_path and os.path.exists(self.log_path) else 0
        try:
            resp = self._call("POST", "/prompt", {"prompt": workflow, "client_id": str(uuid.uuid4())})
        except urllib.error.HTTPError as e:
            raise AssertionError(f"workflow refused: {e.read().decode(errors='replace')}") from e
        pid = resp["prompt_id"]  # type: ignore[index]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hist = self._call("GET", f"/history/{pid}")
            if hist and pid in hist:  # type: ignore[operator]
                entry = hist[pid]  # type: ignore[index]
                log = ""
                if self.log_path and os.path.exists(self.log_path):
                    with open(self.log_path, encoding="utf-8", errors="replace") as f:
                        f.seek(start)
                        log = f.read()
                return RunResult(entry["status"]["status_str"], entry.get("outputs", {}),
                                 entry["status"].get("messages", []), log)
            time.sleep(0.5)
        raise AssertionError(f"prompt {pid} did not finish in {timeout} s")

    def free(self) -> None:
        self._call("POST", "/free", {"unload_models": True, "free_memory": True})
