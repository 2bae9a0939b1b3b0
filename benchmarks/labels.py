"""Does a label help? One labelled model against an unlabelled model of the same size trained on
the same documents, compared on held-out documents of each label.

    python benchmarks/labels.py --task python            # python-docs vs python-code, built in
    python benchmarks/labels.py --task speakers          # tinyshakespeare's speeches by speaker
    python benchmarks/labels.py --task speakers --speakers 4 --steps 500 --out /tmp/speakers

``python``: the ``python-docs`` topics labelled ``docs`` and as many characters of
``python-code`` files (every 25th standard-library file) labelled ``code``. ``speakers``:
tinyshakespeare's speeches (blocks separated by blank lines, ``NAME:`` on the first line) of the
``--speakers`` speakers with the most text, the name line dropped so that the label is the only
hint of who speaks. Every tenth document of each label is held out (unless it has a character
no training document has). The labelled run reads a directory per label (``--labels dirs``);
the unlabelled run reads the same documents, one file each, labels spread over the stream the
same way. Both train the same steps from the same seed and are compared at their last
checkpoint; the table is each model's loss (nats per character) on each label's held-out
documents (and the labelled model's when told the wrong label), then a few labelled samples.
Losses depend on steps, not on the host's speed.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_CORPUS = HERE.parent.parent / "shared" / "corpora" / "tinyshakespeare.txt"


def speeches(text: str) -> list[tuple[str, str]]:
    """``(speaker, speech)`` of every block ``NAME:\\nlines`` separated by blank lines."""
    out = []
    for block in text.split("\n\n"):
        head, _, body = block.strip("\n").partition("\n")
        if head.endswith(":") and body.strip():
            out.append((head[:-1].strip(), body))
    return out


def speaker_documents(corpus: Path, speakers: int) -> list[tuple[str, str]]:
    every = speeches(corpus.read_text(encoding="utf-8"))
    size = collections.Counter()
    for who, body in every:
        size[who] += len(body)
    kept = {who for who, _ in size.most_common(speakers)}
    return [(who, body) for who, body in every if who in kept]


def python_documents() -> list[tuple[str, str]]:
    from charrnn.corpora import BUILTIN

    docs = [("docs", text) for _, text in BUILTIN["python-docs"].loader()]
    want, code = sum(len(t) for _, t in docs), []
    for _, text in BUILTIN["python-code"].loader()[::25]:
        if sum(len(t) for _, t in code) >= want:
            break
        code.append(("code", text))
    return docs + code


def write_split(documents: list[tuple[str, str]], out: Path) -> tuple[list[str], dict]:
    """Write ``out/labelled/LABEL/K.txt`` and ``out/plain/K.txt`` (the training documents) and
    return the labels (most text first) and each label's held-out documents."""
    by_label = collections.defaultdict(list)
    for label, text in documents:
        by_label[label].append(text)
    labels = sorted(by_label, key=lambda w: -sum(map(len, by_label[w])))
    train, test = {}, {}
    for w in labels:
        train[w] = [t for k, t in enumerate(by_label[w], 1) if k % 10]
        test[w] = [t for k, t in enumerate(by_label[w], 1) if not k % 10]
    # A held-out document with a character no training document has cannot be scored by either model.
    known = set().union(*(set(t) for w in labels for t in train[w]))
    test = {w: [t for t in test[w] if set(t) <= known] for w in labels}
    for w in labels:
        (out / "labelled" / w).mkdir(parents=True, exist_ok=True)
        for k, t in enumerate(train[w]):
            (out / "labelled" / w / f"{k:05d}.txt").write_text(t, encoding="utf-8")
    # The plain run's files, read in name order, take turns between labels as the labelled
    # run's stream does, so both see the labels spread over training alike.
    (out / "plain").mkdir(parents=True, exist_ok=True)
    turns = itertools.zip_longest(*(train[w] for w in labels))
    for k, t in enumerate(t for turn in turns for t in turn if t is not None):
        (out / "plain" / f"{k:06d}.txt").write_text(t, encoding="utf-8")
    return labels, test


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=("python", "speakers"), default="python")
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="tinyshakespeare.txt (--task speakers)")
    p.add_argument("--speakers", type=int, default=8)
    p.add_argument("--cell", default="lstm")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--out", type=Path, default=None, help="default: checkpoints/labels-TASK")
    args = p.parse_args()
    out = args.out or Path("checkpoints") / f"labels-{args.task}"
    # Documents left by an earlier run (other speakers, say) would join this one's training.
    stale = [out / d for d in ("labelled", "plain", "test", "test-wrong-label") if (out / d).exists()]
    if stale:
        raise SystemExit(f"labels.py: {out} already holds documents of an earlier run ({stale[0].name}/); "
                         "pass a new --out or remove it")

    sys.path.insert(0, str(HERE.parent))
    import charrnn
    from charrnn.config import DataConfig, ModelConfig, RunConfig, TrainConfig

    if args.task == "speakers":
        if not args.corpus.is_file():
            raise SystemExit(f"labels.py: no corpus at {args.corpus} (pass --corpus tinyshakespeare.txt)")
        documents = speaker_documents(args.corpus, args.speakers)
    else:
        documents = python_documents()
    labels, held_out = write_split(documents, out)
    model = ModelConfig(cell=args.cell, layers=args.layers, hidden=args.hidden)
    train = TrainConfig(max_steps=args.steps, eval_every=max(args.steps // 6, 1), seed=0)
    runs = {}
    for name, corpus, data in [("labelled", "labelled", DataConfig(labels="dirs", val_frac=0.05)),
                               ("unlabelled", "plain", DataConfig(val_frac=0.05))]:
        print(f"training the {name} model ({args.steps} steps) ...", flush=True)
        result = charrnn.train(str(out / corpus), RunConfig(model=model, train=train, data=data),
                               out=str(out / f"run-{name}"), overwrite=True)
        runs[name] = charrnn.load(result.run_dir, "latest")

    test_dir = out / "test"
    for w in labels:
        (test_dir / w).mkdir(parents=True, exist_ok=True)
        for k, t in enumerate(held_out[w]):
            (test_dir / w / f"{k:05d}.txt").write_text(t, encoding="utf-8")
    labelled = runs["labelled"].evaluate_labelled(test_dir)["labels"]
    # The same documents under the wrong label (each label's under the next one's): if the model
    # uses its label, the wrong one costs it.
    wrong_dir = out / "test-wrong-label"
    for w, other in zip(labels, labels[1:] + labels[:1]):
        (wrong_dir / other).mkdir(parents=True, exist_ok=True)
        for k, t in enumerate(held_out[w]):
            (wrong_dir / other / f"{w}-{k:05d}.txt").write_text(t, encoding="utf-8")
    wrong = runs["labelled"].evaluate_labelled(wrong_dir)["labels"]
    wrong = {w: wrong[other] for w, other in zip(labels, labels[1:] + labels[:1])}
    plain = {}
    for w in labels:  # the unlabelled model, one held-out document (a file) at a time
        scores = [runs["unlabelled"].evaluate(t) for t in held_out[w]]
        chars = sum(s["chars"] for s in scores)
        plain[w] = {"chars": chars, "nats": sum(s["nats"] * s["chars"] for s in scores) / chars}

    print(f"\n{args.task}: {len(labels)} labels, {args.cell} {args.layers}x{args.hidden}, {args.steps} steps "
          f"each; parameters: labelled {runs['labelled'].num_params:,}, unlabelled {runs['unlabelled'].num_params:,}")
    print("loss on held-out documents, nats per character (lower is better)\n")
    print("| label | held-out chars | unlabelled | labelled | change | labelled, told the wrong label |")
    print("|---|---|---|---|---|---|")
    for w in labels:
        a, b, c = plain[w], labelled[w], wrong[w]
        assert a["chars"] == b["chars"] == c["chars"], w  # the same text scored
        print(f"| {w} | {a['chars']:,} | {a['nats']:.3f} | {b['nats']:.3f} | {b['nats'] - a['nats']:+.3f} "
              f"| {c['nats']:.3f} |")
    chars = sum(plain[w]["chars"] for w in labels)
    a, b, c = (sum(d[w]["nats"] * d[w]["chars"] for w in labels) / chars for d in (plain, labelled, wrong))
    print(f"| all | {chars:,} | {a:.3f} | {b:.3f} | {b - a:+.3f} | {c:.3f} |")
    print("\nlabelled samples (temperature 0.8, seed 1):")
    for w in labels[:3]:
        text = runs["labelled"].sample(label=w, length=160, temperature=0.8, seed=1)[0].text
        print(f"\n--label {w}:\n{text.strip()}")


if __name__ == "__main__":
    main()
