"""The whole local stack: Azurite, the local model server and the local Functions host.

`make run` calls `python -m local.stack`: it creates `local.settings.json` from the
example on first run (with a random LOCAL_FUNCTION_KEY), starts the three services,
waits until each answers, prints how to call the endpoint and drop a folder, and
stops all three on Ctrl-C or SIGTERM. Tests use `Stack` with free ports and a temp
data folder.

Storage set to `UseDevelopmentStorage=true` means Azurite; a VLM_ENDPOINT on
127.0.0.1 at the model port means the local model server. Point either at Azure in
local.settings.json and that stand-in is not started.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shlex
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from local import procs
from local.azurite import Azurite, start_azurite
from local.model_admin import ADMIN_TOKEN_FILE, ModelAdmin, read_token

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = ROOT / "local.settings.json"
EXAMPLE = ROOT / "local.settings.example.json"
DEV_STORAGE = "usedevelopmentstorage=true"


def ensure_local_settings(path: Path = SETTINGS, example: Path = EXAMPLE) -> dict:
    """Create local.settings.json from the example with a random function key; return its document."""
    if not path.exists():
        doc = json.loads(example.read_text())
        doc["Values"]["LOCAL_FUNCTION_KEY"] = secrets.token_urlsafe(24)
        path.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"created {path.name} with a new LOCAL_FUNCTION_KEY")
    return json.loads(path.read_text())


@dataclass
class StackConfig:
    root: Path = ROOT
    data_dir: Path = ROOT / ".local"
    host_port: int = 7071
    blob_port: int = 10000
    queue_port: int = 10001
    model_port: int = 8089
    values: dict[str, str] = field(default_factory=dict)  # settings handed to the host
    model_args: list[str] = field(default_factory=list)  # extra flags for local.model_server
    host_args: list[str] = field(default_factory=list)  # extra flags for local.host
    python: str = sys.executable


class Stack:
    """Starts and stops the three processes; exposes their URLs."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.azurite: Azurite | None = None
        self.model: procs.Proc | None = None
        self.host: procs.Proc | None = None
        self.values = dict(config.values)
        self.model_admin_token = ""  # this start's token for the model server's /admin/* (local/model_admin.py)

    @property
    def host_url(self) -> str:
        return f"http://127.0.0.1:{self.config.host_port}"

    @property
    def model_url(self) -> str:
        return f"http://127.0.0.1:{self.config.model_port}"

    @property
    def model_admin_token_file(self) -> Path:
        return self.config.data_dir / ADMIN_TOKEN_FILE

    def model_admin(self) -> ModelAdmin:
        """A client for the local model server's /stats and /admin/*, with this start's token."""
        return ModelAdmin(self.model_url, self.model_admin_token)

    @property
    def function_key(self) -> str:
        return self.values.get("LOCAL_FUNCTION_KEY", "")

    @property
    def connection_string(self) -> str:
        return self.values["VlmStorage"]

    def _uses_azurite(self) -> bool:
        return self.values.get("VlmStorage", DEV_STORAGE).strip().lower().rstrip(";") == DEV_STORAGE

    def _uses_local_model(self) -> bool:
        endpoint = self.values.get("VLM_ENDPOINT", "")
        return endpoint.startswith(("http://127.0.0.1:", "http://localhost:")) or not endpoint

    @property
    def pidfile(self) -> procs.PidFile:
        return procs.PidFile(self.config.data_dir / "stack.pids.json")

    def _processes(self) -> list[procs.Proc]:
        azurite = self.azurite.proc if self.azurite is not None else None
        return [p for p in (azurite, self.model, self.host) if p is not None]

    def _check_ports(self) -> None:
        """Fail before starting anything when a port is taken, naming the process that holds it."""
        c = self.config
        wanted = [("functions host", c.host_port)]
        if self._uses_azurite():
            wanted += [("azurite blob", c.blob_port), ("azurite queue", c.queue_port)]
        if self._uses_local_model():
            wanted.append(("model server", c.model_port))
        for what, port in wanted:
            if procs.port_open("127.0.0.1", port):
                raise procs.ProcessError(f"{what}: {procs.port_holders_message('127.0.0.1', port)}")

    def start(self) -> Stack:
        c = self.config
        c.data_dir.mkdir(parents=True, exist_ok=True)
        logs = c.data_dir / "logs"
        for name, info in self.pidfile.stop_leftovers():
            print(f"stopped {name} (pid {info.pid}) left running by an earlier run", flush=True)
        self._check_ports()
        try:
            if self._uses_azurite():
                self.azurite = start_azurite(
                    c.data_dir / "azurite",
                    blob_port=c.blob_port,
                    queue_port=c.queue_port,
                    log_path=logs / "azurite.log",
                )
                for name in ("VlmStorage", "AzureWebJobsStorage"):
                    self.values[name] = self.azurite.connection_string
            if self._uses_local_model():
                self.model = procs.start_process(
                    [
                        c.python,
                        "-m",
                        "local.model_server",
                        "--port",
                        str(c.model_port),
                        "--admin-token-file",
                        str(self.model_admin_token_file),
                        *c.model_args,
                    ],
                    name="model-server",
                    log_path=logs / "model_server.log",
                    cwd=c.root,
                )
                procs.wait_for_http(f"{self.model_url}/health", timeout_s=60, proc=self.model)
                self.model_admin_token = read_token(self.model_admin_token_file)  # written before the port opened
                self.values["VLM_ENDPOINT"] = f"{self.model_url}/v1"
                # the stand-in's entry (priced as the default deployed model) comes from an override, not the shipped catalog
                self.values.setdefault("VLM_MODEL_CATALOG", str(c.root / "local" / "model_catalog.local.json"))
            # issue 14: spans and metrics as JSON lines through the OpenTelemetry SDK's exporters
            self.values.setdefault("VLM_TELEMETRY_DIR", str(c.data_dir / "telemetry"))
            # the batch timers' function.json name their schedules: a local.settings.json older than them gets
            # local ones (every 10 s; the stand-in needs no 60 s between polls) instead of a function in error
            self.values.setdefault("BATCH_SUBMIT_SCHEDULE", "*/10 * * * * *")
            self.values.setdefault("BATCH_COLLECT_SCHEDULE", "5/10 * * * * *")
            host_settings = c.data_dir / "host.settings.json"
            host_settings.write_text(json.dumps({"IsEncrypted": False, "Values": self.values}, indent=2))
            self.host = procs.start_process(
                [
                    c.python,
                    "-m",
                    "local.host",
                    "--root",
                    str(c.root),
                    "--port",
                    str(c.host_port),
                    "--settings",
                    str(host_settings),
                    "--strict",  # a function that fails to load stops start-up, loudly
                    *c.host_args,
                ],
                name="functions-host",
                log_path=logs / "host.log",
                cwd=c.root,
            )
            procs.wait_for_http(f"{self.host_url}/admin/host/status", timeout_s=60, proc=self.host, headers=self._key())
        except BaseException:
            self.stop()
            raise
        self.pidfile.record(self._processes())
        return self

    def restart_host(self) -> None:
        """Stop and start only the Functions host (tests: a host that dies mid-batch)."""
        assert self.host is not None
        cmd = self.host.cmd
        self.host.stop()
        self.host = procs.start_process(cmd, name="functions-host", log_path=self.host.log_path, cwd=self.config.root)
        self.pidfile.record(self._processes())
        procs.wait_for_http(f"{self.host_url}/admin/host/status", timeout_s=60, proc=self.host, headers=self._key())

    def _key(self) -> dict[str, str]:
        """The host's status endpoint needs the function key like every function."""
        return {"x-functions-key": self.function_key} if self.function_key else {}

    def stop(self) -> None:
        for proc in (self.host, self.model):
            if proc is not None:
                proc.stop()
        if self.azurite is not None:
            self.azurite.stop()
        self.host = self.model = self.azurite = None
        self.pidfile.clear()

    def dead(self) -> list[str]:
        """Names of processes that have died (empty while all run)."""
        dead = []
        for name, proc in (("functions host", self.host), ("model server", self.model)):
            if proc is not None and not proc.alive():
                dead.append(name)
        if self.azurite is not None and not self.azurite.proc.alive():
            dead.append("azurite")
        return dead


def function_lines(root: Path, host_url: str, key: str) -> str:
    """One line per function folder, HTTP ones with their method and URL: read from function.json and
    host.json, so a new function shows up here without anyone remembering to add it."""
    from local.host_config import discover_functions, load_host_json

    prefix = load_host_json(root).route_prefix
    lines = []
    for spec in discover_functions(root, environ={}):
        trigger = spec.trigger
        if spec.trigger_type == "httpTrigger":
            methods = ",".join(m.upper() for m in trigger.get("methods") or ["ANY"])
            path = "/".join(part.strip("/") for part in (prefix, str(trigger.get("route") or spec.name)) if part)
            url = f"{host_url}/{path}"
            auth = f"?code={key}" if str(trigger.get("authLevel", "function")).lower() != "anonymous" else ""
            lines.append(f"    {spec.name:<15} {methods:<5} {url}{auth}")
        else:
            lines.append(f"    {spec.name:<15} {spec.trigger_type}")
    return "\n".join(lines)


def banner(stack: Stack) -> str:
    key = stack.function_key
    sample = ROOT.parent / "shared" / "corpus" / "photos" / "phone_4032x3024.jpg"
    photo = sample if sample.exists() else Path("photo.jpg")
    storage = (
        f"Azurite 127.0.0.1:{stack.config.blob_port} (blob), :{stack.config.queue_port} (queue)"
        if stack.azurite
        else "as in local.settings.json"
    )
    # local.drop reads local.settings.json, which means Azurite on its default port
    moved = stack.azurite is not None and stack.config.blob_port != 10000
    storage_flag = f' --connection-string "{stack.connection_string}"' if moved else ""
    admin = (
        f'  model admin      curl -H "Authorization: Bearer $(cat {stack.model_admin_token_file})" '
        f"{stack.model_url}/admin/config\n"
        if stack.model
        else ""
    )
    return f"""
vlm-functions is running locally
  Functions host   {stack.host_url}
{function_lines(stack.config.root, stack.host_url, key)}
  model server     {stack.model_url if stack.model else stack.values.get("VLM_ENDPOINT")}
  storage          {storage}
  logs             {stack.config.data_dir / "logs"}
{admin}
Analyse an image:
  curl -F file=@{photo} "{stack.host_url}/api/analyze?code={key}"
  curl -F file=@invoice.png -F task=invoice "{stack.host_url}/api/analyze?code={key}"

Drop a folder (every image gets results/<path>.json):
  .venv/bin/python -m local.drop ../shared/corpus/photos --prefix photos/ --wait{storage_flag}
  .venv/bin/python -m local.drop ../shared/corpus/documents --prefix invoices/ --task invoice --wait{storage_flag}

Ctrl-C stops everything.
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m local.stack", description="Start the whole local stack.")
    p.add_argument("--host-port", type=int, default=7071)
    p.add_argument("--blob-port", type=int, default=10000)
    p.add_argument("--queue-port", type=int, default=10001)
    p.add_argument("--model-port", type=int, default=8089)
    p.add_argument("--model-mode", choices=["ocr", "facts"], default="ocr")
    p.add_argument(
        "--model-args",
        default="",
        help='more flags for the local model server, e.g. "--reasoning --model-name gpt-5.4-mini-2026-03-17" '
        "(see python -m local.model_server --help)",
    )
    p.add_argument("--data-dir", type=Path, default=ROOT / ".local", help="logs, Azurite data, the pid file")
    p.add_argument("--settings", type=Path, default=SETTINGS, help="created from the example when missing")
    args = p.parse_args(argv)
    doc = ensure_local_settings(args.settings)
    config = StackConfig(
        host_port=args.host_port,
        blob_port=args.blob_port,
        queue_port=args.queue_port,
        model_port=args.model_port,
        data_dir=args.data_dir,
        values={k: str(v) for k, v in doc.get("Values", {}).items()},
        model_args=["--mode", args.model_mode, *shlex.split(args.model_args)],
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stack = Stack(config)
    print("starting Azurite, the local model server and the local Functions host ...", flush=True)
    try:
        stack.start()
    except procs.ProcessError as exc:
        print(f"could not start the stack: {exc}", file=sys.stderr)
        return 1
    print(banner(stack), flush=True)
    code = 0
    try:
        while not stop.wait(1.0):
            dead = stack.dead()
            if dead:
                print(f"stopped: {', '.join(dead)} exited; see {config.data_dir / 'logs'}", file=sys.stderr)
                code = 1
                break
    finally:
        print("stopping ...", flush=True)
        stack.stop()
    return code


if __name__ == "__main__":
    sys.exit(main())
