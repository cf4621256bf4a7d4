#!/usr/bin/env python3
"""Run a saved API-format workflow on a running ComfyUI, headless, and report the outcome.

    python scripts/run_workflow.py example_workflows/api/extract_then_validate.json \
        [--server http://127.0.0.1:8188] [--timeout 3600] [--set 3.rank=32 ...]

Queues the workflow (POST /prompt), waits for it to finish (polls GET /history/<id>), then
prints each output node's text (reports) and files (LoRAs, charts) or the error. Exit status:
0 success, 1 a node failed, 2 ComfyUI refused the workflow (bad inputs: the reasons are
printed), 3 timed out, 4 the server could not be reached. Standard library only, so the
Python that runs ComfyUI (or any other) can run it. Export workflows with "Export (API)"
(UI-format files, with "nodes" and "links", are refused with that hint).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
import uuid


class ServerError(RuntimeError):
    """The server could not be reached or answered garbage."""


def request(server: str, path: str, body: object | None = None, timeout: float = 30.0) -> tuple[int, object]:
    """(HTTP status, decoded JSON body) of one call to the ComfyUI server."""
    data = None if body is None else json.dumps(body).encode("utf-8")
    req = urllib.request.Request(server.rstrip("/") + path, data=data,
                                 headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:  # 400 carries the validation errors as JSON
        status, raw = e.code, e.read()
    except (urllib.error.URLError, OSError) as e:
        raise ServerError(f"cannot reach ComfyUI at {server}: {e}") from e
    try:
        return status, json.loads(raw) if raw else None
    except json.JSONDecodeError:
        return status, raw.decode("utf-8", "replace")


def apply_overrides(prompt: dict, overrides: list[str]) -> None:
    """``NODE.INPUT=VALUE`` (VALUE as JSON when it parses, else a string)."""
    for item in overrides:
        target, sep, raw = item.partition("=")
        node, dot, name = target.partition(".")
        if not sep or not dot:
            raise SystemExit(f"--set {item!r}: use NODE_ID.INPUT=VALUE, e.g. 3.rank=32")
        if node not in prompt:
            raise SystemExit(f"--set {item!r}: no node {node!r} (nodes: {', '.join(sorted(prompt))})")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        prompt[node].setdefault("inputs", {})[name] = value


def format_validation_error(body: object) -> str:
    if not isinstance(body, dict):
        return str(body)
    lines = []
    err = body.get("error")
    if isinstance(err, dict):
        lines.append(f"{err.get('message', '')}: {err.get('details', '')}".strip(": "))
    for node_id, info in (body.get("node_errors") or {}).items():
        for e in info.get("errors", []):
            lines.append(f"  node {node_id} ({info.get('class_type')}): {e.get('message')}: {e.get('details')}")
    return "\n".join(lines) or json.dumps(body)


def print_outputs(prompt: dict, outputs: dict) -> None:
    for node_id, out in outputs.items():
        title = prompt.get(node_id, {}).get("_meta", {}).get("title") or prompt.get(node_id, {}).get("class_type")
        print(f"== node {node_id} ({title})")
        for text in out.get("text", []):
            print(text)
        for img in out.get("images", []):
            sub = f"{img.get('subfolder')}/" if img.get("subfolder") else ""
            print(f"image ({img.get('type')}): {sub}{img.get('filename')}")


def print_error(status: dict) -> None:
    for kind, data in status.get("messages", []):
        if kind == "execution_error":
            print(f"node {data.get('node_id')} ({data.get('node_type')}) failed: "
                  f"{data.get('exception_type')}: {data.get('exception_message')}", file=sys.stderr)
        elif kind == "execution_interrupted":
            print(f"interrupted at node {data.get('node_id')} ({data.get('node_type')})", file=sys.stderr)


def run(path: str, server: str, timeout: float, overrides: list[str], poll: float = 0.5) -> int:
    with open(path, encoding="utf-8") as f:
        prompt = json.load(f)
    if isinstance(prompt, dict) and "nodes" in prompt and "links" in prompt:
        print(f"{path} is a UI-format workflow; open it in ComfyUI and use 'Export (API)', or use "
              "the twin in example_workflows/api/.", file=sys.stderr)
        return 2
    apply_overrides(prompt, overrides)
    status, body = request(server, "/prompt", {"prompt": prompt, "client_id": str(uuid.uuid4())})
    if status != 200 or not isinstance(body, dict) or "prompt_id" not in body:
        print(f"ComfyUI refused the workflow (HTTP {status}):\n{format_validation_error(body)}", file=sys.stderr)
        return 2
    prompt_id = body["prompt_id"]
    print(f"queued {prompt_id}", file=sys.stderr)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, history = request(server, f"/history/{prompt_id}")
        entry = history.get(prompt_id) if isinstance(history, dict) else None
        if entry and entry.get("status", {}).get("completed") is not None:
            print_outputs(prompt, entry.get("outputs", {}))
            state = entry.get("status", {})
            if state.get("status_str") == "success":
                return 0
            print_error(state)
            return 1
        time.sleep(poll)
    print(f"timed out after {timeout:g} s; the workflow may still be running (prompt {prompt_id})",
          file=sys.stderr)
    return 3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workflow", help="API-format workflow JSON")
    p.add_argument("--server", default="http://127.0.0.1:8188", help="ComfyUI address")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the result")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="NODE.INPUT=VALUE",
                   help="override an input, e.g. --set 3.rank=32 (repeatable)")
    a = p.parse_args(argv)
    server = a.server if "://" in a.server else "http://" + a.server
    try:
        return run(a.workflow, server, a.timeout, a.overrides)
    except ServerError as e:
        print(str(e), file=sys.stderr)
        return 4


if __name__ == "__main__":
    sys.exit(main())
