"""The controller: action chunks in, limited joint targets out at the control rate."""
