"""The `kiln` command: argument handling always; the end-to-end paths once compiler and runtime exist."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kiln.__main__ import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ["demo", "compile", "generate", "serve", "bench", "profile"]
needs_compiler = pytest.mark.skipif(not (ROOT / "compiler" / "api.py").is_file(), reason="kiln.compile not written yet")
needs_engine = pytest.mark.skipif(not (ROOT / "runtime" / "llm.py").is_file(), reason="kiln.LLM not written yet")


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kiln", *argv], capture_output=True, text=True, timeout=300)


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
        [sys.executable, "-c", "import sys, kiln.__main__ as m; m.build_parser(); print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.strip() == "False"


def test_serve_parses_its_options_and_refuses_a_missing_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = build_parser().parse_args(["serve", "m", "--port", "9001", "--api-key", "k", "--max-num-seqs", "8"])
    assert (args.host, args.port, args.api_key, args.max_num_seqs) == ("127.0.0.1", 9001, "k", 8)
    assert main(["serve", str(tmp_path / "nope"), "--port", "8000"]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: kiln" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["compile"], ["generate", "dir"], ["compile", "d", "--dtype", "int3"]])
def test_bad_arguments_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


@pytest.mark.parametrize("command", [["compile"], ["generate"], ["demo"], ["bench"]])
def test_missing_model_dir_is_a_clear_error(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
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


@pytest.fixture(scope="module")
def tiny_artifact(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`kiln compile -o` run once; stage lines go to stderr, the summary to stdout."""
    art = tmp_path_factory.mktemp("art") / "tiny-llama"
    result = _run("compile", str(tiny_llama), "-o", str(art))
    assert result.returncode == 0, result.stderr
    assert f"saved {art}" in result.stdout and "kiln: writing weights.safetensors" in result.stderr
    return art


class _Writes:
    """Counts the writes to stdout, to see tokens arrive one step at a time rather than at the end."""

    def __init__(self) -> None:
        self.chunks: list[str] = []

    def write(self, text: str) -> int:
        self.chunks.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def _generate(model: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    writes = _Writes()
    monkeypatch.setattr(sys, "stdout", writes)
    assert main(["generate", str(model), "The kiln", "--max-tokens", "6"]) == 0
    monkeypatch.undo()
    return writes.chunks


@needs_engine
def test_generate_streams_the_same_text_from_artifact_and_checkpoint(
    tiny_llama: Path, tiny_artifact: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from_checkpoint = _generate(tiny_llama, monkeypatch)
    from_artifact = _generate(tiny_artifact, monkeypatch)
    assert "".join(from_artifact).strip() and "".join(from_artifact) == "".join(from_checkpoint)
    assert len([c for c in from_artifact if c]) > 2  # several chunks: streamed, not printed once
    assert "loading artifact" in capsys.readouterr().err


@needs_engine
def test_bench_reports_throughput(tiny_artifact: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", str(tiny_artifact), "--num-requests", "3", "--input-len", "8", "--output-len", "4"]) == 0
    out = capsys.readouterr().out
    assert "requests/s" in out and "output tokens/s" in out and "12 tokens" in out, out


@needs_compiler
def test_corrupted_artifact_is_refused(tiny_artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    art = Path(shutil.copytree(tiny_artifact, tmp_path / "art"))
    (art / "config.json").write_text((art / "config.json").read_text() + " ")
    assert main(["generate", str(art), "x"]) == 2
    assert "checksum mismatch: config.json" in capsys.readouterr().err


@needs_compiler
def test_compile_output_must_be_new(tiny_llama: Path, tiny_artifact: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compile", str(tiny_llama), "-o", str(tiny_artifact)]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert main(["compile", str(tiny_artifact)]) == 2
    assert "compiled kiln artifact already" in capsys.readouterr().err


@needs_compiler
def test_unknown_quantization_scheme_is_refused(tiny_llama: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compile", str(tiny_llama), "--quantize", "int3"]) == 2
    assert "int3" in capsys.readouterr().err


def test_target_needs_an_output_directory(tiny_llama: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compile", str(tiny_llama), "--target", "cuda:90"]) == 2
    assert "compile --target:" in capsys.readouterr().err


@needs_engine
def test_generate_with_speculative_config(
    tiny_artifact: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = "".join(_generate(tiny_artifact, monkeypatch))
    writes = _Writes()
    monkeypatch.setattr(sys, "stdout", writes)
    spec = '{"method": "ngram", "num_speculative_tokens": 3}'
    assert main(["generate", str(tiny_artifact), "The kiln", "--max-tokens", "6", "--speculative-config", spec]) == 0
    monkeypatch.undo()
    assert "".join(writes.chunks) == plain  # greedy: the same text
    for bad, message in (("{nope", "not JSON"), ('{"method": "x"}', "speculative_config.method")):
        assert main(["generate", str(tiny_artifact), "x", "--speculative-config", bad]) == 2
        assert message in capsys.readouterr().err
