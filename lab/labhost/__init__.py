"""Host side of the real-kernel lab: build the cached VM images, boot QEMU, report results.

Only the Python standard library is used, so the driver runs with any Python >= 3.11.
"""
