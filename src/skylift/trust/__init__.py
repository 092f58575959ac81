"""The trust core: keys, signatures, and TUF repositories built with python-tuf.

Pure: functions take and return bytes and objects; the clock is a parameter.
"""
