"""Tests that prove the deployments: systemd, the image, packaging, install, the README."""
