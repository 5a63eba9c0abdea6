"""Tests of etrnd's link part."""
