"""Importing this module registers every editing method."""
from memit.editing.memit.main import MEMITEditor

__all__ = ["MEMITEditor"]
