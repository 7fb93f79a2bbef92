"""The robot side: the G1 joint table and the drivers the controller writes to."""
