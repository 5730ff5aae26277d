"""`make compose-check`: build the project's image, start the CPU stack of `compose.cpu.yaml` (Redis and two
orchestrator replicas on the embedded models), send requests through it, and tear it down. Not part of `make test`.

    .venv/bin/python scripts/compose_check.py [--keep] [--torch-index URL]

It needs a Docker engine and `docker compose` (or `docker-compose`). The requests, each checked:

1. `/health` and `/ready` on both replicas;
2. a question with an image on replica a (`/v1/analyze`), which opens a session; a follow-up by `session_id` on
   replica b, and another back on a: the session lives in the Redis they share;
3. a small batch through the official `openai` client: the input file uploaded and the batch created on replica a,
   followed and its output file read on replica b, one answer per line.

Where no registry can be reached, the base images the files name (`python:3.11-slim`, `redis:7.4-alpine`) can be
missing: then stand-ins are built from Debian's own packages (`debootstrap` bookworm, Debian's Python 3.11 and
redis-server; needs root) and tagged with those names, and the output says so; the Python one trusts the host's
certificate authorities (`/etc/ssl/certs/ca-certificates.crt`), so that pip works behind a proxy the host trusts.
PyTorch comes from PyTorch's CPU index (the Dockerfile's default) when it answers, else from PyPI (the CUDA build,
several GB).
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from openai import OpenAI

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "compose.cpu.yaml"
PROJECT = "glmcheck"
REPLICAS = {"a": "http://127.0.0.1:8001", "b": "http://127.0.0.1:8002"}
RECEIPT = ROOT / "tests" / "fixtures" / "receipt.png"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
"""The host's trusted certificates, given to the Python stand-in: where outbound HTTPS passes a proxy that signs with
its own authority, pip inside the build trusts what the host trusts."""
PYPI = "https://pypi.org/simple"
STAND_INS = {
    "python:3.11-slim": """FROM glmcheck/debian:bookworm
LABEL org.glmcheck.stand-in="debian bookworm"
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip python3-venv ca-certificates \\
    && ln -s /usr/bin/python3 /usr/local/bin/python && rm -rf /var/lib/apt/lists/*
COPY host-ca-bundle.crt /etc/ssl/certs/host-ca-bundle.crt
ENV PIP_BREAK_SYSTEM_PACKAGES=1 \\
    PIP_CERT=/etc/ssl/certs/host-ca-bundle.crt \\
    SSL_CERT_FILE=/etc/ssl/certs/host-ca-bundle.crt \\
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/host-ca-bundle.crt
""",
    # As the official image does, `redis-server` without a configuration file runs with protected mode off (else it
    # refuses every client from another container, as there is no password): `redis-entrypoint` below.
    "redis:7.4-alpine": """FROM glmcheck/debian:bookworm
LABEL org.glmcheck.stand-in="debian bookworm"
RUN apt-get update && apt-get install -y --no-install-recommends redis-server && rm -rf /var/lib/apt/lists/*
COPY redis-entrypoint /usr/local/bin/redis-entrypoint
RUN chmod 755 /usr/local/bin/redis-entrypoint
ENTRYPOINT ["/usr/local/bin/redis-entrypoint"]
CMD ["redis-server"]
""",
}


REDIS_ENTRYPOINT = """#!/bin/sh
if [ "$1" = redis-server ]; then
    shift
    exec redis-server --protected-mode no "$@"
fi
exec "$@"
"""


def say(text: str) -> None:
    print(f"[compose-check {time.strftime('%H:%M:%S')}] {text}", flush=True)


def run(*argv: str, stdin: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, input=stdin, check=check, cwd=ROOT)


def compose_command() -> list[str]:
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise SystemExit("neither `docker compose` nor `docker-compose` is installed")


def has_image(name: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", name], capture_output=True).returncode == 0


def pullable(name: str) -> bool:
    return subprocess.run(["docker", "pull", "-q", name], capture_output=True).returncode == 0


def stand_in(name: str) -> bool:
    """Whether the image `name` is one of this script's stand-ins (built now or on an earlier run)."""
    labels = subprocess.run(
        ["docker", "image", "inspect", "--format", '{{ index .Config.Labels "org.glmcheck.stand-in" }}', name],
        capture_output=True,
        text=True,
    )
    return labels.returncode == 0 and labels.stdout.strip() not in ("", "<no value>")


def ensure_base_images() -> None:
    """The base images, pulled, or built as stand-ins (module docstring)."""
    missing = [name for name in STAND_INS if not has_image(name) and not pullable(name)]
    if not missing:
        return
    if not has_image("glmcheck/debian:bookworm"):
        if not shutil.which("debootstrap"):
            raise SystemExit(f"{', '.join(missing)} cannot be pulled and debootstrap is not installed")
        with tempfile.TemporaryDirectory(prefix="glmcheck-debian-") as root:
            say("building a Debian bookworm base with debootstrap")
            run("debootstrap", "--variant=minbase", "bookworm", root, "http://deb.debian.org/debian")
            tar = subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE)
            run("docker", "import", "-", "glmcheck/debian:bookworm", stdin=tar.communicate()[0])
    for name in missing:
        say(f"{name} cannot be pulled here: building a stand-in from Debian's packages")
        with tempfile.TemporaryDirectory(prefix="glmcheck-context-") as context:
            (Path(context) / "Dockerfile").write_text(STAND_INS[name], encoding="utf-8")
            (Path(context) / "redis-entrypoint").write_text(REDIS_ENTRYPOINT, encoding="utf-8")
            shutil.copy(HOST_CA_BUNDLE, Path(context) / "host-ca-bundle.crt")
            run("docker", "build", "-q", "-t", name, context)


def torch_index(chosen: str | None) -> str:
    if chosen:
        return chosen
    try:
        urllib.request.urlopen(CPU_INDEX + "/torch/", timeout=10)
        return CPU_INDEX
    except OSError:
        say(f"{CPU_INDEX} does not answer: PyTorch from PyPI (the CUDA build)")
        return PYPI


def wait_healthy(timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    pending = dict(REPLICAS)
    while pending and time.monotonic() < deadline:
        for name, url in list(pending.items()):
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    say(f"replica {name} is up")
                    del pending[name]
            except httpx.HTTPError:
                pass
        time.sleep(3)
    if pending:
        raise RuntimeError(f"replicas {sorted(pending)} not healthy after {timeout_s:.0f} s")


def expect(label: str, ok: bool, detail: Any = "") -> None:
    say(f"{'ok  ' if ok else 'FAIL'} {label}{f': {detail}' if detail != '' else ''}")
    if not ok:
        raise RuntimeError(f"{label} failed: {detail}")


def check_health() -> None:
    for name, url in REPLICAS.items():
        health, ready = httpx.get(f"{url}/health", timeout=10), httpx.get(f"{url}/ready", timeout=30)
        expect(f"replica {name} /health and /ready", (health.status_code, ready.status_code) == (200, 200),
               f"{health.status_code}, {ready.status_code}")  # fmt: skip


def _status(response: httpx.Response) -> str:
    """The status, and the body when it is not 200."""
    return str(response.status_code) if response.status_code == 200 else f"{response.status_code} {response.text[:300]}"


def image_url() -> str:
    return "data:image/png;base64," + base64.b64encode(RECEIPT.read_bytes()).decode()


def check_session() -> None:
    a, b = REPLICAS["a"], REPLICAS["b"]
    opened = httpx.post(f"{a}/v1/analyze", json={"question": "What is the total?", "image_url": image_url()},
                        timeout=120)  # fmt: skip
    expect("a question with an image on replica a", opened.status_code == 200, _status(opened))
    session = opened.json()["session_id"]
    expect("it opened a session", bool(session), session)
    say(f"     answer: {opened.json()['answer'][:120]!r}")
    follow = httpx.post(f"{b}/v1/analyze", json={"question": "And the date?", "session_id": session}, timeout=120)
    expect("the follow-up by session on replica b", follow.status_code == 200, _status(follow))
    say(f"     answer: {follow.json()['answer'][:120]!r}")
    back = httpx.post(f"{a}/v1/analyze", json={"question": "Which shop is it?", "session_id": session}, timeout=120)
    expect("another, back on replica a", back.status_code == 200, _status(back))


def check_batch(count: int = 3) -> None:
    body = {"question": "What is the total?", "image_url": image_url()}
    lines = "".join(
        json.dumps({"custom_id": f"r{n}", "method": "POST", "url": "/v1/analyze", "body": body}) + "\n"
        for n in range(count)
    )
    on_a = OpenAI(base_url=f"{REPLICAS['a']}/v1", api_key="unused", max_retries=0)
    on_b = OpenAI(base_url=f"{REPLICAS['b']}/v1", api_key="unused", max_retries=0)
    uploaded = on_a.files.create(file=("in.jsonl", lines.encode()), purpose="batch")
    batch = on_a.batches.create(input_file_id=uploaded.id, endpoint="/v1/analyze", completion_window="24h")  # type: ignore[arg-type]
    expect(f"a batch of {count} created on replica a", batch.status in ("validating", "in_progress"), batch.status)
    deadline = time.monotonic() + 300
    while (batch := on_b.batches.retrieve(batch.id)).status not in ("completed", "failed", "cancelled", "expired"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"batch {batch.id} still {batch.status}")
        time.sleep(2)
    expect("followed on replica b to completed", batch.status == "completed", batch.status)
    counts = batch.request_counts
    expect("every request answered", counts is not None and (counts.completed, counts.failed) == (count, 0), counts)
    assert batch.output_file_id is not None
    output = [json.loads(line) for line in on_b.files.content(batch.output_file_id).text.splitlines()]
    ids = sorted(entry["custom_id"] for entry in output)
    statuses = {entry["response"]["status_code"] for entry in output}
    expect("its output read on replica b", ids == [f"r{n}" for n in range(count)] and statuses == {200}, ids)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--keep", action="store_true", help="leave the stack running afterwards")
    parser.add_argument("--torch-index", help=f"where the image's PyTorch comes from (default: {CPU_INDEX} if it "
                        "answers, else PyPI)")  # fmt: skip
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    args = parser.parse_args()
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        raise SystemExit("no Docker engine answers (`docker info`): start dockerd first")
    compose = [*compose_command(), "-f", str(COMPOSE_FILE), "-p", PROJECT]
    ensure_base_images()
    stand_ins = [name for name in STAND_INS if stand_in(name)]
    index = torch_index(args.torch_index)
    say(f"building the image (PyTorch from {index})")
    started = time.monotonic()
    run(*compose, "build", "--build-arg", f"TORCH_INDEX_URL={index}")
    say(f"built in {time.monotonic() - started:.0f} s")
    steps: list[tuple[str, Callable[[], None]]] = [
        ("health", check_health), ("session across replicas", check_session), ("batch across replicas", check_batch)
    ]  # fmt: skip
    failed = False
    try:
        run(*compose, "up", "-d")
        wait_healthy(args.startup_timeout)
        for name, step in steps:
            say(f"-- {name}")
            step()
    except (RuntimeError, httpx.HTTPError, subprocess.CalledProcessError) as exc:
        failed = True
        say(f"FAILED: {exc}")
        run(*compose, "logs", "--tail", "60", check=False)
    finally:
        if not args.keep:
            run(*compose, "down", "-v", check=False)
    if stand_ins:
        say(f"base images that are stand-ins built from Debian's packages (no registry): {', '.join(stand_ins)}")
    say("FAILED" if failed else "passed: two replicas sharing Redis served a session and a batch across them")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
