"""The ``topofx`` command line: help at every level, exit codes, one-line user errors."""
from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import pytest

from topofx import zoo
from topofx.cli import main

USER_FILE = textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F
    from torch import nn


    class Mixed(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.ops = nn.ModuleList([
                nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)),
                nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)),
                nn.AvgPool2d(3, 1, 1),
            ])

        def forward(self, x, w):
            return sum(wi * op(x) for wi, op in zip(w, self.ops))


    class Net(nn.Module):
        def __init__(self, c=3):
            super().__init__()
            self.a, self.b = Mixed(c), Mixed(c)
            self.alpha = nn.Parameter(1e-3 * torch.randn(2, 3))

        def forward(self, x):
            w = F.softmax(self.alpha, -1)
            return self.a(x, w[0]) + self.b(x, w[1])


    class DataDependent(nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x * 2
            return x


    def build(c=3):
        return Net(c)


    def build_pair():
        torch.manual_seed(0)
        return Net(), torch.randn(2, 3, 8, 8)


    def data_dependent():
        return DataDependent(), torch.randn(2, 3, 4, 4)


    def broken():
        raise ValueError("boom")


    NOT_A_FUNCTION = 3
    """
)


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "mynet.py"
    path.write_text(USER_FILE)
    return path


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("argv", [["--help"], ["models", "--help"], ["simplify", "--help"], ["bench", "--help"]])
def test_help_at_every_level(argv, capsys):
    assert main(argv) == 0
    assert "usage:" in capsys.readouterr().out


def test_no_command_is_a_usage_error(capsys):
    assert main([]) == 2
    assert "give a command" in one_error_line(capsys)


def test_models_lists_names_with_descriptions(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == zoo.names()
    assert all(zoo.describe(name) in line for name, line in zip(zoo.names(), out))


def test_simplify_user_file(user_file, capsys):
    assert main(["simplify", f"{user_file}:build", "--input-shape", "2,3,8,8", "--mode", "exact"]) == 0
    out = capsys.readouterr().out
    assert "topofx report: Net, mode=exact" in out and "found 2 mixed edges" in out


def test_simplify_channels_last_layout(user_file, capsys):
    assert main(["simplify", f"{user_file}:build", "--input-shape", "2,3,8,8", "--mode", "exact",
                 "--layout", "channels_last"]) == 0
    assert "layout 1" in capsys.readouterr().out  # the report counts the channels_last rewrite


def test_simplify_factory_with_inputs_and_set(user_file, capsys):
    assert main(["simplify", f"{user_file}:build_pair", "--mode", "exact"]) == 0
    assert "topofx report" in capsys.readouterr().out
    assert main(["simplify", f"{user_file}:build", "--set", "c=4", "--input-shape", "2x4x8x8", "--mode", "exact"]) == 0


def test_simplify_zoo_model_with_viz(tmp_path, capsys):
    out_dir = tmp_path / "pics"
    argv = ["simplify", "nb201-darts", "--set", "C=4", "--set", "N=1", "--input-shape", "2,3,16,16",
            "--mode", "exact", "--viz", str(out_dir)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "TinyNetworkDarts" in out and "pictures" in out
    assert (out_dir / "before.dot").exists() and (out_dir / "after.dot").exists()
    if shutil.which("dot"):
        assert (out_dir / "before.svg").exists() and (out_dir / "after.svg").exists()


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["simplify", "no-such-model"], "unknown model 'no-such-model'"),
        (["simplify", "missing/file.py:build"], "model file not found"),
        (["simplify", "{file}:nothere"], "has no 'nothere'; it defines: "),
        (["simplify", "{file}:NOT_A_FUNCTION"], "not a function"),
        (["simplify", "{file}"], "give the factory function too"),
        (["simplify", "{file}:build"], "pass --input-shape"),
        (["simplify", "{file}:build", "--input-shape", "2,3,x"], "bad --input-shape"),
        (["simplify", "{file}:build", "--input-shape", "0,3,8,8"], "bad --input-shape"),
        (["simplify", "nb201-darts", "--input-shape", "2,1,32,32"], "B,3,S,S"),
        (["simplify", "{file}:broken"], "mynet.py:"),
        (["simplify", "{file}:build_pair", "--set", "c=4"], "does not accept --set c"),
        (["simplify", "{file}:data_dependent", "--strict", "--mode", "exact"], "cannot capture"),
        (["simplify", "{file}:build", "--mode", "fast"], "invalid choice"),
        (["simplify"], "required"),
        (["bench", "{file}:build"], "built-in models only"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(argv, expected, user_file, capsys):
    argv = [a.format(file=user_file) for a in argv]
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert line.startswith("topofx") and expected in line, line


def test_broken_factory_names_the_line(user_file, capsys):
    assert main(["simplify", f"{user_file}:broken"]) == 2
    line = one_error_line(capsys)
    assert "ValueError: boom" in line and "mynet.py:" in line


def test_mode_not_implemented_is_one_line(user_file, capsys, monkeypatch):
    import topofx.simplifier

    def not_yet(*args, **kwargs):
        raise NotImplementedError("mode='topo' is not implemented yet;\nuse mode='exact'")

    monkeypatch.setattr(topofx.simplifier, "simplify", not_yet)
    assert main(["simplify", f"{user_file}:build_pair", "--mode", "topo"]) == 2
    assert "not implemented yet; use mode='exact'" in one_error_line(capsys)


def test_capture_fallback_without_strict_is_a_one_line_warning(user_file, capsys):
    assert main(["simplify", f"{user_file}:data_dependent", "--mode", "exact"]) == 0
    captured = capsys.readouterr()
    assert "fallback" in captured.out
    warnings = [line for line in captured.err.splitlines() if line.strip()]
    assert len(warnings) == 1 and warnings[0].startswith("topofx: warning:")


def test_bench_delegates(capsys):
    assert main(["bench", "--list"]) == 0
    assert capsys.readouterr().out.split() == zoo.names()
    assert main(["bench", "no-such-model"]) == 2


def test_python_dash_m():
    done = subprocess.run([sys.executable, "-m", "topofx", "models"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "nb201-darts" in done.stdout
    done = subprocess.run([sys.executable, "-m", "topofx", "simplify", "nope"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "unknown model" in done.stderr
