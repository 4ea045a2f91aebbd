"""Building and loading the C kernels (`kernels.c` with `attention.c` and `quant.c`) once per instruction-set level.

`-march=native` would tie a build to the machine that made it and leave a CPU without AVX-512 with whatever the
compiler vectorises for a generic target. Instead each level is one build with fixed flags: "avx512_vnni"
(x86-64-v4 plus VNNI), "avx2" (x86-64-v3: AVX2, FMA, F16C, BMI), "scalar" (the x86-64 baseline, SSE2 only, the
portable C loops). The int8 kernels have hand-written paths for the first two (quant.c); the float kernels are
the same C, vectorised by the compiler for each level. At run time the best level this CPU's flags
(/proc/cpuinfo) allow is chosen; `KILN_CPU_ISA=<level>` forces a lower one (so every path can be tested on one
machine), and a level the CPU lacks is refused. On other architectures there is one level, "native".

Each build lives in kiln's cache directory in a folder named by the hash of the sources and flags, as a library
whose name carries the hash of its content, checked before every load (a library that fails it is rebuilt).
The module itself also refuses to load on a CPU without the instructions it was built for.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
from functools import cache, lru_cache
from pathlib import Path
from types import ModuleType

_SOURCES = [Path(__file__).with_name(name) for name in ("kernels.c", "attention.c", "quant.c")]
_HEADERS = [Path(__file__).with_name("vexp.h")]  # not compiled on their own, but part of what a build is
_X86 = platform.machine().lower() in ("x86_64", "amd64")

# level -> (compiler flags, /proc/cpuinfo flags it needs), best first. AVX-512 code is kept at 256-bit vectors
# where the compiler vectorises (as -march=native picks on Intel's server cores: 512-bit ones lower the clock);
# quant.c's intrinsics use 512-bit registers.
_V3 = {"avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "movbe", "abm", "xsave"}
_V4 = {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
ISA_LEVELS: dict[str, tuple[list[str], frozenset[str]]] = (
    {
        "avx512_vnni": (
            ["-march=x86-64-v4", "-mavx512vnni", "-mprefer-vector-width=256"],
            frozenset(_V3 | _V4 | {"avx512_vnni"}),
        ),
        "avx2": (["-march=x86-64-v3"], frozenset(_V3)),
        "scalar": (["-march=x86-64"], frozenset()),
    }
    if _X86
    else {"native": (["-march=native"], frozenset())}
)
ISA_NAMES = {
    "avx512_vnni": "AVX-512 VNNI (x86-64-v4 build)",
    "avx2": "AVX2+FMA (x86-64-v3 build)",
    "scalar": "scalar (x86-64 baseline build)",
    "native": "native (-march=native build)",
}
_SHOWN_FLAGS = ("sse4_2", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "amx_int8", "neon", "asimd", "sve")


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags Linux reports (empty where /proc/cpuinfo cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_description() -> str:
    """The CPU's model name and the vector features that decide the level, for benchmark output."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    names = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")]
    flags = cpu_flags()
    shown = " ".join(f for f in _SHOWN_FLAGS if f in flags) or "no vector flags listed"
    return f"{names[0] if names else platform.processor() or platform.machine()}; {shown}"


@lru_cache(maxsize=1)
def supported_levels() -> list[str]:
    """The levels this CPU can run, best first (always ending with the portable one)."""
    flags = cpu_flags()
    return [level for level, (_, needs) in ISA_LEVELS.items() if needs <= flags]


def selected_level() -> str:
    """The best level this CPU runs, or the one `KILN_CPU_ISA` names; ValueError for an unknown level or one
    this CPU lacks (running it would stop the process on an illegal instruction)."""
    forced = os.environ.get("KILN_CPU_ISA", "").strip()
    levels = supported_levels()
    if not forced:
        return levels[0]
    if forced not in ISA_LEVELS:
        raise ValueError(f"KILN_CPU_ISA={forced!r} is not a level of this architecture: one of {list(ISA_LEVELS)}")
    if forced not in levels:
        raise ValueError(f"KILN_CPU_ISA={forced!r}: this CPU lacks its instructions (it runs {levels})")
    return forced


def _cache_dir() -> Path:
    root = os.environ.get("KILN_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "kiln") / "cpu"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _verified(library: Path, suffix: str) -> bool:
    """Whether a cached `kiln_cpu-<hash><suffix>` still has the content hash its name carries (the cache is
    outside kiln's control: a library that changed there is rebuilt, never loaded)."""
    try:
        return not library.is_symlink() and _digest(library) == library.name.removeprefix("kiln_cpu-")[: -len(suffix)]
    except OSError:
        return False


@cache
def load(level: str) -> ModuleType | None:
    """The extension module built for `level` (one of `ISA_LEVELS`), building it on first use; None when there is
    no C compiler or Python headers, or the build fails. The caller checks that the CPU runs `level`."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    include = sysconfig.get_paths()["include"]
    if compiler is None or not (Path(include) / "Python.h").exists():
        return None
    flags = ["-O3", *ISA_LEVELS[level][0], "-fopenmp", "-fvisibility=hidden", "-shared", "-fPIC", f"-I{include}"]
    text = b"".join(src.read_bytes() for src in _SOURCES + _HEADERS) + " ".join(flags).encode()
    digest = hashlib.sha256(text).hexdigest()[:16]
    directory = _cache_dir() / digest
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    target = next((p for p in sorted(directory.glob(f"kiln_cpu-*{suffix}")) if _verified(p, suffix)), None)
    if target is None:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            built = Path(tmp) / f"kiln_cpu{suffix}"
            result = subprocess.run(
                [compiler, *flags, *map(str, _SOURCES), "-o", str(built), "-lm"], capture_output=True
            )
            if result.returncode != 0:
                return None
            target = directory / f"kiln_cpu-{_digest(built)}{suffix}"
            os.replace(built, target)  # atomic: concurrent builders never see half a library
    loader = importlib.machinery.ExtensionFileLoader("kiln_cpu", str(target))
    spec = importlib.util.spec_from_file_location("kiln_cpu", target, loader=loader)
    if spec is None:
        return None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module
