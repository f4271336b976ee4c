"""Plug-ins for other tools. Each imports explainprune, never the reverse: ``import explainprune`` does not
import anything here, and a missing tool (e.g. lmms-eval) only matters when its plug-in is used."""
