"""Pack what bench/gpu_check.py needs on the offline GPU machine and that machine lacks, into `.gpu/` (ignored by
git), so that one device call runs the whole validation:

    python bench/gpu_bundle.py                      # here, once per session: writes .gpu/ (about 6 MB)
    # then the device tool's run, with carry [".gpu"]:
    bash bench/gpu_device.sh

Why a bundle: the device machine reaches no registry. Its image has torch, transformers, peft, accelerate, pyarrow
and pandas (/work/.library/device/KINDS.md), but not trl, datasets (with dill and multiprocess) or omegaconf, so
their wheels travel; two versions of datasets and its pins let pip pick the one the image's pyarrow, fsspec and
huggingface-hub accept. The built-in SmolLM2 cannot travel: its GGUF (98 MB) is over the 64 MiB a call carries.
Its tokenizer and config do (3.5 MB), and there the checks run on the SmolLM2 shape with seeded random weights
(`compare_trl.smollm2_folder`), which changes none of what they test (kernels against autograd, step 1 = reference,
resume bitwise, FSDP2 = plain, speed).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUNDLE = REPO / ".gpu"
# Several versions where the image's own packages decide which applies. The device's Python was 3.12; multiprocess
# has a wheel per Python version, so its neighbours travel too.
WHEELS = ["trl==1.16.0", "datasets==5.2.0", "datasets==4.8.5", "dill==0.4.1", "dill==0.4.0", "multiprocess==0.70.19",
          "multiprocess==0.70.18", "omegaconf==2.4.0"]
PYTHONS = ("3.12", "3.11", "3.13")


def main() -> int:
    sys.path.insert(0, str(REPO))
    from transformers import AutoConfig, AutoTokenizer

    from trinity_dpo.sources import builtin

    wheels = BUNDLE / "wheels"
    shutil.rmtree(BUNDLE, ignore_errors=True)
    wheels.mkdir(parents=True)
    for spec in WHEELS:
        for python in PYTHONS if spec.startswith("multiprocess") else PYTHONS[:1]:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                            "--python-version", python, "--platform", "manylinux2014_x86_64", "-d", str(wheels),
                            spec], check=True)
    smollm2 = builtin.materialize("builtin:smollm2-135m-instruct")
    AutoTokenizer.from_pretrained(smollm2).save_pretrained(BUNDLE / "smollm2")
    AutoConfig.from_pretrained(smollm2).save_pretrained(BUNDLE / "smollm2")
    size = sum(f.stat().st_size for f in BUNDLE.rglob("*") if f.is_file())
    print(f"wrote {BUNDLE} ({size / 2 ** 20:.1f} MiB): {len(list(wheels.iterdir()))} wheels, SmolLM2's tokenizer and "
          "config. Device tool: run with carry [\".gpu\"] and the command `bash bench/gpu_device.sh`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
