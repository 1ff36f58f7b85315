"""The digits federation on real processes on this machine: one ``flower-superlink``, one
``flower-supernode`` per client, ``flwr run``; no simulation engine, no Ray.

Run::

    python -m captum_paramsal.federated.localhost [--clients 2] [--rounds 1] [--method saliency]
                                                  [--rho 0.3] [--json out.json]

It writes a Flower app folder (only a ``pyproject.toml`` naming
:mod:`.deployed_app`'s ``server_app`` and ``client_app``) and a ``FLWR_HOME`` with the SuperLink
connection into a temporary folder, starts the processes on free ports of 127.0.0.1, runs the
app, waits for it, reads the results file the ServerApp writes, and compares the library's bytes
(``ArrayRecord.count_bytes()`` of every message, as :mod:`.flower_apps` counts them) with Flower's
own ``network-traffic`` (``flwr ls --format json``). It then stops every process it started and
their children, by PID (also on an error or Ctrl-C), and removes the temporary folder.

Flower counts more than the arrays: it counts the Fleet API traffic between the SuperLink and the
SuperNodes (``PullMessages``/``PushMessages`` requests and responses, and every object pulled or
pushed), i.e. besides the arrays' bytes each message's metadata and object tree, every object's id
(a 64-character SHA-256, in the tree and in its parent's references), every Array's protobuf
header (dtype, shape, chunks), and the records without arrays (the round's config down, the metrics
up). With the digits encoder (24 arrays down, 18-24 up with SCAFFOLD) that is about 7-11 KB per
message, a few hundred bytes per array: 4 % on top of the dense downlink, 15 % on top of the
sparse replies (2 clients, 1 round: 1,411,396 bytes by ``count_bytes()``, 1,483,247 by Flower).
Identical arrays within one message are sent once (content addressing: the zero SCAFFOLD variates
of the first round), which takes a little off Flower's count. The leg between the ServerApp and
the SuperLink and the app (FAB) download are not counted.

Timing on 2 busy cores, 2 clients, 1 round: 50-100 s. The processes are up after about 5 s,
``flwr run`` takes 8-11 s, the ServerApp starts 5-10 s later, and each exchange (the round's train
messages, the final evaluation) 12-30 s: Flower starts a fresh ClientApp process for every
message (importing torch, captum and this package each time) and the SuperNode polls. The
simulation engine does a round in well under a second; this is to show that nothing depends on it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

EXECUTABLES = ("flower-superlink", "flower-supernode", "flwr")
CONNECTION = "cps-localhost"

PYPROJECT = """\
[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "cps-digits"
version = "1.0.0"
description = "captum-paramsal: salient-parameter federated learning on the digits task"
license = "BSD-3-Clause"
dependencies = []

[tool.flwr.app]
publisher = "captum-paramsal"

[tool.flwr.app.components]
serverapp = "captum_paramsal.federated.deployed_app:server_app"
clientapp = "captum_paramsal.federated.deployed_app:client_app"

[tool.flwr.app.config]
{config}
"""


def executables() -> Dict[str, str]:
    """The paths of ``flower-superlink``, ``flower-supernode`` and ``flwr``: next to this Python
    (a virtual environment's ``bin``, which need not be on ``PATH``), else on ``PATH``. Raises
    ``FileNotFoundError`` naming what is missing."""
    bindir = os.path.dirname(sys.executable)
    found, missing = {}, []
    for name in EXECUTABLES:
        path = os.path.join(bindir, name)
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            path = shutil.which(name)
        if path:
            found[name] = path
        else:
            missing.append(name)
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)} not found next to {sys.executable} nor on PATH; "
                                f"install the extra: pip install 'captum-paramsal[fl]'")
    return found


def free_port() -> int:
    """A port of 127.0.0.1 that is free now (the OS's choice for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toml(value: Any) -> str:
    return json.dumps(value) if isinstance(value, str) else repr(value)


class Processes:
    """The processes this run started (each in its own session, its output in a log file), and
    their stopping: SIGTERM to each (SuperNodes first), then whatever is left of their children,
    by PID: the SuperNodes' ``flower-superexec`` runs detached and may outlive its parent."""

    def __init__(self, log_dir: str, env: Dict[str, str], cwd: str) -> None:
        self.log_dir, self.env, self.cwd = log_dir, env, cwd
        self.started: List[tuple] = []  # (role, Popen, log path)
        self.seen: Dict[int, Any] = {}  # pid -> psutil.Process, the started ones and every descendant seen
        self.names: Dict[int, str] = {}

    def start(self, role: str, command: Sequence[str]) -> subprocess.Popen:
        import psutil

        log_path = os.path.join(self.log_dir, f"{role}.log")
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(list(command), env=self.env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.started.append((role, proc, log_path))
        try:
            self._see(psutil.Process(proc.pid), role)
        except psutil.NoSuchProcess:
            pass
        return proc

    def _see(self, p, name: str = "") -> None:
        if p.pid not in self.seen:
            try:
                name = name or " ".join(os.path.basename(a) for a in p.cmdline()[:2])
                p.create_time()  # psutil keeps it, to tell the process from a later one with its PID
            except Exception:  # gone or unreadable: remembered by PID only
                pass
            self.seen[p.pid], self.names[p.pid] = p, name or "?"

    def snapshot(self) -> None:
        """Remember every descendant alive now (a child that has exited can no longer be found)."""
        import psutil

        for _, proc, _ in self.started:
            try:
                for child in psutil.Process(proc.pid).children(recursive=True):
                    self._see(child)
            except psutil.NoSuchProcess:
                pass

    def check_alive(self) -> None:
        for role, proc, log_path in self.started:
            if proc.poll() is not None:
                raise RuntimeError(f"{role} (pid {proc.pid}) exited with {proc.returncode}:\n{tail(log_path)}")

    def records(self) -> List[Dict[str, Any]]:
        out = []
        for pid, p in sorted(self.seen.items()):
            try:
                created = p.create_time()  # cached by psutil once read
            except Exception:  # gone before it was read
                created = None
            out.append({"pid": pid, "create-time": created, "name": self.names.get(pid, "?")})
        return out

    def stop(self, grace: float = 10.0) -> List[str]:
        """Stop everything; return what had to be killed (``role/name pid``)."""
        import psutil

        self.snapshot()
        forced = []
        for _role, proc, _ in reversed(self.started):  # the SuperNodes first, then the SuperLink
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for role, proc, _ in reversed(self.started):
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                forced.append(f"{role} {proc.pid}")
        own = {proc.pid for _, proc, _ in self.started}
        rest = _wait_gone([p for pid, p in self.seen.items() if pid not in own], 3)  # most leave with their parent
        for p in rest:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        rest = _wait_gone(rest, 3)
        for p in rest:
            try:
                forced.append(f"{self.names.get(p.pid, '?')} {p.pid}")
                p.kill()
            except psutil.NoSuchProcess:
                pass
        _wait_gone(rest, 3)
        return forced

    def logs(self) -> str:
        return "\n".join(f"--- {role} (pid {proc.pid}) ---\n{tail(path)}" for role, proc, path in self.started)


def _wait_gone(processes: Sequence[Any], timeout: float) -> List[Any]:
    """Wait up to ``timeout`` s for ``processes`` to end (a zombie counts as ended: its parent or
    init reaps it); return those still running."""
    deadline = time.perf_counter() + timeout
    left = [p for p in processes if _running(p)]
    while left and time.perf_counter() < deadline:
        time.sleep(0.1)
        left = [p for p in left if _running(p)]
    return left


def _running(p) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def alive(records: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Those of ``records`` (from :func:`run_localhost`'s ``processes``) still running: same PID,
    same start time, not a zombie."""
    import psutil

    left = []
    for r in records:
        try:
            p = psutil.Process(r["pid"])
            if p.status() != psutil.STATUS_ZOMBIE and (r["create-time"] is None
                                                        or abs(p.create_time() - r["create-time"]) < 0.01):
                left.append(r)
        except psutil.NoSuchProcess:
            pass
    return left


def tail(path: str, lines: int = 25) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def _wait_port(port: int, proc: subprocess.Popen, role: str, timeout: float) -> float:
    started = time.perf_counter()
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return time.perf_counter() - started
        if proc.poll() is not None:
            raise RuntimeError(f"{role} exited with {proc.returncode} before listening on port {port}")
        if time.perf_counter() - started > timeout:
            raise TimeoutError(f"{role} not listening on port {port} after {timeout:.0f} s")
        time.sleep(0.1)


def traffic_comparison(results: Dict[str, Any], flower: Dict[str, Any]) -> Dict[str, Any]:
    """The library's bytes (what the messages' records count) against Flower's ``network-traffic``
    (down is the SuperLink's outbound, up its inbound)."""
    messages = results["messages"]
    flower_bytes = {"down": int(flower["outbound-bytes"]), "up": int(flower["inbound-bytes"])}
    out: Dict[str, Any] = {"flower": dict(flower_bytes, total=sum(flower_bytes.values()))}
    library = {d: messages[d]["array-bytes"] for d in ("down", "up")}
    records = {d: messages[d]["record-bytes"] for d in ("down", "up")}
    counts = {d: messages[d]["messages"] for d in ("down", "up")}
    out["library"] = dict(library, total=sum(library.values()))
    out["records"] = dict(records, total=sum(records.values()))
    out["messages"] = dict(counts, total=sum(counts.values()))
    arrays = {d: messages[d].get("arrays", 0) for d in ("down", "up")}
    out["arrays"] = dict(arrays, total=sum(arrays.values()))
    out["rounds-library"] = {  # the train messages alone, as the RoundRecords count them
        "down": sum(sum(r["bytes-down"]) for r in results["rounds"]),
        "up": sum(sum(r["bytes-up"]) for r in results["rounds"])}
    out["ratio"] = {d: out["flower"][d] / max(1, out["library"][d]) for d in ("down", "up", "total")}
    out["overhead-per-message"] = {d: (out["flower"][d] - out["library"][d]) / max(1, out["messages"][d])
                                   for d in ("down", "up", "total")}
    out["overhead-per-array"] = {d: (out["flower"][d] - out["library"][d]) / max(1, out["arrays"][d])
                                 for d in ("down", "up", "total")}
    return out


def run_localhost(
    clients: int = 2,
    rounds: int = 1,
    method: str = "saliency",
    rho: float = 0.3,
    alpha: float = 0.5,
    seed: int = 0,
    timeout: float = 300.0,
    json_path: Optional[str] = None,
    keep: bool = False,
    echo: Callable[[str], None] = print,
    base_dir: Optional[str] = None,
) -> Dict[str, Any]:
    """Run the digits federation (:mod:`.deployed_app`) on a SuperLink and ``clients`` SuperNodes
    on 127.0.0.1; return the ServerApp's results (``results``), Flower's run row (``run``), the
    byte comparison (``traffic``), timings (``seconds``), and every process started or seen as
    their child (``processes``: pid, create-time, name; all stopped when this returns).

    ``timeout``: seconds from ``flwr run`` to the end of the run. ``keep``: leave the temporary
    folder (logs, app, FLWR_HOME) and say where. ``json_path``: also write the returned dict there.
    ``base_dir``: where the temporary folder goes (default: ``tempfile``'s, i.e. ``$TMPDIR``).
    ``echo``: where the progress lines go.
    """
    from .deployed_app import federation, settings
    from .digits_task import METHODS

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    if clients < 1 or rounds < 1:
        raise ValueError(f"clients and rounds must be >= 1, got {clients}, {rounds}")
    paths = executables()
    t0 = time.perf_counter()
    seconds: Dict[str, float] = {}
    params = settings({"method": method, "rho": float(rho), "rounds": int(rounds), "num-clients": int(clients),
                       "alpha": float(alpha), "seed": int(seed)})
    federation(params)  # what every process will build, checked before anything starts
    root = tempfile.mkdtemp(prefix="cps-flwr-", dir=base_dir)
    dirs = {name: os.path.join(root, name) for name in ("app", "flwr_home", "logs", "tmp")}
    out_file = os.path.join(root, "results.json")
    config = dict(params, out=out_file)
    link_port = free_port()
    try:
        for d in dirs.values():
            os.makedirs(d)
        with open(os.path.join(dirs["app"], "pyproject.toml"), "w") as f:
            f.write(PYPROJECT.format(config="\n".join(f"{k} = {_toml(v)}" for k, v in config.items())))
        with open(os.path.join(dirs["flwr_home"], "config.toml"), "w") as f:
            f.write(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                    f'address = "127.0.0.1:{link_port}"\ninsecure = true\n')
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env.update({
        "FLWR_HOME": dirs["flwr_home"], "TMPDIR": dirs["tmp"], "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",  # default 1 s: each ClientApp message waits for it
        "OMP_NUM_THREADS": "1",
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
        # this package for the ServerApp and ClientApp processes, also from a checkout that is not installed
        "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p),
    })
    procs = Processes(dirs["logs"], env, root)

    def flwr(*args: str, limit: float = 120.0) -> subprocess.CompletedProcess:
        return subprocess.run([paths["flwr"], *args], env=env, cwd=root, capture_output=True, text=True,
                              timeout=limit, stdin=subprocess.DEVNULL)

    def run_row(run_id: int) -> Dict[str, Any]:
        listed = flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
        try:
            return json.loads(listed.stdout)["runs"][0]
        except (ValueError, KeyError, IndexError):
            raise RuntimeError(f"flwr ls failed ({listed.returncode}): {listed.stdout[-1000:]}{listed.stderr[-1000:]}"
                               ) from None

    report: Dict[str, Any] = {"temp-dir": root, "ports": {"superlink": link_port}}
    run_id = None
    echo(f"temporary folder {root}")
    try:
        link = procs.start("superlink", [paths["flower-superlink"], "--insecure", "--host", "127.0.0.1",
                                         "--port", str(link_port), "--disable-runtime-dependency-installation"])
        up = _wait_port(link_port, link, "superlink", 60)
        echo(f"started superlink (pid {link.pid}) on 127.0.0.1:{link_port}, listening after {up:.1f} s")
        node_ports = [free_port() for _ in range(clients)]
        report["ports"]["supernodes"] = node_ports
        nodes = []
        for k, port in enumerate(node_ports):
            nodes.append(procs.start(f"supernode{k}", [
                paths["flower-supernode"], "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                "--host", "127.0.0.1", "--port", str(port),
                "--node-config", f"partition-id={k} num-partitions={clients}"]))
        for k, (node, port) in enumerate(zip(nodes, node_ports)):
            _wait_port(port, node, f"supernode {k}", 60)
            echo(f"started supernode {k} (pid {node.pid}) on 127.0.0.1:{port}, partition {k} of {clients}")
        seconds["processes-up"] = time.perf_counter() - t0

        started = time.perf_counter()
        submitted = flwr("run", dirs["app"], CONNECTION, "--format", "json")
        try:
            run_id = int(json.loads(submitted.stdout)["run-id"])
        except (ValueError, KeyError):
            raise RuntimeError(f"flwr run failed ({submitted.returncode}):\n{submitted.stdout[-2000:]}"
                               f"{submitted.stderr[-2000:]}") from None
        seconds["flwr-run"] = time.perf_counter() - started
        report["run-id"] = run_id
        echo(f"flwr run: run {run_id} submitted in {seconds['flwr-run']:.1f} s ({config['method']}, "
             f"rho {config['rho']:g}, {rounds} round(s), {clients} clients); waiting up to {timeout:.0f} s")

        progress_file, progress_at = out_file + ".log", 0

        def show_progress() -> None:  # the ServerApp's lines so far
            nonlocal progress_at
            if os.path.exists(progress_file):
                with open(progress_file) as f:
                    f.seek(progress_at)
                    text = f.read()
                complete = text[: text.rfind("\n") + 1]
                progress_at += len(complete)
                for line in complete.splitlines():
                    echo(f"  [{time.perf_counter() - started:5.1f} s] {line}")

        last_status_check = time.perf_counter()
        row: Dict[str, Any] = {}
        while True:
            procs.check_alive()
            procs.snapshot()
            show_progress()
            # `flwr ls` is a process start (about 1-2 s of CPU): asked every 5 s, and once the results are written
            finished_file = os.path.exists(out_file)
            if finished_file or time.perf_counter() - last_status_check > 5:
                row = run_row(run_id)
                last_status_check = time.perf_counter()
                if str(row.get("status", "")).startswith("finished"):
                    break
            if time.perf_counter() - started > timeout:
                raise TimeoutError(f"run {run_id} not finished after {timeout:.0f} s (status {row.get('status')})")
            time.sleep(0.25 if not finished_file else 0.5)
        show_progress()
        seconds["run"] = time.perf_counter() - started
        report["run"] = row
        status = str(row["status"])
        echo(f"run {run_id} {status} after {seconds['run']:.1f} s")
        if not os.path.exists(out_file):
            raise RuntimeError(f"run {run_id} {status} without writing {out_file}:\n{_server_log(flwr, run_id)}")
        with open(out_file) as f:
            results = json.load(f)
        report["results"] = results
        if "error" in results or status != "finished:completed":
            raise RuntimeError(f"run {run_id} {status}: {results.get('error', '')}\n{_server_log(flwr, run_id)}")
        for r in results["rounds"]:
            echo(f"round {r['round']}: accuracy received {r['accuracy-received']:.3f}, bytes down {r['bytes-down']}, "
                 f"up {r['bytes-up']}, rejected {len(r['rejected'])}, {r['seconds']:.1f} s")
        per_client = [round(a, 3) for a in results["final-client-accuracy"]]
        echo(f"final accuracy {results['final-accuracy']:.3f} (per client {per_client})")
        traffic = traffic_comparison(results, row["network-traffic"])
        report["traffic"] = traffic
        for line in traffic_lines(traffic):
            echo(line)
    except Exception:
        echo((f"run {run_id} did not complete; " if run_id is not None else "") + "the processes' logs (tail):")
        echo(procs.logs())
        raise
    finally:
        stopping = time.perf_counter()
        forced = procs.stop()
        report["processes"] = procs.records()
        report["forced"] = forced
        seconds["stop"] = time.perf_counter() - stopping
        seconds["total"] = time.perf_counter() - t0
        report["seconds"] = seconds
        left = alive(report["processes"])
        echo(f"stopped {len(procs.started)} processes and {len(report['processes']) - len(procs.started)} of "
             f"their children in {seconds['stop']:.1f} s" + (f"; had to kill {forced}" if forced else "")
             + (f"; STILL ALIVE: {left}" if left else ""))
        if keep:
            echo(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    echo(f"total {seconds['total']:.1f} s (processes up {seconds['processes-up']:.1f} s, run {seconds['run']:.1f} s)")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=1, default=str)
        echo(f"wrote {json_path}")
    return report


def _server_log(flwr, run_id: int) -> str:
    try:
        shown = flwr("log", str(run_id), CONNECTION, "--show", limit=30)
        return "ServerApp log (tail):\n" + shown.stdout[-4000:]
    except Exception as e:  # the log is a courtesy; the error is reported anyway
        return f"(no ServerApp log: {e})"


def traffic_lines(traffic: Dict[str, Any]) -> List[str]:
    lines = ["bytes       library (ArrayRecord.count_bytes)   all records   Flower network-traffic   "
             "Flower/library   overhead per message"]
    for d in ("down", "up", "total"):
        lines.append(f"{d:<6} {traffic['messages'][d]:>3} msgs {traffic['library'][d]:>16,} "
                     f"{traffic['records'][d]:>21,} {traffic['flower'][d]:>24,} {traffic['ratio'][d]:>16.4f} "
                     f"{traffic['overhead-per-message'][d]:>18,.0f} B")
    lines.append(f"Flower/library {traffic['ratio']['total']:.3f}: Flower counts the Fleet API traffic (SuperLink <-> "
                 "SuperNodes), i.e. besides the arrays each message's metadata and object tree, every object's "
                 "64-character id, every Array's protobuf header and the config/metric records: "
                 f"{traffic['overhead-per-message']['total']:,.0f} B per message, "
                 f"{traffic['overhead-per-array']['total']:,.0f} B per array ({traffic['arrays']['total']} arrays in "
                 f"{traffic['messages']['total']} messages); the ServerApp <-> SuperLink leg and the app download "
                 "are not counted.")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m captum_paramsal.federated.localhost",
                                     description="The digits federation on a local SuperLink and SuperNodes "
                                                 "(real processes on 127.0.0.1).")
    parser.add_argument("--clients", type=int, default=2, help="SuperNodes, one per client (default 2)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds (default 1)")
    parser.add_argument("--method", default="saliency", help="a method of digits_task.METHODS (default saliency)")
    parser.add_argument("--rho", type=float, default=0.3, help="share of units sent, selection methods (default 0.3)")
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label split (default 0.5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds for the run (default 300)")
    parser.add_argument("--json", default=None, help="write the report there")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, app, FLWR_HOME)")
    args = parser.parse_args(argv)

    def terminated(signum, frame):  # a plain `kill` of this command still stops what it started
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminated)
    try:
        run_localhost(args.clients, args.rounds, args.method, args.rho, args.alpha, args.seed, args.timeout,
                      args.json, args.keep)
    except KeyboardInterrupt:
        print("interrupted; everything started was stopped", file=sys.stderr)
        return 130
    except (RuntimeError, TimeoutError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
