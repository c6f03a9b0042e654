"""Shared components of the explanation-guided MONAI bundle collection.

Bundles reference these classes and functions by ``_target_`` in their JSON configs.
"""

__version__ = "0.1.0"
