"""Alignment on adapters: DPO and GRPO losses, completion log-probabilities, and the reference
policy for free (the same model with its adapters switched off)."""

from .dpo import DPOOutput, dpo_loss
from .grpo import GRPOOutput, group_advantages, grpo_loss
from .logprobs import SequenceLogprobs, reference_logprobs, sequence_logprobs
from .modules import DPOModule, GRPOModule, PreferenceCollator, disable_dropout

__all__ = ["DPOModule", "DPOOutput", "GRPOModule", "GRPOOutput", "PreferenceCollator", "SequenceLogprobs",
           "disable_dropout", "dpo_loss", "group_advantages", "grpo_loss", "reference_logprobs", "sequence_logprobs"]
