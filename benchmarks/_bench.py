"""Shared helpers of the benchmark scripts (not a library module; imported as ``_bench``).

Thread setup must run before jax or torch is imported: ``setup_threads`` pins the process to
``n`` cores (so XLA's and PyTorch's thread pools both see ``n``), sets ``XLA_FLAGS`` and the
OpenMP/MKL variables; ``torch_threads`` then calls ``torch.set_num_threads(n)`` after torch is
imported. With the default (all cores the process may use), nothing is pinned: both runtimes use
every core.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:  # the scripts also run without the package installed editable
    sys.path.insert(1, REPO)

_THREADS: int | None = None
LOAD_AT_START = os.getloadavg()


def parser(doc: str) -> argparse.ArgumentParser:
    """A script's flags: its docstring's first paragraph as the description, the rest as the
    epilog, and the flags every benchmark takes (``--threads``, ``--json``)."""
    first, rest = doc.split("\n\n", 1)
    p = argparse.ArgumentParser(description=first, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None,
                   help="threads for both torch and XLA (default: every core this process may use; "
                        "fewer pins the process to that many cores)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON (temp file, then rename)")
    return p


def setup_threads(n: int | None, train: bool = False) -> int:
    """Same thread count for XLA and torch. Call before importing jax or torch. ``train``: the
    script measures training, so it restarts itself once with the glibc malloc settings the
    training commands start with (``longrope_jax.platforms``); both sides run under them."""
    global _THREADS
    for mod in ("jax", "torch"):
        if mod in sys.modules:
            raise RuntimeError(f"setup_threads must run before {mod} is imported")
    if train:
        from longrope_jax import platforms

        platforms.restart_with_malloc_tunables()
    avail = sorted(os.sched_getaffinity(0))
    if n is None or n >= len(avail):
        n = len(avail)
    else:
        if n < 1:
            raise SystemExit("--threads: expected at least 1")
        # XLA sizes its CPU thread pool from the cores it may run on; pinning is what reliably
        # limits it (the Eigen flag alone does not govern every XLA CPU kernel).
        os.sched_setaffinity(0, avail[:n])
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={n}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    _THREADS = n
    return n


def torch_threads():
    import torch

    torch.set_num_threads(_THREADS or len(os.sched_getaffinity(0)))
    return torch


def command_line() -> str:
    """The exact command line of this run (interpreter included)."""
    return shlex.join([sys.executable] + sys.argv)


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "cores_visible": os.cpu_count(), "threads": _THREADS,
            "load_average_at_start": LOAD_AT_START, "python": platform.python_version(),
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES")}
    for mod in ("numpy", "jax", "jaxlib", "torch", "transformers"):
        m = sys.modules.get(mod)
        if m is not None:
            info[mod] = getattr(m, "__version__", "?")
    return info


def write_json(path: str | None, obj) -> None:
    if not path:
        return
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1, default=float)
        fh.write("\n")
    os.replace(tmp, path)


def md_table(headers: list[str], rows: list[list]) -> str:
    def cell(x):
        if x is None:
            return "—"
        if isinstance(x, float):
            return f"{x:.4g}" if abs(x) < 1e5 else f"{x:.3e}"
        return str(x)

    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def torch_adamw(model, s):
    """The peer's update: ``torch.optim.AdamW`` with the settings' ``lr``, ``b1``, ``b2``, ``eps`` and
    ``weight_decay``, the loss on ``labels=ids``, ``clip_grad_norm_`` at ``clip_norm``. Returns
    ``step(ids, lr=None) -> loss`` (``lr``: this step's rate, else the settings')."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=s["lr"], betas=(s["b1"], s["b2"]), eps=s["eps"],
                            weight_decay=s["weight_decay"])

    def step(ids, lr=None) -> float:
        if lr is not None:
            for g in opt.param_groups:
                g["lr"] = float(lr)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s["clip_norm"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def run_side(script: str, side: str, argv: list[str]) -> dict:
    """One side of a comparison in a process of its own (neither runtime's threads beside the
    other's): ``script --side SIDE ARGV...``, which prints its result as JSON on its last stdout
    line."""
    r = subprocess.run([sys.executable, os.path.abspath(script), "--side", side, *argv], capture_output=True,
                       text=True)
    if r.returncode:
        raise SystemExit(f"{side}: {r.stderr[-2000:]}")
    return json.loads(r.stdout.splitlines()[-1])


def finish(name: str, args, title: str, tables: list[str], notes: list[str],
           machine_info: dict | None = None, **fields) -> int:
    """A run's end: the report on stdout and, with ``--json``, the record (benchmark name, command,
    ``machine_info`` or :func:`machine`, load average at the end, settings, then ``fields``).
    Returns the exit status, 0."""
    report(title, tables, notes)
    write_json(args.json, {"benchmark": name, "command": command_line(), "machine": machine_info or machine(),
                           "load_average_at_end": os.getloadavg(), "settings": vars(args), **fields})
    return 0


def report(title: str, tables: list[str], notes: list[str]) -> None:
    """The Markdown report on stdout."""
    print(f"## {title}\n")
    for t in tables:
        print(t + "\n")
    for n in notes:
        print(f"- {n}")
    print(f"\nCommand: `{command_line()}`; GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES') or '(unset)'}.")
    fmt = lambda xs: " ".join(f"{x:.2f}" for x in xs)  # noqa: E731
    print(f"\nLoad average (1/5/15 min) at start: {fmt(LOAD_AT_START)}, at end: {fmt(os.getloadavg())}.")
    if LOAD_AT_START[0] >= 0.5:
        print(f"WARNING: the machine was busy when this run started (1-min load {LOAD_AT_START[0]:.2f}); "
              "other work on its cores makes these timings unreliable.")


# ----------------------------------------------------------------------------------------------
# Models and data.


def load_ours():
    from longrope_jax.loading import load_model

    t = time.perf_counter()
    m = load_model("smollm2", param_dtype="float32")
    log(f"longrope-jax: loaded SmolLM2 (fp32) in {time.perf_counter() - t:.1f}s")
    return m


def load_peer(gguf: str | None = None):
    """transformers' own GGUF loading of the same file, fp32, SDPA attention, eval mode.

    ``gguf``: the file (default ``loading.smollm2_path()``; pass it to keep jax unimported).
    """
    torch = torch_threads()
    import transformers

    if gguf is None:
        from longrope_jax.loading import smollm2_path

        gguf = smollm2_path()
    p = gguf
    t = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(p), gguf_file=os.path.basename(p), dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    log(f"transformers: loaded SmolLM2 (fp32, sdpa) in {time.perf_counter() - t:.1f}s")
    return model


def pydoc_tokens(tokenizer, length: int):
    """int32[1, length]: the first ``length`` tokens of the pydoc text (the ``ppl`` protocol)."""
    from longrope_jax.data import read_documents, windows

    return windows(read_documents("pydoc:"), tokenizer, length, 1, source="pydoc:").tokens


def peer_nll(model, tokens) -> float:
    """transformers' forward with ``labels=``: mean NLL over the ``L - 1`` predictions."""
    import numpy as np
    import torch

    ids = torch.from_numpy(np.asarray(tokens, np.int64))
    with torch.inference_mode():
        return float(model(input_ids=ids, labels=ids).loss)


def timed(fn, *a, **kw):
    t = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t


def best(fn, repeats: int) -> float:
    """The shortest of ``repeats`` timed calls of ``fn()``, after one untimed warm-up call."""
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return None if not n else (xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2]))


class CompileLog:
    """Counts JAX compilations and their time while active (jax.monitoring events).

    ``backend``: XLA backend compilations (every jitted function, including tiny eager ops);
    ``seconds``: tracing + lowering + XLA compile time summed.
    """

    EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
              "/jax/core/compile/backend_compile_duration")

    def __init__(self):
        self.seconds = 0.0
        self.backend = 0
        self.by_name: dict[str, int] = {}
        self._on = False
        import jax.monitoring

        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event, secs, **kw):
        if not self._on or event not in self.EVENTS:
            return
        self.seconds += secs
        if event == self.EVENTS[-1]:
            self.backend += 1
            name = str(kw.get("fun_name", "?"))
            self.by_name[name] = self.by_name.get(name, 0) + 1

    def __enter__(self):
        self.seconds, self.backend, self.by_name, self._on = 0.0, 0, {}, True
        return self

    def __exit__(self, *exc):
        self._on = False
