"""fedshield: privacy-preserving federated fine-tuning (Flower + Opacus + transformers).

The rooms of the product live at the repository root (server/, client/, strategies/,
privacy/, simulations/, conf/, task/, deploy/, protocol.py, as the product card lays them
out); in the source tree fedshield/<room> is a link to each, and the wheel holds them as
fedshield.<room>. Everything imports as `fedshield.<room>`.
"""

from __future__ import annotations

# First, before anything imports Flower, Ray or transformers: nothing phones home
# (deploy/offline.py). Every `import fedshield.…` passes through here.
from fedshield.deploy import offline as _offline  # noqa: F401

__version__ = "0.2.0"
