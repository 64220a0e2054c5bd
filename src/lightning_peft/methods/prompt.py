r"""Prompt tuning (Lester et al. 2021) and prefix tuning (Li & Liang 2021) for transformers models.

Both are *model-level*: nothing in the model is wrapped. One :class:`PromptLearning` module hangs
off the model as ``model.lp_prompt`` (so ``.to()``, optimizers and state dicts see its tensors)
and a forward pre-hook on the model rewrites the call's keyword arguments:

    prompt tuning   inputs_embeds  <- [P; E(input_ids)]           P: [T, dim]
                    attention_mask <- [1...1; mask],  labels <- [-100...-100; labels]
                    position_ids   <- [0..T-1; position_ids + T]
                    (a causal LM's logits then include the T virtual positions, as in HF PEFT)
    prefix tuning   cache          <- per layer l: keys K_l, values V_l,   [batch, heads, T, head_dim]
                    attention_mask <- [1...1; mask],  position_ids <- position_ids + T
                    with P: [T, layers * 2 * heads * head_dim] = [K_0 V_0 K_1 V_1 ...] per token
                    (PEFT's layout), optionally P = MLP(E) while training (``projection``)

Without ``position_ids`` they come from the extended attention mask (``cumsum - 1``), so a
left-padded row gets the positions it has alone. Once the model's cache already holds the
virtual tokens (generation after the first step) only the attention mask is extended and the
positions shifted. The base model's tensors are never touched; disabling the
adapters (or activating a non-prompt one) makes the hook a no-op. File key, as in PEFT:
``prompt_embeddings`` (``[T, dim]``, or the prefix ``P``; the MLP is never saved).
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass

import torch
from torch import nn

from .base import AdapterModule

ATTR = "lp_prompt"  # where the module hangs off the model


@dataclass(frozen=True)
class PrefixShape:
    tokens: int
    layers: int
    heads: int
    head_dim: int

    @property
    def width(self) -> int:
        """Columns of ``P``: keys and values of every layer."""
        return self.layers * 2 * self.heads * self.head_dim


def prefix_geometry(model_config) -> tuple[int, int, int]:
    """``(num_layers, token_dim, num_attention_heads)`` of a transformers config, PEFT's rule:
    with grouped-query attention the prefix has the key/value heads, ``token_dim = head_dim * kv heads``."""
    get = lambda *names: next((getattr(model_config, n) for n in names if getattr(model_config, n, None)), None)  # noqa: E731
    layers, dim, heads = get("num_hidden_layers", "n_layer", "num_layers"), get("hidden_size", "n_embd", "d_model"), \
        get("num_attention_heads", "n_head", "num_heads")
    if None in (layers, dim, heads):
        raise ValueError("cannot read num_layers / hidden size / attention heads from the model's config; pass "
                         "token_dim, num_layers and num_attention_heads to PrefixTuningConfig.")
    kv_heads = get("num_key_value_heads")
    if kv_heads is not None:
        head_dim = get("head_dim") or dim // heads
        return layers, head_dim * kv_heads, kv_heads
    return layers, dim, heads


def _dynamic_cache():
    """transformers' ``DynamicCache`` (transformers is loaded: the model comes from it)."""
    module = sys.modules.get("transformers")
    if module is None:
        raise RuntimeError("prefix tuning passes its keys and values as a transformers Cache; the model is not a "
                           "transformers model (transformers is not loaded). Use prompt tuning or LoRA instead.")
    return module.DynamicCache


class PromptLearning(AdapterModule):
    """Named prompt-tuning and prefix-tuning adapters of one model, applied by a forward pre-hook."""

    method = "prompt"
    wrapped_attr = None
    model_level = True
    unmergeable_reason = "prompt and prefix tuning add virtual tokens"
    adapter_stores = ("prompt_embeddings", "prefix_embeddings", "prefix_mlp", "prefix_shapes")

    def __init__(self) -> None:
        super().__init__()
        self.prompt_embeddings = nn.ParameterDict()  # prompt tuning: P [T, dim]
        self.prefix_embeddings = nn.ParameterDict()  # prefix: P [T, width], or E [T, token_dim] with an MLP
        self.prefix_mlp = nn.ModuleDict()
        self.prefix_shapes: dict[str, PrefixShape] = {}
        self._hook = None

    # ------------------------------------------------------------------------------ adapters
    def adapter_names(self) -> list[str]:
        return list(self.prompt_embeddings) + list(self.prefix_shapes)

    def method_name(self, name: str) -> str:
        return "prefix" if name in self.prefix_shapes else "prompt"

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        if name in self.prompt_embeddings:
            return {"prompt_embeddings": self.prompt_embeddings[name]}
        if name in self.prefix_mlp:  # the file holds the prefix the MLP computes (PEFT drops the MLP)
            with torch.no_grad():
                return {"prompt_embeddings": self.prefix(name)}
        return {"prompt_embeddings": self.prefix_embeddings[name]}

    def trainable_tensors(self, name: str) -> list[torch.Tensor]:
        if name in self.prefix_mlp:
            return [self.prefix_embeddings[name], *self.prefix_mlp[name].parameters()]
        return super().trainable_tensors(name)

    def add_prompt(self, name: str, init: torch.Tensor) -> None:
        """Prompt-tuning adapter ``name`` with virtual token embeddings ``init: [T, dim]`` (fp32)."""
        self._check_new(name)
        self.prompt_embeddings[name] = nn.Parameter(init.detach().to(torch.float32).clone())

    def add_prefix(self, name: str, shape: PrefixShape, device: torch.device, projection_width: int | None = None) -> None:
        """Prefix adapter ``name``: ``P ~ N(0, 1)`` (PEFT's embedding init), or with
        ``projection_width`` an embedding ``E ~ N(0, 1)`` and the MLP that maps it to ``P``."""
        self._check_new(name)
        token_dim = shape.heads * shape.head_dim
        columns = token_dim if projection_width else shape.width
        self.prefix_embeddings[name] = nn.Parameter(torch.randn(shape.tokens, columns, device=device))
        if projection_width:
            self.prefix_mlp[name] = nn.Sequential(nn.Linear(token_dim, projection_width), nn.Tanh(),
                                                  nn.Linear(projection_width, shape.width)).to(device)
        self.prefix_shapes[name] = shape

    def _check_new(self, name: str) -> None:
        if name in self.adapter_names():
            raise ValueError(f"adapter {name!r} already exists on this model; choose another adapter_name.")

    def prefix(self, name: str) -> torch.Tensor:
        """``P: [T, layers * 2 * heads * head_dim]`` of prefix adapter ``name``."""
        embeddings = self.prefix_embeddings[name]
        return self.prefix_mlp[name](embeddings) if name in self.prefix_mlp else embeddings

    # --------------------------------------------------------------------------------- hook
    def attach(self, model: nn.Module) -> None:
        """Register the forward pre-hook on ``model`` (the module this one hangs off)."""
        self._hook = model.register_forward_pre_hook(self._prepare_inputs, with_kwargs=True)

    def unwrapped(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        return None

    def _prepare_inputs(self, model: nn.Module, args: tuple, kwargs: dict):
        name = self.active_adapter
        if self.disabled or name not in self.adapter_names():
            return None
        names = _parameters(model)  # inspect.signature: once per call, not once per question
        kwargs = _as_keywords(model, names, args, kwargs)
        cache_key = "cache" if "cache" in names else "past_key_values"
        cache = kwargs.get(cache_key)
        filled = cache is not None and cache.get_seq_length() > 0  # virtual tokens already in the cache
        tokens = self.prefix_shapes[name].tokens if name in self.prefix_shapes else len(self.prompt_embeddings[name])
        mask = kwargs.get("attention_mask")
        if mask is not None:
            kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], tokens), mask], dim=1)
        prepended = name not in self.prefix_shapes and not filled
        if name in self.prefix_shapes:
            if not filled:
                kwargs[cache_key] = self._prefix_cache(model, name, kwargs, cache)
        elif prepended:
            self._prepend_prompt(model, name, kwargs)
        self._place_positions(names, kwargs, tokens, prepended)
        return (), kwargs

    @staticmethod
    def _place_positions(names: list[str], kwargs: dict, tokens: int, prepended: bool) -> None:
        """Positions with the ``tokens`` virtual tokens at ``0 .. tokens-1`` and the real ones after
        them, so that a left-padded row gets the positions it has alone.

        Given ``position_ids`` (generate passes them, counted over the real tokens) are shifted by
        ``tokens``, with ``0 .. tokens-1`` put in front where the prompt was just prepended. Without
        them, a model that takes ``position_ids`` gets them from the extended attention mask
        (``cumsum - 1``, as transformers' generate does): with no padding these equal the model's
        own default positions; with left padding the default would count the pads, which moves
        the real tokens away from the virtual ones (HF PEFT ignores ``position_ids`` under prompt
        tuning and leaves that shift)."""
        positions = kwargs.get("position_ids")
        if positions is not None:
            positions = positions + tokens
            if prepended:
                front = torch.arange(tokens, device=positions.device, dtype=positions.dtype)
                positions = torch.cat([front.expand(*positions.shape[:-1], tokens), positions], dim=-1)
            kwargs["position_ids"] = positions
            return
        mask = kwargs.get("attention_mask")
        if mask is None or "position_ids" not in names:
            return
        inputs = kwargs.get("inputs_embeds") if kwargs.get("inputs_embeds") is not None else kwargs.get("input_ids")
        span = inputs.shape[1]  # this call's positions: the last `span` columns of the extended mask
        positions = mask.long().cumsum(-1) - 1
        kwargs["position_ids"] = positions.masked_fill_(mask == 0, 1)[:, -span:]

    def _prepend_prompt(self, model: nn.Module, name: str, kwargs: dict) -> None:
        ids = kwargs.pop("input_ids", None)
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = model.get_input_embeddings()(ids)
        prompt = self.prompt_embeddings[name].to(embeds.dtype)
        kwargs["inputs_embeds"] = torch.cat([prompt.expand(embeds.shape[0], -1, -1), embeds], dim=1)
        labels = kwargs.get("labels")
        if labels is not None and labels.dim() == 2 and labels.shape[1] == embeds.shape[1]:  # per-token labels
            kwargs["labels"] = torch.cat([labels.new_full((labels.shape[0], len(prompt)), -100), labels], dim=1)

    def _prefix_cache(self, model: nn.Module, name: str, kwargs: dict, cache):
        shape = self.prefix_shapes[name]
        inputs = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        batch = inputs.shape[0]
        dtype = model.get_input_embeddings().weight.dtype
        # [T, 2L * heads * head_dim] -> [2L, heads, T, head_dim]: row 2l holds layer l's keys, 2l+1 its values
        kv = self.prefix(name).to(dtype).view(shape.tokens, 2 * shape.layers, shape.heads, shape.head_dim)
        kv = kv.permute(1, 2, 0, 3).unsqueeze(1).expand(-1, batch, -1, -1, -1)
        pairs = [(kv[2 * layer], kv[2 * layer + 1]) for layer in range(shape.layers)]
        if cache is None:
            return _dynamic_cache()(pairs)
        for layer, (key, value) in enumerate(pairs):  # an empty cache handed in (generate)
            cache.update(key, value, layer)
        return cache


def _parameters(model: nn.Module) -> list[str]:
    return list(inspect.signature(model.forward).parameters)


def _as_keywords(model: nn.Module, names: list[str], args: tuple, kwargs: dict) -> dict:
    """The call's arguments as keywords (``model(ids)`` -> ``input_ids=ids``); ``names``: the
    parameters of ``model.forward``."""
    if not args:
        return dict(kwargs)
    if len(args) > len(names):
        raise TypeError(f"{type(model).__name__}.forward got {len(args)} positional arguments; pass them by keyword.")
    return {**dict(zip(names, args)), **kwargs}


# ------------------------------------------------------------------------------------ injection
def _prompt_init(embedding: nn.Module, config, tokens: int) -> torch.Tensor:
    """``[T, dim]`` starting prompt: N(0, 1), embeddings of random vocabulary tokens, or of a
    text's tokens repeated / cut to ``T`` (PEFT's RANDOM, SAMPLE_VOCAB, TEXT)."""
    weight = embedding.weight
    if config.init == "random":
        return torch.randn(tokens, weight.shape[1], device=weight.device)
    if config.init == "vocab":
        ids = torch.randint(0, weight.shape[0], (tokens,), device=weight.device)
    else:
        if config.tokenizer is None:
            raise ValueError(f"PromptTuningConfig(init={config.init!r}) starts from a text: pass tokenizer=... (with "
                             f"encode(text) -> token ids), or use init='random' / 'vocab'.")
        ids = list(config.tokenizer.encode(config.init))
        ids = torch.tensor((ids * (tokens // max(len(ids), 1) + 1))[:tokens], device=weight.device)
    with torch.no_grad():
        return embedding(ids).float()


def inject_prompt_learning(model: nn.Module, config, name: str, loading: bool = False):
    """Add prompt- or prefix-tuning adapter ``name`` (by ``config``'s type) to ``model`` and return
    the config with the model's sizes filled in. ``loading``: the weights come from a file next,
    so skip the starting values (a text init needs no tokenizer) and the prefix MLP."""
    import dataclasses

    getter = getattr(model, "get_input_embeddings", None)
    embedding = getter() if callable(getter) else None
    if embedding is None or "inputs_embeds" not in _parameters(model):
        raise ValueError(f"{config.peft_type.lower()} needs a transformers-style model (get_input_embeddings() and a "
                         f"forward taking inputs_embeds); {type(model).__name__} is not one. Inject into the "
                         f"transformers model itself (e.g. inject_adapters(module.model, ...)).")
    module = model._modules.get(ATTR)
    if module is None:
        if hasattr(model, ATTR):
            raise ValueError(f"{type(model).__name__} already has an attribute {ATTR!r}; cannot attach prompt tuning.")
        module = PromptLearning()
        model.add_module(ATTR, module)
        module.attach(model)
    device = embedding.weight.device
    if config.peft_type == "PROMPT_TUNING":
        dim = embedding.weight.shape[1]
        if config.token_dim not in (None, dim):
            raise ValueError(f"token_dim={config.token_dim} but the model's embeddings are {dim} wide.")
        tokens = config.num_virtual_tokens
        init = torch.zeros(tokens, dim, device=device) if loading else _prompt_init(embedding, config, tokens)
        module.add_prompt(name, init)
        return dataclasses.replace(config, token_dim=dim)
    layers, token_dim, heads = (config.num_layers, config.token_dim, config.num_attention_heads)
    if None in (layers, token_dim, heads):
        found = prefix_geometry(getattr(model, "config", None))
        layers, token_dim, heads = layers or found[0], token_dim or found[1], heads or found[2]
    if token_dim % heads:
        raise ValueError(f"token_dim={token_dim} is not divisible by num_attention_heads={heads}.")
    shape = PrefixShape(config.num_virtual_tokens, layers, heads, token_dim // heads)
    width = (config.encoder_hidden_size or token_dim) if config.projection and not loading else None
    module.add_prefix(name, shape, device, width)
    return dataclasses.replace(config, num_layers=layers, token_dim=token_dim, num_attention_heads=heads,
                               encoder_hidden_size=config.encoder_hidden_size or token_dim)
