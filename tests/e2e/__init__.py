"""End-to-end: the generated user-data on a real systemd (``make e2e``).

- ``rootfs``: the Debian bookworm image (debootstrap + apt, cached by recipe) and the
  per-boot overlay;
- ``nspawn``: boot it with systemd-nspawn under ``script``, run commands with nsenter;
- ``devices``: the udev stand-in that makes attached volumes appear in the container;
- ``archive_server``: the agent archive over http on 127.0.0.1 (user-data's url mode);
- ``machine``: all of it for one sandbox instance.

Choices: the container shares the host's network (IMDS and EC2 are on 127.0.0.1); the
agent's config root is "/" as in production, and the relay mirrors the block plane's
links and loop nodes into the container's /dev; the instance "profile" is a unit drop-in
in the image with the sandbox's dummy keys; the only per-instance difference in the
user-data is the IMDS URL (one IMDS server per instance, all on loopback).
"""
