"""The `kiln` command: argument handling always; the end-to-end paths once compiler and runtime exist."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kiln.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ["demo", "compile", "generate", "serve", "bench"]
needs_compiler = pytest.mark.skipif(not (ROOT / "compiler" / "api.py").is_file(),
                                    reason="kiln.compile not written yet")
needs_engine = pytest.mark.skipif(not (ROOT / "runtime" / "llm.py").is_file(),
                                  reason="kiln.LLM not written yet")


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kiln", *argv], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_for_each_subcommand(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert f"usage: kiln {command}" in capsys.readouterr().out


def test_top_level_help_runs_as_module_without_torch() -> None:
    result = _run("--help")
    assert result.returncode == 0, result.stderr
    for command in SUBCOMMANDS:
        assert command in result.stdout
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, kiln.__main__ as m; m.build_parser(); "
                               "print('torch' in sys.modules)"],
        capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "False"


@pytest.mark.parametrize("command", ["serve", "bench"])
def test_unbuilt_commands_say_so(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "--port", "8000"]) == 2
    assert "not built yet" in capsys.readouterr().err


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: kiln" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["compile"], ["generate", "dir"], ["compile", "d", "--dtype", "int3"]])
def test_bad_arguments_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


@pytest.mark.parametrize("command", [["compile"], ["generate"], ["demo"]])
def test_missing_model_dir_is_a_clear_error(command: list[str], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    argv = [*command, str(tmp_path / "nope")] + (["hi"] if command == ["generate"] else [])
    assert main(argv) == 2
    assert "no such directory" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kiln.models.testing import build_tiny_checkpoint

    return build_tiny_checkpoint("llama", tmp_path_factory.mktemp("tiny-llama"))


@needs_compiler
def test_compile_report(tiny_llama: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compile", str(tiny_llama), "--report"]) == 0
    out = capsys.readouterr().out
    assert "paged_attention" in out and "compiled" in out


@needs_compiler
def test_compile_output_is_refused_until_artifacts_exist(tiny_llama: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    import kiln

    if hasattr(kiln.CompiledModel, "save"):
        pytest.skip("artifacts can be saved now")
    assert main(["compile", str(tiny_llama), "-o", str(tiny_llama / "art")]) == 2
    assert "not yet supported" in capsys.readouterr().err


@needs_engine
def test_generate_prints_text(tiny_llama: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", str(tiny_llama), "The kiln", "--max-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip() != ""


@needs_engine
def test_demo_agrees_with_hf(tiny_llama: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["demo", str(tiny_llama), "--max-tokens", "8"])
    out = capsys.readouterr().out
    assert "tok/s" in out and "tokens agree: 4/4 prompts" in out, out
    assert status == 0


def test_bad_sampling_value_is_refused_before_compiling(tiny_llama: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", str(tiny_llama), "x", "--top-p", "2"]) == 2
    assert "top_p" in capsys.readouterr().err
