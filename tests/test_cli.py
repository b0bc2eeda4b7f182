"""python -m kbit: doctor and demo run and report; bad arguments exit with a message."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kbit.__main__ import main


def test_doctor_passes_and_names_the_cpu_level(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "CPU kernel level" in out and "self-check" in out and "OK" in out


def test_default_command_is_doctor(capsys):
    assert main([]) == 0
    assert "self-check" in capsys.readouterr().out


def test_demo_small(capsys):
    assert main(["demo", "--size", "64", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "NF4" in out and "AdamW8bit" in out and "Linear 64x64" in out


@pytest.mark.parametrize("argv", [["demo", "--size", "0"], ["demo", "--steps", "-1"], ["bogus"]])
def test_bad_arguments_exit_with_usage(argv):
    result = subprocess.run([sys.executable, "-m", "kbit", *argv], capture_output=True, text=True)
    assert result.returncode == 2 and "usage" in result.stderr


def test_bad_capability_environment_is_a_clear_error():
    env = {"KBIT_CPU_CAPABILITY": "avx9000", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", "import kbit"], capture_output=True, text=True, env=env)
    assert result.returncode != 0 and "choose one of scalar, avx2, avx512" in result.stderr
