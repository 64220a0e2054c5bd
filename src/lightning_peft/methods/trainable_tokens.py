r"""Trainable tokens (``LoraConfig(trainable_token_indices=...)``): a few rows of an embedding train,
the rest stays frozen; new special tokens or a chat template's markers, without training (or
saving) the whole embedding.

For an embedding ``E: [num, dim]`` and token indices ``t_1..t_n`` the adapter holds the rows'
values ``V: [n, dim]`` (initialised to ``E[t_i]``) and the forward uses ``E`` with row ``t_i``
replaced by ``V_i``. Only the looked-up rows are replaced (no copy of ``E`` per forward). An output
head tied to the embedding (same weight tensor, GPT-2 / Gemma) gets a layer sharing ``V``, so its
logits for those tokens change with it, as in PEFT. Merging writes ``V`` into ``E``; unmerging
writes the original rows back. File key (PEFT's): ``<embedding path>.token_adapter.trainable_tokens_delta``
(``[n, dim]``; the name says delta, the tensor holds the rows' values).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterModule


class TrainableTokensLayer(AdapterModule):
    """An ``nn.Embedding`` (or the ``nn.Linear`` head tied to it, with ``tied_to``) whose rows
    ``token_indices[name]`` come from the adapter's values."""

    method = "trainable_tokens"
    adapter_stores = ("trainable_tokens_delta", "trainable_tokens_original", "token_indices")

    def __init__(self, base_layer: nn.Module, tied_to: "TrainableTokensLayer | None" = None) -> None:
        super().__init__()
        if not isinstance(base_layer, (nn.Embedding, nn.Linear)):
            raise ValueError(f"trainable_token_indices names {type(base_layer).__name__}; it trains rows of an "
                             f"nn.Embedding. Name the embedding module (e.g. {{'embed_tokens': [...]}}).")
        self.base_layer = base_layer
        # a tied head reads the embedding layer's tensors, owns none (nothing of it is saved)
        self._tied = [tied_to] if tied_to is not None else []
        if tied_to is None:
            self.trainable_tokens_delta = nn.ParameterDict()
            self.trainable_tokens_original: dict[str, torch.Tensor] = {}
            self.token_indices: dict[str, list[int]] = {}

    @property
    def owner(self) -> "TrainableTokensLayer":
        return self._tied[0] if self._tied else self

    # ------------------------------------------------------------------------------ adapters
    def adapter_names(self) -> list[str]:
        return list(self.owner.token_indices)

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        if self._tied:
            return {}
        return {"token_adapter.trainable_tokens_delta": self.trainable_tokens_delta[name]}

    def trainable_tensors(self, name: str) -> list[torch.Tensor]:
        return [] if self._tied else [self.trainable_tokens_delta[name]]

    def remove_adapter(self, name: str) -> None:
        if self._tied:
            if self.active_adapter == name:
                self.active_adapter = None
            return
        for store in (self.trainable_tokens_delta, self.trainable_tokens_original, self.token_indices):
            store.pop(name, None)
        if self.active_adapter == name:
            self.active_adapter = None

    def add_adapter(self, name: str, token_indices: list[int], init_weights: bool = True) -> None:
        """Train rows ``token_indices`` for adapter ``name``: their current values (or random ones
        with ``init_weights=False``, for tests)."""
        if name in self.token_indices:
            raise ValueError(f"adapter {name!r} already has trainable tokens on this embedding; choose another name.")
        weight = self.base_layer.weight
        bad = [i for i in token_indices if not 0 <= i < weight.shape[0]]
        if bad:
            raise ValueError(f"trainable_token_indices {bad[:5]} are outside this embedding's {weight.shape[0]} rows; "
                             f"resize the embeddings first (transformers: model.resize_token_embeddings(n)).")
        original = weight.detach()[list(token_indices)].clone()
        values = original.clone() if init_weights else torch.randn_like(original)
        self.trainable_tokens_delta[name] = nn.Parameter(values)
        self.trainable_tokens_original[name] = original
        self.token_indices[name] = list(token_indices)

    # ------------------------------------------------------------------------------- weights
    def merged_weight(self, name: str) -> torch.Tensor:
        """The embedding weight with the adapter's rows written in (a new tensor)."""
        owner = self.owner
        index = torch.tensor(owner.token_indices[name], device=self.base_layer.weight.device)
        values = owner.trainable_tokens_delta[name].to(self.base_layer.weight.dtype)
        return self.base_layer.weight.index_copy(0, index, values)

    mergeable = True

    def merge(self, name: str, allow_lossy: bool = False) -> None:
        if not self._tied:  # the tied head shares the embedding's weight: written once, here
            with torch.no_grad():
                self.base_layer.weight.copy_(self.merged_weight(name))
        self.merged.append(name)

    def unmerge(self, name: str) -> None:
        if not self._tied:
            index = torch.tensor(self.token_indices[name], device=self.base_layer.weight.device)
            with torch.no_grad():
                self.base_layer.weight.index_copy_(0, index, self.trainable_tokens_original[name].to(
                    self.base_layer.weight))
        self.merged.remove(name)

    def merged_state(self, name: str | None, base_state) -> dict[str, torch.Tensor]:
        state = base_state(self.base_layer)  # the embedding (or tied head) with the trained rows
        if name in self.adapter_names() and name not in self.merged:
            state["weight"] = self.merged_weight(name)
        return state

    # ------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self.active_adapter
        owner = self.owner
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled or name not in owner.token_indices or name in self.merged:
            return result
        values = owner.trainable_tokens_delta[name]
        index = torch.tensor(owner.token_indices[name], device=x.device)
        if isinstance(self.base_layer, nn.Linear):  # a tied head: the logits of the trained rows
            rows = F.linear(x, values.to(x.dtype))
            if self.base_layer.bias is not None:
                rows = rows + self.base_layer.bias[index]
            return result.index_copy(-1, index, rows.to(result.dtype))
        hit = x.unsqueeze(-1) == index                       # [..., n]: which trained row each token is
        rows = hit.to(values.dtype) @ values                 # [..., dim]
        scale = getattr(self.base_layer, "embed_scale", None)  # Gemma-style scaled embeddings
        if scale is not None:
            rows = rows * scale.to(rows.dtype) if torch.is_tensor(scale) else rows * scale
        return torch.where(hit.any(-1, keepdim=True), rows.to(result.dtype), result)
