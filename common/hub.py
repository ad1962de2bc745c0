"""Model cards and Hub uploads for saved vqgpt folders (tokenizer or prior)."""

from __future__ import annotations

import os

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, ModelCardData, PyTorchModelHubMixin
from safetensors.torch import save_file

# What a saved model folder consists of; checkpoints, images and logs stay local.
MODEL_FILES = ["config.json", "model.safetensors", "generation_config.json", "README.md"]


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
    """

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
