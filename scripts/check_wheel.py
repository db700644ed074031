"""Checks a built wheel: it holds tsparse/_C*.so; when built with CUDA for 9.0a the shared
object carries sm_90a code (listed by cuobjdump from the dev extra); and, installed on its own
(outside the source tree), it imports and finds its configs (tsparse/_configs)."""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile


def find_cuobjdump():
    spec = importlib.util.find_spec("nvidia")
    for base in (spec.submodule_search_locations if spec else []):
        for c in glob.glob(os.path.join(base, "*", "bin", "cuobjdump")):
            return c
    return shutil.which("cuobjdump")


def check_installed(wheel: str) -> None:
    """Installs the wheel into a scratch folder and imports it from there, away from the repo."""
    with tempfile.TemporaryDirectory() as target:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                        "--target", target, wheel], check=True)
        code = (
            "import sys, os; sys.path.insert(0, os.getcwd()); import tsparse; "
            "assert tsparse.__file__.startswith(os.getcwd()), tsparse.__file__; "
            "from tsparse.dualstream.config import config_dir, load_method_config; "
            "d = config_dir(); assert d.is_dir() and d.name == '_configs', d; "
            "load_method_config(); "
            "from tsparse.dualstream.rewards import compute_score; "
            "print('installed wheel OK:', tsparse.build_info()['version'], d)"
        )
        subprocess.run([sys.executable, "-c", code], cwd=target, check=True)


def main(paths):
    wheels = [p for pattern in paths for p in glob.glob(pattern)]
    if not wheels:
        sys.exit("check_wheel: no wheel found")
    wheel = max(wheels, key=os.path.getmtime)
    with zipfile.ZipFile(wheel) as z:
        libs = [n for n in z.namelist() if n.startswith("tsparse/_C") and n.endswith(".so")]
        if not libs:
            sys.exit(f"check_wheel: {wheel} has no tsparse/_C*.so")
        with tempfile.TemporaryDirectory() as tmp:
            so = z.extract(libs[0], tmp)
            exe = find_cuobjdump()
            if exe is None:
                print(f"check_wheel: {wheel}: {libs[0]} present (no cuobjdump to list device code)")
                return
            os.chmod(exe, 0o755)
            out = subprocess.run([exe, "--list-elf", so], capture_output=True, text=True).stdout
    check_installed(wheel)
    cubins = [line.split(":")[-1].strip() for line in out.splitlines() if ".cubin" in line]
    print(f"check_wheel: {os.path.basename(wheel)}: {libs[0]}; device code: {cubins or 'none (CPU-only build)'}")
    if os.environ.get("TSPARSE_CUDA", "1") != "0" and not any("sm_90a" in c for c in cubins):
        sys.exit("check_wheel: FAIL - no sm_90a code in the wheel's extension")


if __name__ == "__main__":
    main(sys.argv[1:])
