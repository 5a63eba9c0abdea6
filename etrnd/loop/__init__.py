"""The event loop never blocks: blocking calls off the loop, and a stall detector."""
