"""Config-driven save/load for every binlat network (Hugging Face Hub layout: config.json + model.safetensors).

Written out rather than taken from huggingface_hub's PyTorchModelHubMixin: both of the methods it would give are
stricter here (see ModelMixin), and nothing uses the rest of it (push_to_hub, model cards); the Hub is still
read through huggingface_hub (`resolve_model_dir`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeAlias, TypeVar, cast

import torch

from . import jsondepth
from .config import ConfigError, config_from_dict, config_to_dict
from .io import atomic_directory, check_state_dict, load_safetensors, read_bounded, save_safetensors

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

M = TypeVar("M", bound="ModelMixin")


# For annotations: a generator or tokenizer network (an nn.Module with ModelMixin) reached through the registry's
# duck-typed interface (config, new_cache, decode steps, from_pretrained, ...). Its classes live in layers that most
# users may not import (binlat.generators, binlat.tokenizer), and nn.Module types each attribute it does not know as
# `Tensor | Module`, so the interface is Any: unchecked, as nn.Module left it, but named.
Network: TypeAlias = Any


DEFAULT_MODEL = "default"


def default_model_dir() -> Path | None:
    """$BINLAT_MODEL, else the bundle shipped in the repository (models/default), else None."""
    env = os.environ.get("BINLAT_MODEL")
    if env:
        return Path(env)
    shipped = Path(__file__).resolve().parents[2] / "models" / DEFAULT_MODEL
    return shipped if (shipped / "model_index.json").is_file() else None


def named_model_dir(name_or_path: str | Path) -> Path | None:
    """The shipped model by name: "default" is its bundle and "default/tokenizer" (diffusion, ar) one of its models,
    wherever binlat runs from. None for any other name, or where a local directory has that name (it wins)."""
    text = str(name_or_path).strip().rstrip("/")
    if not (text == DEFAULT_MODEL or text.startswith(DEFAULT_MODEL + "/")) or Path(text).is_dir():
        return None
    root = default_model_dir()
    if root is None:
        raise FileNotFoundError(
            f"{text}: the shipped model '{DEFAULT_MODEL}' is not in this installation (it lives "
            f"in a clone's models/default); set BINLAT_MODEL=DIR to a bundle, or pass a model "
            f"directory"
        )
    return root / text[len(DEFAULT_MODEL) :].lstrip("/")


def looks_like_hub_id(name: str | Path, *, bare_name: bool = False) -> bool:
    """Whether `name` is meant as a Hugging Face Hub repo id rather than a local path: "owner/name", or also a bare
    "name" with `bare_name` (the older ids, such as "gpt2", that transformers still takes for a text encoder; a
    binlat model is always owner/name). Not an id: an empty name, and a path: what is absolute, starts with "."
    or "~", has a second "/" (or the platform's own separator), or names something on disk. Asked before a
    download, so a mistyped path is refused as a missing file instead of being fetched."""
    text = str(name)
    if not text or os.path.isabs(text) or text.startswith(("/", ".", "~")) or (os.sep != "/" and os.sep in text):
        return False
    slashes = text.count("/")
    return (slashes == 1 or (bare_name and slashes == 0)) and not Path(text).exists()


OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_REACHABLE: dict[str, tuple[float, str | None]] = {}  # host:port -> (when checked, why unreachable or None)


def hub_offline_reason(timeout: float = 2.0) -> str | None:
    """Why the Hub cannot be asked now, or None: HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE set, or no TCP connection to
    the Hub's host within `timeout` seconds (remembered for a minute). huggingface_hub itself would retry a dead
    network for most of a minute before giving up; this answers at once."""
    for var in OFFLINE_ENV:
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return f"{var} is set"
    import socket
    import time
    from urllib.parse import urlsplit

    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    key = f"{host}:{port}"
    when, why = _REACHABLE.get(key, (0.0, None))
    if time.monotonic() - when > 60:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            why = None
        except OSError as e:
            why = f"{host} is unreachable ({e.strerror or type(e).__name__})"
        _REACHABLE[key] = (time.monotonic(), why)
    return why


def hub_download_advice(repo: str) -> str:
    return (
        f"download it with huggingface-cli download {repo} --local-dir DIR (hf download with huggingface_hub "
        f">= 1.0), then pass DIR"
    )


def hub_snapshot(repo: str, allow_patterns: list[str], **hub_kwargs: Any) -> Path:
    """The local snapshot of Hub repo `repo`: from the cache when it is there; otherwise fetched once, unless the
    Hub cannot be asked (offline, no network): then a one-line FileNotFoundError at once, naming the command that
    fixes it."""
    from huggingface_hub import snapshot_download

    kwargs = {k: v for k, v in hub_kwargs.items() if k != "local_files_only"}
    try:
        return Path(snapshot_download(repo, allow_patterns=allow_patterns, local_files_only=True, **kwargs))
    except Exception:  # noqa: BLE001 - not cached (or cached only in part): ask the Hub, if it can be asked
        pass
    why = "offline" if hub_kwargs.get("local_files_only") else hub_offline_reason()
    if why is not None:
        raise FileNotFoundError(
            f"{repo}: not a local directory, and not in the Hugging Face cache while the Hub "
            f"cannot be reached ({why}): {hub_download_advice(repo)}"
        )
    try:
        return Path(snapshot_download(repo, allow_patterns=allow_patterns, **kwargs))
    except Exception as e:  # noqa: BLE001 - not found, refused, network: all end in the same advice
        raise FileNotFoundError(
            f"{repo}: not a local directory, and the Hub copy could not be fetched "
            f"({type(e).__name__}): {hub_download_advice(repo)}"
        ) from None


def resolve_model_dir(name_or_path: str | Path, **hub_kwargs: Any) -> Path:
    """A local directory as is; "default[/part]" as the shipped model; anything else is treated as a Hub repo id
    and fetched (or read from cache)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    named = named_model_dir(name_or_path)
    if named is not None:
        if not named.is_dir():
            raise FileNotFoundError(f"{name_or_path}: the shipped model {named.parent} has no {named.name}")
        return named
    if not looks_like_hub_id(name_or_path):
        raise FileNotFoundError(f"{name_or_path}: no such model directory")
    return hub_snapshot(str(name_or_path), ["*.json", "*.safetensors"], **hub_kwargs)


class ModelMixin:
    """Adds strict `save_pretrained` / `from_pretrained` to an nn.Module whose __init__ takes a dataclass config.

    Unlike huggingface_hub's mixin, on purpose: unknown config keys and missing/unexpected/mis-shaped weights are
    errors (never silently ignored), loading never unpickles, and saving is atomic."""

    config_class: ClassVar[type]
    config: Any
    gradient_checkpointing: bool = False

    if TYPE_CHECKING:  # what the nn.Module subclasses' constructors take (the mixin itself has no __init__)

        def __init__(self, config: Any) -> None: ...

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute block activations in the backward pass (less memory, ~30% more compute)."""
        module: Any  # those with the flag: the blocks
        for module in cast(torch.nn.Module, self).modules():  # the mixin's classes are nn.Modules
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = enabled

    def save_pretrained(
        self, save_directory: str | Path, *, dtype: torch.dtype | None = None, files: dict[str, bytes] | None = None
    ) -> Path:
        """`dtype` (e.g. torch.float16) stores floating-point weights in that precision to halve the files;
        `from_pretrained` loads them back into the model's float32 parameters. `files` (name -> bytes) are written
        beside them in the same atomic write (e.g. binlat.card's provenance.json)."""
        save_directory = Path(save_directory)
        state = cast(torch.nn.Module, self).state_dict()
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        with atomic_directory(save_directory) as tmp:
            (tmp / CONFIG_NAME).write_text(json.dumps(config_to_dict(self.config), indent=2) + "\n")
            save_safetensors(state, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
            for name, data in (files or {}).items():
                (tmp / name).write_bytes(data)
        return save_directory

    @classmethod
    def read_config(cls, pretrained_model_name_or_path: str | Path, **hub_kwargs: Any) -> Any:
        """A model directory's config alone (no weights read), with from_pretrained's errors."""
        return cls._config_in(resolve_model_dir(pretrained_model_name_or_path, **hub_kwargs))

    @classmethod
    def _config_in(cls, directory: Path) -> Any:
        config_path = directory / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"{directory}: missing {CONFIG_NAME}; is this a {cls.__name__} directory?")
        try:
            data = jsondepth.loads(read_bounded(config_path, what="config").decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{config_path}: not valid JSON ({e})") from None
        except jsondepth.JSONNestingError as e:
            raise ConfigError(f"{config_path}: {e}") from None
        return config_from_dict(cls.config_class, data, source=str(config_path))

    @classmethod
    def from_pretrained(
        cls: type[M],
        pretrained_model_name_or_path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        allow_nonfinite: bool = False,
        **hub_kwargs: Any,
    ) -> M:
        """Weights stored as anything but float32/float16/bfloat16, or holding NaN or infinite values, are a
        WeightsError naming the tensor; `allow_nonfinite=True` loads non-finite values anyway."""
        directory = resolve_model_dir(pretrained_model_name_or_path, **hub_kwargs)
        config = cls._config_in(directory)
        from .budget import check_network

        check_network(cls, config, str(directory), dtype)  # a config of a million blocks is refused, not built
        # Built on the meta device and handed the file's tensors, which safetensors memory-maps, rather than
        # allocating and initialising parameters only to overwrite them: a model costs its weights once, not twice.
        with torch.device("meta"):
            model = cls(config)
        module = cast(torch.nn.Module, model)  # the same object, typed as the nn.Module it also is
        state = load_safetensors(directory / WEIGHTS_NAME)
        check_state_dict(module, state, str(directory / WEIGHTS_NAME), allow_nonfinite=allow_nonfinite)
        expected = module.state_dict()
        # A tensor already in the wanted dtype stays the mapped one; float16 files are widened as before.
        state = {
            k: v.to(dtype if dtype is not None and v.is_floating_point() else expected[k].dtype)
            for k, v in state.items()
        }
        module.load_state_dict(state, strict=True, assign=True)
        module.to(device=device)
        module.eval()
        return model
