"""medusa-forge: train, measure and ship Medusa heads for any Hugging Face causal LM."""

from medusa_forge.drafts.medusa_heads import MedusaConfig, MedusaHeads, MedusaModel
from medusa_forge.errors import UserError

__all__ = ["MedusaConfig", "MedusaHeads", "MedusaModel", "UserError"]
__version__ = "0.1.0"
