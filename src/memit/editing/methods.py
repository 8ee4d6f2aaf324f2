"""Importing this module registers every editing method."""
from memit.editing.alphaedit.main import AlphaEditEditor
from memit.editing.ft.main import FTEditor, FTLEditor
from memit.editing.memit.main import MEMITEditor
from memit.editing.mend.main import MENDEditor
from memit.editing.rome.main import ROMEEditor

__all__ = ["AlphaEditEditor", "FTEditor", "FTLEditor", "MEMITEditor", "MENDEditor", "ROMEEditor"]
