"""charrnn's benchmark: training and sampling speed, compile time and memory, side by side with
an idiomatic PyTorch peer (``pip install -e ".[bench]"``), printed as a table.

    python benchmarks/run.py                      # all configurations, float32
    python benchmarks/run.py --dtype bfloat16 --configs lstm-2x512
    python benchmarks/run.py --no-torch --steps 20
    python benchmarks/run.py --repeat 3           # medians of 3 alternating rounds (noisy hosts)
    PYTHONPATH=/tmp/before python benchmarks/run.py   # the charrnn of another checkout (a git worktree)

Every measurement runs in its own subprocess (so peak RSS is per run and nothing is shared),
charrnn and PyTorch alternating, and figures are medians over steps after warm-up. The host's
speed drifts: compare ratios within one run, not across runs.

Both sides' training runs get the process tuning ``charrnn train`` gives itself (glibc malloc
options, glibc's huge-page tunable where it helps): the peer is PyTorch at its strongest, not
PyTorch as a plain script runs it (``--untuned-peer`` measures that). Sampling runs untuned on
both sides, as ``charrnn sample`` runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {
    # name: (cell, layers, hidden, seq_len, batch)
    "char-rnn-default": ("lstm", 2, 128, 50, 50),
    "lstm-2x512": ("lstm", 2, 512, 100, 64),
    "gru-2x256": ("gru", 2, 256, 100, 64),
    "rnn-1x512": ("rnn", 1, 512, 100, 64),
}
VOCAB = 65
SAMPLE_LENGTH = 2000
HERE = Path(__file__).resolve().parent


def _charrnn_on_path() -> None:
    """Make ``import charrnn`` find a charrnn: one that PYTHONPATH or an install provides, else
    the checkout this file is in. So one script measures any tree: ``PYTHONPATH=/tmp/before``
    benchmarks that checkout's code (PYTHONPATH comes before an editable install)."""
    if importlib.util.find_spec("charrnn") is None:
        sys.path.append(str(HERE.parent))


def _charrnn_root() -> Path:
    """The checkout whose ``charrnn`` this process imports."""
    return Path(importlib.util.find_spec("charrnn").origin).resolve().parent.parent


def _glibc_hugetlb() -> bool:
    return "glibc.malloc.hugetlb=1" in os.environ.get("GLIBC_TUNABLES", "")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


# --- charrnn workers (run in a subprocess) ---------------------------------------------------

def charrnn_train(cell, layers, hidden, seq_len, batch, steps, dtype):
    import jax
    import numpy as np

    from charrnn.config import ModelConfig, TrainConfig
    from charrnn.model import build_model
    from charrnn.parallel import DataParallel
    from charrnn.train import init_state, lr_schedule, make_optimizer, make_train_step

    try:  # as `charrnn train` tunes its process (charrnn.runtime since the restructuring)
        from charrnn import runtime
    except ImportError:  # older trees: make_train_step set the malloc options itself
        from charrnn.train import use_training_xla_flags
    else:
        use_training_xla_flags = runtime.use_training_xla_flags
        runtime.keep_freed_memory()
    use_training_xla_flags()
    cfg = TrainConfig(batch_size=batch, seq_len=seq_len, dtype=dtype)
    model = build_model(ModelConfig(cell=cell, layers=layers, hidden=hidden), VOCAB, 0)
    optimizer = make_optimizer(cfg, lr_schedule(cfg, None))
    graphdef, state = init_state(model, optimizer, 0)
    dp = DataParallel(batch)  # as `charrnn train` places things: one device is a mesh of one
    state = dp.replicate(state)
    carry = dp.shard_rows(model.initial_carry(batch))
    step_fn = make_train_step(graphdef, optimizer, cfg)
    rng = np.random.default_rng(0)
    data = [rng.integers(2, VOCAB, (batch, seq_len + 1)).astype(np.int32) for _ in range(4)]
    batches = [(dp.shard_rows(d[:, :-1]), dp.shard_rows(d[:, 1:]), np.bool_(False)) for d in data]
    t = time.perf_counter()
    state, carry, m = step_fn(state, carry, batches[0])
    jax.block_until_ready(m)
    first = time.perf_counter() - t
    times = []
    for i in range(steps + 3):
        t = time.perf_counter()
        state, carry, m = step_fn(state, carry, batches[i % 4])
        jax.block_until_ready(m)
        if i >= 3:
            times.append(time.perf_counter() - t)
    return {"chars_per_s": batch * seq_len / _median(times), "first_step_s": first, "peak_rss_mb": _peak_rss_mb(),
            "malloc_tuned": True, "hugetlb": _glibc_hugetlb()}


def charrnn_sample(cell, layers, hidden, batch, devices=1, length=SAMPLE_LENGTH):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from charrnn import parallel
    from charrnn import sample as sampler
    from charrnn.config import ModelConfig
    from charrnn.model import build_model, split_model
    from charrnn.vocab import END

    model = build_model(ModelConfig(cell=cell, layers=layers, hidden=hidden), VOCAB, 0)
    graphdef, params = split_model(model)
    # Never end early, so every run generates the full length (as the PyTorch loop does): an
    # output bias of -inf for the end token, so the sampler below is exactly the one
    # `charrnn sample` runs (sample.model_step_fn, parameters in the carry).
    params["b_out"] = params["b_out"].at[END].set(-jnp.inf)
    step_fn = sampler.model_step_fn(graphdef)

    # As `charrnn sample` does: rows split over CPU devices where parallel.sampling_devices says.
    mesh = parallel.local_mesh(devices) if devices > 1 else None
    prime, generate = sampler.make_sampler(step_fn, mesh=mesh)
    controls = sampler.make_controls(VOCAB, 1.0)
    prompt = sampler.prompt_tokens(np.zeros(0, np.int32), batch)

    def run():
        n = 0
        for toks in sampler.generate_stream(prime, generate, (params, model.initial_carry(batch)), prompt,
                                            jax.random.PRNGKey(0), controls, length):
            n += toks.size
        return n

    run()  # compile
    times = []
    for _ in range(3):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return {"chars_per_s": batch * length / _median(times)}


def matmul_peak_gflops() -> float:
    import jax
    import jax.numpy as jnp

    n = 2048
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(10):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def encode_mb_per_s(megabytes: int = 64) -> float:
    import tempfile

    import numpy as np

    from charrnn import data

    rng = np.random.default_rng(0)
    block = " ".join(rng.choice(["the", "cat", "über", "naïve", "\n", "sat"], 250_000)).encode()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.txt"
        with open(path, "wb") as f:
            for _ in range(megabytes):
                f.write(block[:1 << 20])
        t = time.perf_counter()
        corpus = data.load_corpus(str(path))
        vocab, _ = data.corpus_vocab(corpus, "file")
        data.encode_corpus(corpus, "file", vocab, Path(d) / "tokens.npy")
        return megabytes / (time.perf_counter() - t)


def first_sample_seconds(runs: int = 3) -> dict:
    """Seconds from starting ``charrnn sample RUN`` to its first generated character on stdout,
    with an empty (cold) and a filled (warm) XLA compilation cache; medians over ``runs``.

    The run is the default model (LSTM 2x128) trained for 2 steps on a small text: sampling
    does not care how well it was trained.
    """
    import select
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        (d / "corpus.txt").write_text("It was the best of times, it was the worst of times.\n" * 400)
        env = dict(os.environ, CHARRNN_XLA_CACHE=str(d / "xla"))
        cli = [sys.executable, str(_charrnn_root() / "cli.py")]  # the measured tree's
        subprocess.run(cli + ["train", str(d / "corpus.txt"), "--out", str(d / "run"), "--max-steps", "2",
                              "--quiet"], env=env, check=True, capture_output=True)

        def once(cache: Path) -> float:
            env["CHARRNN_XLA_CACHE"] = str(cache)
            t = time.perf_counter()
            p = subprocess.Popen(cli + ["sample", str(d / "run"), "--prime", "It", "--length", "300", "--seed", "0"],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            got = b""
            while len(got) <= len(b"It"):  # the prime is printed first, then generated text
                select.select([p.stdout], [], [])
                chunk = os.read(p.stdout.fileno(), 1)
                if not chunk:
                    break
                got += chunk
            elapsed = time.perf_counter() - t
            p.communicate()
            return elapsed

        cold = [once(d / f"cold-{i}") for i in range(runs)]
        warm_cache = d / "warm"
        once(warm_cache)
        warm = [once(warm_cache) for _ in range(runs)]
        return {"cold_s": statistics.median(cold), "warm_s": statistics.median(warm)}


def _worker(argv):
    kind, args = argv[0], json.loads(argv[1])
    _charrnn_on_path()
    if kind == "charrnn-train":
        out = charrnn_train(**args)
    elif kind == "charrnn-sample":
        out = charrnn_sample(**args)
    elif kind == "torch-train":
        sys.path.insert(0, str(HERE))
        import torch_peer
        tune = args.pop("tune", True)
        tuned = tune and torch_peer.keep_freed_memory()  # charrnn's malloc options, as its training
        out = {**torch_peer.train_speed(**args), "malloc_tuned": tuned, "hugetlb": _glibc_hugetlb()}
    elif kind == "torch-sample":
        sys.path.insert(0, str(HERE))
        import torch_peer
        out = torch_peer.sample_speed(**args)
    elif kind == "matmul":
        out = {"gflops": matmul_peak_gflops()}
    elif kind == "first-sample":
        out = first_sample_seconds()
    elif kind == "encode":
        out = {"mb_per_s": encode_mb_per_s()}
    else:
        raise SystemExit(f"unknown worker {kind}")
    print(json.dumps(out))


CPU_DEVICES = [1]


def _run(kind: str, **args) -> dict:
    _charrnn_on_path()
    env = dict(os.environ)
    if kind == "charrnn-train" or (kind == "torch-train" and args.get("tune", True)):
        # As `charrnn train` re-runs itself: its large blocks in huge pages, where that helps.
        # PyTorch's peer gets the same (glibc reads the tunable only when a process starts).
        from charrnn import runtime

        env = runtime.huge_pages_env(env) or env
    if kind.startswith("charrnn") and CPU_DEVICES[0] > 1:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                            f" --xla_force_host_platform_device_count={CPU_DEVICES[0]}").strip()
    r = subprocess.run([sys.executable, __file__, "_worker", kind, json.dumps(args)], capture_output=True,
                       text=True, env=env)
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def _devices_for(option: str, batch: int) -> int:
    if option != "auto":
        return int(option)
    from charrnn.parallel import auto_cpu_devices

    return auto_cpu_devices(batch)


def _sample_devices_for(option: str, cell: str, layers: int, hidden: int, batch: int) -> int:
    if option != "auto":
        return int(option) if batch % int(option) == 0 else 1
    from charrnn.config import ModelConfig
    from charrnn.parallel import sampling_devices_for

    return sampling_devices_for(ModelConfig(cell=cell, layers=layers, hidden=hidden), VOCAB, batch)


def _alternate(repeat: int, ours, theirs) -> tuple[dict, dict]:
    """Run ``ours`` and ``theirs`` (or only ``ours`` when it is None) ``repeat`` times, alternating.

    Returns each side's figures as medians over the rounds, and for every figure both report,
    the median of the per-round ratios under ``"ratio:" + key`` in the first dict: the host's
    speed drifts over minutes, so a round's two runs are the fairest pair.
    """
    rounds = [(ours(), theirs() if theirs else {}) for _ in range(repeat)]

    def medians(side: int) -> dict:
        keys = {k for r in rounds for k, v in r[side].items() if isinstance(v, (int, float))
                and not isinstance(v, bool)}
        out = {k: statistics.median(r[side][k] for r in rounds if k in r[side]) for k in keys}
        flags = {k for r in rounds for k, v in r[side].items() if isinstance(v, bool)}
        out.update({k: all(r[side].get(k) for r in rounds) for k in flags})  # true in every round
        errors = [r[side]["error"] for r in rounds if "error" in r[side]]
        return {**out, **({"error": errors[0]} if errors else {})}

    c, t = medians(0), medians(1)
    for k in set(c) & set(t) - {"error"} - {k for k, v in c.items() if isinstance(v, bool)}:
        pairs = [r[0][k] / r[1][k] for r in rounds if r[0].get(k) and r[1].get(k)]
        if pairs:
            c["ratio:" + k] = statistics.median(pairs)
    return c, t


def _ratio(c: dict, key: str):
    return c.get("ratio:" + key)


def _tuning(figures: dict) -> str:
    """How a training run's process was tuned, in words, from its worker's report."""
    parts = [name for name, on in (("mallopt", figures.get("malloc_tuned")), ("hugetlb", figures.get("hugetlb")))
             if on]
    return "+".join(parts) or "untuned"


def _tuning_line(rows: list, torch: bool) -> str:
    """The table's second header line: how each side's training process was tuned."""
    words = {"mallopt+hugetlb": "glibc malloc options as `charrnn train` sets them and "
                                "GLIBC_TUNABLES=glibc.malloc.hugetlb=1",
             "mallopt": "glibc malloc options as `charrnn train` sets them (huge-page tunable: no help here)",
             "untuned": "no process tuning"}
    pairs = {r["tuning"] for r in rows}
    sampling = "sampling: neither side tuned, as `charrnn sample` runs"
    if not torch:
        ours = {c for c, _ in pairs}
        return f"training: {', '.join(words.get(c, c) for c in sorted(ours))}; {sampling}"
    if len(pairs) == 1 and len(set(next(iter(pairs)))) == 1:
        (ours, _), = pairs
        both = "both sides untuned" if ours == "untuned" else "both sides tuned"
        return f"training: {both} ({words.get(ours, ours)}); {sampling}"
    return ("training, NOT tuned alike (charrnn / torch): "
            + ", ".join(f"{r['config']} {r['tuning'][0]} / {r['tuning'][1]}" for r in rows) + f"; {sampling}")


SPEED_RATIOS = {"train": "training", "sample1": "sampling b=1", "sample32": "sampling b=32"}


def _have_torch() -> bool:
    return subprocess.run([sys.executable, "-c", "import torch"], capture_output=True).returncode == 0


def _fmt(x, unit=""):
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    return f"{x:,.0f}{unit}" if x >= 100 else f"{x:.2f}{unit}"


def main(argv=None):
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "_worker":
        return _worker(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names: " + ", ".join(CONFIGS))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--steps", type=int, default=30, help="timed training steps per run")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch peer")
    p.add_argument("--threads", type=int, default=2, help="PyTorch threads (match the cores)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON too")
    p.add_argument("--cpu-devices", default="auto",
                   help="run charrnn data-parallel over this many CPU devices; 'auto' (the default) "
                        "chooses as `charrnn train` and `charrnn sample` do")
    p.add_argument("--repeat", type=int, default=1,
                   help="measure every figure this many times, charrnn and PyTorch alternating, and print "
                        "medians (ratios: the median of each round's ratio)")
    p.add_argument("--untuned-peer", action="store_true",
                   help="run PyTorch's training as a plain script runs it, without the malloc options and "
                        "huge-page tunable charrnn's training gets")
    a = p.parse_args(argv)
    _charrnn_on_path()
    torch = not a.no_torch and _have_torch()
    if not a.no_torch and not torch:
        print("PyTorch not installed (pip install -e '.[bench]'): charrnn only", file=sys.stderr)
    peak = _run("matmul").get("gflops")
    rows = []
    for name in a.configs.split(","):
        cell, layers, hidden, seq_len, batch = CONFIGS[name]
        sys.stderr.write(f"{name} ...\n")
        row = {"config": name}
        CPU_DEVICES[0] = _devices_for(a.cpu_devices, batch)
        row["devices"] = CPU_DEVICES[0]
        train = dict(cell=cell, layers=layers, hidden=hidden, seq_len=seq_len, batch=batch, steps=a.steps)
        c, t = _alternate(a.repeat, lambda: _run("charrnn-train", dtype=a.dtype, **train),
                          (lambda: _run("torch-train", vocab=VOCAB, threads=a.threads, dtype=a.dtype,
                                        tune=not a.untuned_peer, **train))
                          if torch else None)
        row.update(train=c.get("chars_per_s"), compile_s=c.get("first_step_s"), rss=c.get("peak_rss_mb"),
                   torch_train=t.get("chars_per_s"), torch_rss=t.get("peak_rss_mb"), error=c.get("error"),
                   train_ratio=_ratio(c, "chars_per_s"), rss_ratio=_ratio(c, "peak_rss_mb"),
                   tuning=(_tuning(c), _tuning(t) if torch else None))
        if torch and a.dtype == "bfloat16":
            row["torch_train_f32"] = _run("torch-train", vocab=VOCAB, threads=a.threads, dtype="float32",
                                          tune=not a.untuned_peer, **train).get("chars_per_s")
        if peak and row["train"]:
            sys.path.insert(0, str(HERE))
            from torch_peer import flops_per_char

            row["mfu"] = row["train"] * flops_per_char(cell, layers, hidden, VOCAB) / (peak * 1e9)
            if row["torch_train"]:
                row["torch_mfu"] = row["torch_train"] * flops_per_char(cell, layers, hidden, VOCAB) / (peak * 1e9)
        for b in (1, 32):
            CPU_DEVICES[0] = _sample_devices_for(a.cpu_devices, cell, layers, hidden, b)
            row[f"sample{b}_devices"] = devices = CPU_DEVICES[0]
            c, t = _alternate(
                a.repeat,
                lambda: _run("charrnn-sample", cell=cell, layers=layers, hidden=hidden, batch=b, devices=devices),
                (lambda: _run("torch-sample", cell=cell, layers=layers, hidden=hidden, batch=b, length=SAMPLE_LENGTH,
                              vocab=VOCAB, threads=a.threads)) if torch else None)
            row[f"sample{b}"], row[f"torch_sample{b}"] = c.get("chars_per_s"), t.get("chars_per_s")
            row[f"sample{b}_ratio"] = _ratio(c, "chars_per_s")
        rows.append(row)

    def ratio(r, k):
        return r.get(k + "_ratio")

    print(f"\ncharrnn benchmark — {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"dtype {a.dtype}, JAX float32 matmul peak {_fmt(peak)} GFLOP/s, charrnn from {_charrnn_root()}")
    print(_tuning_line(rows, torch))
    head = ["config", "devices", "train chars/s", "vs torch", "compile s", "peak RSS MB", "vs torch", "% of peak",
            "torch % of peak", "sample b=1", "vs torch", "sample b=32", "devices", "vs torch"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        rss_ratio = r.get("rss_ratio")
        cells = [r["config"], str(r["devices"]), _fmt(r["train"]), _fmt(ratio(r, "train"), "x"), _fmt(r["compile_s"]), _fmt(r["rss"]),
                 _fmt(rss_ratio, "x"), _fmt(100 * r["mfu"] if r.get("mfu") else None, "%"),
                 _fmt(100 * r["torch_mfu"] if r.get("torch_mfu") else None, "%"),
                 _fmt(r["sample1"]), _fmt(ratio(r, "sample1"), "x"), _fmt(r["sample32"]),
                 str(r["sample32_devices"]), _fmt(ratio(r, "sample32"), "x")]
        print("| " + " | ".join(cells) + " |")
        if r.get("torch_train_f32"):
            print(f"|   vs torch float32 | {_fmt(r['train'] / r['torch_train_f32'], 'x')} |")
        if r.get("error"):
            print(f"  {r['config']}: charrnn failed: {r['error']}")
    behind = [f"{r['config']} {what} {_fmt(ratio(r, key), 'x')}" for r in rows for key, what in SPEED_RATIOS.items()
              if ratio(r, key) is not None and ratio(r, key) < 1]
    if behind:
        print("below 1 (PyTorch faster): " + "; ".join(behind))
    enc = _run("encode").get("mb_per_s")
    print(f"\ncorpus encoding (two streaming passes to a memory-mapped file): {_fmt(enc)} MB/s")
    first = _run("first-sample")
    if "error" not in first:
        print(f"`charrnn sample RUN` to its first generated character: {first['warm_s']:.2f} s with a warm "
              f"compilation cache, {first['cold_s']:.2f} s cold")
    if a.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
