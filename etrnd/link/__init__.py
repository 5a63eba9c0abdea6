"""The WAN link from rtnetlink: events, the pure link state, debounce, the watcher, egress."""
