"""The fleet simulator: simulated devices run by real agent processes, for demos and tests.

:mod:`skylift.fleet.devices` lays out devices with file slots and the ``file``
bootloader, and starts and stops one ``skylift agent run`` process per device.
"""
