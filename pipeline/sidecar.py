"""The sidecar: a second Python process for the work after training (the classification report, the pictures).

Why: in one process, importing matplotlib (~0.3 s) and drawing three pictures
(~0.3 s) all come after torch's import and the training, one after the other. Started before the main
process imports torch (or before extract), the sidecar imports them on another core meanwhile, then
computes the report (the same classification_metrics; its dict crosses back as JSON, which keeps floats
exact) and draws the pictures while the main process saves the model.

It never fails a run: when it cannot start, answers an error or dies, the report is computed in the main
process and a picture that was not drawn becomes a note. Torch-free; talks JSON lines on stdin/stdout.
Used by train-head and run; finetune draws in its own process (there a second process competes with
training for the cores and did not pay). TLEARN_NO_SIDECAR=1 turns it off everywhere.
"""
from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

ROOT = str(Path(__file__).resolve().parents[1])  # the folder holding pipeline/: the child imports from here
_BOOT = "import sys; sys.path.insert(0, sys.argv[1]); from pipeline.sidecar import serve; serve(sys.argv[2:])"
EVALUATE_TIMEOUT_S = 120.0  # a child still importing on a loaded machine; past this, do it here
DRAW_TIMEOUT_S = 300.0


class SidecarError(Exception):
    """The sidecar did not answer (could not start, died, timed out, raised). Internal: callers fall back."""


class Sidecar:
    """Parent's handle: call(op, payload) sends a request and waits for its reply; one at a time."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self._buf = b""
        self.busy = False  # a request is out: it may be writing files now

    @classmethod
    def start(cls, plots: bool = True, nice: int = 0) -> Sidecar | None:
        """Start one (None when the OS refuses). nice > 0: lower its CPU priority, for when it would
        otherwise compete with real work (extract's workers) for the cores."""
        args = [sys.executable, "-c", _BOOT, ROOT, f"nice={int(nice)}"] + (["plots"] if plots else [])
        debug = os.environ.get("TLEARN_DEBUG", "") not in ("", "0")
        try:
            proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=None if debug else subprocess.DEVNULL, close_fds=True)
        except OSError:
            return None
        return cls(proc)

    def __enter__(self) -> Sidecar:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None and not self.busy:  # the run failed and it is not writing: end it now
            self.kill()
        self.close()  # busy: let it finish the picture it is writing (no temp file left behind)

    def send(self, op: str, payload) -> None:
        try:
            self.proc.stdin.write(json.dumps({"op": op, "payload": payload}).encode() + b"\n")
            self.proc.stdin.flush()
            self.busy = True
        except (OSError, ValueError) as e:  # broken pipe: it died
            raise SidecarError(f"the sidecar is gone ({e})") from None

    def receive(self, timeout: float):
        line = self._read_line(timeout)
        reply = json.loads(line)
        if not reply.get("ok"):
            raise SidecarError(reply.get("error", "failed"))
        return reply["result"]

    def call(self, op: str, payload, timeout: float):
        self.send(op, payload)
        return self.receive(timeout)

    def _read_line(self, timeout: float) -> bytes:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            ready, _, _ = select.select([fd], [], [], timeout)
            if not ready:
                self.kill()
                raise SidecarError(f"no answer within {timeout:g} s")
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise SidecarError(f"the sidecar exited (status {self.proc.wait()})")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        self.busy = False
        return line

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.busy = False

    def close(self) -> None:
        """Ask it to exit (an explicit message: DataLoader workers forked meanwhile hold copies of its
        stdin, so end-of-file may never come); killed if it has not exited within a few seconds."""
        try:
            self.proc.stdin.write(b'{"op": "exit"}\n')
            self.proc.stdin.close()
        except OSError:  # broken pipe: it is gone already
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()
        self.proc.stdout.close()


# --------------------------------------------------------------------------- what the main process calls


@contextlib.contextmanager
def sidecar(plots: bool = True, nice: int = 0, enabled: bool = True):
    """with sidecar(...) as side: a started Sidecar, or None (disabled, TLEARN_NO_SIDECAR=1, or the OS
    refused); ended on exit. Without one, the report and the pictures are made in this process."""
    enabled = enabled and os.environ.get("TLEARN_NO_SIDECAR", "") in ("", "0")
    side = Sidecar.start(plots, nice) if enabled else None
    if side is None:
        yield None
        return
    with side:
        yield side


def split_classification_metrics(side: Sidecar | None, preds: dict[str, tuple[list[int], list[int]]],
                                 class_names: list[str]) -> dict[str, dict]:
    """{split: classification_metrics(y_true, y_pred, class_names)}: in the sidecar when there is one,
    else (or when it fails) here. Labels must be plain ints (lists), as they cross as JSON."""
    if side is not None:
        try:
            return side.call("evaluate", {"splits": preds, "class_names": class_names}, EVALUATE_TIMEOUT_S)
        except SidecarError:
            pass
    from .metrics import classification_metrics

    return {s: classification_metrics(yt, yp, class_names) for s, (yt, yp) in preds.items()}


def start_pictures(side: Sidecar | None, job) -> Callable[[], list[str]]:
    """Start drawing a run's pictures (a plots.PictureJob); returns wait() -> notes of pictures not drawn.
    With a sidecar the drawing runs there meanwhile; without, it happens in wait(), i.e. after the caller
    has saved the run, so even a crash while drawing cannot cost the model."""
    from dataclasses import asdict

    if side is not None:
        try:
            side.send("draw", asdict(job))
        except SidecarError as e:
            note = f"pictures not drawn: {e}"
            return lambda: [note]

        def wait() -> list[str]:
            try:
                return side.receive(DRAW_TIMEOUT_S)
            except SidecarError as e:
                return [f"pictures not drawn: {e}"]

        return wait

    def draw_here() -> list[str]:
        from .plots import draw_pictures

        return draw_pictures(job)

    return draw_here


# --------------------------------------------------------------------------- the child


def _evaluate(payload: dict) -> dict:
    from .metrics import classification_metrics

    names = payload["class_names"]
    return {s: classification_metrics(yt, yp, names) for s, (yt, yp) in payload["splits"].items()}


def _draw(payload: dict) -> list[str]:
    from .plots import PictureJob, draw_pictures

    return draw_pictures(PictureJob(**payload))


HANDLERS = {"evaluate": _evaluate, "draw": _draw}


def serve(argv: list[str]) -> None:
    """The child's loop: import what will be needed, then answer one JSON line per request until EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle; it ends us
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything a library prints goes to stderr, never into the replies
    sys.stdout = sys.stderr
    opts = dict(a.split("=", 1) for a in argv if "=" in a)
    if int(opts.get("nice", 0)) > 0:
        os.nice(int(opts["nice"]))
    try:
        from . import metrics

        metrics.preload()
        if "plots" in argv:
            from . import plots

            plots.preload()
    except Exception:  # a missing library shows up as an error reply (and the parent's fallback)
        pass
    for line in sys.stdin:
        try:
            req = json.loads(line)
            if req["op"] == "exit":
                break
            reply = {"ok": True, "result": HANDLERS[req["op"]](req["payload"])}
        except Exception as e:
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()
    # every file it wrote is closed and renamed; skip the interpreter's teardown of matplotlib & co
    # (~0.5 s) that the parent would otherwise wait for
    os._exit(0)
