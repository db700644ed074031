"""A user's mistake at the command line ends in exactly one line on stderr naming the file,
argument or key, exit status 2, and no traceback (``--debug`` / ``TSPARSE_DEBUG=1`` show it).

Each case runs the CLI's ``main`` with stderr captured (what ``python -m`` calls); a few run as
real subprocesses, which also proves nothing else (library warnings, progress bars) reaches
stderr before the error. None of the cases loads a model: every check runs before that.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("yaml")

from tsparse import _cli  # noqa: E402
from tsparse.dualstream.data import DroppedBoxesWarning, load_vitar_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "<image>\nWhere is the lesion?\nA) left\nB) right"


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """A folder of broken inputs (one real PNG among them)."""
    from PIL import Image

    d = tmp_path_factory.mktemp("bad")
    Image.new("L", (56, 56), 100).save(d / "img.png")
    (d / "fake.png").write_text("not an image\n")
    (d / "empty.json").write_text("")
    (d / "blank.json").write_text("  \n\n")
    (d / "binary.json").write_bytes(bytes(range(256)) * 4)
    (d / "nul.json").write_bytes(b'[{"a": 1}]\x00\x00')
    (d / "broken.json").write_text('[{"question": "q", ')
    (d / "lines.json").write_text('{"question": "q"}\n{"question": "r"}\n')
    (d / "broken.jsonl").write_text('{"question": "q"}\n{bad\n')
    (d / "topdict.json").write_text('{"records": []}')
    rec = {"image_path": "img.png", "question": QUESTION, "answer": "A"}
    for name, r in {
        "noquestion": {k: v for k, v in rec.items() if k != "question"},
        "noanswer": {k: v for k, v in rec.items() if k != "answer"},
        "bboxstr": {**rec, "bbox": "[0.1, 0.1, 0.5, 0.5]"},
        "nonimage": {**rec, "image_path": "fake.png"},
        "noimagefile": {**rec, "image_path": "missing.png"},
    }.items():
        (d / f"{name}.json").write_text(json.dumps([r]))
    drop = [{**rec, "id": f"r{i}", "bbox": [[0.1, 0.1, 0.5, 0.5]] + ([[0.6, 0.6, 0.2, 0.2]] if i % 2 else [])}
            for i in range(6)]
    (d / "dropboxes.json").write_text(json.dumps(drop))
    (d / "good.json").write_text(json.dumps([rec]))
    (d / "notyaml.yaml").write_text("# a title\n\nsome: text: that is not YAML\n")
    (d / "listyaml.yaml").write_text("- a\n- b\n")
    (d / "binary.yaml").write_bytes(bytes(range(128, 256)))
    (d / "afile").write_text("x")
    return d


def _one_line(capsys, *names):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in names:
        assert str(n) in lines[0], (n, lines[0])
    return lines[0]


# --------------------------------------------------------------------------------------
# python -m tsparse.train
def _train(bad, tmp_path, *extra):
    from tsparse.train.__main__ import main

    return main(["--config", "demo", "--output-dir", str(tmp_path / "run"), "eval.samples=0", *extra])


@pytest.mark.parametrize("name,expect", [
    ("empty.json", "empty"), ("blank.json", "empty"), ("binary.json", "not a UTF-8 text file"),
    ("nul.json", "binary"), ("broken.json", "not valid JSON"), ("lines.json", ".jsonl"),
    ("broken.jsonl", "line 2: not valid JSON"), ("topdict.json", "top level must be a JSON list"),
    ("noquestion.json", "`question`"), ("noanswer.json", "`answer`"), ("bboxstr.json", "`bbox` must be a list"),
    ("nonimage.json", "fake.png"), ("noimagefile.json", "missing.png"),
])
def test_train_bad_data_file(bad, tmp_path, capsys, name, expect):
    assert _train(bad, tmp_path, f"data.train={bad / name}") == 2
    line = _one_line(capsys, "python -m tsparse.train: error:", name if name != "nonimage.json" else "fake.png", expect)
    if name in ("noquestion.json", "noanswer.json", "bboxstr.json", "nonimage.json"):
        assert "record 0" in line


@pytest.mark.parametrize("name,expect", [
    ("notyaml.yaml", "not valid YAML"), ("listyaml.yaml", "top level must be a mapping"),
    ("binary.yaml", "not a UTF-8 text file"), ("good.json", "top level must be a mapping"),
])
def test_train_config_that_is_not_a_yaml_mapping(bad, capsys, name, expect):
    from tsparse.train.__main__ import main

    assert main(["--config", str(bad / name)]) == 2
    _one_line(capsys, name, expect)


def test_train_output_dir_that_is_a_file(bad, capsys):
    from tsparse.train.__main__ import main

    for out in (bad / "afile", bad / "afile" / "sub"):
        assert main(["--config", "demo", "--output-dir", str(out), "eval.samples=0"]) == 2
        _one_line(capsys, "`output_dir`", "afile", "is a file")


def test_train_flags_and_keys(bad, tmp_path, capsys):
    from tsparse.train.__main__ import main

    assert main(["--config", "demo", "--bogus"]) == 2
    _one_line(capsys, "--bogus")
    assert _train(bad, tmp_path, "stages.warmup.stepz=1") == 2
    _one_line(capsys, "stages.warmup.stepz")
    assert _train(bad, tmp_path, "--model", str(bad / "nothere"), f"data.synthetic_root={tmp_path / 'scans'}",
                  "data.synthetic_splits={train: 2}") == 2
    _one_line(capsys, "model.path", "nothere")
    assert _train(bad, tmp_path, "--resume-from", str(tmp_path / "nockpt")) == 2
    _one_line(capsys, "nockpt")


# --------------------------------------------------------------------------------------
# python -m tsparse.eval / python -m tsparse.infer
@pytest.mark.parametrize("args,names", [
    (["--data", "{bad}/missing.json"], ["--data", "missing.json"]),
    (["--data", "{bad}/broken.json"], ["broken.json", "not valid JSON"]),
    (["--data", "{bad}/empty.json"], ["empty.json", "empty"]),
    (["--data", "{bad}/nonimage.json"], ["fake.png", "not an image"]),
    (["--data", "{bad}/noanswer.json"], ["noanswer.json", "`answer`"]),
    (["--mode", "dense,sparsevlm"], ["--mode", "sparsevlm"]),
    (["--keep-ratio", "0"], ["--keep-ratio", "(0, 1]"]),
    (["--keep-ratio", "1.5"], ["--keep-ratio"]),
    (["--keep-ratio", "nan"], ["--keep-ratio"]),
    (["--keep-ratio", "most"], ["--keep-ratio", "'most'"]),
    (["--limit", "-1"], ["--limit", "-1"]),
    (["--batch-size", "0"], ["--batch-size", "0"]),
    (["--batch-size", "two"], ["--batch-size", "'two'"]),
    (["--max-new-tokens", "0"], ["--max-new-tokens"]),
    (["--device", "cuda"], ["--device cuda", "no CUDA device"]),
    (["--device", "quantum"], ["--device", "quantum"]),
    (["--model", "{bad}/no_such_model"], ["--model", "no_such_model"]),
    (["--threads", "0"], ["--threads"]),
    (["--score", "{bad}/missing.json"], ["--score", "missing.json"]),
    (["--score", "{bad}/topdict.json"], ["topdict.json", "JSON list"]),
    (["--config", "{bad}/notyaml.yaml"], ["notyaml.yaml", "YAML"]),
])
def test_eval_mistakes(bad, tmp_path, capsys, monkeypatch, args, names):
    import torch

    from tsparse.eval import main

    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("a GPU is usable here")
    monkeypatch.setenv("TSPARSE_CACHE", str(tmp_path / "cache"))
    argv = [a.replace("{bad}", str(bad)) for a in args] + ["--out", str(tmp_path / "res"), "--no-progress"]
    assert main(argv) == 2
    _one_line(capsys, "python -m tsparse.eval: error:", *names)
    assert not (tmp_path / "res").exists()  # nothing was run


@pytest.mark.parametrize("args,names", [
    (["--image", "{bad}/fake.png", "--question", QUESTION], ["--image", "fake.png"]),
    (["--image", "{bad}/missing.png", "--question", QUESTION], ["--image", "missing.png"]),
    (["--image", "{bad}/img.png"], ["--image and --question"]),
    (["--data", "{bad}/missing.json"], ["--data", "missing.json"]),
    (["--data", "{bad}/binary.json"], ["binary.json", "UTF-8"]),
    (["--data", "{bad}/nonimage.json"], ["fake.png"]),
    (["--index", "-2"], ["--index", "-2"]),
    (["--mode", "sparse2"], ["--mode", "sparse2"]),
    (["--mode", "baseline:random", "--keep-ratio", "1.01"], ["--keep-ratio"]),
    (["--mode", "baseline:random"], ["--keep-ratio"]),
    (["--boxes", "{{not json"], ["--boxes"]),
    (["--boxes", '{"a": 1}'], ["--boxes"]),
    (["--device", "cuda:0"], ["--device cuda:0"]),
    (["--model", "{bad}/afile"], ["--model", "afile"]),
    (["--max-new-tokens", "-3"], ["--max-new-tokens"]),
])
def test_infer_mistakes(bad, tmp_path, capsys, monkeypatch, args, names):
    import torch

    from tsparse.infer import main

    if any(a.startswith("cuda") for a in args) and torch.cuda.is_available():
        pytest.skip("a GPU is usable here")
    monkeypatch.setenv("TSPARSE_CACHE", str(tmp_path / "cache"))
    assert main([a.replace("{bad}", str(bad)) for a in args]) == 2
    _one_line(capsys, "python -m tsparse.infer: error:", *names)


# --------------------------------------------------------------------------------------
def test_dropped_boxes_are_counted_and_reported(bad, capsys):
    with pytest.warns(DroppedBoxesWarning) as rec:
        samples = load_vitar_json(bad / "dropboxes.json", invalid_boxes="drop")
    assert len(rec) == 1
    msg = str(rec[0].message)
    assert "dropped 3 invalid box(es) in 3 of 6 records" in msg and "'r1'" in msg and "'r3'" in msg
    assert "empty or inverted" in msg
    assert [len(s.boxes) for s in samples] == [1] * 6
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing dropped: no warning
        load_vitar_json(bad / "good.json", invalid_boxes="drop")
    with pytest.raises(ValueError, match=r"record 1: `bbox\[1\]`"):
        load_vitar_json(bad / "dropboxes.json", invalid_boxes="raise")

    # Inside a CLI the warning is one line on stderr, the run goes on.
    def main(argv):
        load_vitar_json(bad / "dropboxes.json", invalid_boxes="drop")
        return 0

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert _cli.run(main, [], "prog") == 0
    _one_line(capsys, "prog: warning:", "dropboxes.json", "dropped 3 invalid box(es)")


def test_debug_shows_the_traceback(bad, capsys, monkeypatch):
    def main(argv):
        raise ValueError("a bad value")

    assert _cli.run(main, [], "prog") == 2
    assert _one_line(capsys, "a bad value").startswith("prog: error: a bad value")
    with pytest.raises(ValueError, match="a bad value"):
        _cli.run(main, ["--debug"], "prog")
    monkeypatch.setenv("TSPARSE_DEBUG", "1")
    with pytest.raises(ValueError, match="a bad value"):
        _cli.run(main, [], "prog")
    monkeypatch.delenv("TSPARSE_DEBUG")

    def bug(argv):
        raise KeyError("internal")  # not a user error: the traceback stays

    with pytest.raises(KeyError):
        _cli.run(bug, [], "prog")

    def library_error(argv):
        import json as _json

        _json.loads("{")  # a ValueError raised outside tsparse: named, with the --debug hint

    assert _cli.run(library_error, [], "prog") == 2
    assert "raised in json" in _one_line(capsys, "--debug")


def _subprocess(args, **env):
    full = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **env}
    if "TSPARSE_DEBUG" not in env:
        full.pop("TSPARSE_DEBUG", None)
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=600)


def test_as_real_commands(bad, tmp_path):
    """``python -m``: exactly one stderr line and exit 2; ``--debug`` and TSPARSE_DEBUG=1 give the
    traceback."""
    cases = [
        (["tsparse.train", "--config", str(bad / "notyaml.yaml")], "notyaml.yaml"),
        (["tsparse.train", "--config", "demo", "--output-dir", str(tmp_path / "r"), "eval.samples=0",
          f"data.train={bad / 'broken.json'}"], "broken.json"),
        (["tsparse.eval", "--batch-size", "0"], "--batch-size"),
        (["tsparse.infer", "--index", "-1"], "--index"),
    ]
    for args, name in cases:
        res = _subprocess(args)
        assert res.returncode == 2, res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and name in lines[0] and "Traceback" not in res.stderr, res.stderr
    res = _subprocess(cases[0][0] + ["--debug"])
    assert res.returncode == 1 and "Traceback" in res.stderr and "notyaml.yaml" in res.stderr
    res = _subprocess(cases[2][0], TSPARSE_DEBUG="1")
    assert res.returncode == 1 and "Traceback" in res.stderr and "--batch-size" in res.stderr
