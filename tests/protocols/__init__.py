"""Tests of etrnd's protocols part."""
