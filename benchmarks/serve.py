"""``charrnn serve`` under load: characters per second (total and per client) and time to the
first character (p50/p99) for 1, 4, 16 and 64 concurrent streaming clients, beside the batched
sampler itself (``Run.sample`` with 16 rows, what ``charrnn sample -n 16`` runs).

    python benchmarks/serve.py                                  # tiny and char-rnn-default
    python benchmarks/serve.py --configs lstm-2x512 --clients 1,16 --length 1000

Each model is a run trained for one step (speed does not depend on the weights) on the
built-in python-docs corpus (vocabulary ~100). The server runs in this process (uvicorn in a
thread, as ``charrnn serve`` does on one device); the clients run in a subprocess (asyncio +
httpx streaming, so parsing their events takes no time from the server). Each round is run
once to compile and warm up, then measured. The target: 16 clients reach >= 70% of
``Run.sample`` with 16 rows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIGS = {  # name: (cell, layers, hidden)
    "tiny": ("gru", 1, 32),
    "char-rnn-default": ("lstm", 2, 128),
    "lstm-2x512": ("lstm", 2, 512),
}


# --- the clients (a subprocess) -------------------------------------------------------------

async def _one_client(client, url: str, model: str, seed: int, length: int) -> dict:
    body = {"model": model, "prompt": "The ", "max_tokens": length, "seed": seed, "stream": True,
            "temperature": 1.0}
    start = time.perf_counter()
    first, chars = None, 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:]).get("choices", []):
                if choice["text"] and first is None:
                    first = time.perf_counter() - start
                chars += len(choice["text"])
    return {"ttfc": first if first is not None else float("nan"), "chars": chars,
            "seconds": time.perf_counter() - start}


async def _clients(url: str, model: str, clients: int, length: int, seed: int) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start, cpu = time.perf_counter(), time.process_time()
        rows = await asyncio.gather(*(_one_client(client, url, model, seed + i, length) for i in range(clients)))
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"wall": wall, "rows": rows, "client_cpu": cpu}


def client_main(args) -> None:
    out = asyncio.run(_clients(args.client, args.model, args.n, args.length, args.seed))
    print(json.dumps(out))


# --- the server side ------------------------------------------------------------------------

def _percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _train_run(name: str, root: Path):
    sys.path.insert(0, str(HERE.parent))
    import charrnn
    from charrnn.config import ModelConfig, RunConfig, TrainConfig

    cell, layers, hidden = CONFIGS[name]
    config = RunConfig(model=ModelConfig(cell=cell, layers=layers, hidden=hidden),
                       train=TrainConfig(max_steps=1, batch_size=8, seq_len=32))
    result = charrnn.train("python-docs", config, out=str(root / name))
    run = charrnn.load(result.run_dir, "latest")
    # An untrained model ends a text at the end token within ~V characters; speed does not
    # depend on the weights, so mask it: every client gets the length it asks for.
    from charrnn.vocab import END

    run.params["b_out"] = run.params["b_out"].at[END].set(-1e9)
    return run


def _sample_rate(run, rows: int, length: int, seed: int = 2) -> float:
    """Characters per second of ``Run.sample`` with ``rows`` rows (what ``charrnn sample -n``
    runs in one process on one device)."""
    from charrnn.config import SampleConfig

    t = time.perf_counter()
    out = run.sample(SampleConfig(prime="The ", length=length, num_samples=rows, seed=seed))
    return sum(len(s.text) - 4 for s in out) / (time.perf_counter() - t)


def _round(url: str, model: str, clients: int, length: int, seed: int) -> dict:
    cmd = [sys.executable, __file__, "--client", url, "--model", model, "-n", str(clients),
           "--length", str(length), "--seed", str(seed)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"client subprocess failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="tiny,char-rnn-default")
    p.add_argument("--clients", default="1,4,16,64")
    p.add_argument("--length", type=int, default=1000, help="characters each client asks for")
    p.add_argument("--chunk", type=int, default=None, help="engine chunk (characters per dispatch)")
    p.add_argument("--repeat", type=int, default=3, help="measured rounds per client count")
    p.add_argument("--client", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("-n", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.client:
        return client_main(args)

    sys.path.insert(0, str(HERE.parent))
    import jax

    from charrnn.serve import ServeLimits, create_app
    from charrnn.serve.server import Background

    counts = [int(c) for c in args.clients.split(",")]
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} x{len(jax.devices())}; "
          f"{args.length} characters per client, prompt 'The ', temperature 1; medians of {args.repeat} "
          "rounds, each beside a Run.sample round (shared hosts drift: compare within a line)")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs.split(","):
            run = _train_run(name, Path(tmp))
            _sample_rate(run, 16, args.length, 1)  # compile
            print(f"\n{name} ({run.config.model.cell} {run.config.model.layers}x{run.config.model.hidden}, "
                  f"vocab {run.vocab.size})")
            print(f"{'clients':>8} {'chars/s':>10} {'per client':>11} {'ttfc p50':>9} {'ttfc p99':>9} "
                  f"{'sample16':>9} {'ratio':>6} {'client cpu':>10}")
            limits = ServeLimits(max_concurrent=max(counts) + 8, max_tokens=max(4096, args.length))
            with Background(create_app({name: run}, limits, chunk=args.chunk, warm_up=True)) as server:
                for c in counts:
                    _round(server.url, name, c, args.length, 1000)  # compile and warm up
                    totals, pers, ttfc, bases, cpu = [], [], [], [], []
                    for rep in range(args.repeat):
                        bases.append(_sample_rate(run, 16, args.length, 10 + rep))
                        r = _round(server.url, name, c, args.length, 2000 + 100 * rep)
                        totals.append(sum(row["chars"] for row in r["rows"]) / r["wall"])
                        pers += [row["chars"] / row["seconds"] for row in r["rows"]]
                        ttfc += [row["ttfc"] for row in r["rows"]]
                        cpu.append(r["client_cpu"] / r["wall"])
                    total, base = statistics.median(totals), statistics.median(bases)
                    print(f"{c:>8} {total:>10,.0f} {statistics.median(pers):>11,.0f} "
                          f"{_percentile(ttfc, .5) * 1e3:>7.0f}ms {_percentile(ttfc, .99) * 1e3:>7.0f}ms "
                          f"{base:>9,.0f} {total / base:>6.0%} {statistics.median(cpu):>10.0%}", flush=True)


if __name__ == "__main__":
    main()
