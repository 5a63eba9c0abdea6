"""What etrnd tells: logs (console, JSON, journal), systemd notify, `etrnd status`."""
