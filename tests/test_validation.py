"""Every input is checked before anything is allocated or written: options, config.json fields,
sizes against the machine; a CLI that answers without importing JAX."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from charrnn import limits
from charrnn.cli import TRAIN_SECTIONS, cli
from charrnn.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from charrnn.errors import CharrnnError

REPO_ROOT = Path(__file__).resolve().parents[1]
TEXT = "the cat sat on the mat. the dog sat on the log.\n" * 4


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_contract(result, allow_success: bool = True):
    """Either success, or exit != 0 with exactly one ``charrnn: error:`` line and no traceback."""
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    if result.exit_code == 0:
        assert allow_success, result.output
        return
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("charrnn: error: "), lines[0]
    assert "internal error" not in lines[0], lines[0]


def assert_refused(result, *fragments):
    assert_contract(result, allow_success=False)
    for f in fragments:
        assert f in result.stderr, (f, result.stderr)


# --- the property: every numeric option, any value ------------------------------------------

NUMERIC_TRAIN_OPTIONS = sorted(
    "--" + f.name.replace("_", "-")
    for klass in TRAIN_SECTIONS.values() for f in dataclasses.fields(klass)
    if any(t in str(f.type) for t in ("int", "float"))) + ["--cpu-devices"]
NUMERIC_SAMPLE_OPTIONS = ["--length", "--temperature", "--top-k", "--top-p", "--num-samples", "--seed",
                          "--beam", "--length-penalty"]

VALUES = st.one_of(
    st.integers(-10, 10),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, -1, 2**31 - 1, 2**31, 2**32, 2**40, 2**63, 2**64 - 1, 2**64, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["inf", "-inf", "nan", "NaN", "1e400", "-0", "0.5", "1e-320", "0x10", "1_000", "", " ", "abc",
                     "True", "--", "1e38", "3.5e38"]),
    st.text(max_size=8),
).map(str)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("validation") / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@settings(max_examples=300)
@given(option=st.sampled_from(NUMERIC_TRAIN_OPTIONS), value=VALUES)
def test_any_value_of_a_numeric_train_option_keeps_the_one_line_contract(corpus, tmp_path_factory, option, value):
    out = tmp_path_factory.getbasetemp() / "never-written"
    result = run("train", corpus, "--out", out, "--dry-run", option, value)
    assert_contract(result)
    assert not out.exists()  # a dry run writes nothing
    if result.exit_code == 0:
        plan = json.loads(result.stdout)
        assert plan["params"] > 0 and plan["vocab_size"] > 2


@settings(max_examples=150)
@given(option=st.sampled_from(NUMERIC_SAMPLE_OPTIONS), value=VALUES)
def test_any_value_of_a_numeric_sample_option_keeps_the_one_line_contract(tmp_path_factory, option, value):
    result = run("sample", tmp_path_factory.getbasetemp() / "no-such-run", option, value)
    assert_contract(result, allow_success=False)


@pytest.mark.parametrize("option, value, fragment", [
    ("--lr", "inf", "--lr must be a finite number"),
    ("--lr", "nan", "--lr must be a finite number"),
    ("--lr", "1e9", "--lr must be in (0, 1000]"),
    ("--weight-decay", "inf", "--weight-decay must be a finite number"),
    ("--epochs", "nan", "--epochs must be a finite number"),
    ("--minutes", "inf", "--minutes must be a finite number"),
    ("--dropout", "nan", "--dropout must be a finite number"),
    ("--val-frac", "-inf", "--val-frac must be a finite number"),
    ("--grad-clip", "inf", "--grad-clip must be a finite number"),
    ("--seed", str(2**64), "--seed must be in [0, 18446744073709551615]"),
    ("--seed", "-1", "--seed must be in"),
    ("--max-steps", str(10**30), "--max-steps must be in [1, 2147483647]"),
    ("--hidden", "0", "--hidden must be in [1,"),
    ("--encoding", "no-such-codec", "unknown --encoding 'no-such-codec'"),
    ("--encoding", "rot13", "unknown --encoding"),
])
def test_bad_values_are_refused_naming_the_option(corpus, tmp_path, option, value, fragment):
    assert_refused(run("train", corpus, "--out", tmp_path / "r", option, value), fragment)
    assert not (tmp_path / "r").exists()


def test_seed_limits_are_the_rng_limits(corpus, tmp_path):
    for seed in (0, 2**40, 2**64 - 1):
        r = run("train", corpus, "--out", tmp_path / "r", "--dry-run", "--seed", seed)
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["config"]["train"]["seed"] == seed


def test_bool_is_not_an_int_and_library_configs_are_checked_too():
    with pytest.raises(CharrnnError, match="--layers must be an integer, not True"):
        ModelConfig(layers=True)
    with pytest.raises(CharrnnError, match="--lr must be a finite number"):
        TrainConfig(lr=math.inf)
    with pytest.raises(CharrnnError, match="--val-frac must be a number"):
        DataConfig(val_frac="0.1")


# --- options that would be ignored, or are malformed ---------------------------------------------

@pytest.mark.parametrize("args, fragment", [
    (["--num-processes", "2"], "--num-processes needs --coordinator"),
    (["--process-id", "0"], "--process-id needs --coordinator"),
    (["--coordinator", "nohost", "--num-processes", "2", "--process-id", "0"], "--coordinator must be HOST:PORT"),
    (["--coordinator", "h:99999", "--num-processes", "2", "--process-id", "0"], "--coordinator must be HOST:PORT"),
    (["--coordinator", "h:1234"], "--coordinator needs --num-processes and --process-id"),
    (["--coordinator", "h:1234", "--num-processes", "2", "--process-id", "2"], "--process-id must be below"),
    (["--init-from", "somewhere", "--hidden", "8"], "--hidden cannot be given with --init-from"),
    (["--init-from", "somewhere", "--cell", "gru", "--layers", "1"], "--cell, --layers cannot be given"),
    (["--resume"], "--resume needs --out"),
])
def test_contradictory_or_ignored_options_are_refused(corpus, args, fragment):
    assert_refused(run("train", corpus, *args), fragment)


def test_read_only_out_directory_is_one_clear_line(corpus, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if _can_write(locked):
            pytest.skip("running as root: permissions do not bind")
        assert_refused(run("train", corpus, "--out", locked / "run", "--max-steps", 1), "is not writable")
    finally:
        locked.chmod(0o700)
    assert list(locked.iterdir()) == []


def _can_write(path: Path) -> bool:
    try:
        (path / ".probe").write_text("x")
    except OSError:
        return False
    (path / ".probe").unlink()
    return True


def test_eval_refuses_an_unknown_encoding_first(tmp_path):
    (tmp_path / "f.txt").write_text("abc")
    assert_refused(run("eval", tmp_path / "no-run", tmp_path / "f.txt", "--encoding", "klingon"),
                   "unknown --encoding 'klingon'")


# --- sizes against the machine ------------------------------------------------------------------

def test_param_count_matches_the_model():
    pytest.importorskip("flax")
    from charrnn.model import build_model, count_params

    for cell in ("rnn", "lstm", "gru"):
        m = ModelConfig(cell=cell, layers=2, hidden=7, label_dim=5)
        assert limits.param_count(m, 11) == count_params(build_model(m, 11, 0)), cell
        # A labelled model: its label vectors and their rows of the first layer count too.
        assert limits.param_count(m, 11, 3) == count_params(build_model(m, 11, 0, num_labels=3)), cell


def test_sizes_beyond_the_machine_are_refused_with_the_numbers(corpus, tmp_path):
    r = run("train", corpus, "--out", tmp_path / "r", "--hidden", 10**8)
    assert_refused(r, "parameters", "per training step", "this machine has")
    assert not (tmp_path / "r").exists()
    r = run("train", corpus, "--out", tmp_path / "r", "--batch-size", 2**31 - 1, "--seq-len", 2**31 - 1)
    assert_refused(r, "this machine has")
    need = limits.step_bytes(RunConfig(), 10)
    limits.check_fits(RunConfig(), 10, memory=need)  # exactly enough passes
    with pytest.raises(CharrnnError, match=r"per training step; this machine has 100 bytes of memory"):
        limits.check_fits(RunConfig(), 10, memory=100)


def _fake_run(run_dir: Path, config: dict) -> Path:
    """A run directory holding only config.json and vocab.json (what reading commands check first)."""
    from charrnn.vocab import Vocab

    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(config))
    (run_dir / "vocab.json").write_text(Vocab.from_texts(["abc"]).to_json())
    return run_dir


def test_an_edited_config_with_a_huge_model_is_refused_by_info_and_eval(tmp_path):
    config = RunConfig().to_dict()
    config["model"]["hidden"] = 10**9
    run_dir = _fake_run(tmp_path / "run", config)
    assert_refused(run("info", run_dir), "config.json", "parameters", "this machine has")
    (tmp_path / "f.txt").write_text("abc")
    assert_refused(run("eval", run_dir, tmp_path / "f.txt"), "config.json", "this machine has")
    (tmp_path / "c.txt").write_text(TEXT)
    assert_refused(run("train", tmp_path / "c.txt", "--out", run_dir, "--resume"), "config.json", "this machine has")


@pytest.mark.parametrize("section, field, value, fragment", [
    ("train", "lr", float("nan"), "field train.lr must be a finite number"),
    ("train", "lr", "0.1", "field train.lr must be a number"),
    ("train", "seed", 2**64, "field train.seed must be in"),
    ("train", "max_steps", True, "field train.max_steps must be an integer"),
    ("model", "layers", 1.5, "field model.layers must be an integer"),
    ("model", "cell", 3, "field model.cell must be a string"),
    ("data", "encoding", "no-such-codec", "unknown field data.encoding"),
    ("data", "val_frac", 2.0, "field data.val_frac must be in [0, 1)"),
])
def test_malformed_config_fields_name_the_file_and_the_field(tmp_path, section, field, value, fragment):
    from charrnn import runs

    config = RunConfig().to_dict()
    config[section][field] = value
    run_dir = _fake_run(tmp_path / "run", config)
    with pytest.raises(CharrnnError) as e:
        runs.read_run_files(run_dir)
    assert str(e.value).startswith(str(run_dir / "config.json")), str(e.value)
    assert fragment in str(e.value)
    assert_refused(run("info", run_dir), "config.json", fragment)


def test_unknown_config_fields_are_named(tmp_path):
    config = RunConfig().to_dict()
    config["train"]["learning_rate"] = 0.1
    with pytest.raises(CharrnnError, match=r"unknown field\(s\): train\.learning_rate"):
        RunConfig.from_dict(config)


# --- a CLI that answers without JAX -------------------------------------------------------------

_PROBE = """
import sys
sys.argv = ["charrnn", *sys.argv[1:]]
from charrnn.cli import cli
try:
    cli.main()
except SystemExit as e:
    code = e.code
print("JAX-IMPORTED" if "jax" in sys.modules else "NO-JAX", file=sys.stderr)
"""


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["train", "--help"], ["sample", "--help"],
                                  ["eval", "--help"], ["info", "--help"], ["corpora"], ["corpora", "--help"],
                                  ["plot", "--help"],
                                  ["train", "c.txt", "--lr", "inf"], ["train", "c.txt", "--num-processes", "2"],
                                  ["train", "c.txt", "--hidden", "1000000000"]])
def test_help_version_corpora_and_argument_errors_do_not_import_jax(args, tmp_path):
    r = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)
    assert r.stderr.strip().endswith("NO-JAX"), r.stderr[-2000:]


def test_import_charrnn_is_lazy_and_complete():
    code = ("import sys, charrnn; assert 'jax' not in sys.modules; "
            "assert callable(charrnn.train) and charrnn.RunConfig and charrnn.load; "
            "import charrnn.train; assert callable(charrnn.train); assert set(charrnn.__all__) <= set(dir(charrnn))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
