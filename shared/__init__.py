"""vlm-functions shared library: everything below the Functions entry points.

The entry points are the function folders at the repository root (analyze_http, openapi_http,
blob_trigger, poison_blobs); they get the worker's application object from `shared.app.get_app`.
Nothing in this package imports azure.functions; the entry points translate.
"""
