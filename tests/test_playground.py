"""The playground at ``/`` in a real headless Chromium: type a prime, press generate, and the
streamed text appears (and equals the seeded ``Run.sample``); the stop button ends a stream."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow  # a real browser (a Chromium subprocess) against a real server

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")
pytest.importorskip("uvicorn", reason="the serve extra (fastapi, uvicorn) is not installed")

from browser import chromium_page, record_requests  # noqa: E402
from helpers import train_tiny, two_styles  # noqa: E402
from charrnn.config import ModelConfig, RunConfig, SampleConfig, TrainConfig  # noqa: E402
from charrnn.serve import ServeLimits, create_app  # noqa: E402
from charrnn.serve.server import Background  # noqa: E402
from charrnn.vocab import END  # noqa: E402

TEXT = "the cat sat on the mat. the dog ran to the barn! a bird sang in the tree.\n" * 30
KEY = "playground-key"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    config = RunConfig(model=ModelConfig(cell="lstm", layers=1, hidden=32),
                       train=TrainConfig(max_steps=30, batch_size=8, seq_len=32, lr=1e-2))
    run = train_tiny(tmp_path_factory.mktemp("playground"), TEXT, config)
    # Never end a text early (the stop button must find a stream still running).
    run.params["b_out"] = run.params["b_out"].at[END].set(-1e9)
    with Background(create_app({"tiny": run}, ServeLimits(max_tokens=200_000), api_key=KEY)) as server:
        yield server, run


def open_playground(page, server, models: int = 1) -> list:
    """Load the playground, give it the API key and wait for its model list; returns the list
    of URLs the page requests (to check that nothing comes from elsewhere)."""
    requests = record_requests(page)
    page.goto(server.url + "/")
    page.fill("#api_key", KEY)
    page.dispatch_event("#api_key", "change")
    page.wait_for_function(f"document.querySelector('#model').options.length >= {models}")
    return requests


def generate(page, **fields: str) -> str:
    """Fill the playground's fields (``prompt="the "``, ``seed="42"``...), press generate, wait
    until it is done and return the generated text."""
    for name, value in fields.items():
        page.fill(f"#{name}", value)
    page.click("#generate")
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('done')")
    return page.text_content("#output")


def test_type_a_prime_press_generate_and_the_text_streams_in(served):
    server, run = served
    with chromium_page() as page:
        requests = open_playground(page, server)
        assert page.eval_on_selector("#model", "s => s.value") == "tiny"
        text = generate(page, prompt="the ", temperature="0.9", max_tokens="120", seed="42")
        assert page.text_content("#output-prime") == "the "
        want = run.sample(SampleConfig(prime="the ", length=120, temperature=0.9, seed=42))[0].text
        assert text == want[len("the "):]
        assert text
        assert all(u.startswith(server.url) for u in requests), requests  # nothing from elsewhere


def test_the_stop_button_ends_a_stream(served):
    server, _ = served
    with chromium_page() as page:
        open_playground(page, server)
        page.fill("#prompt", "the ")
        page.fill("#max_tokens", "200000")
        # Press stop the moment the first characters arrive (a click from here could come late).
        page.evaluate("""() => new MutationObserver((_, observer) => {
            observer.disconnect(); document.querySelector('#stop').click();
        }).observe(document.querySelector('#output'), {childList: true, characterData: true, subtree: true})""")
        page.click("#generate")
        page.wait_for_function("!document.querySelector('#status').textContent.startsWith('generating')")
        assert page.text_content("#status").startswith("stopped"), (page.text_content("#status"),
                                                                    len(page.text_content("#output")))
        assert page.is_enabled("#generate")
        assert len(page.text_content("#output")) < 200_000


def test_a_refused_request_shows_the_servers_message(served):
    server, _ = served
    with chromium_page() as page:
        open_playground(page, server)
        page.fill("#prompt", "the ")
        page.fill("#top_p", "0")
        page.click("#generate")
        page.wait_for_function("document.querySelector('#status').className === 'error'")
        assert "top_p" in page.text_content("#status")


@pytest.fixture(scope="module")
def served_labelled(served, tmp_path_factory):
    from charrnn.config import DataConfig

    _, tiny = served
    root = tmp_path_factory.mktemp("playground-labels")
    config = RunConfig(model=ModelConfig(cell="gru", layers=1, hidden=16, label_dim=2),
                       data=DataConfig(labels="tsv", val_frac=0.2),
                       train=TrainConfig(max_steps=10, batch_size=4, seq_len=16, lr=1e-2))
    styles = train_tiny(root, two_styles(root / "styles.tsv"), config, "styles")
    with Background(create_app({"tiny": tiny, "styles": styles}, ServeLimits(), api_key=KEY)) as server:
        yield server, styles


def test_a_labelled_model_gets_a_label_picker_and_its_label_is_sent(served_labelled):
    server, styles = served_labelled
    with chromium_page() as page:
        requests = open_playground(page, server, models=2)
        assert page.is_hidden("#label-box")  # "tiny" has no labels
        page.select_option("#model", "styles")
        assert page.is_visible("#label-box")
        options = page.eval_on_selector_all("#label option", "os => os.map(o => [o.value, o.textContent])")
        assert [v for v, _ in options] == ["", "digits", "upper"]
        assert options[0][1] == "any (drawn)"
        page.select_option("#label", "upper")
        text = generate(page, prompt="", max_tokens="40", seed="3")
        assert text == styles.sample(SampleConfig(prime="", length=40, seed=3, temperature=0.8, label="upper"))[0].text
        assert page.text_content("#status").endswith("label: upper")
        assert all(u.startswith(server.url) for u in requests), requests
