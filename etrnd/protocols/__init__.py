"""The relay protocols behind one seam (seam.py), picked in choose.py: ETRN and ODMR."""
