"""``charrnn serve``: the official ``openai`` client against a real server on 127.0.0.1.

One tiny trained run and one server (in a thread, on a free port, with an API key) serve the
whole module; seeded completions are compared with ``Run.sample`` on the same options.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from helpers import assert_refused, train_tiny, two_styles

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")
pytest.importorskip("uvicorn", reason="the serve extra (fastapi, uvicorn) is not installed")
openai = pytest.importorskip("openai", reason="the openai client (test extra) is not installed")
httpx = pytest.importorskip("httpx", reason="httpx (test extra) is not installed")

import charrnn  # noqa: E402
from charrnn.config import ModelConfig, RunConfig, SampleConfig, TrainConfig  # noqa: E402
from charrnn.serve import ServeLimits, create_app  # noqa: E402
from charrnn.serve.engine import Completion, Engine  # noqa: E402
from charrnn.serve.protocol import CompletionRequest, check_request  # noqa: E402
from charrnn.serve.server import Background  # noqa: E402
from charrnn.vocab import END  # noqa: E402

KEY = "test-key"
TEXT = ("the cat sat on the mat. the dog ran to the barn! a bird sang in the tree; "
        "the fox hid by the wall, and the hen laid an egg.\n") * 20
LIMITS = ServeLimits(max_tokens=300, max_n=4, max_prompt=50, max_concurrent=32, max_body=4096)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    config = RunConfig(model=ModelConfig(cell="gru", layers=1, hidden=32),
                       train=TrainConfig(max_steps=40, batch_size=8, seq_len=32, lr=1e-2))
    return train_tiny(tmp_path_factory.mktemp("serve"), TEXT, config)


@pytest.fixture(scope="module")
def server(tiny_run):
    with Background(create_app({"tiny": tiny_run}, LIMITS, api_key=KEY)) as s:
        yield s


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def expected(run, prompt: str, length: int, seed: int, n: int = 1, **options) -> list[str]:
    """What ``charrnn sample`` gives (generated text only, the prime left out)."""
    samples = run.sample(SampleConfig(prime=prompt, length=length, seed=seed, num_samples=n, **options))
    return [s.text[len(prompt):] for s in samples]


def test_lists_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"


def test_seeded_completion_is_charrnn_sample(client, tiny_run):
    out = client.completions.create(model="tiny", prompt="the ", max_tokens=120, seed=7, temperature=0.9)
    assert out.object == "text_completion" and out.model == "tiny"
    (choice,) = out.choices
    assert choice.text == expected(tiny_run, "the ", 120, 7, temperature=0.9)[0]
    assert choice.finish_reason in ("stop", "length")
    assert out.usage.prompt_tokens == 4
    assert out.usage.completion_tokens == len(choice.text)
    assert out.usage.total_tokens == 4 + len(choice.text)


def test_n_completions_are_the_rows_of_charrnn_sample(client, tiny_run):
    out = client.completions.create(model="tiny", prompt="a ", max_tokens=80, seed=3, n=3, top_p=0.9)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [c.text for c in out.choices] == expected(tiny_run, "a ", 80, 3, n=3, top_p=0.9)
    assert len({c.text for c in out.choices}) > 1


def test_temperature_zero_is_greedy(client, tiny_run):
    out = client.completions.create(model="tiny", prompt="the d", max_tokens=60, temperature=0)
    assert out.choices[0].text == expected(tiny_run, "the d", 60, 0, greedy=True)[0]


def test_charrnn_controls_top_k_greedy_and_penalties(client, tiny_run):
    out = client.completions.create(model="tiny", prompt="the ", max_tokens=80, seed=9, extra_body={"top_k": 3})
    assert out.choices[0].text == expected(tiny_run, "the ", 80, 9, top_k=3)[0]
    out = client.completions.create(model="tiny", prompt="the ", max_tokens=80, extra_body={"greedy": True})
    assert out.choices[0].text == expected(tiny_run, "the ", 80, 0, greedy=True)[0]
    plain = client.completions.create(model="tiny", prompt="the ", max_tokens=150, temperature=0).choices[0].text
    out = client.completions.create(model="tiny", prompt="the ", max_tokens=150, temperature=0,
                                    frequency_penalty=2.0, presence_penalty=1.0)
    assert out.choices[0].text != plain
    assert out.choices[0].text == expected(tiny_run, "the ", 150, 0, greedy=True, frequency_penalty=2.0,
                                           presence_penalty=1.0)[0]
    out = client.completions.create(model="tiny", prompt="the ", max_tokens=150, seed=4, n=2,
                                    extra_body={"repetition_penalty": 1.3})
    assert [c.text for c in out.choices] == expected(tiny_run, "the ", 150, 4, n=2, repetition_penalty=1.3)
    again = client.completions.create(model="tiny", prompt="the ", max_tokens=150, temperature=0).choices[0].text
    assert again == plain  # a penalized request leaves no trace in later rows


def test_length_and_echo(client):
    out = client.completions.create(model="tiny", prompt="the ", max_tokens=5, seed=1, echo=True)
    choice = out.choices[0]
    assert choice.text.startswith("the ")
    if choice.finish_reason == "length":
        assert len(choice.text) == 4 + 5


def test_stop_strings_end_the_text_before_them(client, tiny_run):
    free = client.completions.create(model="tiny", prompt="the ", max_tokens=200, seed=5).choices[0].text
    stop = "the"
    assert stop in free, "the tiny model should say 'the' within 200 characters"
    out = client.completions.create(model="tiny", prompt="the ", max_tokens=200, seed=5, stop=[stop, "zzz"])
    assert out.choices[0].text == free[:free.index(stop)]
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == expected(tiny_run, "the ", 200, 5, stop=(stop, "zzz"))[0]


def test_stream_concatenates_to_the_plain_text(client):
    plain = client.completions.create(model="tiny", prompt="the ", max_tokens=150, seed=11, n=2)
    pieces, finish, events = ["", ""], [None, None], 0
    for chunk in client.completions.create(model="tiny", prompt="the ", max_tokens=150, seed=11, n=2, stream=True):
        events += 1
        for c in chunk.choices:
            pieces[c.index] += c.text
            finish[c.index] = c.finish_reason or finish[c.index]
    assert pieces == [c.text for c in plain.choices]
    assert finish == [c.finish_reason for c in plain.choices]
    assert events >= 2


def _stream_text(url: str, seed: int, max_tokens: int) -> str:
    c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=300)
    return "".join(ch.choices[0].text for ch in c.completions.create(
        model="tiny", prompt="the ", max_tokens=max_tokens, seed=seed, stream=True) if ch.choices)


def test_sixteen_streaming_clients_get_their_single_client_texts(server):
    lengths = [40 + 15 * i for i in range(16)]  # different lengths: rows join and leave mid-batch
    alone = [_stream_text(server.url, 100 + i, n) for i, n in enumerate(lengths)]
    crowd = [None] * 16

    def one(i):
        crowd[i] = _stream_text(server.url, 100 + i, lengths[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert crowd == alone


@pytest.mark.parametrize("arrivals", [[16], [9, 7], [1] * 16, [3, 5, 8], [15, 1]])
def test_the_batch_is_the_live_rows_padded_to_a_power_of_two(tiny_run, arrivals):
    """However requests arrive, 16 live rows run as a batch of 16 (rows that joined a padded
    batch were once counted on top of its padding, and 16 clients ran as 32 rows at half speed);
    as rows leave, the batch keeps its size until three quarters of it is padding."""
    endless = copy.copy(tiny_run)  # rows that never reach the end token: only cancelling ends them
    endless.params = {**tiny_run.params, "b_out": tiny_run.params["b_out"].at[END].set(-1e9)}
    engine = Engine(endless, max_batch=64, chunk=16)
    completions = []
    for group in arrivals:
        joining = [Completion(check_request(CompletionRequest(model="tiny", prompt="the ", max_tokens=4000,
                                                              seed=len(completions) + i), tiny_run.vocab,
                                            ServeLimits(max_tokens=4000)),
                              sink=lambda item: None) for i in range(group)]
        completions += joining
        engine._step(joining)
    assert (engine.live_rows, engine.batch_rows) == (16, 16)
    for keep, rows in [(8, 16), (5, 16), (4, 4), (2, 4), (1, 1), (0, 0)]:
        for c in completions[keep:]:
            c.cancel()
        engine._step([])
        assert (engine.live_rows, engine.batch_rows) == (keep, rows)


def test_a_disconnected_stream_frees_its_row(server):
    engine = server.app.state.engines["tiny"]
    body = {"model": "tiny", "prompt": "the ", "max_tokens": 300, "stream": True, "seed": 1}
    with httpx.stream("POST", server.url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        assert r.status_code == 200
        next(r.iter_lines())
    deadline = time.time() + 30
    while engine.live_rows:
        assert time.time() < deadline, "the row was not freed"
        time.sleep(0.05)


@pytest.mark.parametrize("options, param", [
    (dict(prompt="the €"), "prompt"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(extra_body={"top_k": 0}), "top_k"),
    (dict(extra_body={"repetition_penalty": 0}), "repetition_penalty"),
    (dict(stop=["a", ""]), "stop"),
    (dict(max_tokens=301), "max_tokens"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(n=5), "n"),
    (dict(prompt="t" * 51), "prompt"),
    (dict(seed=-1), "seed"),
    (dict(extra_body={"temperature": "hot"}), "temperature"),
    (dict(extra_body={"n": True}), "n"),
    (dict(extra_body={"stop": 3}), "stop"),
    (dict(logprobs=2), "logprobs"),
])
def test_refused_values_are_bad_requests_naming_the_field(client, options, param):
    options = {"prompt": "the ", "max_tokens": 5, **options}
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", **options)
    assert e.value.status_code == 400
    assert e.value.body["param"] == param, e.value.body
    assert e.value.body["message"]


def test_over_max_concurrent_is_429_and_a_closed_stream_frees_its_place(tiny_run, monkeypatch):
    app = create_app({"tiny": tiny_run}, ServeLimits(max_concurrent=1), api_key=KEY)
    monkeypatch.setattr(app.state.engines["tiny"], "submit", lambda completion: None)  # never answers
    headers = {"Authorization": f"Bearer {KEY}"}
    with Background(app) as server:
        body = {"model": "tiny", "prompt": "the ", "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=headers, timeout=60) as r:
            assert r.status_code == 200
            c = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
            with pytest.raises(openai.RateLimitError):
                c.completions.create(model="tiny", prompt="the ")
        deadline = time.time() + 30
        while app.state.active["requests"]:
            assert time.time() < deadline, "the closed stream kept its place"
            time.sleep(0.05)


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="the ")
    assert e.value.body["param"] == "model"


def test_missing_or_wrong_key_is_refused(server):
    for key in ("wrong", None):
        c = openai.OpenAI(base_url=server.url + "/v1", api_key=key or "x", max_retries=0,
                          default_headers={} if key else {"Authorization": ""})
        with pytest.raises(openai.AuthenticationError):
            c.models.list()
        with pytest.raises(openai.AuthenticationError):
            c.completions.create(model="tiny", prompt="the ")


@pytest.mark.parametrize("content, status, code", [
    (b'{"model": "tiny", "prompt": ', 400, "invalid_json"),
    (b'[1, 2]', 400, "invalid_body"),
    (b'{"prompt": "the "}', 400, "missing_field"),
    (b'{"model": "tiny", "prompt": "' + b"a" * 5000 + b'"}', 413, "body_too_large"),
])
def test_malformed_bodies_get_json_errors(server, content, status, code):
    r = httpx.post(server.url + "/v1/completions", content=content, timeout=30,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert "Traceback" not in r.text


def test_unknown_routes_and_methods_are_json_errors(server):
    r = httpx.get(server.url + "/v1/nothing", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["message"]
    r = httpx.get(server.url + "/v1/completions", timeout=30, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 405 and r.json()["error"]["message"]


def test_playground_page_is_served(server):
    r = httpx.get(server.url + "/", timeout=30)
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    page = r.text
    for needle in ('id="prompt"', 'id="model"', 'id="temperature"', 'id="top_p"', 'id="max_tokens"',
                   'id="seed"', 'id="generate"', 'id="stop"', "AbortController", "getReader"):
        assert needle in page
    assert "http://" not in page and "https://" not in page  # no CDN: works offline


def test_limits_are_checked():
    with pytest.raises(charrnn.CharrnnError, match="--max-n"):
        ServeLimits(max_n=0)
    with pytest.raises(charrnn.CharrnnError, match="--max-tokens"):
        ServeLimits(max_tokens=10, default_max_tokens=20)


def _cli(monkeypatch, *args):
    from click.testing import CliRunner

    from charrnn.cli import cli

    monkeypatch.setenv("CHARRNN_NO_XLA_CACHE", "1")  # keep this session's compilation cache
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.parametrize("args, message", [
    (["serve", "/nonexistent/run"], "/nonexistent/run"),
    (["serve", "RUN", "--max-n", "0"], "--max-n"),
    (["serve", "RUN", "--max-tokens", "-1"], "--max-tokens"),
    (["serve", "RUN", "--api-key", " "], "--api-key"),
    (["serve", "RUN", "--port", "70000"], "--port"),
    (["serve", "RUN", "RUN"], "named"),
    (["serve", "RUN", "--checkpoint", "worst"], "--checkpoint"),
])
def test_cli_refuses_bad_flags_in_one_line(tiny_run, monkeypatch, args, message):
    assert_refused(_cli(monkeypatch, *[tiny_run.run_dir if a == "RUN" else a for a in args]), message)


def test_cli_refuses_a_busy_port_or_a_bad_host(tiny_run, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        result = _cli(monkeypatch, "serve", tiny_run.run_dir, "--port", s.getsockname()[1])
    assert_refused(result, "cannot listen")
    assert_refused(_cli(monkeypatch, "serve", tiny_run.run_dir, "--host", "256.1.1.1"), "--host")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_serves_and_exits_0_on_a_signal(tiny_run, sig):
    env = {**os.environ, "CHARRNN_API_KEY": KEY, "JAX_PLATFORMS": "cpu"}
    p = subprocess.Popen([sys.executable, "-m", "charrnn.cli", "serve", str(tiny_run.run_dir), "--port", "0"],
                         stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = p.stderr.readline()
        assert "serving" in line, line + p.stderr.read()
        url = line.split(" on ")[1].split()[0]
        r = httpx.post(url + "/v1/completions", json={"model": tiny_run.run_dir.name, "prompt": "the ",
                                                      "max_tokens": 20, "seed": 2},
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        assert r.status_code == 200, r.text
        assert json.loads(r.text)["choices"][0]["text"] == expected(tiny_run, "the ", 20, 2)[0]
        p.send_signal(sig)
        assert p.wait(60) == 0, p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()


# --- labelled runs (trained with --labels): the `label` field ---------------------------------

@pytest.fixture(scope="module")
def styles_run(tmp_path_factory):
    from charrnn.config import DataConfig

    root = tmp_path_factory.mktemp("serve-labels")
    config = RunConfig(model=ModelConfig(cell="gru", layers=1, hidden=32, label_dim=4),
                       data=DataConfig(labels="tsv", val_frac=0.2),
                       train=TrainConfig(max_steps=60, batch_size=8, seq_len=32, lr=1e-2))
    return train_tiny(root, two_styles(root / "styles.tsv"), config, "styles")


@pytest.fixture(scope="module")
def styles_server(styles_run, tiny_run):
    with Background(create_app({"styles": styles_run, "tiny": tiny_run}, LIMITS, api_key=KEY)) as s:
        yield s


@pytest.fixture
def styles_client(styles_server):
    return openai.OpenAI(base_url=styles_server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _label(choice):
    return (choice.model_extra or {}).get("label")


def test_a_labelled_model_lists_its_labels(styles_client, styles_run):
    meta = {m.id: m.model_extra["meta"] for m in styles_client.models.list().data}
    assert meta["styles"]["labels"] == [{"name": n, "documents": c}
                                        for n, c in zip(styles_run.labels.names, styles_run.labels.counts)]
    assert [d["name"] for d in meta["styles"]["labels"]] == ["digits", "upper"]
    assert "labels" not in meta["tiny"]
    # One model's description is its entry of the list.
    assert styles_client.models.retrieve("styles").model_extra["meta"] == meta["styles"]


@pytest.mark.parametrize("label", ["upper", "digits", "upper=0.7,digits=0.3"])
def test_a_seeded_labelled_completion_is_charrnn_sample(styles_client, styles_run, label):
    out = styles_client.completions.create(model="styles", prompt="", max_tokens=60, seed=5, n=2,
                                           extra_body={"label": label})
    assert [c.text for c in out.choices] == expected(styles_run, "", 60, 5, n=2, label=label)
    assert [_label(c) for c in out.choices] == [label, label]


def test_without_a_label_each_row_draws_the_label_charrnn_sample_draws(styles_client, styles_run):
    drawn = set()
    for seed in (1, 2, 3):
        out = styles_client.completions.create(model="styles", prompt="", max_tokens=50, seed=seed, n=4)
        samples = styles_run.sample(SampleConfig(prime="", length=50, seed=seed, num_samples=4))
        assert [c.text for c in out.choices] == [s.text for s in samples]
        assert [_label(c) for c in out.choices] == [s.label for s in samples]
        drawn |= {s.label for s in samples}
    assert drawn == {"digits", "upper"}  # the rows of a request draw labels, not one for all


@pytest.mark.parametrize("label, needle", [
    ("nope", "unknown label 'nope' (known: digits, upper)"),
    ("upper=x", "weight of 'upper' must be a number >= 0"),
    ("upper=1,nope=1", "unknown label 'nope'"),
    ("upper=0,digits=0", "must not all be 0"),
    ("", "unknown label ''"),
    (3, "label must be a string"),
])
def test_a_bad_label_is_a_bad_request_naming_the_field(styles_client, label, needle):
    with pytest.raises(openai.BadRequestError) as e:
        styles_client.completions.create(model="styles", prompt="", max_tokens=5, extra_body={"label": label})
    assert e.value.status_code == 400
    assert e.value.body["param"] == "label", e.value.body
    assert needle in e.value.body["message"]
    assert "--label" not in e.value.body["message"]


def test_a_bad_label_is_quoted_as_sent(styles_client):
    """The field is named by the check itself, not by rewriting the CLI's messages afterwards."""
    with pytest.raises(openai.BadRequestError) as e:
        styles_client.completions.create(model="styles", prompt="", max_tokens=5,
                                         extra_body={"label": "--label=1"})
    assert "unknown label '--label'" in e.value.body["message"], e.value.body


def test_a_label_for_an_unlabelled_model_is_a_bad_request(styles_client):
    with pytest.raises(openai.BadRequestError) as e:
        styles_client.completions.create(model="tiny", prompt="the ", max_tokens=5, extra_body={"label": "upper"})
    assert e.value.body["param"] == "label"
    assert "without labels" in e.value.body["message"]
    out = styles_client.completions.create(model="tiny", prompt="the ", max_tokens=5, seed=1)
    assert _label(out.choices[0]) is None  # unlabelled models' choices carry no label


@pytest.mark.parametrize("label", [None, "digits"])
def test_a_labelled_stream_concatenates_to_the_plain_text(styles_client, label):
    extra = {} if label is None else {"label": label}
    plain = styles_client.completions.create(model="styles", prompt="", max_tokens=80, seed=11, n=3, extra_body=extra)
    pieces, labels = [""] * 3, [set(), set(), set()]
    for chunk in styles_client.completions.create(model="styles", prompt="", max_tokens=80, seed=11, n=3,
                                                  stream=True, extra_body=extra):
        for c in chunk.choices:
            pieces[c.index] += c.text
            labels[c.index].add(_label(c))
    assert pieces == [c.text for c in plain.choices]
    assert labels == [{_label(c)} for c in plain.choices]  # every chunk of a row names its label


def _labelled_text(url: str, seed: int, max_tokens: int, label, prompt: str) -> list[str]:
    c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=300)
    out = c.completions.create(model="styles", prompt=prompt, max_tokens=max_tokens, seed=seed, n=2,
                               extra_body={} if label is None else {"label": label})
    return [ch.text for ch in out.choices]


def test_concurrent_labelled_requests_get_their_single_client_texts(styles_server, styles_run):
    """Rows of different labels share one batch; a row's text never depends on its neighbours."""
    asks = [(21, 40, "upper", ""), (22, 90, None, "1"), (23, 60, "digits=0.5,upper=0.5", "AB"), (24, 120, "digits", "")]
    alone = [_labelled_text(styles_server.url, *a) for a in asks]
    assert alone[0] == expected(styles_run, "", 40, 21, n=2, label="upper")
    assert alone[2] == expected(styles_run, "AB", 60, 23, n=2, label="digits=0.5,upper=0.5")
    crowd = [None] * len(asks)

    def one(i):
        crowd[i] = _labelled_text(styles_server.url, *asks[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(asks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert crowd == alone


def test_a_labelled_engine_warms_up(styles_run):
    engine = Engine(styles_run, max_batch=4, chunk=16)
    engine.warm_up(rows=4, prompt=4)  # the programs of labelled rows compile without a request


def test_cli_serves_labelled_runs(styles_run, monkeypatch):
    with socket.socket() as s:  # a busy port: the CLI gets past loading the run, then stops at listening
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        result = _cli(monkeypatch, "serve", styles_run.run_dir, "--port", s.getsockname()[1])
    assert_refused(result, "cannot listen")
