"""The daemon: link decisions to rounds, retries, the control socket, the office MTA gate."""
