"""Saved vqgpt model folders: what they hold, model cards, and Hub uploads (tokenizer, prior, classifier)."""

from __future__ import annotations

import json
import os
import re

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, ModelCardData, PyTorchModelHubMixin, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError
from safetensors import safe_open
from safetensors.torch import save_file

from common.cli import UserError

# What a saved model folder consists of; checkpoints, images and logs stay local.
MODEL_FILES = ["config.json", "model.safetensors", "generation_config.json", "README.md"]


# The kinds of model folder and the command that writes each.
KINDS = {"tokenizer": "train.tokenizer", "prior": "train.prior", "classifier": "train.classifier"}


def model_kind(config: dict) -> str | None:
    """Which vqgpt model a ``config.json`` describes, from the keys each kind writes; None if none."""
    if "vqgpt" in config and "model_type" in config:
        return "prior"
    if "num_codes" in config and "code_dim" in config:
        return "tokenizer"
    if "num_classes" in config and "width" in config:
        return "classifier"
    return None


def resolve_model(ref: str, kind: str) -> str:
    """A local folder or Hub id of a vqgpt ``kind`` -> a local folder whose config and weights are checked.

    Every way of naming the wrong thing is one line: no such folder, a Hub id that cannot be reached
    (offline), a folder with no model, a model of another kind, a corrupt ``config.json``, a missing,
    truncated or corrupt ``model.safetensors``.
    """
    ref, expected = str(ref), f"expected a {kind} folder written by {KINDS[kind]}, or its Hub id"
    if os.path.isfile(ref):
        raise UserError(f"{ref} is a file; {expected}")
    folder = ref
    if not os.path.isdir(ref):
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", ref) or ref.startswith((".", "/")):
            raise UserError(f"{ref}: no such folder (and not a Hub id of the form user/name); {expected}")
        try:
            folder = snapshot_download(ref, allow_patterns=MODEL_FILES)
        except (OfflineModeIsEnabled, LocalEntryNotFoundError):
            raise UserError(f"{ref} is not a local folder and the Hub cannot be reached (offline, and not in the cache); {expected}") from None  # fmt: skip
        except RepositoryNotFoundError:
            raise UserError(f"{ref}: no such folder, and no such model on the Hub; {expected}") from None
        except HfHubHTTPError as e:
            raise UserError(f"{ref}: the Hub answered {type(e).__name__}: {str(e).splitlines()[0]}") from None
    config_path = os.path.join(folder, "config.json")
    if not os.path.exists(config_path):
        raise UserError(f"{ref} holds no model (no config.json); {expected}")
    try:
        with open(config_path) as f:
            config = json.load(f)
        assert isinstance(config, dict)
    except (ValueError, AssertionError, UnicodeDecodeError) as e:
        raise UserError(f"{config_path} is corrupt ({type(e).__name__}); the folder holds no loadable model") from None
    found = model_kind(config)
    if found != kind:
        what = f"a {found} (written by {KINDS[found]})" if found else "a model that is not vqgpt's"
        raise UserError(f"{ref} holds {what}, not a {kind}; {expected}")
    weights = os.path.join(folder, "model.safetensors")
    if not os.path.exists(weights):
        raise UserError(f"{ref} has a config.json but no model.safetensors; the {kind} was not saved whole")
    try:
        with safe_open(weights, "pt") as f:  # reads the header and checks it against the file's length
            f.keys()
    except Exception as e:  # safetensors raises its own error types for a bad header or a short file
        raise UserError(f"{weights} is truncated or corrupt ({str(e).splitlines()[0][:80]})") from None
    return folder


def write_model_card(directory: str, *, title: str, summary: str, metrics: dict[str, float], dataset: str | None,
                     details: dict[str, object], tags: list[str], usage: str) -> None:  # fmt: skip
    """README.md with YAML metadata and the measured metrics, in ``directory``."""
    data = ModelCardData(library_name="vqgpt", tags=["vqgpt", *tags], datasets=[dataset] if dataset and "/" in dataset else None)  # fmt: skip
    metric_rows = "\n".join(f"| {k} | {v:.4g} |" for k, v in metrics.items())
    detail_rows = "\n".join(f"| {k} | {v} |" for k, v in details.items())
    content = f"""---
{data.to_yaml()}
---

# {title}

{summary}

## Evaluation

Measured on the held-out split at the end of training.

| metric | value |
|---|---|
{metric_rows}

## Training

| setting | value |
|---|---|
{detail_rows}

## Usage

```python
{usage.strip()}
```
"""
    ModelCard(content).save(os.path.join(directory, "README.md"))


def push_folder(folder: str, repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    """Upload the model files of ``folder`` (config, weights, card) to ``repo_id``; returns the commit URL."""
    present = [f for f in MODEL_FILES if os.path.exists(os.path.join(folder, f))]
    if "config.json" not in present or "model.safetensors" not in present:
        raise FileNotFoundError(f"{folder} has no saved model (config.json and model.safetensors); train it first")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    # One commit with exactly the model files: checkpoints, images and logs stay local.
    operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=os.path.join(folder, f)) for f in present]
    info = api.create_commit(repo_id, operations=operations, commit_message="Upload vqgpt model")
    return str(getattr(info, "commit_url", info))


class HubMixin(PyTorchModelHubMixin):
    """``PyTorchModelHubMixin`` as vqgpt's own models (tokenizer, classifier) use it.

    Saving takes an optional ``state_dict`` (the full weights gathered from FSDP shards, as in
    ``transformers``' ``save_pretrained``); loading is strict: a missing or extra weight is an error
    naming the folder (the mixin's default is ``strict=False``, which loads half a model silently).
    Before anything is read, :func:`resolve_model` checks that the folder holds a model of this kind.
    """

    model_kind: str  # a key of KINDS, set by each model class

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        return super().from_pretrained(resolve_model(pretrained_model_name_or_path, cls.model_kind), **kwargs)

    def save_pretrained(self, save_directory, *, state_dict: dict | None = None, **kwargs):
        self._state_dict_to_save = state_dict
        try:
            return super().save_pretrained(save_directory, **kwargs)
        finally:
            self._state_dict_to_save = None

    def _save_pretrained(self, save_directory) -> None:
        state = getattr(self, "_state_dict_to_save", None)
        state = self.state_dict() if state is None else state
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, os.path.join(save_directory, "model.safetensors"))

    @classmethod
    def _from_pretrained(cls, *, model_id, strict=True, **kwargs):
        try:
            return super()._from_pretrained(model_id=model_id, strict=strict, **kwargs)
        except RuntimeError as e:  # missing or unexpected weights
            detail = " ".join(line.strip() for line in str(e).splitlines())
            raise ValueError(f"weights in {model_id} do not match its config: {detail}") from None
