"""vlm-functions shared library: everything below the Functions entry points.

The entry points are the function folders at the repository root (every folder with a
function.json: HTTP, blob, queue and timer triggers); they get the worker's application object
from `shared.app.get_app`. Nothing in this package imports azure.functions; the entry points
translate.
"""
