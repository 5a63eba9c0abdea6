"""Tests of etrnd's config part."""
