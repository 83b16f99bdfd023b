"""vlm-functions shared library: everything below the two Functions entry points.

Nothing in this package imports azure.functions; the entry points translate.
"""
