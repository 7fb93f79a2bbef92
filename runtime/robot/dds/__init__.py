"""The G1 over DDS: wire types, the LowCmd CRC, the link, the driver and a simulated G1 on the same topics.

Importing this package needs nothing beyond numpy; the modules that talk DDS import ``cyclonedds`` (0.10.2, installed
by tools/install_dds.sh) themselves.
"""
