"""medusa-forge: train, measure and ship Medusa heads for any Hugging Face causal LM."""

from medusa_forge.errors import UserError
from medusa_forge.heads import MedusaConfig, MedusaHeads, MedusaModel

__all__ = ["MedusaConfig", "MedusaHeads", "MedusaModel", "UserError"]
__version__ = "0.1.0"
