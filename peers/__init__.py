"""zbroker peers: heartbeats, the bully election, delta streaming and catch-up between nodes."""
