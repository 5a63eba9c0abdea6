"""Tests of etrnd's service part."""
