"""ray-updown."""
